"""Flat, commented run configurations: the defaults, their CLI flags and YAML/JSON files.

Every field is one CLI flag (``ema_decay`` → ``--ema-decay``; booleans also take ``--no-…``), may
be set in a ``--config`` file, and is saved into every checkpoint. Each algorithm choice says where
it comes from: [paper] stated by the MAD paper, [reported] by secondary summaries of it, [practice]
from the practitioners' code (ABM, Fast-Datafree, CMI, DeepInversion), [ours] where none says.
"""

from __future__ import annotations

import argparse
import json
import os
import typing
from dataclasses import dataclass, field, fields, replace

import torch

from madfast._extras import require
from madfast.errors import UsageError
from madfast.train.presets import preset_sources

__all__ = ["DistillConfig", "TeacherConfig", "config_from_dict", "load_config_file", "add_config_args",
           "config_from_args", "format_config", "autocast_dtype", "CHOICES", "CUDAGRAPH_MODES"]


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DistillConfig:
    """MAD: data-free distillation of a trained teacher into a student."""
    # --- data (evaluation only) and models ---
    dataset: str = _f("cifar10", "data set the teacher was trained on: its classes, image size and test split")
    data_dir: typing.Optional[str] = _f(None, "local folder of the data set (never downloaded); digits needs none")
    img_size: int = _f(0, "image side in pixels; 0: the data set's")
    teacher: str = _f("cifar_resnet34", "teacher architecture (madfast or torchvision.models name, or timm:NAME)")
    teacher_ckpt: typing.Optional[str] = _f(None, "teacher weights: a `madfast train-teacher` file, a state dict (plain, "
                                            "{state_dict|model: ...}, module.-prefixed), a CMI/Fast-Datafree CIFAR "
                                            "ResNet/WRN checkpoint (torch or safetensors files), torchvision:WEIGHTS "
                                            "(a cached torchvision file), or hub (a timm:NAME teacher's cached file)")
    check_teacher: bool = _f(True, "evaluate the loaded teacher on the test split before distilling (unless its "
                             "madfast file records it); --no-check-teacher: no teacher accuracy, no ratio")
    student: str = _f("cifar_resnet18", "student architecture (madfast or torchvision.models name, or timm:NAME)")
    # --- generator G ---
    nz: int = _f(256, "noise dimension [ours: 256]")
    ngf: int = _f(64, "generator width [ours: the common DFKD generator]")
    conditioning: str = _f("sum", "class conditioning: sum G(z+E[y]) | cat G([z,E[y]]) | uncond G(z) [paper: sum trains most stably]")
    gen_block: str = _f("conv", "generator up-block: conv | resnet [paper: both; ours: conv]")
    gen_output: str = _f("tanh", "generator output activation: tanh | sigmoid (mapped to [0, 1], then normalised) [ours: tanh]")
    # --- MAD schedule ---
    steps: int = _f(20000, "adversarial iterations (each: g_steps G steps, one EMA step, s_steps student steps) [ours: count]")
    g_pretrain_steps: int = _f(200, "G pretraining steps on the CE and BN terms alone, before adversarial training [paper: a hyperparameter; ours: count]")
    g_steps: int = _f(1, "generator steps per iteration [practice: ABM 1]")
    s_steps: int = _f(10, "student steps per iteration [practice: ABM 10]")
    batch_size: int = _f(256, "global batch of generated samples per step, split across ranks [ours: 256; ABM 128]")
    # --- losses ---
    adv_bound: typing.Optional[float] = _f(3.0, "δ, bound on the adversarial discrepancy in L_G; none: unbounded [paper: δ; ours: 3]")
    adv_kind: str = _f("kl", "adversarial discrepancy D: kl (MAD) | l1 (DFAD) [paper: kl]")
    temperature: float = _f(1.0, "τ of the KL divergences [practice: ABM 1]")
    lambda_ce: float = _f(1.0, "weight of CE(T(x), y) in L_G (uncond: y = T's argmax) [ours]")
    lambda_bn: typing.Optional[float] = _f(None, "weight of the teacher BN-statistics loss in L_G; none (auto): 1.0 with a "
                                           "teacher that has BatchNorm2d layers, 0 (the prior off) without [ours; 0.1 "
                                           "stalls on digits; practice: 0.05 at ImageNet scale]")
    lambda0: float = _f(1.0, "λ0: weight of the student loss on samples of G [paper: λ0; ours: 1]")
    lambda1: float = _f(1.0, "λ1: weight of the student loss on samples of the EMA generator [paper: λ1; ours: 1]")
    # --- EMA generator ---
    ema: bool = _f(True, "keep the EMA generator G̃ (--no-ema: plain adversarial distillation, the baseline) [paper]")
    ema_decay: float = _f(0.95, "α: G̃ ← α·G̃ + (1−α)·G [reported: the paper's best, 0.95]")
    ema_buffers: str = _f("average", "G's float buffers in G̃: average | copy [ours: average]")
    ema_bn: str = _f("batch", "BatchNorm of G̃ when sampling: batch statistics | running (its EMA'd statistics) [ours: batch]")
    ema_from_pretrained: bool = _f(True, "G̃ ← G when G's pre-training ends, not G's random initialisation "
                                   "(--no-ema-from-pretrained: from G's initialisation) [ours]")
    share_embedding: bool = _f(False, "G̃ uses G's class embedding table instead of its average [ours: off]")
    student_eval_in_g_step: bool = _f(True, "student in eval mode in the G step: its BN statistics do not move on "
                                      "G's batch (--no-…: train mode) [practice: CMI/Fast-Datafree]")
    augment: bool = _f(False, "random resized crop (scale 0.25–1) + flip of each synthetic sample before the student "
                       "step [practice: Fast-Datafree/CMI; on in the presets, off by default]")
    # --- optimisation ---
    optimizer_s: str = _f("adam", "student optimiser: adam | sgd (momentum 0.9) [practice: ABM adam, Fast-DFKD sgd]")
    lr_s: float = _f(2e-3, "student learning rate [practice: ABM Adam 2e-3; Fast-DFKD SGD 0.1]")
    weight_decay_s: float = _f(0.0, "student weight decay [practice: Fast-DFKD 5e-4]")
    lr_g: float = _f(1e-3, "generator learning rate (Adam, betas 0.5, 0.999) [practice: ABM 1e-3]")
    schedule: str = _f("cosine", "learning-rate schedule over the adversarial iterations: cosine | constant [practice: ABM cosine]")
    grad_clip: float = _f(5.0, "gradient-norm clipping for G and S; 0: off [practice: ABM 5]")
    # --- speed ---
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (torchrun: the local rank's GPU)")
    amp: str = _f("auto", "autocast with fp32 master weights: auto (bf16 on CUDA, none elsewhere) | none | bf16 | "
                  "fp16 (fp16 adds GradScalers)")
    channels_last: bool = _f(True, "channels-last memory format for the networks and images: cuDNN's and "
                             "oneDNN's fast layout (on a 2-core AVX2 CPU each conv ran 1.1–1.5× faster)")
    cudnn_benchmark: typing.Optional[bool] = _f(None, "let cuDNN time its convolution algorithms for each shape "
                                                "(torch.backends.cudnn.benchmark); none: on CUDA")
    optimizer_impl: str = _f("fused", "optimiser kernels: fused (one kernel for all tensors) | foreach | loop "
                             "(one tensor at a time)")
    compile: bool = _f(False, "torch.compile teacher, student and generator")
    compile_mode: str = _f("default", "torch.compile mode: default | reduce-overhead (CUDA graphs of the forwards "
                           "and backwards, on CUDA tensors) | max-autotune (also CUDA graphs) | "
                           "max-autotune-no-cudagraphs")
    sync_bn: bool = _f(True, "under torchrun: the teacher's BN prior on moments all-reduced over ranks, and "
                       "SyncBatchNorm in G (CUDA only; torch has no CPU SyncBatchNorm) [ours]")
    concat_forward: bool = _f(True, "one teacher/student forward for G and G̃ samples together (student BN sees both) [ours]")
    backend: str = _f("auto", "madfast op backend: auto | torch | triton | cuda | cpp")
    # --- run ---
    seed: int = _f(0, "seed of initialisation and noise (rank r draws noise from its own seeded stream)")
    out: str = _f("runs/distill", "output folder: checkpoints, metrics.csv, TensorBoard, summary.json")
    log_every: int = _f(50, "log losses every N iterations")
    eval_every: int = _f(1000, "evaluate the student every N iterations; 0: only at the end")
    ckpt_every: int = _f(1000, "checkpoint every N iterations; 0: only at the end")
    keep_ckpts: int = _f(3, "keep the last K checkpoints")
    eval_batch_size: int = _f(512, "evaluation batch size per rank (each rank evaluates its own shard of the test split)")
    num_workers: int = _f(2, "data-loading workers for evaluation")
    tensorboard: bool = _f(True, "also log to TensorBoard (OUT/tb)")
    progress: bool = _f(True, "show a progress bar")

    def validate(self) -> "DistillConfig":
        _check_choices(self)
        for name in ("steps", "g_steps", "s_steps", "batch_size", "nz", "ngf", "log_every", "keep_ckpts",
                     "eval_batch_size"):
            _check(getattr(self, name) >= 1, name, "must be ≥ 1")
        for name in ("g_pretrain_steps", "eval_every", "ckpt_every", "num_workers", "img_size", "grad_clip",
                     "lambda_ce", "lambda0", "lambda1", "weight_decay_s"):
            _check(getattr(self, name) >= 0, name, "must be ≥ 0")
        for name in ("lr_s", "lr_g", "temperature"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(0.0 <= self.ema_decay <= 1.0, "ema_decay", "must be in [0, 1]")
        if self.img_size:  # 0: the data set's, checked once known
            from madfast.models.generator import generator_img_size_error
            error = generator_img_size_error(self.img_size)
            _check(error is None, "img_size", error)
        _check(self.adv_bound is None or self.adv_bound > 0, "adv_bound", "must be > 0 or none")
        _check(self.lambda_bn is None or self.lambda_bn >= 0, "lambda_bn", "must be ≥ 0 or none (auto)")
        return self

    def for_device(self, device: torch.device) -> "DistillConfig":
        """This config with its speed choices left to the device resolved: on CUDA bf16 autocast and
        cuDNN autotuning; elsewhere fp32 (bf16 is emulated on most CPUs)."""
        cuda = device.type == "cuda"
        auto = {"amp": "bf16" if cuda else "none", "cudnn_benchmark": cuda}
        return replace(self, **{k: v for k, v in auto.items() if getattr(self, k) in (None, "auto")})


@dataclass
class TeacherConfig:
    """Supervised training of a teacher on a local data set."""
    dataset: str = _f("cifar10", "data set to train on")
    data_dir: typing.Optional[str] = _f(None, "local folder of the data set (never downloaded); digits needs none")
    img_size: int = _f(0, "image side in pixels; 0: the data set's")
    model: str = _f("cifar_resnet34", "architecture (madfast or torchvision.models name, or timm:NAME)")
    epochs: int = _f(200, "training epochs")
    batch_size: int = _f(128, "global batch size, split across ranks")
    optimizer: str = _f("sgd", "adam | sgd (momentum 0.9, nesterov)")
    lr: float = _f(0.1, "peak learning rate (cosine schedule)")
    weight_decay: float = _f(5e-4, "weight decay")
    augment: bool = _f(True, "random crop and flip (never for digits)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    amp: str = _f("none", "autocast: none | bf16 | fp16")
    channels_last: bool = _f(False, "channels-last memory format")
    seed: int = _f(0, "seed")
    out: str = _f("runs/teacher", "output folder: teacher.pt, metrics.csv")
    num_workers: int = _f(2, "data-loading workers")
    progress: bool = _f(True, "show a progress bar")

    def validate(self) -> "TeacherConfig":
        _check_choices(self)
        for name in ("epochs", "batch_size"):
            _check(getattr(self, name) >= 1, name, "must be ≥ 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.img_size >= 0 and self.num_workers >= 0, "img_size/num_workers", "must be ≥ 0")
        return self


CHOICES = {
    "conditioning": ("sum", "cat", "uncond"), "gen_block": ("conv", "resnet"), "gen_output": ("tanh", "sigmoid"),
    "adv_kind": ("kl", "l1"), "ema_buffers": ("average", "copy"), "ema_bn": ("batch", "running"),
    "optimizer_s": ("adam", "sgd"), "optimizer": ("adam", "sgd"), "schedule": ("cosine", "constant"),
    "amp": ("auto", "none", "bf16", "fp16"), "optimizer_impl": ("fused", "foreach", "loop"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "backend": ("auto", "torch", "triton", "cuda", "cpp"),
}
# the compile modes in which inductor captures CUDA graphs (it runs CPU tensors without them)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` choice on ``device`` (None: fp32, no autocast)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise UsageError(f"--{name.replace('_', '-')} {what}")


def _check_choices(cfg) -> None:
    for f in fields(cfg):
        if f.name in CHOICES:
            value = getattr(cfg, f.name)
            _check(value in CHOICES[f.name], f.name, f"must be one of {', '.join(CHOICES[f.name])}, got {value!r}")


def _types(cls) -> dict[str, tuple[type, bool]]:
    """field → (base type, optional)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = (args[0], True) if args else (hint, False)
    return out


def _coerce(cls, name: str, value):
    base, optional = _types(cls)[name]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UsageError(f"{name} may not be none")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a {base.__name__}, got {value!r}") from None


def config_from_dict(cls, values: dict):
    """A validated ``cls`` from a dict (a checkpoint's or a file's); unknown keys are an error."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise UsageError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**{k: _coerce(cls, k, v) for k, v in values.items()}).validate()


def load_config_file(path: str) -> dict:
    """Values from a YAML (.yaml/.yml) or JSON file."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path!r} does not exist")
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                values = require("yaml", "a YAML --config file").safe_load(f) or {}
            else:
                values = json.load(f)
    except Exception as e:  # yaml/json parse errors have no common base
        raise UsageError(f"--config {path!r} could not be parsed: {e}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path!r} must hold a mapping of field: value")
    return values


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field; defaults stay None so that file values are only overridden by flags given."""
    types = _types(cls)
    for f in fields(cls):
        base, optional = types[f.name]
        help_ = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                choices=CHOICES.get(f.name), type=str if optional else base, help=help_)


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """Defaults ← ``base`` (a file's or a checkpoint's values) ← the flags given."""
    values = dict(base or {})
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})
    return config_from_dict(cls, values)


def format_config(cfg, preset: str | None = None, file: dict | None = None, args: argparse.Namespace | None = None) -> str:
    """The resolved config as YAML (loadable with --config), each line commented with where its value
    came from: flag, file, preset NAME [paper|reported|practice|ours], or default."""
    yaml = require("yaml", "--print-config")
    sources = preset_sources(preset) if preset else {}
    if hasattr(cfg, "for_device"):  # the device choices as this machine would resolve them
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
        resolved = cfg.for_device(device)
    else:
        resolved, device = cfg, None
    lines = [f"# madfast {type(cfg).__name__}" + (f", preset {preset}" if preset else "") +
             " (flag > --config file > preset > default)"]
    for f in fields(cfg):
        if args is not None and getattr(args, f.name, None) is not None:
            src = "flag"
        elif file and f.name in file:
            src = "file"
        elif f.name in sources:
            src = f"preset {preset} [{sources[f.name]}]"
        else:
            src = "default"
        value = yaml.safe_dump({f.name: getattr(cfg, f.name)}, default_flow_style=True, width=1 << 16).strip()
        if getattr(resolved, f.name) != getattr(cfg, f.name):
            src += f"; on {device.type}: {getattr(resolved, f.name)}"
        lines.append(f"{value.strip('{}')}  # {src}")
    return "\n".join(lines) + "\n"
