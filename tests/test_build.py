"""The extension is built and registered as expected; backend choice; import without it."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

from madfast import BackendUnavailableError, _backend
from madfast.ops import ema_update_


def _cuda_build_expected() -> bool:
    # Mirrors setup.py: CUDA kernels are compiled whenever nvcc and a CUDA torch are present.
    forced = os.environ.get("MADFAST_CUDA")
    found = torch.version.cuda is not None and (CUDA_HOME is not None or os.path.exists("/usr/local/cuda/bin/nvcc"))
    return found if forced is None else forced == "1"


COMPILED_OPS = ["ema_update_", "kl_div_fwd", "kl_div_bwd", "l1_fwd", "l1_bwd", "channel_moments",
                "channel_moments_backward", "bn_lrelu", "bn_lrelu_backward", "bn_stat_losses", "bn_stat_losses_backward"]


@pytest.mark.parametrize("op", COMPILED_OPS)
def test_extension_is_loaded_with_cpu_kernel(op):
    assert _backend.extension_loaded()
    assert _backend.has_kernel(op, "CPU")


@pytest.mark.skipif(not _cuda_build_expected(), reason="no nvcc or CPU-only torch: CUDA kernels not built")
@pytest.mark.parametrize("op", COMPILED_OPS)
def test_cuda_kernel_is_compiled_and_registered(op):
    assert _backend.has_kernel(op, "CUDA"), f"setup.py should have compiled the CUDA kernel of {op} (csrc/cuda/)"


def test_has_kernel_for_unknown_op_is_false():
    assert not _backend.has_kernel("no_such_op", "CPU")


def test_auto_picks_cpp_on_cpu_and_env_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("MADFAST_BACKEND", raising=False)
    assert _backend.choose("ema_update_", "auto", cpu) == "cpp"
    monkeypatch.setenv("MADFAST_BACKEND", "torch")
    assert _backend.choose("ema_update_", "auto", cpu) == "torch"
    assert _backend.choose("ema_update_", "cpp", cpu) == "cpp"  # an explicit argument wins


def test_unknown_or_unavailable_backend_is_a_clear_error(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.choose("ema_update_", "cudnn", cpu)
    with pytest.raises(BackendUnavailableError, match="backend='cuda' is unavailable.*runs cuda tensors"):
        ema_update_([torch.zeros(2)], [torch.ones(2)], 0.5, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _backend.choose("ema_update_", "triton", cpu)
    monkeypatch.setenv("MADFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="got 'nope'"):
        _backend.choose("ema_update_", None, cpu)


@pytest.mark.parametrize("triton_version, numpy_version, usable", [
    ("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True), ("3.7.1", "2.4.6", True), ("3.8.0", "2.5.0.dev0", True)])
def test_an_interpreter_that_cannot_run_is_named_not_crashed_in(monkeypatch, triton_version, numpy_version, usable):
    """Triton 3.6's interpreter under NumPy 2.4 fails inside every kernel with a runtime loop bound
    (measured with torch 2.11): the backend is unavailable there, with the reason."""
    numpy, triton = pytest.importorskip("numpy"), pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend._interpreter_incompatibility.cache_clear()
    try:
        if usable:
            assert _backend.choose("kl_div_fwd", "triton", torch.device("cpu")) == "triton"
        else:
            with pytest.raises(BackendUnavailableError, match=f"Triton {triton_version}'s interpreter cannot run "
                               f"under NumPy {numpy_version} \\(needs triton >= 3.7 or numpy < 2.4\\)"):
                _backend.choose("kl_div_fwd", "triton", torch.device("cpu"))
    finally:
        _backend._interpreter_incompatibility.cache_clear()


def test_op_table_names_only_entries_that_exist():
    """Every forward and backward entry of madfast._backend.OPS is registered (the extension is built
    and triton installed wherever the suite runs), so the table cannot name a kernel that is gone."""
    from madfast.ops._register import present
    assert importlib.util.find_spec("triton") is not None and _backend.extension_loaded()
    missing = [(op, b, name) for op, spec in _backend.OPS.items() for b, names in spec.kernels.items()
               for name in names if name is not None and not present(name)]
    assert not missing
    for op, spec in _backend.OPS.items():
        assert set(spec.auto) <= {"cpu", "cuda"} and all(set(order) <= set(spec.kernels) for order in spec.auto.values())
        assert set(spec.atomics) <= set(spec.kernels), op


def test_unknown_op_or_a_backend_the_op_lacks_is_a_clear_error():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        _backend.choose("no_such_op", "auto", cpu)
    with pytest.raises(BackendUnavailableError, match="upsample_conv has no cpp backend.*torch, aten, triton"):
        _backend.choose("upsample_conv", "cpp", cpu)
    with pytest.raises(BackendUnavailableError, match="kl_div_fwd has no aten backend"):
        _backend.choose("kl_div_fwd", "aten", cpu)


def test_env_backend_is_a_preference_an_argument_a_demand(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("MADFAST_BACKEND", "aten")
    assert _backend.choose("upsample_conv", None, cpu) == "aten"
    assert _backend.choose("kl_div_fwd", None, cpu) == "cpp"  # no aten path: its own auto choice
    with pytest.raises(BackendUnavailableError, match="kl_div_fwd has no aten backend"):
        _backend.choose("kl_div_fwd", "aten", cpu)


def test_an_extension_error_without_a_message_is_named():
    code = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class Failing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "madfast._C":
                    raise ImportError()  # no message, as some loaders raise

        sys.meta_path.insert(0, Failing())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import madfast
        assert any("could not be loaded (ImportError)" in str(w.message) for w in caught), caught
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_import_without_extension_warns_and_falls_back():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["madfast._C"] = None  # as if the extension were not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import madfast
        assert any("madfast._C could not be loaded" in str(w.message) for w in caught), caught
        import torch
        from madfast import _backend
        assert _backend.choose("ema_update_", "auto", torch.device("cpu")) == "torch"
        e, p = [torch.zeros(3)], [torch.ones(3)]
        madfast.ops.ema_update_(e, p, 0.75)
        assert torch.allclose(e[0], torch.full((3,), 0.25))
        try:
            madfast.ops.ema_update_(e, p, 0.75, backend="cpp")
        except madfast.BackendUnavailableError as err:
            assert "not built or failed to load" in str(err)
        else:
            raise AssertionError("backend='cpp' without the extension must fail")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
