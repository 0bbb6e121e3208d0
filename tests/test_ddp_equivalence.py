"""2 gloo ranks with half the batch each == 1 process with the whole batch, where MAD's semantics say so.

Where they agree: every loss is a batch mean (DDP averages the ranks' gradients of their
half-batch means: the whole batch's mean gradient), the teacher's BN prior is computed on moments
all-reduced over ranks (`--sync-bn`), the adversarial bound applies to the global discrepancy, G̃
is updated from identical G's, and gradient clipping sees the averaged gradient. With the same
codes (z, y) split over the ranks, student, G and G̃ after a pre-training step and two adversarial
iterations equal the single process's, and so does every logged loss (rank mean), to fp64 rounding.

Where they do not, by design: (1) each rank draws codes from its own seeded stream, so a real
2-rank run sees other samples than a 1-process run (here both read one global stream, split by
rank); (2) BatchNorm in train mode normalises with the rank's half-batch statistics — G's BN
(torch has no CPU SyncBatchNorm; `--sync-bn` converts it on CUDA only) and the student's (DDP
does not sync them). So the equivalence runs with G's BN at fixed statistics and a student
without BN, and `test_batch_norm_is_where_ranks_differ` shows G's train-mode BN breaking it.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from madfast.data import Normalize
from madfast.models import Generator
from madfast.train import DistillConfig
from madfast.train.distributed import DistContext
from madfast.train import task as task_module
from madfast.train.task import MADTask
from test_mad_semantics import C, MEAN, NZ, STD, tiny_student, tiny_teacher

WORLD, B, ITERATIONS = 2, 8, 3


def _task(ctx: DistContext, g_bn: str, adv_bound) -> MADTask:
    cfg = DistillConfig(dataset="digits", nz=NZ, ngf=4, batch_size=B, steps=10, g_pretrain_steps=1, s_steps=2,
                        adv_bound=adv_bound, ema_bn="running", device="cpu", backend="torch").validate()
    torch.manual_seed(0)  # same initialisation everywhere
    gen = Generator(NZ, C, 16, 1, 4, cfg.conditioning, cfg.gen_block, cfg.gen_output)
    task = MADTask(cfg, tiny_teacher(), tiny_student(), gen, Normalize((MEAN,), (STD,)), ctx)
    if g_bn == "fixed":  # BN as a per-channel affine map: the same on half a batch and on all of it
        for module in (task.g_raw, task.ema.module):
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
    # One global code stream (a fresh seed per draw), each rank taking its rows.
    draws = iter(range(10**6))

    def codes(n: int):
        g = torch.Generator().manual_seed(1000 + next(draws))
        z = torch.randn(n * ctx.world_size, NZ, generator=g)
        y = torch.randint(0, C, (n * ctx.world_size,), generator=g)
        rows = slice(ctx.rank * n, (ctx.rank + 1) * n)
        return z[rows], y[rows]

    task._codes = codes
    return task


def _run(ctx: DistContext, g_bn: str, adv_bound) -> dict:
    torch.set_default_dtype(torch.float64)  # differences left are summation order, not fp32 rounding
    torch.set_num_threads(1)
    task = _task(ctx, g_bn, adv_bound)
    losses = []
    for step in range(ITERATIONS):
        values = {k: v.detach().clone() for k, v in task.iteration(step).items()}
        if ctx.distributed:  # as the trainer logs them: the rank mean
            for v in values.values():
                dist.all_reduce(v)
                v /= ctx.world_size
        losses.append(values)
    return {"losses": losses, "student": task.student_raw.state_dict(), "generator": task.g_raw.state_dict(),
            "ema": task.ema.state_dict()}


def _plant(bug: str | None) -> None:
    """Bugs the equivalence must catch, planted in a rank process."""
    if bug == "no gradient all-reduce":  # no DDP: each rank steps on its own half-batch gradient
        task_module.wrap = lambda module, ctx: module
    elif bug == "bound per rank":  # min(D_rank, δ) instead of min(D, δ) of the global D
        MADTask._adversarial = lambda self, s, t: self.adversarial(s, t)


def _worker(rank: int, store: str, out: str, g_bn: str, adv_bound, bug=None) -> None:
    _plant(bug)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = _run(DistContext(rank, WORLD, torch.device("cpu")), g_bn, adv_bound)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _both(tmp_path, g_bn: str, adv_bound, bug=None) -> tuple[dict, list[dict]]:
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, g_bn, adv_bound, bug), nprocs=WORLD, join=True)
    previous = torch.get_default_dtype()
    try:
        single = _run(DistContext(), g_bn, adv_bound)
    finally:
        torch.set_default_dtype(previous)
    return single, [torch.load(f"{out}.{r}") for r in range(WORLD)]


def _max_difference(a: dict, b: dict, buffers: bool = True) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if a[k].is_floating_point() and (buffers or "running_" not in k))


# Why these hold on any CPU: the runs are fp64, so a CPU's vector width only reorders fp64 sums
# (~1e-16 relative); over 3 iterations that stays far below a bound set by the size of one step.
# Weights: fp64 summation order (observed < 1e-12); a one-step change of one weight is ~lr = 1e-3..2e-3
# (Adam), so 1e-9 separates rounding from a bug. Losses: the trainer computes them from fp32 logits
# (``.float()``), so the half-batch means differ from the whole batch's by fp32 rounding: 1e-6 relative.
TOL, LOSS_RTOL = 1e-9, 1e-6
# The adversarial bound where it matters: in the first adversarial G step rank 1's D (0.06331) is
# above it and rank 0's (0.06262) and the global mean (0.06296) below; so min(D, δ) must use the
# global D (all three fp64, the margins ~1e-4, far beyond rounding).
BOUND = 0.063


@pytest.mark.slow
@pytest.mark.parametrize("adv_bound", [None, BOUND], ids=["unbounded", "bound"])
def test_two_ranks_equal_one_process(tmp_path, adv_bound):
    single, ranks = _both(tmp_path, "fixed", adv_bound)
    for rank, got in enumerate(ranks):
        for name in ("student", "generator", "ema"):
            assert _max_difference(single[name], got[name]) < TOL, (rank, name)
        for step, (want, have) in enumerate(zip(single["losses"], got["losses"])):
            assert want.keys() == have.keys()
            for k in want:
                assert abs(want[k].item() - have[k].item()) < LOSS_RTOL * max(1.0, abs(want[k].item())), (step, k)
    # the run moved: the comparison is not between initial weights
    assert _max_difference(single["student"], tiny_student().double().state_dict()) > 1e-3


@pytest.mark.slow
def test_batch_norm_is_where_ranks_differ(tmp_path):
    """G's BN in train mode normalises each rank's half batch with its own statistics (no CPU
    SyncBatchNorm): the 2-rank G is then another function than the 1-process G. Its weights stay
    identical across ranks (DDP); its running statistics move with each rank's own samples in the
    student step (G samples in train mode) until the next DDP forward broadcasts rank 0's."""
    single, ranks = _both(tmp_path, "batch", None)
    assert _max_difference(single["generator"], ranks[0]["generator"], buffers=False) > 1e-3
    assert _max_difference(ranks[0]["generator"], ranks[1]["generator"], buffers=False) == 0


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["no gradient all-reduce", "bound per rank"])
def test_a_planted_ddp_bug_breaks_the_equivalence(tmp_path, bug):
    """The bound above can fail: each bug moves some network by far more than TOL."""
    single, ranks = _both(tmp_path, "fixed", BOUND, bug)
    worst = max(_max_difference(single[name], got[name]) for got in ranks for name in ("student", "generator"))
    assert worst > 1e3 * TOL, worst
