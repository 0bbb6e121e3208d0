"""The fused upsample×2 → conv3×3 (Triton implicit GEMMs; the "aten" path fused around ATen's
convolution), forward and backward, against the torch reference and fp64 formulas; and the block's
BN-normalise/LeakyReLU tail (bn_lrelu) on every backend it has."""

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPILED_BACKENDS, DEVICES, assert_within, skip_unless_available

from madfast.ops.upsample_conv import torch_upsample_conv, upsample_conv
from madfast.ops.upsample_conv.bilinear_adjoint import bilinear_taps, torch_bilinear_adjoint, triton_bilinear_adjoint
from madfast.ops.bn_lrelu import bn_lrelu
from madfast.ops.bn_stats.reference import torch_channel_moments
from madfast.ops.bn_stats.triton_kernel import triton_channel_moments
from madfast.ops.upsample_conv.op import upsample_conv_moments

# upsample_conv's fused backends: "triton" and "aten" (fused around ATen's convolution)
BACKENDS = [(d, b) for d in DEVICES for b in ("triton", "aten")]

CASES = [  # (N, Cin, Cout, H, W): 1×1→2×2, 4×4→8×8, 7×7→14×14, 8×8→16×16; odd channel counts
    (1, 3, 3, 1, 1), (33, 3, 17, 1, 1), (2, 17, 3, 4, 4), (1, 64, 17, 7, 7), (33, 3, 5, 4, 4), (2, 17, 64, 8, 8),
    (1, 128, 128, 4, 4),
]


def run(fn, x, w):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y, s, ss = fn(x, w)
    # grad_output ≠ 1, and gradients through the statistics too (as train-mode BN takes them)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)).sum()
    (loss + (s.double() * 0.01).sum() + (ss.double() * 1e-3).sum()).backward()
    return [y.detach(), s.detach(), ss.detach(), x.grad, w.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_reference(device, backend, case, channels_last, dtype):
    skip_unless_available("upsample_conv", backend, device)
    N, Cin, Cout, H, W = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(Cout, Cin, 3, 3, generator=g, dtype=torch.float64).to(device) / (3 * Cin**0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def reference(x, w):
        y = torch_upsample_conv(x, w)
        return y, y.double().sum((0, 2, 3)), y.double().square().sum((0, 2, 3))

    ref = run(reference, x, w)
    same = run(reference, x.to(dtype), w.to(dtype))
    ours = run(lambda a, b: upsample_conv(a, b, stats=True, backend=backend), x.to(dtype), w.to(dtype))
    assert ours[0].dtype == dtype and ours[0].shape == (N, Cout, 2 * H, 2 * W)
    if channels_last and H * W > 1:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for i, (what, factor) in enumerate([("y", 2), ("sum", 2), ("sum of squares", 2), ("grad x", 3), ("grad w", 3)]):
        assert_within(ours[i], ref[i], same[i], dtype, factor, what)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fp64_and_gradients_of_one_input(device, backend):
    """fp64 runs in fp64 on "aten" (fp32 GEMMs in Triton), sums included; asking for one gradient
    computes only that one."""
    skip_unless_available("upsample_conv", backend, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64).to(device)
    tol = 1e-10 if backend != "triton" else 1e-4
    ref = torch_upsample_conv(x, w)
    y, s, ss = upsample_conv(x, w, stats=True, backend=backend)
    assert s.dtype == ss.dtype == torch.float64
    for ours, theirs in ((y, ref), (s, ref.sum((0, 2, 3))), (ss, ref.square().sum((0, 2, 3)))):
        torch.testing.assert_close(ours, theirs, atol=tol * theirs.abs().max().item(), rtol=tol)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)
    for wanted in ("x", "w"):
        a, b = x.clone().requires_grad_(wanted == "x"), w.clone().requires_grad_(wanted == "w")
        (grad,) = torch.autograd.grad((upsample_conv(a, b, backend=backend)[0] * gy).sum(), a if wanted == "x" else b)
        (expected,) = torch.autograd.grad((torch_upsample_conv(a, b) * gy).sum(), a if wanted == "x" else b)
        torch.testing.assert_close(grad, expected, atol=tol * expected.abs().max().item(), rtol=tol)


def test_without_stats_and_torch_backend():
    x, w = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3)
    y, s, ss = upsample_conv(x, w, backend="torch")
    assert s is None and ss is None
    torch.testing.assert_close(y, torch_upsample_conv(x, w))
    for backend in ("aten", "triton"):
        skip_unless_available("upsample_conv", backend, "cpu")
        y2, s2, ss2 = upsample_conv(x, w, backend=backend)
        assert s2 is None and ss2 is None
        torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in ("torch", "aten", "triton")])
