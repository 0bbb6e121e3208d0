"""Teacher weights from anywhere: a `madfast train-teacher` file, a plain state dict, the common
wrappers around one, DDP/compile key prefixes, torchvision's published files and the CIFAR
ResNet/WRN checkpoints of CMI / Fast-Datafree (zju-vipa) through a documented key map.

Files are torch pickles (.pth/.pt/.bin) or safetensors. Nothing is downloaded:
``torchvision:WEIGHTS`` (e.g. ``torchvision:IMAGENET1K_V1``) names the file torchvision would cache
under ``torch.hub.get_dir()/checkpoints``, and ``hub`` (for a ``timm:NAME`` model) the file timm
would cache; either must already be there.
"""

from __future__ import annotations

import os
import re
import itertools
import warnings

import torch
from torch import nn

from madfast._extras import require
from madfast.errors import CheckpointError
from madfast.models.from_timm import is_timm, timm_hub_weights_path

__all__ = ["load_teacher_weights", "extract_state_dict", "CMI_KEY_MAPS", "torchvision_weights_path",
           "TEACHER_FORMAT"]

TEACHER_FORMAT = "madfast-teacher/1"
# Wrappers seen in the wild: {"state_dict": ...} (CMI, Places365, timm), {"model": ...} (DeiT,
# torchvision references), {"model_state_dict": ...}, {"net": ...}, {"teacher": ...}.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "teacher", "module")
# DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") prefixes, stripped when all keys carry them.
_PREFIXES = ("module.", "_orig_mod.")

# CMI / Fast-Datafree CIFAR classifiers → madfast's (same layers, other names):
#   resnet18/34 (DAFL's CIFAR ResNet):  linear.*                    → fc.*
#   wrn-D-W (xternalz WideResNet):      blockK.layer.I.*            → blockK.I.*
#                                       blockK.layer.I.convShortcut → blockK.I.shortcut
#                                       bn1.* (the final BN)        → bn.*
CMI_KEY_MAPS: dict[str, list[tuple[str, str]]] = {
    "cifar_resnet": [(r"^linear\.", "fc.")],
    "wrn": [(r"^(block\d)\.layer\.", r"\1."), (r"\.convShortcut\.", ".shortcut."), (r"^bn1\.", "bn.")],
}


def torchvision_weights_path(spec: str, name: str) -> str:
    """``torchvision:WEIGHTS`` → the local file of ``name``'s weights enum member WEIGHTS (never fetched)."""
    torchvision = require("torchvision", f"teacher weights {spec!r}")

    tag = spec.split(":", 1)[1] or "DEFAULT"
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise CheckpointError(f"--teacher-ckpt {spec!r}: {name!r} is not a torchvision model with published "
                              "weights") from None
    try:
        weights = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise CheckpointError(f"--teacher-ckpt {spec!r}: {name!r} has no weights {tag!r} "
                              f"(choose one of {', '.join(w.name for w in enum)})") from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise CheckpointError(f"--teacher-ckpt {spec!r}: {path!r} is missing (nothing is downloaded: "
                              f"fetch {weights.url} there, or pass the file's path)")
    return path


def _read(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"--teacher-ckpt {path!r} does not exist")
    with open(path, "rb") as f:  # safetensors: an 8-byte header length, then a JSON header; torch: a zip/pickle magic
        safetensors = f.read(9)[8:] == b"{"
    if safetensors:
        st = require("safetensors.torch", f"the safetensors file {path!r}", extra="timm")
        try:
            return st.load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 — safetensors raises its own SafetensorError
            raise CheckpointError(f"--teacher-ckpt {path!r} could not be read as safetensors: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — a file with pickled objects (e.g. an argparse.Namespace) besides tensors
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors have no common base
        raise CheckpointError(f"--teacher-ckpt {path!r} could not be read: {e}") from None


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()))


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, a module's, or one found under a wrapper key (recursively);
    ``module.``/``_orig_mod.`` prefixes shared by all keys are stripped."""
    for _ in range(4):  # wrappers nest at most a few deep ({"model": {"state_dict": ...}})
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if _is_state_dict(obj):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS
                      if isinstance(obj, dict) and isinstance(obj.get(k), (dict, nn.Module))), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        keys = f" (top-level keys: {', '.join(map(str, list(obj)[:8]))})" if isinstance(obj, dict) else ""
        raise CheckpointError(f"holds no state dict of tensors{keys}")
    state = dict(obj)
    while prefix := next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _remap(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _fit(state: dict, model: nn.Module, name: str, num_classes: int) -> dict:
    """``state`` as is, or under the first key map whose keys are exactly the model's; of the model's shapes."""
    want = model.state_dict()
    keys = set(want)
    # tried in order, each map applied only if the ones before it did not fit
    candidates = itertools.chain([state], ({_remap(k, rules): v for k, v in state.items()}
                                           for rules in CMI_KEY_MAPS.values()))
    fitted = next((m for m in candidates if set(m) == keys), None)
    if fitted is None:
        missing = [k for k in want if k not in state]
        extra = [k for k in state if k not in want]
        what = f"lacks {missing[0]!r}" if missing else f"has the unexpected key {extra[0]!r}"
        raise CheckpointError(f"does not fit {name!r} with {num_classes} classes: it {what} "
                              f"({len(missing)} missing, {len(extra)} unexpected keys)")
    for k, t in want.items():
        if fitted[k].shape != t.shape:
            raise CheckpointError(f"does not fit {name!r} with {num_classes} classes: {k!r} has shape "
                                  f"{tuple(fitted[k].shape)}, the model wants {tuple(t.shape)}")
    return fitted


def load_teacher_weights(path: str | None, model: nn.Module, name: str, num_classes: int, channels: int) -> dict:
    """Loads the teacher weights at ``path`` into ``model`` (built as ``name`` with ``num_classes``
    classes and ``channels`` input channels) and returns what the file says about itself:
    ``{"format", "test_acc", "dataset", "img_size"}`` for a madfast file, ``{"format": "state_dict"}``
    otherwise. Every mismatch is a CheckpointError naming the file and the first offending key."""
    if not path:
        raise CheckpointError("--teacher-ckpt is required (a madfast teacher.pt, a state dict or safetensors "
                              "file, a torchvision/CMI checkpoint, torchvision:WEIGHTS, or hub for timm:NAME)")
    if path.startswith("torchvision:"):
        path = torchvision_weights_path(path, name)
    elif path == "hub":
        if not is_timm(name):
            raise CheckpointError(f"--teacher-ckpt hub is for timm:NAME teachers, not {name!r}")
        path = timm_hub_weights_path(name)
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == TEACHER_FORMAT:
        if (obj["model"], obj["num_classes"], obj["channels"]) != (name, num_classes, channels):
            raise CheckpointError(
                f"--teacher-ckpt {path!r} holds a {obj['model']!r} with {obj['num_classes']} classes and "
                f"{obj['channels']} channels, but the run asks for a {name!r} with {num_classes} classes and "
                f"{channels} channels")
        meta = {k: obj.get(k) for k in ("format", "test_acc", "dataset", "img_size")}
    else:
        meta = {"format": "state_dict", "test_acc": None, "dataset": None, "img_size": None}
    try:
        state = _fit(extract_state_dict(obj), model, name, num_classes)
    except CheckpointError as e:
        raise CheckpointError(f"--teacher-ckpt {path!r} {e}") from None
    model.load_state_dict(state)
    return meta
