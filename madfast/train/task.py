"""The MAD task: generator step, EMA step, student steps — the paper's iteration, one method each.

Each step returns a dict of named 0-d loss tensors (no host sync here; the loop reads them).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from madfast.errors import UsageError
from madfast.models import Generator
from madfast.nn import AdversarialLoss, BNStatHook, FusedEMA, KLDivLoss
from madfast.train.augment import random_resized_crop_flip
from madfast.train.config import CUDAGRAPH_MODES, DistillConfig, autocast_dtype
from madfast.train.distributed import DistContext, broadcast_buffers, wrap
from madfast.train.sync_bn import GlobalBNStatHook, sync_generator_bn

__all__ = ["MADTask", "bn_prior_weight"]


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def bn_prior_weight(lambda_bn: float | None, teacher: nn.Module, name: str) -> float:
    """λ_bn for ``teacher``: as given, or (None, auto) 1.0 if it has BatchNorm2d layers and 0 if not
    — a LayerNorm/GroupNorm teacher (ViT, ConvNeXt) records no batch statistics to match."""
    has_bn = has_batch_norm(teacher)
    if lambda_bn is None:
        return 1.0 if has_bn else 0.0
    if lambda_bn > 0 and not has_bn:
        raise UsageError(f"--lambda-bn {lambda_bn:g} needs a teacher with BatchNorm2d layers, and {name!r} has "
                         "none (no batch statistics to match): pass --lambda-bn 0, or none for auto")
    return lambda_bn


class MADTask:
    """Teacher T (frozen, eval, outside DDP), student S and generator G (DDP under torchrun), EMA
    generator G̃ (identical on all ranks), their optimisers, schedules and the noise stream."""

    def __init__(self, cfg: DistillConfig, teacher: nn.Module, student: nn.Module, generator: Generator,
                 normalize: nn.Module, ctx: DistContext):
        cfg = cfg.for_device(ctx.device)
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        self.batch = cfg.batch_size // ctx.world_size
        fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.teacher = teacher.to(self.device, memory_format=fmt).eval().requires_grad_(False)
        sync = cfg.sync_bn and ctx.distributed
        self.lambda_bn = bn_prior_weight(cfg.lambda_bn, teacher, cfg.teacher)
        self.bn_hook = ((GlobalBNStatHook if sync else BNStatHook)(self.teacher, backend=cfg.backend)
                        if has_batch_norm(teacher) else None)
        self.student_raw = student.to(self.device, memory_format=fmt).train()
        self.g_raw = (sync_generator_bn(generator, self.device) if sync else generator).to(
            self.device, memory_format=fmt).train()
        self.student, self.generator = wrap(self.student_raw, ctx), wrap(self.g_raw, ctx)
        self.ema = (FusedEMA(self.g_raw, decay=cfg.ema_decay, exclude_buffers=cfg.ema_buffers == "copy",
                             backend=cfg.backend) if cfg.ema else None)
        if self.ema is not None and cfg.ema_bn == "batch":
            # G̃ normalises with batch statistics, as G does, without updating its (EMA'd) running
            # statistics: they stay a function of G's alone, hence identical on every rank.
            self.ema.module.train()
            for m in self.ema.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.track_running_stats = False
        if self.ema is not None and cfg.share_embedding and self.g_raw.embed is not None:
            # G̃ conditions through G's own class table (not an average of it): one label, one code.
            self.ema.module.embed = self.g_raw.embed
        self.normalize = normalize.to(self.device)
        self.kl = KLDivLoss(cfg.temperature, backend=cfg.backend)
        self.adversarial = AdversarialLoss(cfg.adv_bound, cfg.adv_kind, cfg.temperature, backend=cfg.backend)
        # Under DDP the bound applies to the mean over all ranks' samples (see _adversarial).
        self.discrepancy = AdversarialLoss(None, cfg.adv_kind, cfg.temperature, backend=cfg.backend)

        impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[cfg.optimizer_impl]
        self.opt_g = torch.optim.Adam(self.g_raw.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999), **impl)
        if cfg.optimizer_s == "adam":
            self.opt_s = torch.optim.Adam(self.student_raw.parameters(), lr=cfg.lr_s, weight_decay=cfg.weight_decay_s,
                                          **impl)
        else:
            self.opt_s = torch.optim.SGD(self.student_raw.parameters(), lr=cfg.lr_s, momentum=0.9,
                                         weight_decay=cfg.weight_decay_s, **impl)
        self.sched_g, self.sched_s = (self._schedule(self.opt_g), self._schedule(self.opt_s))
        amp = autocast_dtype(cfg.amp, self.device)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext
        fp16 = cfg.amp == "fp16"
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_s = torch.amp.GradScaler(self.device.type, enabled=fp16)
        # Per-rank noise stream: ranks see different samples, and its state is checkpointed.
        self.noise = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + ctx.rank + 1)
        compile_ = (lambda m: torch.compile(m, mode=cfg.compile_mode)) if cfg.compile else (lambda m: m)
        self._teacher_f, self._student_f, self._gen_f = map(compile_, (self.teacher, self.student, self.generator))
        # the forwards outside DDP: G's and G̃'s sampling, the student's in the G step
        self._g_sample_f, self._student_g_f = compile_(self.g_raw), compile_(self.student_raw)
        self._ema_f = compile_(self.ema.module) if self.ema is not None else None
        # A CUDA-graph mode replays each compiled forward into buffers of its own; every iteration
        # starts a new generation of them, as nothing of the previous one is read after it returns.
        self._cudagraphs = cfg.compile and cfg.compile_mode in CUDAGRAPH_MODES

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Generator images → classifier input: to [0, 1] (from tanh's [-1, 1]), normalised like the data."""
        if self.cfg.gen_output == "tanh":
            x = (x + 1) * 0.5
        x = self.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _schedule(self, opt: torch.optim.Optimizer):
        if self.cfg.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.cfg.steps)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    def _codes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.cfg.nz, device=self.device, generator=self.noise)
        y = torch.randint(0, self.g_raw.num_classes, (n,), device=self.device, generator=self.noise)
        return z, y

    def _step(self, loss: torch.Tensor, opt, scaler, params: list[nn.Parameter]) -> None:
        # ``inputs=`` keeps the generator's loss from accumulating into the student and vice versa.
        scaler.scale(loss).backward(inputs=params)
        if self.cfg.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=self.cfg.optimizer_impl != "loop")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def generator_step(self, pretrain: bool = False) -> dict[str, torch.Tensor]:
        """L_G = −min(D(T(x), S(x)), δ) + λ_ce·CE(T(x), y) + λ_bn·L_BN(T; x); pretraining drops the first term."""
        cfg = self.cfg
        z, y = self._codes(self.batch)
        with self.autocast():
            x = self.to_input(self._gen_f(z, y))
            t = self._teacher_f(x)
            bn = self.bn_hook.loss if self.bn_hook is not None else torch.zeros((), device=self.device)
            # uncond: G never sees y, so the CE target is the teacher's own class (as CMI/Fast-Datafree do)
            target = t.detach().argmax(1) if cfg.conditioning == "uncond" else y
            ce = F.cross_entropy(t.float(), target)
            loss = cfg.lambda_ce * ce + self.lambda_bn * bn
            out = {"g_ce": ce.detach(), "g_bn": bn.detach()}
            if not pretrain:
                # The student outside DDP: no gradient reaches its weights here; in eval mode (by
                # default) its BN running statistics do not move on the G step's batch either.
                was_training = self.student_raw.training
                self.student_raw.train(not cfg.student_eval_in_g_step)
                try:
                    adv = self._adversarial(self._student_g_f(x).float(), t.float())
                finally:
                    self.student_raw.train(was_training)
                loss = loss + adv
                out["g_adv"] = adv.detach()
        self._step(loss, self.opt_g, self.scaler_g, list(self.g_raw.parameters()))
        return {"g_loss": loss.detach(), **out}

    def _adversarial(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """−min(D, δ) with D the mean discrepancy over every rank's samples. Under DDP each rank's term
        is −D_rank while the global D is below δ, else the constant −δ: DDP's gradient average then
        is exactly ∇(−min(D, δ)); the value returned is the global one (one small all-reduce, no sync)."""
        if not self.ctx.distributed or self.cfg.adv_bound is None:
            return self.adversarial(s, t)
        local = self.discrepancy(s, t)  # −D_rank
        d = -local.detach().clone()
        dist.all_reduce(d)
        d /= self.ctx.world_size
        bound = self.cfg.adv_bound
        term = torch.where(d < bound, local, torch.full_like(local, -bound))
        # value: −min(D, δ) of the global mean; gradient: that of ``term``
        return term + (-torch.clamp(d, max=bound) - term).detach()

    @torch.no_grad()
    def ema_step(self) -> None:
        """G̃ ← α·G̃ + (1−α)·G (one fused launch per dtype group)."""
        broadcast_buffers(self.g_raw, self.ctx)  # G's BN statistics drift per rank; G̃ must not
        self.ema.update(self.g_raw)

    def _samples(self) -> torch.Tensor:
        """A batch of G, then (with the EMA) a batch of G̃, concatenated; no gradient to either."""
        with torch.no_grad(), self.autocast():
            xs = [self._g_sample_f(*self._codes(self.batch))]
            if self.ema is not None:
                xs.append(self._ema_f(*self._codes(self.batch)))
            return self.to_input(torch.cat(xs))

    def student_step(self) -> dict[str, torch.Tensor]:
        """L_S = λ0·D(T(x), S(x)) + λ1·D(T(x̃), S(x̃)); without the EMA, D(T(x), S(x)) alone."""
        cfg, b = self.cfg, self.batch
        x = self._samples()
        if cfg.augment:  # teacher and student see the same crop of each sample
            x = random_resized_crop_flip(x, self.noise)
        paused = self.bn_hook.paused() if self.bn_hook is not None else contextlib.nullcontext()
        with torch.no_grad(), self.autocast(), paused:  # no BN prior in the student step
            t = self._teacher_f(x).float()
        params = list(self.student_raw.parameters())
        if self.ema is None:
            with self.autocast():
                loss = kl_g = self.kl(self._student_f(x).float(), t)
            self._step(loss, self.opt_s, self.scaler_s, params)
            return {"s_loss": loss.detach(), "s_kl_g": kl_g.detach()}
        if cfg.concat_forward:
            with self.autocast():
                s = self._student_f(x).float()
                kl_g, kl_ema = self.kl(s[:b], t[:b]), self.kl(s[b:], t[b:])
                loss = cfg.lambda0 * kl_g + cfg.lambda1 * kl_ema
            self._step(loss, self.opt_s, self.scaler_s, params)
        else:
            # Separate forwards (student BN sees each source alone); DDP syncs on the second backward.
            no_sync = self.student.no_sync if self.ctx.distributed else contextlib.nullcontext
            with no_sync(), self.autocast():
                kl_g = self.kl(self._student_f(x[:b]).float(), t[:b])
            self.scaler_s.scale(cfg.lambda0 * kl_g).backward(inputs=params)
            with self.autocast():
                kl_ema = self.kl(self._student_f(x[b:]).float(), t[b:])
            loss = cfg.lambda0 * kl_g.detach() + cfg.lambda1 * kl_ema
            self._step(cfg.lambda1 * kl_ema, self.opt_s, self.scaler_s, params)
        return {"s_loss": loss.detach(), "s_kl_g": kl_g.detach(), "s_kl_ema": kl_ema.detach()}

    def iteration(self, step: int) -> dict[str, torch.Tensor]:
        """Step ``step`` of the run: a G pretraining step, or g_steps G steps + EMA + s_steps S steps."""
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if step < self.cfg.g_pretrain_steps:
            return self.generator_step(pretrain=True)
        if step == self.cfg.g_pretrain_steps and self.ema is not None and self.cfg.ema_from_pretrained:
            # G̃ starts from the pre-trained G, not from G's random initialisation [ours]
            broadcast_buffers(self.g_raw, self.ctx)
            self.ema.set(self.g_raw)
        losses = {}
        for _ in range(self.cfg.g_steps):
            losses.update(self.generator_step())
        if self.ema is not None:
            self.ema_step()
        for _ in range(self.cfg.s_steps):
            losses.update(self.student_step())
        # Each rank's student BN statistics moved with its own batch; the next G step reads them (eval
        # mode, outside DDP). Rank 0's everywhere, as in a checkpoint: a resumed run continues exactly.
        broadcast_buffers(self.student_raw, self.ctx)
        self.sched_g.step()
        self.sched_s.step()
        return losses

    def lrs(self) -> dict[str, float]:
        return {"lr_g": self.opt_g.param_groups[0]["lr"], "lr_s": self.opt_s.param_groups[0]["lr"]}

    def state_dict(self) -> dict:
        return {"student": self.student_raw.state_dict(), "generator": self.g_raw.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_step": self.ema.stochastic_rounding_step if self.ema is not None else 0,
                "opt_g": self.opt_g.state_dict(), "opt_s": self.opt_s.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_s": self.sched_s.state_dict(),
                "scaler_g": self.scaler_g.state_dict(), "scaler_s": self.scaler_s.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student_raw.load_state_dict(state["student"])
        self.g_raw.load_state_dict(state["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.stochastic_rounding_step = state.get("ema_step", 0)  # a checkpoint without it restarts the rounding stream
        for name in ("opt_g", "opt_s", "sched_g", "sched_s", "scaler_g", "scaler_s"):
            getattr(self, name).load_state_dict(state[name])