def test_stats_are_channel_sums_on_every_backend(device, backend, dtype):
    """stats=True gives Σy and Σy² per output channel over (N, 2H, 2W) on every backend — not the
    batch mean and variance that "aten" and "triton" compute inside — in fp32 (fp64 for fp64), with
    their gradients; against fp64 F.interpolate + F.conv2d, summed here."""
    skip_unless_available("upsample_conv", backend, device)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) + 0.5).to(device)
    w = (torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) / 6).to(device)
    g_sum, g_sumsq = (torch.randn(6, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y64 = F.conv2d(F.interpolate(xr, scale_factor=2, mode="bilinear", align_corners=True), wr, padding=1)
    sum64, sumsq64 = y64.sum((0, 2, 3)), (y64 * y64).sum((0, 2, 3))
    expected_grads = torch.autograd.grad((sum64 * g_sum).sum() + (sumsq64 * g_sumsq).sum(), (xr, wr))

    xa, wa = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    _, s, ss = upsample_conv(xa, wa, stats=True, backend=backend)
    assert s.dtype == ss.dtype == dtype and s.shape == ss.shape == (6,)
    tol = 1e-10 if dtype == torch.float64 and backend != "triton" else 2e-5  # Triton: fp32 GEMMs
    for what, ours, theirs in (("sum", s, sum64), ("sum of squares", ss, sumsq64)):
        torch.testing.assert_close(ours.double(), theirs.detach(), atol=tol * theirs.abs().max().item(), rtol=tol,
                                   msg=lambda m, what=what: f"{what}: {m}")
    grads = torch.autograd.grad((s.double() * g_sum).sum() + (ss.double() * g_sumsq).sum(), (xa, wa))
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours.double(), theirs, atol=tol * theirs.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("backend", ["torch", "aten", "triton"])
@pytest.mark.parametrize("shapes", [((0, 3, 4, 4), (5, 3, 3, 3)), ((2, 3, 4, 4), (0, 3, 3, 3))],
                         ids=["no images", "no output channels"])
def test_empty_inputs(backend, shapes):
    """y is empty, Σy and Σy² over no values are 0, and the gradients (through y and the sums
    alike) are zeros of the inputs' shapes."""
    skip_unless_available("upsample_conv", backend, "cpu")
    if backend != "triton" and shapes[1][0] == 0:
        pytest.skip("ATen's convolution (torch and aten backends) refuses a weight with no output channels")
    x, w = torch.randn(shapes[0], requires_grad=True), torch.randn(shapes[1], requires_grad=True)
    y, s, ss = upsample_conv(x, w, stats=True, backend=backend)
    assert y.shape == (x.shape[0], w.shape[0], 8, 8) and s.shape == ss.shape == (w.shape[0],)
    assert torch.count_nonzero(s) == torch.count_nonzero(ss) == 0
    gx, gw = torch.autograd.grad(y.sum() + s.sum() + ss.sum(), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape and torch.count_nonzero(gx) == torch.count_nonzero(gw) == 0


def test_bad_input():
    x, w = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3)
    with pytest.raises(ValueError, match="weight must have shape \\(Cout, 4, 3, 3\\)"):
        upsample_conv(torch.randn(2, 4, 4, 4), w)
    with pytest.raises(ValueError, match="x must be 4-D"):
        upsample_conv(x[0], w)
    with pytest.raises(TypeError, match="weight has dtype"):
        upsample_conv(x, w.double())
    with pytest.raises(ValueError, match="weight must have shape"):
        upsample_conv(x, torch.randn(5, 3, 5, 5))


def test_triton_refuses_images_past_32_bit_indexing():
    """The Triton kernels index within an image in 32 bits: a larger image is an error naming x,
    raised before anything is allocated (x here is one expanded element, no memory)."""
    pytest.importorskip("triton")
    from madfast.ops.upsample_conv.triton_kernel import triton_upsample_conv_fwd, triton_upsample_conv_grad_weight

    x = torch.zeros(1, 1, 1, 1).expand(2, 2**16, 2**8, 2**7)
    with pytest.raises(ValueError, match="one image of x has 2147483648 elements"):
        triton_upsample_conv_fwd(x, torch.zeros(1, 2**16, 3, 3))
    with pytest.raises(ValueError, match="one image of x has"):
        triton_upsample_conv_grad_weight(x, torch.zeros(1), torch.Size((1, 2**16, 3, 3)))


def test_bad_input_to_the_triton_backward_op():
    """The registered backward op checks its arguments too, naming each one (the Triton forward is
    only reached through upsample_conv, which checks)."""
    skip_unless_available("upsample_conv", "triton", "cpu")
    backward = torch.ops.madfast.upsample_conv_backward_triton
    x, w, g = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3), torch.randn(2, 5, 8, 8)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        backward(g[:, :4], x, w, None, None, None, None, True, True)
    with pytest.raises(ValueError, match="grad_mean must have shape"):
        backward(g, x, w, None, None, torch.randn(4), None, True, True)
    with pytest.raises(ValueError, match="y \\(the forward's output\\) must be given when grad_var"):
        backward(g, x, w, None, torch.randn(5), None, torch.randn(5), True, True)
    with pytest.raises(ValueError, match="mean \\(the forward's output\\) must be given when grad_var"):
        backward(g, x, w, g, None, None, torch.randn(5), True, True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (33, 17, 1, 1), (1, 64, 7, 7), (3, 2, 33, 31)],
                         ids=lambda s: "x".join(map(str, s)))  # the last: N·H·W split over 3 programs
