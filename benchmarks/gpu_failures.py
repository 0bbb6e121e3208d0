"""What a gpu_check.sh run left to do: the steps that failed or were cut short, as the shell
assignments that narrow benchmarks/gpu_check.sh to them (STEP_CASES, HEADLINE_OPS, CHECK_OPS, TESTS;
an empty one skips its step, an unset one runs it whole).

    python3 benchmarks/gpu_failures.py PREVIOUS_OUT_DIR
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

RESULT = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_left(report: dict | None, ops: tuple[str, ...], timed: bool) -> list[str]:
    """The ops of a check run to redo: all when it did not finish, else those it did not run, those
    with a failed correctness row and (``timed``) those with a dtype that has no speed row."""
    if report is None or not report["summary"]["finished"]:
        return list(ops)
    rows = report["results"]
    checked = {(r["op"], r["dtype"]) for r in rows if r["kind"] == "correctness"}
    redo = {r["op"] for r in rows if r["kind"] == "correctness" and not r["ok"]} | (set(ops) - {o for o, _ in checked})
    if timed:
        redo |= {o for o, _ in checked - {(r["op"], r["dtype"]) for r in rows if r["kind"] == "speed"}}
    return [op for op in ops if op in redo]


def _planned(log: Path, what: str) -> tuple[list[str], list[str]] | None:
    """(what a step's log says it was to run on its "# WHAT:" line, the log's lines); None when the
    step never started."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].split() for line in lines if line.startswith(f"# {what}:")), []), lines


def _tests_left(log: Path) -> list[str] | None:
    """Failed tests by node id, and the files of the run that the log has no result for (cut short)."""
    planned = _planned(log, "tests")
    if planned is None:
        return None
    files, lines = planned
    results = [m.groups() for m in map(RESULT.match, lines) if m]
    seen = {node.split("::")[0] for node, _ in results}
    return [node for node, outcome in results if outcome in ("FAILED", "ERROR")] + [f for f in files if f not in seen]


def left_to_do(prev: Path, ops: tuple[str, ...]) -> dict[str, str | None]:
    """gpu_check.sh's narrowing variables (None: leave it unset, i.e. run the whole step)."""
    planned, done = _planned(prev / "step.log", "step cases"), _json(prev / "step.json") or {}
    tests = _tests_left(prev / "pytest.log")
    return {
        "STEP_CASES": None if planned is None else ",".join(c for c in planned[0] if c not in done),
        "HEADLINE_OPS": ",".join(_check_left(_json(prev / "headline.json"), ops, timed=True)),
        "CHECK_OPS": ",".join(_check_left(_json(prev / "check.json"), ops, timed=False)),
        "TESTS": None if tests is None else " ".join(tests),
    }


def main() -> int:
    from madfast.check import OP_NAMES

    for name, value in left_to_do(Path(sys.argv[1]), OP_NAMES).items():
        print(f"unset {name}" if value is None else f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
