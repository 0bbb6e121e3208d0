"""Every CUDA kernel of madfast (csrc/cuda/*.cuh, host side included) run on the CPU through a
CUDA execution-model emulator (tests/cuda_emulator/) and checked against the torch reference or the
C++ CPU kernels: multi-block grids, channels_last and strided inputs, reductions split over
blocks, warps that return early, views that are not 16-byte aligned.
Needs no GPU (and checks no speed); on a GPU the real kernels run in the other test files too."""

import os
import sys

import pytest
import torch

from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator uses ucontext (glibc)")


@pytest.fixture(scope="module")
def emulated():
    from torch.utils.cpp_extension import load

    # torch caches JIT builds by name and sources, not by torch version: one name per version, so a
    # second torch on the machine (same Python, same CUDA) builds its own instead of loading a stale one
    version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    return load(name=f"madfast_cuda_emulated_{version}",
                sources=[os.path.join(ROOT, "tests/cuda_emulator/kernels_emulated.cpp")],
                extra_include_paths=[os.path.join(ROOT, "tests/cuda_emulator"), os.path.join(ROOT, "csrc")],
                extra_cflags=["-O1"], verbose=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape,sm_count", [((2, 3, 5, 7), 1), ((3, 70, 1, 1), 4), ((4, 2, 33, 31), 132)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_emulated_bn_lrelu(emulated, shape, sm_count, layout, dtype):
    """Forward and one-pass backward; the last shape splits each channel over several blocks."""
    from madfast.ops.bn_lrelu import bn_lrelu

    g = torch.Generator().manual_seed(2)
    y = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        # neither layout: y is copied to contiguous, grad read through its own strides
        y, grad = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (y, grad))
    scale, shift = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    args = [t.double().clone().requires_grad_() for t in (y, scale, shift)]
    expected = bn_lrelu(*args, 0.2, "torch")
    expected_grads = torch.autograd.grad(expected, args, grad.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    out = emulated.bn_lrelu(y, scale, shift, 0.2)
    assert out.dtype == dtype and out.stride() == (y.contiguous().stride() if layout == "strided" else y.stride())
    torch.testing.assert_close(out.double(), expected.detach(), atol=tol * 4, rtol=tol)
    for ours, theirs in zip(emulated.bn_lrelu_backward(grad, y, scale, shift, 0.2, sm_count), expected_grads):
        assert rel_err(ours, theirs) <= tol, rel_err(ours, theirs)


# The CUDA kernels of the loss, BN-statistics and EMA ops, emulated, against fp64 formulas or their
# C++ CPU kernels (themselves tested against the torch references in test_losses.py / test_ema_op.py).

def close(ours, theirs, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert rel_err(ours, theirs) <= tol, rel_err(ours, theirs)


def expected_logit_loss(s, t, kind, tau, reduction, sign, bound, grad):
    """loss, D, grad_s, grad_t in fp64, written out here (log_softmax and autograd, no madfast code)."""
    s, t = s.double().requires_grad_(), t.double().requires_grad_()
    if kind == "kl":
        lps, lpt = torch.log_softmax(s / tau, 1), torch.log_softmax(t / tau, 1)
        rows = (lpt.exp() * (lpt - lps)).sum(1) * tau**2
    else:
        rows = (s - t).abs().sum(1)
    if reduction == "none":
        loss = d = rows
    else:
        d = rows.sum() / {"sum": 1, "batchmean": s.shape[0], "mean": s.numel()}[reduction]
        loss = sign * (torch.clamp(d, max=bound) if bound is not None else d)
    gs, gt = torch.autograd.grad(loss, (s, t), grad.double())
    return loss.detach(), d.detach(), gs, gt


# (B, C, t's column offset): groups of 8 threads (C <= 128; 40 rows: a second block mostly past B),
# of a warp (C = 1000: the backward splits columns over blocks) and of the block (C > 2048, odd: rows
# not 16-byte aligned, a scalar head and tail); t offset by a column: no common alignment, scalar loads.
LOGIT_CASES = [(40, 5, 0), (9, 33, 1), (3, 1000, 0), (2, 2051, 0), (2, 2600, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", LOGIT_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_logit_losses(emulated, case, dtype):
    """Forward (row statistics + the one-block second stage) and backward against fp64 formulas,
    for every reduction, a bound that is hit and one that is not, and a strided grad_output."""
    B, C, offset = case
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(B, C, generator=g) * 3).to(dtype)
    t = (torch.randn(B, C + offset, generator=g) * 3).to(dtype)[:, offset:]
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    configs = [("kl", 2.0, "batchmean", 1.0, None), ("kl", 1.0, "none", 1.0, None), ("kl", 4.0, "sum", -1.0, 1e9),
               ("kl", 1.0, "batchmean", -1.0, 1e-3), ("l1", 1.0, "mean", -1.0, None), ("l1", 1.0, "none", 1.0, None),
               ("l1", 1.0, "mean", -1.0, 1e-3)]
    for kind, tau, reduction, sign, bound in configs:
        grad = (torch.randn(2 * B, generator=g).to(dtype)[::2] if reduction == "none"
                else torch.tensor(1.5, dtype=dtype))
        loss, d, gs, gt = expected_logit_loss(s, t, kind, tau, reduction, sign, bound, grad)
        if kind == "kl":
            out, stats, total = emulated.kl_div_fwd(s, t, tau, reduction, sign, bound)
            ours = emulated.kl_div_bwd(grad, s, t, stats, total, tau, reduction, sign, bound, True, True)
        else:
            out, total = emulated.l1_fwd(s, t, reduction, sign, bound)
            ours = emulated.l1_bwd(grad, s, t, total, reduction, sign, bound, True, True)
        what = f"{kind} {reduction} bound={bound}"
        assert out.dtype == dtype and out.shape == loss.shape, what
        assert rel_err(out, loss) <= tol, (what, rel_err(out, loss))
        if reduction != "none":
            assert rel_err(total, d) <= tol, (what, rel_err(total, d))
        for name, a, b in (("grad s", ours[0], gs), ("grad t", ours[1], gt)):
            assert a.dtype == dtype and a.shape == (B, C), (what, name)
            if b.abs().max() == 0:  # past the bound: exactly zero
                assert a.abs().max() == 0, (what, name)
            else:
                assert rel_err(a, b) <= 2 * tol, (what, name, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 70, 1, 1), (4, 2, 33, 31)], ids=lambda s: "x".join(map(str, s)))
def test_emulated_channel_moments(emulated, shape, layout, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g) + 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    moments = emulated.channel_moments(x)
    # the fp64 formula: per-channel mean and biased variance of the values as stored
    x64 = x.double()
    mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5  # fp32 accumulation (bf16 inputs are exact in fp32)
    torch.testing.assert_close(moments[0].double(), mean, rtol=rtol, atol=0)
    torch.testing.assert_close(moments[1].double(), var, rtol=rtol, atol=0)
    gm, gv = torch.randn(shape[1], generator=g).to(moments[0].dtype), torch.randn(shape[1], generator=g).to(moments[0].dtype)
    m = x64.numel() // shape[1]
    c = (slice(None), None, None)  # per channel, broadcast over (H, W); dim 0 (N) broadcasts too
    expected = gm.double()[c] / m + gv.double()[c] * 2 * (x64 - mean[c]) / m  # d(gm·mean + gv·var)/dx
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    # one pass of the grid, and 1 or 3 blocks whose threads walk the channel through many strides
    for max_blocks in (65535, 3, 1):
        grad = emulated.channel_moments_backward(gm, gv, x, moments[0], max_blocks)
        torch.testing.assert_close(grad.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    for ours, theirs in zip(moments, torch.ops.madfast.channel_moments(x)):  # and the C++ kernel agrees
        close(ours, theirs, dtype)


def bn_prior_formula(xs, rms, rvs):
    """Σ_l ‖mean_c(x_l) − rm_l‖₂ + ‖var_c(x_l) − rv_l‖₂ (biased) in fp64, and its gradients."""
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    loss = sum((x.mean((0, 2, 3)) - rm.double()).norm() + (x.var((0, 2, 3), unbiased=False) - rv.double()).norm()
               for x, rm, rv in zip(xs64, rms, rvs))
    return loss.detach(), torch.autograd.grad(loss, xs64)


def bn_layers(specs, seed=7):
    """(shape, layout, dtype, offset) → x, running_mean, running_var; the offset makes |mean| ≫ std."""
    g = torch.Generator().manual_seed(seed)
    xs, rms, rvs = [], [], []
    for shape, layout, dtype, offset in specs:
        x = (torch.randn(shape, generator=g) * 0.5 + offset).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = x.transpose(2, 3).contiguous().transpose(2, 3)  # neither layout: copied by the kernel
        xs.append(x)
        rms.append(torch.randn(shape[1], generator=g) + offset)
        rvs.append(torch.rand(shape[1], generator=g) + 0.2)
    return xs, rms, rvs


# Row splits for NCHW (2 × 64² = 8192 rows: 2 splits) and channels_last (400 rows: 3 splits), NCHW
# threads whose rows cross samples (40 × 35 rows, 256 apart: the (n, hw) stepping), two channel
# groups of 32 (C = 40), 1×1 maps, a lone value, |mean| ≫ std (offset 1000), a strided view, and
# bf16 beside fp32 in one call (two dtype groups).
BN_SPECS = [((2, 3, 64, 64), "contiguous", torch.float32, 0.0), ((4, 40, 10, 10), "channels_last", torch.float32, 2.0),
            ((3, 70, 1, 1), "contiguous", torch.float32, -1.0), ((1, 1, 1, 1), "contiguous", torch.float32, 0.5),
            ((2, 5, 6, 7), "contiguous", torch.float32, 1000.0), ((2, 4, 5, 3), "strided", torch.float32, 0.0),
            ((2, 33, 4, 4), "channels_last", torch.bfloat16, 1.0), ((40, 2, 7, 5), "contiguous", torch.float32, 0.3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_bn_stat_losses(emulated, dtype):
    """The multi-layer CUDA op against the fp64 formula: the loss, each layer's moments and norms,
    and every grad_x (in x's dtype and layout)."""
    specs = [(shape, layout, dtype if d == torch.float32 else d, offset) for shape, layout, d, offset in BN_SPECS]
    xs, rms, rvs = bn_layers(specs)
    loss, moments, norms = emulated.bn_stat_losses(xs, rms, rvs)
    want, grads = bn_prior_formula(xs, rms, rvs)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == moments.dtype == norms.dtype == acc
    assert moments.shape == (2, sum(x.shape[1] for x in xs)) and norms.shape == (2, len(xs))
    tol = 1e-12 if dtype == torch.float64 else 2e-5  # fp32: per-thread shifted sums, Chan merges
    assert abs(loss.item() - want.item()) <= tol * want.item()
    col = 0
    for x, rm, rv, norm_m, norm_v in zip(xs, rms, rvs, norms[0], norms[1]):
        x64, c = x.double(), x.shape[1]
        mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(moments[0, col:col + c].double(), mean, rtol=tol, atol=tol)
        torch.testing.assert_close(moments[1, col:col + c].double(), var, rtol=10 * tol, atol=tol)
        assert norm_m.item() == pytest.approx((mean - rm.double()).norm().item(), rel=10 * tol, abs=tol)
        assert norm_v.item() == pytest.approx((var - rv.double()).norm().item(), rel=10 * tol, abs=tol)
        col += c
    ones = torch.ones((), dtype=acc)
    out = emulated.bn_stat_losses_backward(2.5 * ones, xs, rms, rvs, moments, norms)
    for x, gx, want_g in zip(xs, out, grads):
        assert gx.dtype == x.dtype and gx.shape == x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert gx.is_contiguous(memory_format=torch.channels_last)
        g_tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2}[x.dtype]
        torch.testing.assert_close(gx.double(), 2.5 * want_g, rtol=g_tol, atol=g_tol * want_g.abs().max().item())


@pytest.mark.parametrize("shape,layout", [((33, 17, 1, 1), "contiguous"), ((64, 3, 2, 2), "channels_last"),
                                          ((2, 3, 64, 64), "contiguous"), ((4, 40, 10, 10), "channels_last")])
def test_emulated_bn_moments_exact_when_mean_dwarfs_std(emulated, shape, layout):
    """|mean| = 1000·std: sums and merges of partial means taken less the channel's first value, so
    the fp32 variance matches the fp64 one of the same values to 1e-5 (one-value rows, H·W = 1, and
    row splits included; without the shared pivot: 2–4e-5)."""
    g = torch.Generator().manual_seed(3)
    x = (1000 + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    _, moments, _ = emulated.bn_stat_losses([x], [torch.zeros(shape[1])], [torch.ones(shape[1])])
    assert rel_err(moments[0], mean) <= 1e-6
    assert rel_err(moments[1], var) <= 1e-5, rel_err(moments[1], var)


def test_emulated_bn_stat_losses_many_layers_and_edges(emulated):
    """More layers than one launch's table (24): two launches per stage, layer order kept; a layer
    with no positions gives NaN moments (as PyTorch's mean of nothing), the others stay finite."""
    specs = [((2, 1 + i % 5, 3, 1 + i % 4), "channels_last" if i % 3 == 0 else "contiguous", torch.float32, 0.1 * i)
             for i in range(30)]
    xs, rms, rvs = bn_layers(specs, seed=8)
    loss, moments, norms = emulated.bn_stat_losses(xs, rms, rvs)
    want, grads = bn_prior_formula(xs, rms, rvs)
    assert loss.item() == pytest.approx(want.item(), rel=2e-5)
    out = emulated.bn_stat_losses_backward(torch.ones(()), xs, rms, rvs, moments, norms)
    for gx, want_g in zip(out, grads):
        torch.testing.assert_close(gx.double(), want_g, rtol=1e-4, atol=1e-4 * want_g.abs().max().item())
    empty = torch.zeros(0, 3, 4, 4)
    loss, moments, norms = emulated.bn_stat_losses([xs[0], empty], [rms[0], torch.zeros(3)], [rvs[0], torch.ones(3)])
    assert loss.isnan() and norms[:, 0].isfinite().all() and norms[:, 1].isnan().all()
    assert moments[:, xs[0].shape[1]:].isnan().all()
    with pytest.raises(ValueError, match=r"running_mean\[1\]"):
        emulated.bn_stat_losses([xs[0], xs[1]], [rms[0], rms[0].new_zeros(99)], [rvs[0], rvs[1]])


def test_emulated_ema_update(emulated):
    """Every (EMA dtype, tensor dtype) group, full and partial 4096-element chunks, tensors shorter
    than a vector, a view that is not 16-byte aligned (the scalar path), an integer buffer."""
    g = torch.Generator().manual_seed(6)
    pairs = []
    for ema_dtype, dtype in [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                             (torch.float64, torch.float64)]:
        for n in (1, 3, 4096, 2 * 4096 + 5, 300):
            pairs.append((torch.randn(n, generator=g).to(ema_dtype), torch.randn(n, generator=g).to(dtype)))
    pairs.append((torch.randn(9001, generator=g)[1:], torch.randn(9001, generator=g)[1:]))  # offset by 4 bytes
    pairs.append((torch.randn(5, 7, generator=g).t(), torch.randn(7, 5, generator=g)))  # a transposed view
    pairs.append((torch.zeros(4, dtype=torch.long), torch.arange(4)))
    ours = [(e.clone(), p) for e, p in pairs]
    theirs = [(e.clone(), p) for e, p in pairs]
    decay = torch.tensor(0.9)
    emulated.ema_update_([e for e, _ in ours], [p for _, p in ours], decay, 0.0, -1, 0, None, None)
    torch.ops.madfast.ema_update_([e for e, _ in theirs], [p for _, p in theirs], decay)
    for (a, _), (b, _), (before, p) in zip(ours, theirs, pairs):
        assert not torch.equal(a, before) or torch.equal(b, before)
        assert torch.equal(a, b)  # the same per-element math (csrc/ema.h), fma included
        if before.is_floating_point():  # and the fp64 formula, rounded once to the EMA's dtype
            w = 1 - decay.double().item()  # the decay tensor is fp32: 1 − fl32(0.9), formed in double
            expected = before.double() + w * (p.double() - before.double())
            rtol = {torch.float64: 1e-15, torch.float32: 1e-6}.get(before.dtype, 8e-3)
            torch.testing.assert_close(a.double(), expected, rtol=rtol, atol=rtol)
        else:
            assert torch.equal(a, p)  # integer buffers copied
    # stochastic rounding: the same hashed bits on both (pair and element indices, vector and tail paths)
    ours = [(e.clone(), p) for e, p in pairs]
    theirs = [(e.clone(), p) for e, p in pairs]
    emulated.ema_update_([e for e, _ in ours], [p for _, p in ours], None, 0.999, 5, 9, None, None)
    torch.ops.madfast.ema_update_([e for e, _ in theirs], [p for _, p in theirs], None, 0.999, 5, 9)
    for (a, _), (b, _) in zip(ours, theirs):
        assert torch.equal(a, b)


def test_emulated_ema_table_written_while_capturing(emulated):
    """While a CUDA graph is captured the per-call table is written by fill kernels (128 values per
    launch) instead of a copy from a host buffer: 70 pairs = 350 values = 2 full launches and a
    partial one, same result as the copied table, bit for bit, and as the fp64 formula."""
    g = torch.Generator().manual_seed(8)
    ema = [torch.randn(n, generator=g) for n in range(1, 71)] + [torch.randn(9000, generator=g).bfloat16()]
    cur = [torch.randn(e.shape, generator=g).to(e.dtype) for e in ema]
    captured, copied = [e.clone() for e in ema], [e.clone() for e in ema]
    emulated.ema_update_captured(captured, cur, None, 0.9, -1, 0)
    emulated.ema_update_(copied, cur, None, 0.9, -1, 0, None, None)
    for a, b, e, p in zip(captured, copied, ema, cur):
        assert torch.equal(a, b)
        expected = (e.double() + 0.1 * (p.double() - e.double())).to(e.dtype)
        torch.testing.assert_close(a, expected, atol=1e-6, rtol=1e-6 if a.dtype == torch.float32 else 8e-3)


def test_emulated_ema_cached_table(emulated):
    """A plan's (host_table, table): built on the first call, reused while the tensors keep their
    storage, rebuilt when one changes -- a stale table would update the old storage."""
    g = torch.Generator().manual_seed(7)
    ema = [torch.randn(5000, generator=g), torch.randn(3, generator=g), torch.randn(7, generator=g).bfloat16(),
           torch.zeros(2, dtype=torch.long)]
    cur = [torch.randn(5000, generator=g), torch.randn(3, generator=g), torch.randn(7, generator=g).bfloat16(),
           torch.ones(2, dtype=torch.long)]
    host, table = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)

    def step(decay):
        expected = [(e.double() + (1 - decay) * (p.double() - e.double())).to(e.dtype) if e.is_floating_point()
                    else p.clone() for e, p in zip(ema, cur)]
        emulated.ema_update_(ema, cur, None, decay, -1, 0, host, table)
        for a, b in zip(ema, expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=8e-3 if a.dtype == torch.bfloat16 else 1e-6)

    step(0.5)
    rows = host.clone()
    # rows: (ema address, tensor address, numel, first CTA, pair index), fp32 group then bf16
    assert rows.tolist() == [[ema[0].data_ptr(), cur[0].data_ptr(), 5000, 0, 0], [ema[1].data_ptr(), cur[1].data_ptr(),
                             3, 2, 1], [ema[2].data_ptr(), cur[2].data_ptr(), 7, 0, 2]]
    assert torch.equal(table, rows)
    table_storage = table.data_ptr()
    step(0.75)
    assert torch.equal(host, rows) and table.data_ptr() == table_storage  # reused, not rebuilt
    old = ema[1]
    ema[1] = old.clone()  # new storage
    ema[1].data = ema[1].data.clone()
    step(0.25)
    assert host[1, 0].item() == ema[1].data_ptr() and torch.equal(table, host)
    assert not torch.equal(old, ema[1])  # the old storage was left alone
    ema[0].data = ema[0].data.double()  # dtype changed: regrouped (fp64 group first)
    step(0.5)
    assert host[0, 0].item() == ema[0].data_ptr()
