"""The MAD run (`distill`) and supervised teacher training (`train_teacher`).

Everything the user gave is checked (data, models, teacher checkpoint, batch split) before
anything is written; a run folder that already holds checkpoints is only continued by resume.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from madfast._extras import require
from madfast.data import Normalize, build_dataset, dataset_info, folder_index
from madfast.errors import CheckpointError, UsageError
from madfast.models import Generator, build_model
from madfast.models.checkpoints import load_teacher_weights
from madfast.models.from_timm import timm_data_info
from madfast.train import checkpoint as ckpt
from madfast.train.config import DistillConfig, TeacherConfig, autocast_dtype
from madfast.train.distributed import DistContext, assert_identical, gather, setup, teardown, wrap
from madfast.train.evaluate import eval_loader, evaluate
from madfast.train.logger import RunLogger
from madfast.train.preemption import PreemptionGuard
from madfast.train.report import save_curves, save_sample_grid
from madfast.train.task import MADTask

__all__ = ["distill", "train_teacher", "NonFiniteLossError", "LOSS_COLUMNS"]

LOSS_COLUMNS = ["g_loss", "g_adv", "g_ce", "g_bn", "s_loss", "s_kl_g", "s_kl_ema"]
TIME_TO_ACCURACY = (0.90, 0.95)  # fractions of the teacher's accuracy timed in summary.json
# What a restart with ``resume="auto"`` may change: how long the run is, how it logs, where it runs.
RESTART_FIELDS = frozenset({"steps", "log_every", "eval_every", "ckpt_every", "keep_ckpts", "progress",
                            "tensorboard", "num_workers", "eval_batch_size", "check_teacher", "device", "out"})


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/Inf; the run stopped and its last good checkpoint is kept."""


def _progress(total: int, initial: int, enabled: bool, desc: str):
    tqdm = require("tqdm.auto", "the progress bar").tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def _launch(run, cfg, *args) -> dict:
    """``run(cfg, ctx, *args)`` inside the process group; the config and batch split are checked
    before joining it, so that every rank fails at once with the same line."""
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    ctx = setup(cfg.device)
    try:
        return run(cfg, ctx, *args)
    finally:
        teardown(ctx)


def shared_test_set(name: str, data_dir: str | None, img_size: int, ctx: DistContext):
    """The test split; under torchrun rank 0 alone scans an ImageFolder's folder and hands its file
    list to the other ranks (a data error on rank 0 is raised on every rank)."""
    if not ctx.distributed:
        return build_dataset(name, "test", data_dir, img_size)
    box: list = [None]
    if ctx.is_main:
        try:
            test_set = build_dataset(name, "test", data_dir, img_size)
            box = [folder_index(test_set)]
        except UsageError as e:
            box = [e]
    dist.broadcast_object_list(box, 0)
    if isinstance(box[0], Exception):
        raise box[0]
    return test_set if ctx.is_main else build_dataset(name, "test", data_dir, img_size, index=box[0])


def _check_fresh_out(out: str) -> None:
    if ckpt.latest_checkpoint(out) is not None or os.path.isfile(os.path.join(out, "teacher.pt")):
        raise UsageError(f"--out {out!r} already holds a run: continue it with --resume {out} or choose another --out")


