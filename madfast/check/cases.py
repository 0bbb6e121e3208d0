"""What `madfast check` runs for each op: inputs, the eager PyTorch formula (the fp64 oracle, the
same-dtype error baseline, the speed baseline and what torch.compile compiles), the madfast call per
backend, the shapes (the benchmarks' plus odd ones) and the work done (bytes or FLOPs).

Every case is a forward + backward: outputs and the gradients of a fixed random weighting of them
with respect to ``grads`` (the inputs that get gradients), so each gradient is checked too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from madfast.ops._dtypes import acc_dtype

__all__ = ["Case", "CASES", "OP_NAMES", "RESNET50_PARAMS", "resnet50_param_shapes"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Shape:
    """One problem size: ``dims`` for the case's ``make``, ``label`` for the tables."""
    label: str
    dims: tuple
    odd: bool = False  # correctness only (not timed)
    headline: bool = False  # a MAD workload (with --quick: the quick one), all that `--headline` runs


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Shape, torch.dtype, torch.device, torch.Generator], list]
    eager: Callable[..., tuple]  # the formula in eager PyTorch
    fused: Callable[[str], Callable[..., tuple]]  # backend → madfast's implementation
    shapes: Callable[[int, bool], list[Shape]]  # (batch divisor, quick) → shapes
    work: Callable[[Shape, torch.dtype], tuple[str, float]]  # ("GB", bytes) or ("TFLOP", flops) per fwd+bwd
    grads: tuple[int, ...] = ()  # indices of inputs to differentiate
    dtypes: tuple[torch.dtype, ...] = DTYPES
    in_place: bool = False  # mutates its first input (EMA): timed without copies
    dispatches: tuple[str, ...] = ()  # the ops madfast.fused(backend) dispatches (madfast._backend.choose)
    convolution: bool = False  # fp32 may run in TF32 (cuDNN's and the Triton GEMMs' rule): see runner.floor