@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_bn_lrelu_matches_reference(device, backend, shape, layout):
    skip_unless_available("bn_lrelu", backend, device)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=g).to(device)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        y = y.transpose(2, 3).contiguous().transpose(2, 3)
    scale, shift = (torch.rand(shape[1], generator=g) + 0.5).to(device), torch.randn(shape[1], generator=g).to(device)
    grad = torch.randn(shape, generator=g).to(device)
    results = []
    for b in ("torch", backend):
        args = [t.clone().requires_grad_() for t in (y, scale, shift)]
        out = bn_lrelu(*args, 0.2, b)
        out.backward(grad)
        results.append([out.detach()] + [a.grad for a in args])
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    forward = torch.ops.madfast.bn_lrelu_triton if backend == "triton" else torch.ops.madfast.bn_lrelu
    backward = torch.ops.madfast.bn_lrelu_backward_triton if backend == "triton" else torch.ops.madfast.bn_lrelu_backward
    torch.library.opcheck(forward, (y.clone().requires_grad_(), scale, shift, 0.2))
    torch.library.opcheck(backward, (grad, y, scale, shift, 0.2))


def test_bn_lrelu_bad_input():
    skip_unless_available("bn_lrelu", "cpp", "cpu")
    y, c = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(ValueError, match="scale must have shape \\(3,\\)"):
        torch.ops.madfast.bn_lrelu(y, torch.ones(4), c, 0.2)
    with pytest.raises(ValueError, match="y must be 4-D"):
        torch.ops.madfast.bn_lrelu(y[0], c, c, 0.2)
    with pytest.raises(ValueError, match="grad must have y's shape"):
        torch.ops.madfast.bn_lrelu_backward(y[:1], y, c, c, 0.2)
    with pytest.raises(TypeError, match="grad has dtype"):
        torch.ops.madfast.bn_lrelu_backward(y.double(), y, c, c, 0.2)


