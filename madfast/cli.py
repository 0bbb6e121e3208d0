"""The `madfast` command line (also `python -m madfast`): demo, train-teacher, distill, eval, check, bench."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from madfast.errors import EXIT_PREEMPTED, CheckpointError, UsageError

__all__ = ["main", "build_parser"]

_EPILOG_DISTILL = """examples:
  madfast distill --dataset cifar10 --data-dir ~/data/cifar10 --teacher cifar_resnet34 \\
      --teacher-ckpt runs/t34/teacher.pt --student cifar_resnet18 --out runs/mad-c10
  madfast distill --resume runs/mad-c10                 # continue exactly where it stopped
  torchrun --nproc_per_node 4 -m madfast distill --config run.yaml --amp bf16 --compile"""


_EPILOG_CHECK = """examples:
  madfast check                                   # every op on this GPU; then `madfast check --save`
  madfast check --headline --dtypes float32,bf16  # the MAD shapes only, checked and timed
  madfast check --device cpu --quick --out /tmp/c # the CPU rehearsal CI runs
  madfast check --ops kl,adversarial --dtypes bfloat16"""


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line (``madfast distill: error: ...``) and exit 2, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_parser(sub, name: str, cls, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    from madfast.train.config import add_config_args

    p = sub.add_parser(name, help=help, description=help, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of field: value (flags override it)")
    add_config_args(p, cls)
    return p


def build_parser() -> argparse.ArgumentParser:
    from madfast.check import OP_NAMES
    from madfast.train.config import DistillConfig, TeacherConfig

    parser = _Parser(prog="madfast", description="Data-free knowledge distillation by "
                     "Momentum Adversarial Distillation (MAD), with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a teacher on the embedded digits, distill a student data-free "
                       "with MAD, print both test accuracies", description="The main job: digits teacher → MAD → "
                       "half-width student. Writes OUT/metrics.json, samples.png, curves.png.")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/demo-<time>)")
    p.add_argument("--steps", type=int, help="adversarial iterations (default: the demo's 700)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--ablation", action="store_true", help="run MAD, no-EMA and no-adversarial-term on the same "
                   "seeds and print student accuracy mean ± std per variant (OUT/ablation.json)")
    p.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="seeds of --ablation (default: 0,1,2)")
    p.add_argument("--shift", default="demo", choices=["demo", "hard"], help="--ablation's distribution shift: demo "
                   "(the demo's settings) or hard (1 student step per G step, lr_G 1e-2) (default: demo)")

    _config_parser(sub, "train-teacher", TeacherConfig, "supervised training of a teacher on a local data set")
    p = _config_parser(sub, "distill", DistillConfig, "data-free distillation of a teacher into a student with MAD",
                       _EPILOG_DISTILL)
    p.add_argument("--resume", metavar="DIR|auto", help="continue the newest checkpoint of a run folder (its config, "
                   "overridden by the flags given); auto: continue --out's newest checkpoint if it has one (the "
                   "flags must describe the same run: only run length and logging may change), else start "
                   "fresh — one command for the first start and every restart")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N iterations of this invocation, "
                   "with a checkpoint (continue with --resume)")
    p.add_argument("--preset", metavar="NAME", help="starting values for a data set: cifar10, cifar100, "
                   "tinyimagenet, imagenet, places365 (each marked paper/reported/practice/ours; a --config "
                   "file and flags override them)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML, each value's "
                   "source) and exit without running")

    p = sub.add_parser("eval", help="test accuracy of a teacher (any weights file) or of the student of a distill run",
                       description="Top-1/top-5 test accuracy of a checkpoint's network.")
    p.add_argument("ckpt", help="teacher.pt, a distill ckpt-*.pt, a run folder (its newest checkpoint), or any "
                   "teacher weights --teacher-ckpt takes (then --model and --dataset are needed)")
    p.add_argument("--model", help="architecture of a weights file that is not madfast's (e.g. resnet50)")
    p.add_argument("--img-size", type=int, help="image side (default: the checkpoint's or the data set's)")
    p.add_argument("--dataset", help="data set (default: the checkpoint's)")
    p.add_argument("--data-dir", help="local data folder (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=2)

    p = sub.add_parser("check", help="verify every kernel against fp64 PyTorch and time it against eager and "
                       "torch.compile on this machine", description="Checks every op on every backend that runs on "
                       "the device (values and gradients, fp32/bf16/fp16/fp64, benchmark and odd shapes), times it, "
                       "and writes OUT/check.json, check.md and verified-entries.json as it goes. Exits 1 if any "
                       "correctness check fails.", epilog=_EPILOG_CHECK,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--ops", help="comma-separated subset of: " + ", ".join(OP_NAMES))
    p.add_argument("--dtypes", help="comma-separated subset of float32,bfloat16,float16,float64 (default: all)")
    p.add_argument("--quick", action="store_true", help="one small benchmark shape per op, short timings, "
                   "no torch.compile unless --compile")
    p.add_argument("--headline", action="store_true", help="only each op's headline shapes (the MAD workloads: "
                   "what verified dispatch is derived from), checked and timed: what a short GPU window runs first")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="check correctness only")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="time torch.compile too (default: on unless --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not time torch.compile")
    p.add_argument("--out", metavar="DIR", default="check-results", help="output folder (default: check-results)")
    p.add_argument("--save", action="store_true", help="add the verified entries to the cache that 'auto' reads "
                   "($MADFAST_CACHE_DIR/verified.json, default ~/.cache/madfast)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop timing (not checking) once the run has taken this long")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = sub.add_parser("bench", help="run the pytest-benchmark suites, or time one whole MAD iteration (bench step); "
                       "write a markdown table and a PNG chart of speed-ups vs eager",
                       description="`madfast bench`: runs benchmarks/bench_*.py with pytest-benchmark. `madfast bench "
                       "step`: one MAD iteration for the eager reference, madfast's default and the default "
                       "compiled, by phase, op kind and network, with its aten-op and host-sync counts.")
    p.add_argument("what", nargs="?", choices=("suites", "step"), default="suites",
                   help="suites (default): the pytest-benchmark suites; step: the whole-iteration benchmark")
    p.add_argument("--out", metavar="DIR", default="benchmarks/results",
                   help="where bench-<time>.{json,md,png} (step: step-<time>.*) go")
    p.add_argument("--bench-dir", metavar="DIR", help="suites: the benchmarks folder (default: the repository's)")
    p.add_argument("-k", dest="select", help="suites: pytest -k expression selecting benchmarks")
    p.add_argument("--case", default="r34_r18_32px_b256", help="step: r34_r18_32px_b256 (the CIFAR preset's "
                   "networks) | r50_r18_224px_b64 | demo_cnn_16px_b64")
    p.add_argument("--providers", default="eager,default", help="step: comma-separated among eager, default, "
                   "default_compile, default_cudagraphs (reduce-overhead) and the variants default_bf16, "
                   "default_contiguous, default_foreach, eager_fused_optim, default_torch_ops")
    p.add_argument("--device", default="auto", help="step: auto | cpu | cuda | cuda:N")
    p.add_argument("--rounds", type=int, default=10, help="step: timed iterations per provider")
    p.add_argument("--divisor", type=int, help="step: divide the case's batch by this (default: 1 on CUDA, 32 on CPU)")
    return parser


def _with_file(args) -> dict:
    from madfast.train.config import load_config_file

    return load_config_file(args.config) if args.config else {}


def _cmd_demo(args) -> int:
    from madfast.train.demo import PASS_RATIO, format_ablation, run_ablation, run_demo

    out = args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be ≥ 1")
    if args.ablation:
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise UsageError(f"--seeds must name distinct seeds, got {args.seeds!r}")
        print(format_ablation(run_ablation(out, seeds, steps=args.steps, progress=args.progress, shift=args.shift)))
        print(f"→ {out}/ablation.json")
        return 0
    if args.shift != "demo":
        raise UsageError("--shift applies to --ablation runs only")
    overrides = {"steps": args.steps} if args.steps else {}
    m = run_demo(out, seed=args.seed, progress=args.progress, distill_overrides=overrides)
    print(f"teacher test accuracy {m['teacher_acc']:.2f}%  student test accuracy {m['student_acc']:.2f}%  "
          f"ratio {m['ratio']:.3f}  ({m['seconds']:.0f} s)  → {out}/metrics.json, samples.png, curves.png")
    if not m["passed"]:
        print(f"madfast demo: failed: the student reached {m['ratio']:.3f} of the teacher's accuracy, "
              f"below {PASS_RATIO:.2f}", file=sys.stderr)
        return 1
    return 0


def _cmd_train_teacher(args) -> int:
    from madfast.train import TeacherConfig, train_teacher
    from madfast.train.config import config_from_args

    s = train_teacher(config_from_args(TeacherConfig, args, _with_file(args)))
    if s:
        print(f"teacher test accuracy {s['test_acc']:.2f}% ({s['seconds']:.0f} s) → {s['teacher_ckpt']}")
    return 0


def _cmd_distill(args) -> int:
    from madfast.train import DistillConfig, distill
    from madfast.train.checkpoint import load_checkpoint
    from madfast.train.config import config_from_args, format_config
    from madfast.train.presets import preset_values

    base = {}
    if args.resume and args.resume != "auto":
        if args.preset:
            raise UsageError("--preset cannot be combined with --resume (the run's config is in its checkpoint)")
        base = dict(load_checkpoint(args.resume).get("config") or {})
        base["out"] = args.resume
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError("--stop-after must be ≥ 1")
    preset = preset_values(args.preset, set(DistillConfig.__dataclass_fields__)) if args.preset else {}
    file = _with_file(args)
    cfg = config_from_args(DistillConfig, args, {**preset, **base, **file})
    if args.print_config:
        print(format_config(cfg, preset=args.preset, file=file, args=args), end="")
        return 0
    s = distill(cfg, resume=args.resume, stop_after=args.stop_after)
    if s.get("preempted"):  # every rank exits so; the first says why
        if os.environ.get("RANK", "0") == "0":
            print(f"madfast distill: preempted by {s['preempted']} at step {s['step']}/{s['total_steps']}; checkpoint "
                  f"written. The same command with --resume auto (or --resume {cfg.out}) continues it", file=sys.stderr)
        return EXIT_PREEMPTED
    if s:
        state = "finished" if s["finished"] else f"stopped at step {s['step']}/{s['total_steps']}"
        student = f"{s['student_acc']:.2f}%" if s["student_acc"] is not None else "not evaluated yet"
        teacher = f"{s['teacher_acc']:.2f}%" if s["teacher_acc"] is not None else "not evaluated"
        print(f"{state}: teacher {teacher}, student {student} ({s['seconds']:.0f} s) → {cfg.out}")
    return 0


def _cmd_eval(args) -> int:
    from madfast.data import Normalize, build_dataset, dataset_info
    from madfast.models import build_model
    from madfast.models.checkpoints import load_teacher_weights
    from madfast.models.from_timm import timm_data_info
    from madfast.train.checkpoint import load_checkpoint
    from madfast.train.distributed import setup
    from madfast.train.evaluate import eval_loader, evaluate

    if args.model is not None:  # any teacher weights, read the way distill's --teacher-ckpt reads them
        if not args.dataset:
            raise UsageError("--model needs --dataset (and --data-dir): a weights file does not name its data")
        cfg, name, weights = {"img_size": args.img_size}, args.model, None
    else:
        state = load_checkpoint(args.ckpt)
        fmt = state.get("format") if isinstance(state, dict) else None
        if fmt == "madfast-teacher/1":
            cfg, name, weights = state["config"], state["model"], state["state_dict"]
        elif fmt == "madfast-distill/1":
            cfg, name, weights = state["config"], state["config"]["student"], state["task"]["student"]
        else:
            raise CheckpointError(f"{args.ckpt!r} is not a madfast teacher or distill checkpoint "
                                  "(for other weights files give --model and --dataset)")
    if args.img_size is not None and args.img_size < 1:
        raise UsageError("--img-size must be ≥ 1")
    dataset, data_dir = args.dataset or cfg["dataset"], args.data_dir or cfg.get("data_dir")
    img_size = args.img_size or cfg.get("img_size") or None
    # sized and normalised as in training: by the teacher's timm config where the data set leaves it open
    info = timm_data_info(dataset_info(dataset, data_dir, img_size), cfg.get("teacher") or cfg.get("model") or name,
                          bool(img_size))
    test = build_dataset(dataset, "test", data_dir, info.img_size)
    model = build_model(name, info.num_classes, info.channels, info.img_size)
    if weights is None:
        load_teacher_weights(args.ckpt, model, name, info.num_classes, info.channels)
    else:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(f"{args.ckpt!r} does not fit {name!r} on {dataset}: "
                                  f"{str(e).splitlines()[0]}") from None
    device = setup(args.device).device
    r = evaluate(model.to(device), eval_loader(test, args.batch_size, 0 if dataset == "digits" else args.num_workers),
                 Normalize(info.mean, info.std), device)
    print(json.dumps({"model": name, "dataset": dataset, "top1": r["acc"], "top5": r["acc5"]}))
    return 0


def _cmd_check(args) -> int:
    from madfast.check import options, run_check

    try:
        opts = options(args.device, args.ops, args.dtypes, args.out, args.quick, args.compile, args.save,
                       args.time_budget, args.progress, args.argv, args.headline, args.timing)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return run_check(opts)


def _cmd_bench(args) -> int:
    if args.what == "step":
        from madfast.train.step_bench import bench_step, write_step_report

        try:
            result = bench_step(args.case, tuple(p for p in args.providers.split(",") if p), args.device, args.rounds,
                                args.divisor)
        except ValueError as e:
            raise UsageError(str(e).replace("bench_step: ", "--")) from None
        stem = os.path.join(os.path.abspath(args.out), time.strftime("step-%Y%m%d-%H%M%S"))
        paths = write_step_report(result, stem)
        with open(paths[1]) as f:
            print(f.read())
        print("→ " + ", ".join(paths))
        return 0
    from madfast.bench_report import write_report

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = args.bench_dir or os.path.join(repo, "benchmarks")
    if not os.path.isdir(bench_dir):
        raise UsageError(f"--bench-dir {bench_dir!r} does not exist (run from a madfast checkout or pass it)")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(os.path.abspath(args.out), time.strftime("bench-%Y%m%d-%H%M%S"))
    cmd = [sys.executable, "-m", "pytest", bench_dir, "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
           "-o", "testpaths=", f"--benchmark-json={stem}.json", "--benchmark-columns=mean,stddev,rounds"]
    if args.select:
        cmd += ["-k", args.select]
    rc = subprocess.call(cmd, cwd=bench_dir)
    if rc != 0 or not os.path.isfile(f"{stem}.json"):
        print(f"madfast: error: the benchmarks failed (pytest exit status {rc})", file=sys.stderr)
        return rc or 1
    write_report(f"{stem}.json", f"{stem}.md", f"{stem}.png")
    print(f"→ {stem}.md, {stem}.png, {stem}.json")
    return 0


_COMMANDS = {"demo": _cmd_demo, "train-teacher": _cmd_train_teacher, "distill": _cmd_distill, "eval": _cmd_eval,
             "bench": _cmd_bench, "check": _cmd_check}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["madfast", *(sys.argv[1:] if argv is None else argv)]
    from madfast.train import NonFiniteLossError
    from madfast.train.preemption import Preempted

    try:
        return _COMMANDS[args.command](args)
    except (UsageError, NonFiniteLossError) as e:
        print(f"madfast {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Preempted as e:
        print(f"madfast {args.command}: {e}; the newest complete checkpoint is kept", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"madfast {args.command}: interrupted", file=sys.stderr)
        return 130
