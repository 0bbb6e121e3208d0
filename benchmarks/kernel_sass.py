"""Instruction mix of a Triton kernel's hottest loop on a GPU it is not running on.

The kernel is compiled for an NVIDIA architecture with Triton's own toolchain (no GPU needed),
disassembled with the nvdisasm Triton ships, and the loop with the most tensor-core instructions is
counted per iteration: instructions issued by each warp, MMA instructions, global loads. With the
iteration's FLOPs this gives the issue-bound time against the tensor-core time — a roofline check
of the inner loop before any GPU has run it.

    python benchmarks/kernel_sass.py        # the generator block's GEMM loops, sm_90 (~1 minute)

`triton_kernels(dtype)` lists every Triton kernel of madfast as its host launches it, and
`fp64_instructions` counts fp64 arithmetic in SASS: tests/test_fp64_instructions.py holds kernels
for non-fp64 data to none.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}  # Triton types


@dataclass
class LoopMix:
    instructions: int  # per warp per iteration
    mma: int  # tensor-core instructions (HMMA/HGMMA) among them
    loads: int  # global loads (LDG, and LDGSTS: asynchronous copies into shared memory)
    opcodes: collections.Counter

    def issue_clocks(self, num_warps: int, schedulers: int = 4) -> float:
        """Clocks an SM needs just to issue one iteration of one program (4 warp schedulers)."""
        return self.instructions * num_warps / schedulers


def compile_for_gpu(fn, types: dict[str, str], constexprs: dict, arch: int = 90, aligned: tuple[str, ...] = (),
                    **options):
    """Triton's compiled kernel of ``fn`` (a @triton.jit function) for sm_``arch``, without a GPU;
    parameters not in ``types`` or ``constexprs`` are i32. ``aligned`` parameters are known
    multiples of 16, as Triton specializes them at launch (pointers from torch's allocator, channel
    strides of C % 16 == 0)."""
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in aligned}
    src = ASTSource(fn, sig, {(params.index(k),): v for k, v in constexprs.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_sass(fn, types: dict[str, str], constexprs: dict, arch: int = 90, aligned: tuple[str, ...] = (),
                 **options) -> str:
    """SASS of ``fn`` for sm_``arch`` (compile_for_gpu, disassembled by Triton's nvdisasm)."""
    cubin = compile_for_gpu(fn, types, constexprs, arch, aligned, **options).asm["cubin"]
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def _opcode(line: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", line).split()[0].split(".")[0]


def hottest_loop(sass: str) -> LoopMix:
    """The loop (a backward branch and the code it jumps over) with the most MMA instructions."""
    code, labels = [], {}
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(code)
        elif m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            code.append(m.group(1))
    best = None
    for end, line in enumerate(code):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        start = labels.get(m.group(1), end + 1) if m else end + 1
        if start <= end:
            ops = collections.Counter(_opcode(i) for i in code[start:end + 1])
            mma = sum(v for k, v in ops.items() if "MMA" in k)
            mix = LoopMix(end - start + 1, mma, ops["LDG"] + ops["LDGSTS"], ops)
            if best is None or mix.mma > best.mma:
                best = mix
    if best is None:
        raise ValueError("no loop in the kernel")
    return best


# fp64 arithmetic (the FP64 pipe: half the fp32 rate on an H100, 1/32–1/64 on L4/A10/RTX cards);
# conversions (F2F) are not counted: loading a scalar kept in fp64, such as EMA's 1 − decay, is fine
FP64_ARITHMETIC = ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET")


def fp64_instructions(sass: str) -> int:
    """How many fp64 arithmetic instructions ``sass`` (nvdisasm or cuobjdump output) holds."""
    return sum(_opcode(m.group(1)) in FP64_ARITHMETIC
               for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", sass))


# channels_last with Cin, Cout multiples of 16, as the generator runs: unit channel strides, the others
# and every pointer aligned (what Triton's launch-time specialization sees)
_ALIGNED = ("x_ptr", "w_ptr", "y_ptr", "gy_ptr", "gx_ptr", "mean_ptr", "part_ptr", "gsum_ptr", "gsumsq_ptr", "gw_ptr",
            "Cin", "Cout", "sx_n", "sx_h", "sx_w", "sy_n", "sy_h", "sy_w", "sg_n", "sg_h", "sg_w")
_UNIT = ("sx_c", "sy_c", "sg_c")
# H100 SXM dense tensor-core FLOP per SM per clock (989 / 495 TFLOP/s at 1.83 GHz on 132 SMs)
TENSOR_FLOP_PER_CLK = {"bf16": 4096, "fp32": 2048}


@dataclass
class KernelLoop:
    kernel: str
    dtype: str  # "bf16" or "fp32" (TF32)
    tile: str
    num_warps: int
    mix: LoopMix
    flops: int  # per iteration of the loop

    @property
    def issue_over_tensor(self) -> float:
        """Clocks to issue one iteration / clocks of its tensor-core work at peak: above 1 the
        loop cannot feed the tensor cores however well memory keeps up."""
        return self.mix.issue_clocks(self.num_warps) / (self.flops / TENSOR_FLOP_PER_CLK[self.dtype])


def block_kernel(kernel: str, dtype, cfg) -> tuple:
    """How the host launches one of the generator block's GEMM kernels ("forward", "grad_weight",
    "grad_input") for ``dtype`` inputs with tiles ``cfg`` (the forward: a triton.Config of
    forward_configs; the gradients: a grad_*_config dict), train mode (BN statistics and their
    fold): (the @triton.jit function, argument types, constexprs, compile options)."""
    import triton.language as tl

    from madfast.ops.upsample_conv import triton_kernel as K

    p = PTR[dtype]
    common = dict(LOWP=dtype in (torch.float16, torch.bfloat16), FP32_DOT="tf32" if dtype == torch.float32 else "ieee",
                  ACC=tl.float64 if dtype == torch.float64 else tl.float32)
    types = {"scale_h": "fp32", "scale_w": "fp32"}
    if kernel == "forward":
        consts = dict(common, STATS=True, TH=K.TH, TW=K.TW, HALO=K.HALO, **cfg.kwargs)
        types.update(x_ptr=p, w_ptr=p, y_ptr=p, part_ptr="*fp64" if dtype == torch.float64 else "*fp32")
        return (K._upsample_conv_fwd_kernel, types, consts,
                {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    common.update(FOLD_SUM=True, FOLD_SUMSQ=True, CENTRED=True)
    types.update(gsum_ptr="*fp32", gsumsq_ptr="*fp32", mean_ptr="*fp32", y_ptr=p)
    options = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg["num_stages"]}
    if kernel == "grad_weight":
        consts = dict(common, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"])
        types.update(x_ptr=p, gy_ptr=p, gw_ptr="*fp64" if dtype == torch.float64 else "*fp32")
        return K._upsample_conv_grad_weight_kernel, types, consts, options
    consts = dict(common, TILE_H=K.TILE_H, TILE_W=K.TILE_W, REGION=K.REGION, REGION_W=2 * K.TILE_W + 4,
                  BLOCK_CI=cfg["block_ci"], BLOCK_K=cfg["block_k"])
    types.update(gy_ptr=p, w_ptr=p, gx_ptr=p)
    return K._upsample_conv_grad_input_kernel, types, consts, options


def triton_kernels(dtype) -> dict[str, tuple]:
    """Every Triton kernel of madfast as its host code launches it for ``dtype`` inputs (pointer
    types, float scalars as fp32, constexprs; the block's GEMMs with the tiles picked for a 128→128
    channel layer on an H100): name → (@triton.jit function, argument types, constexprs, options)."""
    import triton.language as tl

    from madfast.ops._triton import TL_DTYPES
    from madfast.ops.bn_lrelu import triton_kernel as BL
    from madfast.ops.bn_stats import triton_kernel as B
    from madfast.ops.ema import triton_kernel as E
    from madfast.ops.kl import triton_kernel as KL
    from madfast.ops.upsample_conv import bilinear_adjoint as BA
    from madfast.ops.upsample_conv import triton_kernel as K

    p, a = PTR[dtype], PTR[torch.float64 if dtype == torch.float64 else torch.float32]
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    f32 = "fp32"
    out = {
        "block_forward": block_kernel("forward", dtype, K.forward_configs(dtype)[0]),
        "block_grad_weight": block_kernel("grad_weight", dtype, K.grad_weight_config(dtype, 232448, 128, 128)),
        "block_grad_input": block_kernel("grad_input", dtype, K.grad_input_config(dtype, 232448, 128)),
        "bn_lrelu": (BL._bn_lrelu_kernel, dict(y_ptr=p, out_ptr=p, g_ptr=p, gy_ptr=p, scale_ptr=a, shift_ptr=a,
                                               gscale_ptr=a, gshift_ptr=a, slope=f32),
                     dict(BACKWARD=True, ACC=acc, BLOCK=BL.BLOCK), {}),
        "bilinear_adjoint": (BA._bilinear_adjoint_kernel, dict(g_ptr=p, out_ptr=p),
                             dict(ACC=acc, BLOCK_P=32, BLOCK_C=64), {}),
        "ema": (E._ema_multi_tensor_kernel, dict(table_ptr="*i64", weight_ptr="*fp64"),
                dict(EMA_DTYPE=TL_DTYPES[dtype], PARAM_DTYPE=TL_DTYPES[dtype], ACC_DTYPE=acc, BLOCK=E.BLOCK),
                {"num_warps": 8}),
        "kl_fwd": (KL._kl_fwd_kernel, dict(s_ptr=p, t_ptr=p, stats_ptr=a, rows_out_ptr=p, inv_tau=f32, tau_sq=f32),
                   dict(ACC=acc, WRITE_ROWS=False, ROWS=4, BLOCK_C=1024), {}),
        "l1_fwd": (KL._l1_fwd_kernel, dict(s_ptr=p, t_ptr=p, rows_acc_ptr=a, rows_out_ptr=p),
                   dict(ACC=acc, WRITE_ROWS=False, ROWS=4, BLOCK_C=1024), {}),
        "loss_reduce": (KL._reduce_kernel, dict(rows_ptr=a, total_ptr=a, loss_ptr=p, scale=f32, sign=f32,
                                                bound_hi=f32, bound_lo=f32),
                        dict(ACC=acc, HAS_BOUND=True, BLOCK=KL.REDUCE_BLOCK), {}),
        "kl_bwd": (KL._kl_bwd_kernel, dict(s_ptr=p, t_ptr=p, stats_ptr=a, grad_ptr=p, total_ptr=a, gs_ptr=p, gt_ptr=p,
                                           inv_tau=f32, tau=f32, factor=f32, sign=f32, bound=f32),
                   dict(ACC=acc, REDUCED=True, HAS_BOUND=True, GRAD_S=True, GRAD_T=True, ROWS=4, BLOCK_C=1024), {}),
        "l1_bwd": (KL._l1_bwd_kernel, dict(s_ptr=p, t_ptr=p, grad_ptr=p, total_ptr=a, gs_ptr=p, gt_ptr=p, factor=f32,
                                           sign=f32, bound=f32),
                   dict(ACC=acc, REDUCED=True, HAS_BOUND=True, GRAD_S=True, GRAD_T=True, ROWS=4, BLOCK_C=1024), {}),
        "moments_backward_nchw": (B._backward_nchw_kernel, dict(x_ptr=p, out_ptr=p, gm_ptr=a, gv_ptr=a, mean_ptr=a,
                                                                inv_m=f32), dict(ACC=acc, BLOCK=B.BLOCK), {}),
        "moments_backward_cl": (B._backward_cl_kernel, dict(x_ptr=p, out_ptr=p, gm_ptr=a, gv_ptr=a, mean_ptr=a,
                                                            inv_m=f32),
                                dict(ACC=acc, BLOCK_P=B.BLOCK_P, BLOCK_C=B.BLOCK_C), {}),
    }
    # the multi-layer BN kernels, three layers per launch (tuples of pointers)
    for layout, cl in (("nchw", False), ("cl", True)):
        consts = dict(NUM=3, CHANNELS_LAST=cl, ACC=acc, BLOCK=B.BLOCK, BLOCK_P=B.BLOCK_P, BLOCK_C=B.BLOCK_C)
        out[f"moment_partials_{layout}"] = (B._partials_kernel, dict(xs=(p,) * 3, tab_ptr="*i64", part_ptr=a),
                                            consts, {})
        out[f"bn_grad_{layout}"] = (B._bn_grad_kernel, dict(xs=(p,) * 3, outs=(p,) * 3, rms=(a,) * 3, rvs=(a,) * 3,
                                                            tab_ptr="*i64", grad_ptr=a, mean_ptr=a, var_ptr=a,
                                                            norms_ptr=a), consts, {})
    for suffix, norms in (("", False), ("_norms", True)):
        out["moment_finalize" + suffix] = (
            B._finalize_kernel, dict(tab_ptr="*i64", part_ptr=a, rms=(a,) * 3, rvs=(a,) * 3, mean_ptr=a, var_ptr=a,
                                     norms_ptr=a), dict(NUM=3, NORMS=norms, ACC=acc, BLOCK_C=B.BLOCK_C), {})
    return out


def _channels_last_loop(kernel: str, dtype, cfg, arch: int) -> LoopMix:
    fn, types, consts, options = block_kernel(kernel, dtype, cfg)
    present = set(inspect.signature(fn.fn).parameters)
    sass = compile_sass(fn, types, dict(consts, **{p: 1 for p in _UNIT if p in present}), arch,
                        aligned=tuple(p for p in _ALIGNED if p in present and p not in consts), **options)
    return hottest_loop(sass)


def block_kernel_loops(channels: int = 128, arch: int = 90) -> list[KernelLoop]:
    """The generator block's three GEMM loops with the tiles the host picks for a channels→channels
    layer (the forward: every autotuned config), in bf16 and fp32, with the BN fold of train mode."""
    from madfast.ops.upsample_conv import triton_kernel as K

    rows = []
    limit = 232448 if arch >= 90 else 101376
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        bm = K.TH * K.TW
        for cfg in K.forward_configs(dtype):  # one iteration: a chunk of channels, all nine taps
            bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
            rows.append(KernelLoop("forward", name, f"9·{bm}×{bn}×{bk}", cfg.num_warps,
                                   _channels_last_loop("forward", dtype, cfg, arch), 9 * 2 * bm * bn * bk))
        g = K.grad_weight_config(dtype, limit, channels, channels)
        rows.append(KernelLoop("grad_weight", name, f"{g['block_n']}×{g['block_k']}×{g['block_m']}", g["num_warps"],
                               _channels_last_loop("grad_weight", dtype, g, arch),
                               2 * g["block_m"] * g["block_n"] * g["block_k"]))
        g = K.grad_input_config(dtype, limit, channels)
        rows.append(KernelLoop("grad_input", name, f"{K.REGION}×{g['block_ci']}×{g['block_k']}", g["num_warps"],
                               _channels_last_loop("grad_input", dtype, g, arch),
                               2 * K.REGION * g["block_ci"] * g["block_k"]))
    return rows


def main() -> None:
    print("| kernel | dtype | tile (M×N×K of the MMA) | warps | instructions/warp/iteration | MMA | loads | "
          "issue clk | tensor clk | issue/tensor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in block_kernel_loops():
        tensor = r.flops / TENSOR_FLOP_PER_CLK[r.dtype]
        print(f"| {r.kernel} | {r.dtype} | {r.tile} | {r.num_warps} | {r.mix.instructions} | {r.mix.mma} | "
              f"{r.mix.loads} | {r.mix.issue_clocks(r.num_warps):.0f} | {tensor:.0f} | {r.issue_over_tensor:.1f} |")


if __name__ == "__main__":
    main()
