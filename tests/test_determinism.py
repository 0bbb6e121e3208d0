"""torch.use_deterministic_algorithms(True) is honoured (auto) or refused with a clear error
(explicit backend) by every op whose GPU kernels add floats with atomics."""

from __future__ import annotations

import contextlib

import pytest
import torch

from madfast import _backend

CUDA = torch.device("cuda")  # only its type is read: no GPU needed


@contextlib.contextmanager
def deterministic(warn_only: bool = False):
    before, before_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


@pytest.fixture
def all_available(monkeypatch):
    """Every backend available and verified on the (pretend) GPU, so that only determinism decides."""
    monkeypatch.setattr(_backend, "_why_unavailable", lambda op, backend, device: None)
    monkeypatch.setattr(_backend, "_auto_allows", lambda op, backend, device, dtype: True)


def test_auto_skips_atomic_kernels_only_when_asked(all_available):
    order = ("cuda", "triton", "aten", "torch")
    assert _backend.choose("upsample_conv", "auto", CUDA, auto=order) == "cuda"
    assert _backend.choose("upsample_conv", "auto", CUDA, auto=order, also=("bn_lrelu",)) == "cuda"
    with deterministic():
        assert _backend.choose("upsample_conv", "auto", CUDA, auto=order) == "triton"  # the op alone: no atomics
        # the block runs bn_lrelu on the same backend, whose CUDA and Triton backwards use atomics
        assert _backend.choose("upsample_conv", "auto", CUDA, auto=order, also=("bn_lrelu",)) == "aten"
        assert _backend.choose("kl_div_fwd", "auto", CUDA, auto=("cuda", "torch")) == "cuda"  # deterministic kernels
        assert _backend.choose("ema_update_", "auto", CUDA, auto=("triton", "torch")) == "triton"


@pytest.mark.parametrize("op,backend", [("upsample_conv", "cuda"), ("bn_lrelu", "triton"), ("bn_lrelu", "cuda")])
def test_explicit_atomic_backend_raises_naming_the_op(all_available, op, backend):
    assert _backend.choose(op, backend, CUDA) == backend
    with deterministic(), pytest.raises(RuntimeError, match=rf"{op} on the {backend} backend uses .*atomic.*"
                                                            r"use_deterministic_algorithms\(True\)"):
        _backend.choose(op, backend, CUDA)
    with deterministic(warn_only=True), pytest.warns(UserWarning, match="not deterministic"):
        assert _backend.choose(op, backend, CUDA) == backend


def test_block_with_triton_raises_for_its_bn_backward(all_available):
    with deterministic(), pytest.raises(RuntimeError, match="bn_lrelu on the triton backend"):
        _backend.choose("upsample_conv", "triton", CUDA, also=("bn_lrelu",))
    with deterministic():
        assert _backend.choose("upsample_conv", "aten", CUDA, also=("bn_lrelu",)) == "aten"


def test_cpu_kernels_are_deterministic_and_unchanged():
    cpu = torch.device("cpu")
    plain = {op: _backend.choose(op, "auto", cpu) for op in ("kl_div_fwd", "ema_update_", "upsample_conv")}
    with deterministic():
        assert {op: _backend.choose(op, "auto", cpu) for op in plain} == plain
        assert _backend.why_nondeterministic(("upsample_conv", "bn_lrelu"), "triton", cpu) is None


def test_block_runs_under_deterministic_mode_on_cpu(monkeypatch):
    from madfast.nn import UpsampleConvBlock
    asked = []
    real = _backend.choose
    monkeypatch.setattr(_backend, "choose", lambda *a, **k: asked.append(k.get("also")) or real(*a, **k))
    block = UpsampleConvBlock(3, 4)
    x = torch.randn(2, 3, 4, 4)
    with deterministic():
        a = block(x)
        a.sum().backward()
    assert a.shape == (2, 4, 8, 8)
    assert asked and all(also == ("bn_lrelu",) for also in asked)  # the block's BN backward decides too
