"""`madfast bench`'s report: a markdown table and a PNG chart of speed-ups vs the eager baseline,
from a pytest-benchmark JSON written with benchmarks/conftest.py (provider/baseline per row)."""

from __future__ import annotations

import json

from madfast._extras import require

__all__ = ["write_report"]


def write_report(json_path: str, md_path: str, png_path: str) -> None:
    with open(json_path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        rows.append({"group": b.get("group") or b["name"], "provider": info.get("provider", b["name"]),
                     "baseline": info.get("baseline", ""), "mean_ms": b["stats"]["mean"] * 1e3,
                     "speedup": info.get("speedup_vs_baseline")})
    rows.sort(key=lambda r: (r["group"], r["mean_ms"]))
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('gpu') or machine.get('cpu', {}).get('brand_raw', 'cpu')}, "
             f"torch {machine.get('torch')}, {machine.get('cpu_threads')} CPU threads", "",
             "| group | provider | mean ms | speed-up vs baseline |", "|---|---|---:|---:|"]
    for r in rows:
        s = f"{r['speedup']:.2f}× ({r['baseline']})" if r["speedup"] is not None else "–"
        lines.append(f"| {r['group']} | {r['provider']} | {r['mean_ms']:.3f} | {s} |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")

    shown = [r for r in rows if r["speedup"] is not None]
    fig = require("matplotlib.figure", "the benchmark chart").Figure(figsize=(max(6, 0.5 * len(shown) + 2), 4))
    ax = fig.subplots()
    ax.bar(range(len(shown)), [r["speedup"] for r in shown])
    ax.set_xticks(range(len(shown)), [f"{r['group']}\n{r['provider']}" for r in shown], rotation=60, ha="right",
                  fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("speed-up vs eager")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