def _randn(shape, dtype, device, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


# ---- EMA ----------------------------------------------------------------------------------------
CHECK_DECAY = 0.75  # large steps, so that an EMA that does nothing fails in bf16 too


RESNET50_PARAMS = 25_557_032


def resnet50_param_shapes() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50 parameter shapes (built on the meta device); without torchvision, one
    tensor of the same size, so the EMA workloads stay runnable."""
    try:
        import torchvision
        with torch.device("meta"):
            return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]
    except ImportError:
        return [(RESNET50_PARAMS,)]


def _ema_shapes(div: int, quick: bool) -> list[Shape]:
    rn50 = resnet50_param_shapes()
    bench = [Shape("resnet50 params", tuple((max(1, s[0] // div),) + tuple(s[1:]) for s in rn50), headline=True),
             Shape("flat 25.6M", ((RESNET50_PARAMS // div,),))]
    odd = [Shape("1, 3×5×7, 4097, 0", ((1,), (3, 5, 7), (4097,), (0,)), odd=True),
           Shape("non-contiguous 33×17ᵀ", (("t", 33, 17),), odd=True)]
    if quick:
        bench = [Shape("resnet50 first 20 params", bench[0].dims[:20], headline=True)]
    return bench + odd


def _ema_make(shape, dtype, device, g):
    def one(dims):
        if dims and dims[0] == "t":  # a transposed view: strides the kernels must follow
            return _randn(dims[1:], dtype, device, g).t()
        return _randn(dims, dtype, device, g)
    return [[one(d) for d in shape.dims], [one(d) for d in shape.dims]]


def _ema_eager(ema, cur):
    torch._foreach_lerp_(ema, cur, 1.0 - CHECK_DECAY)
    return tuple(ema)


def _ema_fused(backend):
    from madfast.ops import ema_update_

    def run(ema, cur):
        ema_update_(ema, cur, CHECK_DECAY, backend=backend)
        return tuple(ema)
    return run


def _ema_work(shape, dtype):
    n = sum(math.prod(d[1:] if d and d[0] == "t" else d) for d in shape.dims)
    return "GB", 3 * n * dtype.itemsize  # read ema and tensor, write ema


# ---- KL / adversarial ---------------------------------------------------------------------------
TAU, BOUND = 4.0, 3.0


def _logit_shapes(div: int, quick: bool) -> list[Shape]:
    rows = max(1, 1024 // div)
    bench = [(rows, c) for c in (10, 100, 1000, 21843)] if not quick else [(64, 100)]
    odd = ((7, 13), (33, 4097)) if quick else ((1, 1), (7, 13), (33, 4097))
    # headline: CIFAR-100's and ImageNet's class counts
    return ([Shape(f"{b}×{c}", (b, c), headline=c in (100, 1000)) for b, c in bench]
            + [Shape(f"{b}×{c}", (b, c), odd=True) for b, c in odd])


def _logits_make(shape, dtype, device, g):
    b, c = shape.dims
    return [_randn((b, c), dtype, device, g, 2.0), _randn((b, c), dtype, device, g, 2.0)]


def eager_kl(s, t, tau=TAU):
    return (F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="batchmean",
                     log_target=True) * tau**2,)


def _logit_work(shape, dtype):
    b, c = shape.dims
    return "GB", 4 * _nbytes((b, c), dtype)  # read s and t, write both gradients


def _adv_eager(kind):
    def run(s, t):
        d = eager_kl(s, t, 1.0)[0] if kind == "kl" else (s - t).abs().mean()
        return (-torch.clamp(d, max=BOUND),)
    return run


# ---- BN statistics ------------------------------------------------------------------------------
RESNET50_BN = [(64, 64, 112, 112), (64, 256, 56, 56), (64, 2048, 7, 7)]


def _bn_shapes(div: int, quick: bool) -> list[Shape]:
    bench = [Shape(f"{max(1, n // div)}×{c}×{h}×{w} {fmt}", ((max(1, n // div), c, h, w), fmt), headline=c == 256)
             for n, c, h, w in RESNET50_BN for fmt in ("nchw", "nhwc")]
    odd = [Shape(f"{'×'.join(map(str, s))} {fmt}", (s, fmt), odd=True)
           for s in ((1, 3, 1, 1), (3, 5, 7, 9), (2, 129, 3, 3)) for fmt in ("nchw", "nhwc")]
    if quick:
        bench = [Shape(f"8×64×14×14 {fmt}", ((8, 64, 14, 14), fmt), headline=True) for fmt in ("nchw", "nhwc")]
        odd = [odd[2], odd[5]]  # 3×5×7×9 nchw, 2×129×3×3 nhwc
    return bench + odd


def _layout(t, fmt):
    return t.contiguous(memory_format=torch.channels_last) if fmt == "nhwc" else t


def _bn_make(shape, dtype, device, g):
    dims, fmt = shape.dims
    c = dims[1]
    x = _layout(_randn(dims, dtype, device, g) * 0.5 + 0.3, fmt)
    rm = _randn((c,), torch.float32, device, g, 0.2)
    rv = (_randn((c,), torch.float32, device, g, 0.2).abs() + 0.5)
    return [x, rm, rv]


def eager_bn(x, rm, rv):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return (torch.linalg.vector_norm(mean - rm.to(x.dtype)) + torch.linalg.vector_norm(var - rv.to(x.dtype)),)


def _bn_work(shape, dtype):
    dims, _ = shape.dims
    return "GB", 3 * _nbytes(dims, dtype)  # read x (forward), read x and write its gradient (backward)


# ---- generator block ----------------------------------------------------------------------------
# (N, Cin, Cout, H): the generators' block shapes, CIFAR to ImageNet (input H×H, output 2H×2H); the
# headline is the CIFAR generator's first block at the CIFAR preset's batch
BLOCK_SHAPES = [(32, 128, 128, 8), (32, 128, 64, 16), (256, 128, 128, 8), (64, 64, 64, 56)]
HEADLINE_BLOCK = (256, 128, 128, 8)


def _block_shapes(div: int, quick: bool) -> list[Shape]:
    bench = [Shape(f"{max(1, n // div)}×{ci}→{co} {h}→{2 * h}px", (max(1, n // div), ci, co, h, h),
                   headline=(n, ci, co, h) == HEADLINE_BLOCK) for n, ci, co, h in BLOCK_SHAPES]
    odd = [Shape("1×3→5 1→2px", (1, 3, 5, 1, 1), odd=True), Shape("2×5→6 7×9→14×18px", (2, 5, 6, 7, 9), odd=True),
           Shape("3×33→17 4→8px nhwc", (3, 33, 17, 4, 4, "nhwc"), odd=True)]
    if quick:
        bench, odd = [Shape("4×16→16 4→8px", (4, 16, 16, 4, 4), headline=True)], odd[1:]
    return bench + odd


def _conv_make(shape, dtype, device, g):
    n, ci, co, h, w, *fmt = shape.dims
    x = _layout(_randn((n, ci, h, w), dtype, device, g), fmt[0] if fmt else "nchw")
    return [x, _randn((co, ci, 3, 3), dtype, device, g, 1.0 / math.sqrt(9 * ci))]


def eager_upsample_conv(x, w):
    y = F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True), w, padding=1)
    ya = y.to(acc_dtype(y.dtype))
    return y, ya.sum((0, 2, 3)), ya.square().sum((0, 2, 3))


def _upsample_conv_fused(backend):
    from madfast.ops.upsample_conv import upsample_conv
    return lambda x, w: upsample_conv(x, w, stats=True, backend=backend)


def _conv_work(shape, dtype):
    n, ci, co, h, w, *_ = shape.dims
    return "TFLOP", 3 * 2 * n * co * (2 * h) * (2 * w) * ci * 9  # forward, data and weight gradients


def _block_make(shape, dtype, device, g):
    x, w = _conv_make(shape, dtype, device, g)
    co = w.shape[0]
    gamma = (1 + _randn((co,), dtype, device, g, 0.1))
    beta = _randn((co,), dtype, device, g, 0.1)
    rm, rv = _randn((co,), dtype, device, g, 0.1), (1 + _randn((co,), dtype, device, g, 0.1).abs())
    return [x, w, gamma, beta, rm, rv, block_slope(dtype)]


def block_slope(dtype: torch.dtype) -> float:
    """LeakyReLU's slope in the block check: 0.2, but 1 in fp16/bf16, where one rounding of z ≈ 0
    flips the branch at random points (in eager PyTorch as in the kernels) and the fp64 comparison
    would measure those flips rather than the kernel."""
    return 0.2 if dtype in (torch.float32, torch.float64) else 1.0


def eager_block(x, w, gamma, beta, rm, rv, slope):
    """nn.Sequential(UpsamplingBilinear2d(2), Conv2d(3×3, no bias), BatchNorm2d, LeakyReLU) in train
    mode: the output and the running statistics after the step."""
    rm, rv = rm.clone(), rv.clone()
    y = F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True), w, padding=1)
    z = F.batch_norm(y, rm, rv, gamma, beta, training=True, momentum=0.1, eps=1e-5)
    return F.leaky_relu(z, slope), rm, rv


def _block_fused(backend):
    from madfast.nn import UpsampleConvBlock

    blocks: dict[tuple, UpsampleConvBlock] = {}  # built once per shape, not inside the timed call

    def run(x, w, gamma, beta, rm, rv, slope):
        key = (x.shape[1], w.shape[0], x.dtype, x.device, slope)
        if key not in blocks:
            blocks[key] = UpsampleConvBlock(key[0], key[1], negative_slope=slope,
                                            backend=backend).to(device=x.device, dtype=x.dtype)
        rm, rv = rm.clone(), rv.clone()
        params = {"1.weight": w, "2.weight": gamma, "2.bias": beta, "2.running_mean": rm, "2.running_var": rv}
        return torch.func.functional_call(blocks[key], params, (x,)), rm, rv
    return run


# ---- BN normalise + LeakyReLU -------------------------------------------------------------------
def _bn_lrelu_shapes(div: int, quick: bool) -> list[Shape]:
    bench = [Shape(f"{max(1, n // div)}×{co}×{2 * h}×{2 * h}", ((max(1, n // div), co, 2 * h, 2 * h), "nchw"),
                   headline=(n, ci, co, h) == HEADLINE_BLOCK) for n, ci, co, h in BLOCK_SHAPES]
    odd = [Shape("1×1×1×1", ((1, 1, 1, 1), "nchw"), odd=True), Shape("3×7×5×9 nhwc", ((3, 7, 5, 9), "nhwc"), odd=True),
           Shape("2×3×1025×1", ((2, 3, 1025, 1), "nchw"), odd=True)]
    if quick:
        bench, odd = [Shape("4×16×8×8", ((4, 16, 8, 8), "nchw"), headline=True)], odd[1:]
    return bench + odd


def _bn_lrelu_make(shape, dtype, device, g):
    dims, fmt = shape.dims
    acc = acc_dtype(dtype)
    return [_layout(_randn(dims, dtype, device, g), fmt), 1 + _randn((dims[1],), acc, device, g, 0.3),
            _randn((dims[1],), acc, device, g, 0.3)]


def eager_bn_lrelu(y, scale, shift):
    acc = scale.dtype
    return (F.leaky_relu(y.to(acc) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), 0.2).to(y.dtype),)


def _bn_lrelu_fused(backend):
    from madfast.ops.bn_lrelu import bn_lrelu
    return lambda y, scale, shift: (bn_lrelu(y, scale, shift, 0.2, backend),)


def _bn_lrelu_work(shape, dtype):
    dims, _ = shape.dims
    return "GB", 4 * _nbytes(dims, dtype)  # read y, write out; read grad and y, write grad_y (≈)


def _fused_loss(name, **kw):
    def make(backend):
        from madfast import ops
        fn = getattr(ops, name)
        return lambda *x: (fn(*x, backend=backend, **kw),)
    return make


def _logit_case(name, eager, fused, dispatch) -> Case:
    return Case(name, _logits_make, eager, fused, _logit_shapes, _logit_work, grads=(0, 1), dispatches=(dispatch,))


CASES: dict[str, Case] = {c.name: c for c in [
    Case("ema", _ema_make, _ema_eager, _ema_fused, _ema_shapes, _ema_work, in_place=True, dispatches=("ema_update_",)),
    _logit_case("kl", eager_kl, _fused_loss("kl_div", temperature=TAU), "kl_div_fwd"),
    _logit_case("adversarial", _adv_eager("kl"),
                _fused_loss("adversarial_loss", bound=BOUND, kind="kl", temperature=1.0), "kl_div_fwd"),
    _logit_case("adversarial_l1", _adv_eager("l1"), _fused_loss("adversarial_loss", bound=BOUND, kind="l1"), "l1_fwd"),
    Case("bn_stats", _bn_make, eager_bn, _fused_loss("bn_stat_loss"), _bn_shapes, _bn_work, grads=(0,),
         dispatches=("bn_stat_losses",)),
    Case("upsample_conv", _conv_make, eager_upsample_conv, _upsample_conv_fused, _block_shapes, _conv_work,
         grads=(0, 1), dispatches=("upsample_conv",), convolution=True),
    Case("block", _block_make, eager_block, _block_fused, _block_shapes, _conv_work, grads=(0, 1, 2, 3),
         dtypes=(torch.float32, torch.bfloat16, torch.float16), dispatches=("upsample_block",), convolution=True),
    Case("bn_lrelu", _bn_lrelu_make, eager_bn_lrelu, _bn_lrelu_fused, _bn_lrelu_shapes, _bn_lrelu_work,
         grads=(0, 1, 2), dispatches=("bn_lrelu",)),
]}
OP_NAMES = tuple(CASES)