def test_block_ops_with_a_meta_argument_raise():
    """Called directly (torch.ops), a meta weight (or BN statistic) beside a real x goes to the fake
    kernel, which checks like the kernels instead of returning uninitialised values."""
    x, w = torch.randn(1, 2, 3, 3), torch.randn(4, 2, 3, 3, device="meta")
    ops = [torch.ops.madfast.upsample_conv_aten]
    ops += [torch.ops.madfast.upsample_conv_triton] if hasattr(torch.ops.madfast, "upsample_conv_triton") else []
    for op in ops:
        with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
            op(x, w, True)
    x, w, g = torch.randn(1, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(1, 4, 6, 6, device="meta")
    backward = {"aten": (torch.ops.madfast.upsample_conv_backward_aten, (None,) * 4)}
    if hasattr(torch.ops.madfast, "upsample_conv_backward_triton"):
        backward["triton"] = (torch.ops.madfast.upsample_conv_backward_triton, (None,) * 4)
    for op, nones in backward.values():
        with pytest.raises(ValueError, match="grad_y is on meta but x is on cpu"):
            op(g, x, w, *nones, True, True)
    y, c = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(ValueError, match="var is on meta but y is on cpu"):
        torch.ops.madfast.bn_lrelu_aten(y, c, c.to("meta"), None, None, 1e-5, 0.2, True)
    with pytest.raises(ValueError, match="grad is on meta but y is on cpu"):
        torch.ops.madfast.bn_lrelu_backward_aten(y.to("meta"), y, c, c, None, None, 1e-5, 0.2, True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_bn_lrelu_meta_argument_raises(backend):
    """A meta scale or shift beside a real y sends the dispatcher to the fake kernel, which checks
    them as the kernels do instead of returning an uninitialised y."""
    skip_unless_available("bn_lrelu", backend, "cpu")
    y, c = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(ValueError, match="scale is on meta but y is on cpu"):
        bn_lrelu(y, c.to("meta"), c, 0.2, backend)
    with pytest.raises(ValueError, match="shift is on meta but y is on cpu"):
        bn_lrelu(y, c, c.to("meta"), 0.2, backend)


# ---- the "aten" path's parts: gather-form bilinear adjoint, Welford moments, its ops ----

@pytest.mark.parametrize("size", range(1, 130))
def test_bilinear_taps_are_the_transposed_interpolation_matrix(size):
    """Row h of the adjoint gathers from rows 2h−1 … 2h+2 only: the taps, scattered into a dense
    (H, 2H) matrix, equal F.interpolate's own (2H, H) matrix transposed (fp64)."""
    rows, weights = bilinear_taps(size, torch.device("cpu"), torch.float64)
    dense = torch.zeros(size, 2 * size, dtype=torch.float64).scatter_add_(1, rows, weights)
    eye = torch.eye(size, dtype=torch.float64).view(size, 1, size)  # batch of unit signals e_h
    interp = F.interpolate(eye, size=2 * size, mode="linear", align_corners=True).view(size, 2 * size)
    torch.testing.assert_close(dense, interp, atol=1e-12, rtol=0)  # ATen takes u·(H−1)/(2H−1) in floating point


ADJOINT_SHAPES = [(1, 1, 1, 1), (2, 3, 1, 5), (2, 3, 2, 3), (1, 5, 7, 9), (3, 17, 8, 8), (1, 70, 13, 11)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", ADJOINT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bilinear_adjoint_matches_autograd_of_interpolate(impl, shape, layout):
    if impl == "triton":
        skip_unless_available("upsample_conv", "triton", "cpu")
    N, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    grad_up = torch.randn(N, C, 2 * H, 2 * W, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        grad_up = grad_up.contiguous(memory_format=torch.channels_last)
    up = F.interpolate(x, size=(2 * H, 2 * W), mode="bilinear", align_corners=True)
    (expected,) = torch.autograd.grad(up, x, grad_up)
    adjoint = torch_bilinear_adjoint if impl == "torch" else triton_bilinear_adjoint
    torch.testing.assert_close(adjoint(grad_up, H, W), expected, atol=1e-13, rtol=0)
    # low precision: summed in fp32, one rounding at the end
    low = adjoint(grad_up.to(torch.bfloat16), H, W)
    assert low.dtype == torch.bfloat16
    (exp_low,) = torch.autograd.grad(up, x, grad_up.to(torch.bfloat16).double())
    torch.testing.assert_close(low.double(), exp_low, atol=2 ** -8 * exp_low.abs().max().item(), rtol=2 ** -7)


def _offset_data(shape, offset, std, dtype):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + offset).to(dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (33, 17, 1, 1), (3, 2, 33, 31), (1, 1, 64, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_channel_moments_when_mean_dwarfs_std(impl, dtype, shape, layout):
    """|mean| = 1000·std (100·std in bf16, whose spacing at 4000 is 16): E[y²]−E[y]² in fp32 loses
    the variance here; Welford/Chan keeps it to ~1e-6."""
    if impl == "triton":
        skip_unless_available("upsample_conv", "triton", "cpu")
    y = _offset_data(shape, 4000.0, 4.0 if dtype == torch.float32 else 40.0, dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)  # of the rounded values
    if impl == "torch":
        mean, var = torch_channel_moments(y)
    else:  # chunk and split merges: tests/test_losses.py::test_bn_moments_exact_when_mean_dwarfs_std
        mean, var = triton_channel_moments(y)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean64, atol=0, rtol=1e-6)
    torch.testing.assert_close(var.double(), var64, atol=0, rtol=1e-5)
    if dtype == torch.float32:  # E[y²]−E[y]² does fail here (so the test can tell them apart)
        naive = y.square().mean((0, 2, 3)) - y.mean((0, 2, 3)).square()
        assert ((naive.double() - var64).abs() / var64).max() > 1e-3


MOMENT_BACKENDS = ("torch", "aten", "triton")


@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in MOMENT_BACKENDS])
def test_batch_moments_when_mean_dwarfs_std(device, backend):
    """upsample_conv_moments on every backend ("aten": Welford; "triton": per-tile partials,
    Chan-combined; "torch": var_mean): the batch mean and biased variance of the y they return,
    against fp64 — with |mean| > 100·std, where E[y²]−E[y]² in fp32 loses the variance (checked
    too); upsample_conv's Σy, Σy² agree with them."""
    skip_unless_available("upsample_conv", backend, device)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64) * 0.01 + 10).to(device)
    w = torch.zeros(5, 6, 3, 3, dtype=torch.float64)
    w[:, :, 1, 1] = torch.rand(5, 6, generator=g, dtype=torch.float64) + 0.5  # centre tap: no padding at the border
    w = w.to(device)
    ref = torch_upsample_conv(x, w)
    y, mean, var = upsample_conv_moments(x.float(), w.float(), backend=backend)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    assert (mean64.abs() / var64.sqrt()).min() > 100
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean64, atol=0, rtol=1e-6)
    # measured ≤ 1.2e-7 on every backend here (|mean| ≈ 3300·std); moments about an fp32 tile mean
    # instead of a pivot (the Triton epilogue without it) are off by 1.2e-4
    torch.testing.assert_close(var.double(), var64, atol=0, rtol=1e-6)
    naive = y.square().mean((0, 2, 3)) - y.mean((0, 2, 3)).square()
    assert ((naive.double() - var64).abs() / var64).max() > 1e-3
    _, s, ss = upsample_conv(x.float(), w.float(), stats=True, backend=backend)
    count = y.numel() // y.shape[1]
    torch.testing.assert_close(s.double(), y.double().sum((0, 2, 3)), atol=0, rtol=1e-6)
    torch.testing.assert_close(ss.double(), y.double().square().sum((0, 2, 3)), atol=0, rtol=1e-6)
    assert count == 4 * 10 * 14


