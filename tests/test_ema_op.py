"""madfast.ops.ema_update_ on every backend against the torch reference."""

import pytest
import torch

from conftest import DEVICES, backends_for, skip_unless_available
from madfast.ops import ema_update_
from madfast.ops.ema import torch_ema_update_

# dtype -> (atol, rtol): the kernels compute in fp32 like the reference, so low precision
# differs by at most one rounding of the result.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}
SIZES = [1, 7, 1023, 1025, 10**6]
CASES = [(d, b) for d in DEVICES for b in backends_for(d)]


def _pairs(shapes, dtype, device, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ema = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    cur = [torch.randn(s, generator=g).to(device=device, dtype=param_dtype or dtype) for s in shapes]
    return ema, cur


def _reference(ema, cur, decay):
    """Independent of the package: e + (1 − decay)(p − e) in fp64, rounded once to the EMA's dtype;
    decay 0 copies; non-floating pairs copied."""
    d = decay.double().item() if isinstance(decay, torch.Tensor) else float(decay)
    out = []
    for e, p in zip(ema, cur):
        if not e.is_floating_point() or d == 0:
            out.append(p.clone().to(e.dtype))
        else:
            out.append((e.double() + (1 - d) * (p.double() - e.double())).to(e.dtype))
    return out


def _assert_close(actual, expected):
    for a, b in zip(actual, expected):
        atol, rtol = TOLERANCES.get(b.dtype, (0, 0))
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _update_and_compare(ema, cur, decay, backend):
    expected = _reference(ema, cur, decay)
    ema_update_(ema, cur, decay, backend=backend)
    _assert_close(ema, expected)


def test_reference_matches_formula_in_float64():
    ema, cur = _pairs([(3, 5), (7,)], torch.float64, "cpu")
    expected = [e + (1 - 0.9) * (p - e) for e, p in zip(ema, cur)]
    torch_ema_update_(ema, cur, torch.tensor(0.9, dtype=torch.float64))
    torch.testing.assert_close(ema, expected, atol=1e-15, rtol=1e-14)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("size", SIZES)
def test_sizes_and_dtypes(device, backend, dtype, size):
    skip_unless_available("ema_update_", backend, device)
    if backend == "triton" and device == "cpu" and size == 10**6 and dtype != torch.float32:
        pytest.skip("the Triton interpreter is slow; one 10^6 case is enough on CPU")
    ema, cur = _pairs([(size,)], dtype, device)
    _update_and_compare(ema, cur, 0.99, backend)


def _mixed_shapes(n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = [(), (1,), (3,), (64,), (7, 3), (16, 3, 3, 3), (5, 1, 2), (129,), (33, 65), (4096,), (4097,)]
    return [pool[int(i)] for i in torch.randint(len(pool), (n,), generator=g)]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_150_tensors_of_mixed_shapes(device, backend, dtype):
    skip_unless_available("ema_update_", backend, device)
    ema, cur = _pairs(_mixed_shapes(), dtype, device)
    _update_and_compare(ema, cur, 0.9, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_mixed_dtypes_and_integer_buffers(device, backend):
    skip_unless_available("ema_update_", backend, device)
    e32, p32 = _pairs([(10,), (2, 3)], torch.float32, device)
    e16, p16 = _pairs([(1025,)], torch.float16, device, seed=1)
    m32, mb16 = _pairs([(300,)], torch.float32, device, param_dtype=torch.bfloat16, seed=2)  # fp32 EMA of bf16
    ints = [torch.tensor(3, device=device), torch.zeros(4, dtype=torch.int32, device=device)]
    new_ints = [torch.tensor(17, device=device), torch.arange(4, dtype=torch.int32, device=device)]
    ema = e32 + [ints[0]] + e16 + m32 + [ints[1]]
    cur = p32 + [new_ints[0]] + p16 + mb16 + [new_ints[1]]
    _update_and_compare(ema, cur, 0.75, backend)
    assert ema[2].item() == 17 and torch.equal(ema[-1], new_ints[1])


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_list_and_empty_tensors(device, backend):
    skip_unless_available("ema_update_", backend, device)
    ema_update_([], [], 0.5, backend=backend)
    ema, cur = _pairs([(0,), (5,), (0, 3)], torch.float32, device)
    _update_and_compare(ema, cur, 0.5, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous(device, backend):
    skip_unless_available("ema_update_", backend, device)
    g = torch.Generator().manual_seed(3)
    base_e = torch.randn(40, 30, generator=g).to(device)
    base_p = torch.randn(30, 40, generator=g).to(device)
    conv_e = torch.randn(8, 3, 5, 5, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    conv_p = torch.randn(8, 3, 5, 5, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    other_e = torch.randn(40, 30, generator=g).to(device)
    ema = [base_e[::2, 1:], other_e.t()[:7], conv_e, conv_e.clone()]  # strided, transposed, channels_last
    cur = [base_p.t()[::2, 1:], base_p[:7], conv_p, conv_p.contiguous()]
    expected = _reference(ema, cur, 0.8)
    untouched = base_e[1::2].clone()
    ema_update_(ema, cur, 0.8, backend=backend)
    _assert_close(ema, expected)
    assert torch.equal(base_e[1::2], untouched), "rows outside the strided view must not change"
    assert ema[2].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", CASES)
def test_decay_as_device_tensor_and_extremes(device, backend):
    skip_unless_available("ema_update_", backend, device)
    ema, cur = _pairs([(1000,), (3, 7)], torch.float32, device)
    decay = torch.tensor(0.25, device=device)
    _update_and_compare(ema, cur, decay, backend)
    before = [e.clone() for e in ema]
    ema_update_(ema, cur, 1.0, backend=backend)  # decay 1 keeps the EMA
    _assert_close(ema, before)
    ema_update_(ema, cur, 0.0, backend=backend)  # decay 0 copies
    _assert_close(ema, cur)


@pytest.mark.parametrize("device,backend", CASES)
def test_bad_input_raises_and_modifies_nothing(device, backend):
    skip_unless_available("ema_update_", backend, device)
    ema, cur = _pairs([(4,), (3,)], torch.float32, device)
    snapshot = [e.clone() for e in ema]
    cases = [
        (ValueError, "same length", (ema, cur[:1], 0.9)),
        (ValueError, "shape mismatch at index 1", (ema, [cur[0], torch.zeros(4, device=device)], 0.9)),
        (TypeError, "ema_tensors\\[0\\].*copied", ([torch.zeros(4, dtype=torch.long, device=device), ema[1]], cur, 0.9)),
        (TypeError, "cannot track", (ema, [cur[0].long(), cur[1]], 0.9)),
        (TypeError, "tensors\\[0\\] \\(torch.float32\\) must both be complex or both real",
         ([ema[0].to(torch.complex64), ema[1]], cur, 0.9)),
        (ValueError, "decay must be in \\[0, 1\\]", (ema, cur, 1.5)),
        (ValueError, "decay must be in \\[0, 1\\]", (ema, cur, -0.1)),
        (ValueError, "decay must be a float or a 0-d", (ema, cur, torch.ones(2))),
        (TypeError, "decay must be a float", (ema, cur, "0.9")),
        # a meta decay sends the cpp/cuda op to its fake kernel, which used to update nothing, silently
        (ValueError, "decay must be on the CPU or on the tensors' device", (ema, cur, torch.tensor(0.5, device="meta"))),
    ]
    if device == "cpu":
        cases.append((ValueError, "device mismatch at index 0", (ema, [cur[0].to("meta"), cur[1]], 0.9)))
    else:
        cases.append((ValueError, "device mismatch at index 0", (ema, [cur[0].cpu(), cur[1]], 0.9)))
    for exc, match, args in cases:
        with pytest.raises(exc, match=match):
            ema_update_(*args, backend=backend)
        for e, s in zip(ema, snapshot):
            assert torch.equal(e, s), f"{match}: the EMA was modified"


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_pairs_lerp_their_real_and_imaginary_parts(device, backend, dtype):
    """As AveragedModel's _foreach_lerp_ does, beside a real pair in the same call; fp64 oracle."""
    skip_unless_available("ema_update_", backend, device)
    g = torch.Generator().manual_seed(0)
    e0, p0 = (torch.randn(129, generator=g, dtype=torch.complex128) for _ in range(2))
    r0, q0 = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    ema, cur = [e0.to(device, dtype, copy=True), r0.float().to(device)], [p0.to(device, dtype), q0.float().to(device)]
    ema_update_(ema, cur, 0.75, backend=backend)
    want = e0 + 0.25 * (p0 - e0)
    tol = 1e-6 if dtype == torch.complex64 else 1e-14
    assert ema[0].dtype == dtype
    assert (ema[0].cpu().cdouble() - want).abs().max() <= tol * want.abs().max()
    assert (ema[1].cpu().double() - (r0 + 0.25 * (q0 - r0))).abs().max() <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernel_checks_its_own_arguments(device):
    """Direct callers of torch.ops.madfast.ema_update_ (C++ users) get the same errors."""
    backend = "cpp" if device == "cpu" else "cuda"
    skip_unless_available("ema_update_", backend, device)
    ema, cur = _pairs([(4,), (3,)], torch.float32, device)
    with pytest.raises(ValueError, match="same length"):
        torch.ops.madfast.ema_update_(ema, cur[:1], torch.tensor(0.5))
    with pytest.raises(ValueError, match="shape mismatch at index 1"):
        torch.ops.madfast.ema_update_(ema, [cur[0], cur[0]], torch.tensor(0.5))
    with pytest.raises(TypeError, match="cannot track"):
        torch.ops.madfast.ema_update_(ema, [cur[0].long(), cur[1]], torch.tensor(0.5))


@pytest.mark.parametrize("device,backend", [c for c in CASES if c[1] != "torch"])
def test_opcheck(device, backend):
    skip_unless_available("ema_update_", backend, device)
    op = torch.ops.madfast.ema_update_triton_ if backend == "triton" else torch.ops.madfast.ema_update_
    ema, cur = _pairs([(33,), (4, 5), (1,)], torch.float32, device)
    ema.append(torch.tensor(2, device=device))
    cur.append(torch.tensor(5, device=device))
    torch.library.opcheck(op, (ema, cur, torch.tensor(0.9, device=device)))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    skip_unless_available("ema_update_", backend, device)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def step(ema, cur, decay):
        ema_update_(ema, cur, decay, backend=backend)

    ema, cur = _pairs([(17,), (3, 4)], torch.float32, device)
    for decay in (torch.tensor(0.9, device=device), torch.tensor(0.5, device=device)):
        expected = _reference(ema, cur, decay)
        step(ema, cur, decay)
        _assert_close(ema, expected)


# ---- exact copies, 1 − decay in double, stochastic rounding, the cached table ----

@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("tensor_decay", [False, True])
def test_decay_zero_copies_exactly(device, backend, tensor_decay):
    """timm's set() and warm-up steps use copy_: NaN and 1e8 in the EMA must not survive."""
    skip_unless_available("ema_update_", backend, device)
    ema = [torch.tensor([float("nan"), 1e8, -3.0, 0.5], device=device),
           torch.tensor([1e8, float("nan")], device=device),  # fp32 EMA of a bf16 tensor
           torch.tensor([float("inf"), 7.0], device=device, dtype=torch.bfloat16)]
    cur = [torch.tensor([0.64, 0.64, 2.0, -1e-30], device=device),
           torch.tensor([0.64, -2.5], device=device, dtype=torch.bfloat16),
           torch.tensor([0.64, 1e30], device=device, dtype=torch.bfloat16)]
    decay = torch.tensor(0.0, device=device) if tensor_decay else 0.0
    ema_update_(ema, cur, decay, backend=backend)
    for e, p in zip(ema, cur):
        assert torch.equal(e, p.to(e.dtype)), (e, p)


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("decay", [0.9999, 0.99999, 0.999999])
def test_one_minus_decay_is_formed_in_double(device, backend, decay):
    """e = 0, p = 1: the fp32 result is the weight itself, fp32(1 − decay). Rounding decay to fp32
    first is off by 1.7e-4 .. 1.3e-2 (relative) at these decays."""
    skip_unless_available("ema_update_", backend, device)
    want = _f32(1 - decay)
    assert abs(_f32(1 - _f32(decay)) - want) / want > 1e-4  # the bug this test is about is visible
    for d in (decay, torch.tensor(decay, dtype=torch.float64, device=device)):
        ema, cur = [torch.zeros(5, device=device)], [torch.ones(5, device=device)]
        ema_update_(ema, cur, d, backend=backend)
        assert ema[0].tolist() == [want] * 5, (d, ema[0][0].item(), want)
    # an fp32 decay tensor is the caller's rounding: 1 − fp32(decay), exact in fp32 (Sterbenz)
    ema = [torch.zeros(3, device=device)]
    ema_update_(ema, [torch.ones(3, device=device)], torch.tensor(decay, device=device), backend=backend)
    assert ema[0].tolist() == [_f32(1 - _f32(decay))] * 3


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_lerp(device, backend, dtype):
    """What timm's _foreach_lerp_ computes, weight 1 − decay on both sides of torch's 0.5 switch."""
    skip_unless_available("ema_update_", backend, device)
    for decay in (0.999, 0.25):
        ema, cur = _pairs([(4099,), (3, 5)], dtype, device, seed=7)
        expected = [torch.lerp(e, p, 1.0 - decay) for e, p in zip(ema, cur)]
        ema_update_(ema, cur, decay, backend=backend)
        for a, b in zip(ema, expected):
            ulp = torch.finfo(dtype).eps * b.double().abs().clamp_min(torch.finfo(dtype).tiny)
            # same formula; the only freedom left is a fused multiply-add in torch's scalar tail loop
            assert ((a.double() - b.double()).abs() <= ulp).all()
            if not (backend == "triton" and device == "cpu"):  # the interpreter truncates fp32 → bf16
                assert (a == b).double().mean() > 0.99


@pytest.mark.parametrize("device,backend", CASES)
def test_any_pair_of_floating_dtypes(device, backend):
    """timm's dtype=: an EMA in another precision than the model, both ways."""
    skip_unless_available("ema_update_", backend, device)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    ema = [torch.randn(37, generator=torch.Generator().manual_seed(i)).to(device=device, dtype=e)
           for i, (e, _) in enumerate((a, b) for a in dtypes for b in dtypes)]
    cur = [torch.randn(37, generator=torch.Generator().manual_seed(100 + i)).to(device=device, dtype=p)
           for i, (_, p) in enumerate((a, b) for a in dtypes for b in dtypes)]
    _update_and_compare(ema, cur, 0.7, backend)


def _mix64(z):
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _sr_expected(e, p, decay, seed, step, pair):
    """Stochastic rounding written out: the fp32 lerp v, its two neighbours in the EMA's dtype by
    nextafter, and the uniform number hashed from (seed, step, pair, element) with Python ints."""
    w = torch.tensor(1.0 - decay, dtype=torch.float32).double()
    v = (w * (p.float() - e.float()).double() + e.double()).float()  # fma(w, p − e, e): one rounding
    key = _mix64(_mix64(_mix64(seed) ^ step) ^ pair)
    u = torch.tensor([(_mix64((key + i * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)) >> 40) / 2**24
                      for i in range(e.numel())], dtype=torch.float64)
    near = v.to(e.dtype)
    down = torch.where(near.double().abs() > v.double().abs(), torch.nextafter(near, torch.zeros_like(near)), near)
    up = torch.nextafter(down, torch.where(v < 0, -torch.inf, torch.inf).to(e.dtype))
    lo, hi = down.float().abs(), up.float().abs()
    prob = (v.abs() - lo) / (hi - lo)  # in fp32, as the kernels compute it
    return torch.where(u.view(e.shape) < prob.double(), up, down)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c[1] != "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_bits(device, backend, dtype):
    skip_unless_available("ema_update_", backend, device)
    g = torch.Generator().manual_seed(11)
    e16 = (torch.randn(5000, generator=g) * 4).to(dtype)
    p16 = (torch.randn(5000, generator=g) * 4).to(dtype)
    p32 = torch.randn(33, generator=g)
    pairs = [(e16, p16), (torch.randn(33, generator=g).to(dtype), p32)]  # second: a bf16/fp16 EMA of fp32
    ema = [e.clone().to(device) for e, _ in pairs]
    for step in (0, 5):
        ema = [e.clone().to(device) for e, _ in pairs]
        ema_update_(ema, [p.to(device) for _, p in pairs], 0.9, backend=backend, stochastic_rounding_seed=3,
                    stochastic_rounding_step=step)
        for i, ((e, p), out) in enumerate(zip(pairs, ema)):
            expected = _sr_expected(e, p, 0.9, 3, step, i)
            assert torch.equal(out.cpu(), expected), (step, i, (out.cpu() != expected).sum().item())
            # both neighbours occur: it is not round-to-nearest
            assert (out.cpu() != torch.lerp(e.float(), p.float(), 0.1).to(dtype)).any()


@pytest.mark.parametrize("device,backend", [c for c in CASES if c[1] != "triton"])
def test_stochastic_rounding_accumulates_updates_below_resolution(device, backend):
    """bf16 at 1.0 has ulp 2^-7; each update moves it by (1 − decay)·0.01 ≈ 2^-17. Round to nearest
    never moves; stochastic rounding follows the exact fp64 EMA on average."""
    skip_unless_available("ema_update_", backend, device)
    n, steps, decay = 20000, 300, 0.999
    nearest = [torch.ones(n, dtype=torch.bfloat16, device=device)]
    sr = [torch.ones(n, dtype=torch.bfloat16, device=device)]
    target = [torch.full((n,), 1.01, dtype=torch.bfloat16, device=device)]
    exact = 1.0
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # honoured: no atomics, seeded bits
    try:
        for step in range(steps):
            ema_update_(nearest, target, decay, backend=backend)
            ema_update_(sr, target, decay, backend=backend, stochastic_rounding_seed=0, stochastic_rounding_step=step)
            exact += (1 - decay) * (target[0][0].double().item() - exact)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(nearest[0], torch.ones_like(nearest[0]))
    moved = exact - 1.0  # ≈ 0.0026
    mean = sr[0].double().mean().item() - 1.0
    assert abs(mean - moved) < 0.05 * moved, (mean, moved)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c[1] != "triton"])
def test_stochastic_rounding_is_reproducible(device, backend):
    skip_unless_available("ema_update_", backend, device)
    outs = []
    for seed, step in ((1, 2), (1, 2), (1, 3), (2, 2)):
        ema, cur = _pairs([(3000,)], torch.bfloat16, device, seed=4)
        ema_update_(ema, cur, 0.99, backend=backend, stochastic_rounding_seed=seed, stochastic_rounding_step=step)
        outs.append(ema[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[3])
    ema, cur = _pairs([(10,)], torch.float32, device)
    before = ema[0].clone()
    ema_update_(ema, cur, 0.5, backend=backend, stochastic_rounding_seed=1)  # fp32 EMAs: no effect
    torch.testing.assert_close(ema[0], _reference([before], cur, 0.5)[0])


def test_triton_refuses_stochastic_rounding():
    skip_unless_available("ema_update_", "triton", "cpu")
    ema, cur = _pairs([(4,)], torch.bfloat16, "cpu")
    with pytest.raises(NotImplementedError, match="stochastic rounding"):
        ema_update_(ema, cur, 0.5, backend="triton", stochastic_rounding_seed=0)
    with pytest.raises(ValueError, match="stochastic_rounding_seed"):
        ema_update_(ema, cur, 0.5, backend="torch", stochastic_rounding_seed=-1)
