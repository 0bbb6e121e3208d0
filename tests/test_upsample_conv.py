"""The fused upsample×2 → conv3×3 (Triton implicit GEMMs, forward and backward) against the torch reference."""

import pytest
import torch

from conftest import skip_unless_available
from madfast.ops.upsample_conv import torch_upsample_conv, upsample_conv

FLOORS = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
CASES = [  # (N, Cin, Cout, H, W): 1×1→2×2, 4×4→8×8, 7×7→14×14, 8×8→16×16; odd channel counts
    (1, 3, 3, 1, 1), (33, 3, 17, 1, 1), (2, 17, 3, 4, 4), (1, 64, 17, 7, 7), (33, 3, 5, 4, 4), (2, 17, 64, 8, 8),
]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run(fn, x, w):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y, s, ss = fn(x, w)
    # grad_output ≠ 1, and gradients through the statistics too (as train-mode BN takes them)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()
    (loss + (s.double() * 0.01).sum() + (ss.double() * 1e-3).sum()).backward()
    return [y.detach(), s.detach(), ss.detach(), x.grad, w.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case, channels_last, dtype):
    skip_unless_available("upsample_conv", "triton", "cpu")
    N, Cin, Cout, H, W = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Cout, Cin, 3, 3, generator=g, dtype=torch.float64) / (3 * Cin**0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def reference(x, w):
        y = torch_upsample_conv(x, w)
        return y, y.double().sum((0, 2, 3)), y.double().square().sum((0, 2, 3))

    ref = run(reference, x, w)
    same = run(reference, x.to(dtype), w.to(dtype))
    ours = run(lambda a, b: upsample_conv(a, b, stats=True, backend="triton"), x.to(dtype), w.to(dtype))
    assert ours[0].dtype == dtype and ours[0].shape == (N, Cout, 2 * H, 2 * W)
    if channels_last and H * W > 1:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for i, (what, factor) in enumerate([("y", 2), ("sum", 2), ("sum of squares", 2), ("grad x", 3), ("grad w", 3)]):
        bound = max(factor * rel_err(same[i], ref[i]), FLOORS[dtype])
        assert rel_err(ours[i], ref[i]) <= bound, f"{what}: {rel_err(ours[i], ref[i]):.3g} > {bound:.3g}"


def test_without_stats_and_torch_backend():
    x, w = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3)
    y, s, ss = upsample_conv(x, w, backend="torch")
    assert s is None and ss is None
    torch.testing.assert_close(y, torch_upsample_conv(x, w))
    skip_unless_available("upsample_conv", "triton", "cpu")
    y2, s2, _ = upsample_conv(x, w, backend="triton")
    assert s2 is None
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)


def test_opcheck_and_compile():
    skip_unless_available("upsample_conv", "triton", "cpu")
    x, w = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.madfast.upsample_conv_triton, (x, w, True))
    g = torch.randn(2, 4, 8, 10)
    torch.library.opcheck(torch.ops.madfast.upsample_conv_backward_triton, (g, x.detach(), w.detach(), True, True))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: upsample_conv(a, b, stats=True, backend="triton")[0].sum(),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), torch_upsample_conv(x, w).sum(), atol=1e-4, rtol=1e-5)


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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (33, 17, 1, 1), (1, 64, 7, 7), (3, 2, 33, 31)],
                         ids=lambda s: "x".join(map(str, s)))  # the last: N·H·W split over 3 programs
def test_bn_lrelu_matches_reference(shape, channels_last):
    skip_unless_available("upsample_conv", "triton", "cpu")
    from madfast.ops.upsample_conv.bn_lrelu import bn_lrelu

    g = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=g)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    grad = torch.randn(shape, generator=g)
    results = []
    for backend in ("torch", "triton"):
        args = [t.clone().requires_grad_() for t in (y, scale, shift)]
        out = bn_lrelu(*args, 0.2, backend)
        out.backward(grad)
        results.append([out.detach()] + [a.grad for a in args])
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.madfast.bn_lrelu_triton, (y.clone().requires_grad_(), scale, shift, 0.2))
    torch.library.opcheck(torch.ops.madfast.bn_lrelu_backward_triton, (grad, y, scale, shift, 0.2))
