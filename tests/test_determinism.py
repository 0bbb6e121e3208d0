"""torch.use_deterministic_algorithms(True) is honoured (auto) or refused with a clear error
(explicit backend) by every op whose GPU kernels add floats with atomics."""

from __future__ import annotations

import contextlib
import dataclasses

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


def test_auto_skips_atomic_kernels_only_when_asked(all_available, monkeypatch):
    # bn_lrelu's CUDA and Triton backwards add the scale/shift gradients with atomics
    triton_first = dataclasses.replace(_backend.OPS["upsample_block"], auto={"cuda": ("triton", "aten")})
    monkeypatch.setitem(_backend.OPS, "upsample_block", triton_first)
    assert _backend.choose("bn_lrelu", "auto", CUDA) == "cuda"
    assert _backend.choose("upsample_block", "auto", CUDA) == "triton"
    with deterministic():
        assert _backend.choose("bn_lrelu", "auto", CUDA) == "torch"
        assert _backend.choose("upsample_conv", "auto", CUDA) == "aten"  # the op alone: no atomics
        # the block's Triton path normalises with bn_lrelu's Triton kernel, which uses atomics
        assert _backend.choose("upsample_block", "auto", CUDA) == "aten"
        assert _backend.choose("kl_div_fwd", "auto", CUDA) == "cuda"  # deterministic kernels
        assert _backend.choose("ema_update_", "auto", CUDA) == "cuda"


@pytest.mark.parametrize("op,backend", [("bn_lrelu", "triton"), ("bn_lrelu", "cuda"), ("upsample_block", "triton")])
def test_explicit_atomic_backend_raises_naming_the_op(all_available, op, backend):
    assert _backend.choose(op, backend, CUDA) == backend
    with deterministic(), pytest.raises(RuntimeError, match=rf"{op} on the {backend} backend uses .*atomic.*"
                                                            r"use_deterministic_algorithms\(True\)"):
        _backend.choose(op, backend, CUDA)
    with deterministic(warn_only=True), pytest.warns(UserWarning, match="not deterministic"):
        assert _backend.choose(op, backend, CUDA) == backend


def test_block_with_aten_is_deterministic(all_available):
    with deterministic():
        assert _backend.choose("upsample_block", "aten", CUDA) == "aten"
        assert _backend.choose("upsample_conv", "triton", CUDA) == "triton"


def test_cpu_kernels_are_deterministic_and_unchanged():
    cpu = torch.device("cpu")
    plain = {op: _backend.choose(op, "auto", cpu) for op in _backend.OPS}
    with deterministic():
        assert {op: _backend.choose(op, "auto", cpu) for op in plain} == plain
        assert all(_backend.why_nondeterministic(op, "triton", cpu) is None for op in plain)


def test_block_runs_under_deterministic_mode_on_cpu(monkeypatch):
    from madfast.nn import UpsampleConvBlock
    asked = []
    real = _backend.choose
    monkeypatch.setattr(_backend, "choose", lambda op, *a, **k: asked.append(op) or real(op, *a, **k))
    block = UpsampleConvBlock(3, 4)
    x = torch.randn(2, 3, 4, 4)
    with deterministic():
        a = block(x)
        a.sum().backward()
    assert a.shape == (2, 4, 8, 8)
    assert asked and set(asked) == {"upsample_block"}  # the block asks as a whole: its BN backward decides too
