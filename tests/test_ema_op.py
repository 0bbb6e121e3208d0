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
    out = [e.clone() for e in ema]
    torch_ema_update_(out, cur, decay if isinstance(decay, torch.Tensor) else torch.tensor(decay, dtype=torch.float64))
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
    _assert_close(ema, expected)


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
        (TypeError, "cannot track", (ema, [cur[0].double(), cur[1]], 0.9)),
        (ValueError, "decay must be in \\[0, 1\\]", (ema, cur, 1.5)),
        (ValueError, "decay must be in \\[0, 1\\]", (ema, cur, -0.1)),
        (ValueError, "decay must be a float or a 0-d", (ema, cur, torch.ones(2))),
        (TypeError, "decay must be a float", (ema, cur, "0.9")),
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
        torch.ops.madfast.ema_update_(ema, [cur[0].double(), cur[1]], torch.tensor(0.5))


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
