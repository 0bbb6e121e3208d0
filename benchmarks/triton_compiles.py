"""How many Triton kernels a madfast command would compile on a GPU, counted on the CPU.

Under TRITON_INTERPRET=1 every launch is recorded under the key Triton's JIT caches a compile by:
argument types, constexpr values, which integers are 1 or multiples of 16, which pointers are 16-byte
aligned, num_warps and num_stages. An autotuned launch counts once per config, since the autotuner
compiles each. Compiling is most of a short GPU window's first pass, so this prices each step of
benchmarks/gpu_check.sh before it runs there. Inductor's own Triton kernels (the torch.compile
baselines) are not counted: on a CPU inductor writes C++.

With --no-launch the kernels are recorded but not run, and the batch divisor a CPU check applies is
lifted, so the count is for the GPU's shapes (the numbers the command prints are then meaningless).

    python benchmarks/triton_compiles.py --no-launch -- check --device cpu --headline --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import os
import sys


def _key(fn, args: tuple, kwargs: dict) -> tuple:
    from triton.runtime.jit import mangle_type

    signature = inspect.signature(fn)
    params = signature.parameters
    bound = signature.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
    key = []
    for name, param in params.items():
        if name not in bound.arguments:
            continue
        value = bound.arguments[name]
        if "constexpr" in str(param.annotation):
            key.append((name, repr(value)))
        elif hasattr(value, "data_ptr"):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or not isinstance(value, int):
            key.append((name, mangle_type(value)))
        else:
            key.append((name, mangle_type(value), value == 1, value % 16 == 0))
    options = {k: v for k, v in kwargs.items() if k not in bound.arguments}
    return tuple(key) + tuple(sorted(options.items()))


def count(argv: list[str], launch: bool) -> dict[str, int]:
    """Runs `madfast ARGV` in this process; returns {kernel: compiles}."""
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    import madfast.check
    from madfast.cli import main
    from madfast.ops.upsample_conv import triton_kernel as upsample

    keys: dict[str, dict] = collections.defaultdict(dict)  # kernel → {key: compiles}
    configs = [1]  # of the autotuned launch under way: on a GPU each config is compiled
    run = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        if not warmup:
            keys[self.fn.__name__][_key(self.fn, args, kwargs)] = configs[0]
        return run(self, *args, grid=grid, warmup=warmup, **kwargs) if launch else None

    launch_tuned = upsample._launch_tuned

    def tuned(tuner, grid, *args, **kwargs):
        configs[0] = len(tuner.configs)
        try:
            return launch_tuned(tuner, grid, *args, **kwargs)
        finally:
            configs[0] = 1

    InterpretedFunction.run = recorded
    upsample._launch_tuned = tuned
    if not launch:  # the GPU's shapes, not the CPU check's divided batches
        options = madfast.check.options
        madfast.check.options = lambda *a, **k: dataclasses.replace(options(*a, **k), batch_divisor=1)
    try:
        main(argv)
    except SystemExit:
        pass
    return {name: sum(k.values()) for name, k in sorted(keys.items())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-launch", dest="launch", action="store_false", help="record the kernels, do not run them")
    p.add_argument("--json", metavar="FILE", help="also write {kernel: compiles} here")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the madfast command's arguments")
    args = p.parse_args()
    counts = count(args.argv[1:] if args.argv[:1] == ["--"] else args.argv, args.launch)
    for name, n in counts.items():
        print(f"{n:5d}  {name}")
    print(f"{sum(counts.values()):5d}  Triton compiles in all ({len(counts)} kernels)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(counts, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