def distill(cfg: DistillConfig, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Runs MAD with ``cfg`` (from scratch, or continuing the newest checkpoint in ``resume``).

    Writes OUT/ckpt-*.pt, metrics.csv, tb/, config.json, summary.json, samples.png (G and G̃)
    and curves.png.

    ``resume="auto"``: continue the newest checkpoint in ``cfg.out`` if there is one (refusing a
    config that differs from the saved one outside RESTART_FIELDS), else start fresh — the same
    call starts a run and continues it after any restart (torchrun --max-restarts, a requeued job).

    ``stop_after``: leave after that many iterations of this invocation with a checkpoint (for
    time-limited jobs; ``resume`` continues exactly). SIGTERM or SIGUSR1 does the same after the
    current iteration (``summary["preempted"]`` names the signal; a second one raises
    madfast.train.preemption.Preempted at once). Returns the summary also written to
    OUT/summary.json; its ``seconds_to_teacher_fraction`` maps "0.90"/"0.95" to the wall seconds
    until an evaluation first found the student at that fraction of the teacher's accuracy.
    """
    return _launch(_distill, cfg, resume, stop_after)


def _distill(cfg: DistillConfig, ctx: DistContext, resume: str | None, stop_after: int | None) -> dict:
    cfg = cfg.for_device(ctx.device)  # what config.json and the checkpoints record
    auto = resume == "auto"
    if auto:
        resume = cfg.out if ckpt.latest_checkpoint(cfg.out) else None
    state = ckpt.load_checkpoint(resume) if resume else None
    if state is not None and state.get("format") != "madfast-distill/1":
        raise CheckpointError(f"--resume {resume!r}: not a `madfast distill` checkpoint")
    if auto and state is not None:
        _check_same_run(state["config"], cfg)
    info = timm_data_info(dataset_info(cfg.dataset, cfg.data_dir, cfg.img_size or None), cfg.teacher,
                          bool(cfg.img_size))
    test_set = shared_test_set(cfg.dataset, cfg.data_dir, info.img_size, ctx)
    torch.manual_seed(cfg.seed)  # same initialisation on every rank
    teacher = build_model(cfg.teacher, info.num_classes, info.channels, info.img_size)
    teacher_file = load_teacher_weights(cfg.teacher_ckpt, teacher, cfg.teacher, info.num_classes, info.channels)
    student = build_model(cfg.student, info.num_classes, info.channels, info.img_size)
    generator = Generator(cfg.nz, info.num_classes, info.img_size, info.channels, cfg.ngf, cfg.conditioning,
                          cfg.gen_block, cfg.gen_output, backend=cfg.backend)
    normalize = Normalize(info.mean, info.std)
    task = MADTask(cfg, teacher, student, generator, normalize, ctx)  # resolves λ_bn: refuses > 0 without BN
    if task.bn_hook is None and ctx.is_main:
        print(f"{cfg.teacher!r} has no BatchNorm2d layers, so the BN-statistics prior is off (lambda_bn 0): "
              "G learns from the adversarial and CE terms", flush=True)
    start, total = 0, cfg.g_pretrain_steps + cfg.steps
    if state is not None:
        task.load_state_dict(state["task"])
        start = state["step"]
        if ctx.is_main:
            print(f"resuming {resume} at step {start}/{total}", flush=True)
        saved_world = len(state["noise"])
        if saved_world == ctx.world_size:  # exact continuation
            task.noise.set_state(state["noise"][ctx.rank])
            ckpt.set_rng_state(state["rng"][ctx.rank])
        else:
            # Another world size: the global batch is kept, each rank's noise stream is re-seeded
            # from (seed, step, rank) — a valid continuation, not bit-exact with either run.
            task.noise.manual_seed((cfg.seed * 1_000_003 + start * 7_919 + ctx.rank + 1) % (2**63))
            ckpt.set_rng_state(state["rng"][ctx.rank % saved_world])
            if ctx.is_main:
                warnings.warn(f"--resume {resume!r}: written by {saved_world} ranks, continued on {ctx.world_size}; "
                              "noise streams re-seeded (not bit-exact)", RuntimeWarning, stacklevel=2)
    else:  # on every rank, so that all of them stop
        _check_fresh_out(cfg.out)

    loader = eval_loader(test_set, cfg.eval_batch_size, 0 if cfg.dataset == "digits" else cfg.num_workers, ctx)
    amp = autocast_dtype(cfg.amp, ctx.device)

    def accuracy(model) -> float:  # on every rank (each its shard), same number everywhere
        return evaluate(model, loader, normalize, ctx.device, cfg.channels_last, ctx, amp)["acc"]

    main = ctx.is_main
    same_data = (teacher_file.get("dataset"), teacher_file.get("img_size")) == (cfg.dataset, info.img_size)
    teacher_acc = teacher_file["test_acc"] if same_data else None
    if teacher_acc is None and cfg.check_teacher:
        teacher_acc = accuracy(task.teacher)
    if main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        if teacher_acc is not None and cfg.progress:
            print(f"teacher {cfg.teacher!r} test accuracy {teacher_acc:.2f}% (before distilling)", flush=True)
    logger = RunLogger(cfg.out, [*LOSS_COLUMNS, "lr_g", "lr_s", "samples_per_s", "student_acc"],
                       cfg.tensorboard, start) if main else None
    # Every generated image counts: G steps, and G (+ G̃) samples of the student steps.
    per_iter = cfg.batch_size * (cfg.g_steps + cfg.s_steps * (2 if cfg.ema else 1))
    images = 0

    def checkpoint(step: int) -> None:
        assert_identical(task.ema.module if task.ema is not None else task.g_raw, ctx, "the EMA generator")
        noise, rng = gather(task.noise.get_state(), ctx), gather(ckpt.rng_state(), ctx)
        if main:
            ckpt.save_checkpoint({"format": "madfast-distill/1", "config": asdict(cfg), "step": step,
                                  "task": task.state_dict(), "noise": noise, "rng": rng}, cfg.out, step, cfg.keep_ckpts)

    bar = _progress(total, start, cfg.progress and main, "distill")
    t0, tick, student_acc = time.perf_counter(), time.perf_counter(), None
    # wall seconds (this process's, evaluations included) to each fraction of the teacher's accuracy
    seconds_to = {f"{r:.2f}": None for r in TIME_TO_ACCURACY}
    end = total if stop_after is None else min(total, start + stop_after)
    step = start
    # Losses stay on the device between log/eval/checkpoint steps, so the host does not wait for
    # the GPU every iteration; at those steps every pending step is checked (the first non-finite
    # loss is named with its step, and nothing is checkpointed after it).
    pending: list[tuple[int, list[str], torch.Tensor]] = []

    def check_pending() -> list[float]:
        flat = torch.cat([v for _, _, v in pending])
        if ctx.distributed:  # one small all-reduce: logged values are rank means, NaN anywhere stops all
            dist.all_reduce(flat)
            flat /= ctx.world_size
        flat, offset = flat.tolist(), 0
        for at, names, v in pending:
            values, offset = flat[offset:offset + v.numel()], offset + v.numel()
            for name, x in zip(names, values):
                if not math.isfinite(x):
                    kept = ckpt.latest_checkpoint(cfg.out)
                    raise NonFiniteLossError(f"loss {name} is {x} at step {at}; stopped. "
                                             f"Last good checkpoint: {kept or 'none (no checkpoint written yet)'}")
        pending.clear()
        return values

    preemption, stopped_by = PreemptionGuard(ctx).install(), None
    try:
        for step in range(start + 1, end + 1):
            losses = task.iteration(step - 1)
            names = list(losses)
            pending.append((step, names, torch.stack([v.float() for v in losses.values()])))
            images += cfg.batch_size if step <= cfg.g_pretrain_steps else per_iter
            evaluating = step == total or (cfg.eval_every and step % cfg.eval_every == 0)
            logging = step % cfg.log_every == 0 or step == end or evaluating
            stopping = preemption.should_stop()  # on every rank, after the same iteration
            checkpointing = (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == end or stopping
            if not (logging or checkpointing):
                bar.update(1)
                continue
            values = check_pending()
            row = dict(zip(names, values))
            if evaluating:
                student_acc = accuracy(task.student_raw)
                row["student_acc"] = student_acc
                for r in TIME_TO_ACCURACY:
                    if teacher_acc and seconds_to[f"{r:.2f}"] is None and student_acc >= r * teacher_acc:
                        seconds_to[f"{r:.2f}"] = time.perf_counter() - t0
            if main and logging:
                now = time.perf_counter()
                row.update(task.lrs(), samples_per_s=images / max(now - tick, 1e-9))
                tick, images = now, 0
                logger.log(step, row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("g_loss", "s_loss", "samples_per_s") if k in row})
            bar.update(1)
            if checkpointing:
                checkpoint(step)
            if stopping:
                stopped_by = preemption.signal_name
                break
    finally:
        preemption.restore()
        bar.close()
        if logger is not None:
            logger.close()
    if not main:
        return {"preempted": stopped_by, "step": step, "total_steps": total} if stopped_by else {}
    summary = {"teacher_acc": teacher_acc, "student_acc": student_acc, "step": step, "total_steps": total,
               "seconds": time.perf_counter() - t0, "finished": step == total,
               "seconds_to_teacher_fraction": seconds_to if teacher_acc else None, "preempted": stopped_by}
    if student_acc is not None and teacher_acc:
        summary["ratio"] = student_acc / teacher_acc
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    # The figures come last and never fail the run: its checkpoint and summary are already written.
    _report("samples.png", lambda: save_sample_grid(task, os.path.join(cfg.out, "samples.png")))
    _report("curves.png", lambda: save_curves(logger.path, os.path.join(cfg.out, "curves.png")))
    return summary


def _check_same_run(saved: dict, cfg: DistillConfig) -> None:
    """A restart continues the run it finds only if it is the same run (outside RESTART_FIELDS)."""
    now = asdict(cfg)
    differ = [k for k in now if k not in RESTART_FIELDS and k in saved and saved[k] != now[k]]
    if differ:
        raise UsageError(f"--resume auto: --out {cfg.out!r} holds another run: " + ", ".join(
            f"--{k.replace('_', '-')} is {now[k]!r} (the run's: {saved[k]!r})" for k in differ))


def _report(name: str, write) -> None:
    try:
        write()
    except Exception as e:  # noqa: BLE001 — any plotting/memory error: warn, keep the run's results
        warnings.warn(f"could not write {name}: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


def train_teacher(cfg: TeacherConfig) -> dict:
    """Supervised training; writes OUT/teacher.pt (with its test accuracy) and OUT/metrics.csv."""
    return _launch(_train_teacher, cfg)


def _train_teacher(cfg: TeacherConfig, ctx: DistContext) -> dict:
    info = timm_data_info(dataset_info(cfg.dataset, cfg.data_dir, cfg.img_size or None), cfg.model,
                          bool(cfg.img_size))
    train_set = build_dataset(cfg.dataset, "train", cfg.data_dir, info.img_size,
                              augment=cfg.augment and cfg.dataset != "digits")
    test_set = shared_test_set(cfg.dataset, cfg.data_dir, info.img_size, ctx)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.num_classes, info.channels, info.img_size)
    if ctx.is_main:
        _check_fresh_out(cfg.out)
        os.makedirs(cfg.out, exist_ok=True)
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = model.to(ctx.device, memory_format=fmt)
    net = wrap(model, ctx)
    workers = 0 if cfg.dataset == "digits" else cfg.num_workers
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, seed=cfg.seed) if ctx.distributed else None
    loader = DataLoader(train_set, batch_size=cfg.batch_size // ctx.world_size, shuffle=sampler is None,
                        sampler=sampler, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} training images")
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.15)
    amp = autocast_dtype(cfg.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp == "fp16")
    normalize = Normalize(info.mean, info.std).to(ctx.device)
    test_loader = eval_loader(test_set, 512, workers, ctx)
    logger = RunLogger(cfg.out, ["loss", "lr", "test_acc"], tensorboard=False) if ctx.is_main else None
    t0 = time.perf_counter()
    bar = _progress(cfg.epochs * len(loader), 0, cfg.progress and ctx.is_main, "teacher")
    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        total_loss = 0.0
        for x, y in loader:
            x, y = normalize(x.to(ctx.device)), y.to(ctx.device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total_loss += loss.item()
            if not math.isfinite(total_loss):
                raise NonFiniteLossError(f"loss is {loss.item()} in epoch {epoch + 1}; stopped")
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3g}")
        acc = evaluate(model, test_loader, normalize, ctx.device, cfg.channels_last, ctx, amp)["acc"]
        if ctx.is_main:
            logger.log(epoch + 1, {"loss": total_loss / len(loader), "lr": opt.param_groups[0]["lr"], "test_acc": acc})
    bar.close()
    if not ctx.is_main:
        return {}
    logger.close()
    path = os.path.join(cfg.out, "teacher.pt")
    ckpt.save_teacher(path, model, cfg.model, info.num_classes, info.channels, cfg.dataset, info.img_size, acc,
                      asdict(cfg))
    summary = {"test_acc": acc, "seconds": time.perf_counter() - t0, "teacher_ckpt": path}
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