@pytest.mark.parametrize("device", DEVICES)
def test_aten_moments_in_fp64(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64).to(device) + 10
    w = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64).to(device)
    ref = torch_upsample_conv(x, w)
    var64, mean64 = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    y, mean, var = upsample_conv_moments(x, w, backend="aten")
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(mean, mean64, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(var, var64, atol=0, rtol=1e-10)


@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in MOMENT_BACKENDS])
def test_moment_gradients(device, backend):
    """Gradients through y, the mean and the variance together, against autograd of the fp64
    composition of F.interpolate, F.conv2d and torch.var_mean (Triton: fp32 GEMMs)."""
    skip_unless_available("upsample_conv", backend, device)
    tol = 1e-10 if backend == "aten" else 1e-4
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(7, 4, 3, 3, generator=g, dtype=torch.float64).to(device)
    gy, gm, gv = (torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in ((3, 7, 10, 12), 7, 7))

    def loss(y, mean, var):
        return (y * gy).sum() + (mean * gm).sum() + (var * gv).sum()

    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = torch.autograd.grad(loss(*upsample_conv_moments(xa, wa, backend=backend)), (xa, wa))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F.conv2d(F.interpolate(xr, scale_factor=2, mode="bilinear", align_corners=True), wr, padding=1)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    expected = torch.autograd.grad(loss(y, mean, var), (xr, wr))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("backend", ["aten", "triton"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device, backend):
    skip_unless_available("upsample_conv", backend, device)
    forward = getattr(torch.ops.madfast, f"upsample_conv_{backend}")
    backward = getattr(torch.ops.madfast, f"upsample_conv_backward_{backend}")
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(forward, (x, w, True))
    torch.library.opcheck(forward, (x.detach().contiguous(memory_format=torch.channels_last), w, False))
    g, y = torch.randn(2, 4, 8, 10, device=device), torch.randn(2, 4, 8, 10, device=device)
    gm, gv, mean = torch.randn(4, device=device), torch.randn(4, device=device), torch.randn(4, device=device)
    # (grad_y, x, weight, y, mean, grad_mean, grad_var, needs grad_x, needs grad_weight)
    torch.library.opcheck(backward, (g, x.detach(), w.detach(), None, None, None, None, True, True))
    torch.library.opcheck(backward, (g, x.detach(), w.detach(), y, mean, gm, gv, True, False))
    torch.library.opcheck(backward, (g, x.detach(), w.detach(), None, None, gm, None, False, True))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: [t.sum() for t in upsample_conv(a, b, stats=True, backend=backend)[:2]],
                             fullgraph=True, backend="aot_eager")
    expected = torch_upsample_conv(x, w).sum()  # the block's output, and its per-channel sums
    for got in compiled(x, w):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_aten_backward_op_bad_input():
    x, w, g = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3), torch.randn(2, 5, 8, 8)
    backward = torch.ops.madfast.upsample_conv_backward_aten
    with pytest.raises(ValueError, match="grad_y must have shape"):
        backward(g[:, :4], x, w, None, None, None, None, True, True)
    with pytest.raises(ValueError, match="y and mean .* must be given with grad_var"):
        backward(g, x, w, None, None, None, torch.randn(5), True, True)


@pytest.mark.parametrize("M,tiles", [(1, 1), (511, 1), (2112, 1), (802_816, 36), (802_816, 4096), (8192, 144)])
def test_grad_weight_splits_cover_every_pixel_once(M, tiles):
    """The weight gradient's pixel splits: each a whole number of BLOCK_M steps (≥ 16 unless M is
    small), together exactly [0, M), ~1024 programs where M allows (test_matches_reference's
    33×3→5 4×4 case runs 4 splits, the last one short, against the fp64 formula)."""
    pytest.importorskip("triton")
    from madfast.ops.upsample_conv.triton_kernel import grad_weight_splits
    splits, m_split = grad_weight_splits(M, tiles, 32)
    assert m_split % 32 == 0 and (splits - 1) * m_split < M <= splits * m_split
    assert splits == 1 or m_split >= 16 * 32
    assert splits * tiles <= max(1024, tiles) + tiles
    if M == 802_816 and tiles == 36:  # 64×64→64 ch 56→112 px: ≥ 16 programs share the pixels
        assert splits >= 16
