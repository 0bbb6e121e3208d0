"""FusedEMA against ModelEmaV3's semantics, written out here, and AveragedModel interop."""

import copy
import inspect
import io

import pytest
import torch
from torch import nn

from conftest import DEVICES, backends_for, rel_err, requires_cuda, skip_unless_available
from madfast import FusedEMA, ema_multi_avg_fn
from madfast.ops import ema_update_


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def reference_decay(step, decay, min_decay, update_after_step, use_warmup, gamma, power):
    """timm ModelEmaV3.get_decay."""
    if step is None:
        return decay
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if not use_warmup:
        return decay
    d = 1 - (1 + step / gamma) ** -power
    return max(min(d, decay), min_decay)


def reference_update(ema_state, model, decay, exclude_buffers):
    """timm ModelEmaV3.update in float64: floating state lerped, integer state copied;
    with exclude_buffers, parameters lerped and every buffer copied."""
    params = dict(model.named_parameters())
    for name, value in model.state_dict().items():
        value = value.detach().to(torch.float64) if value.is_floating_point() else value.clone()
        if value.is_floating_point() and (name in params or not exclude_buffers):
            ema_state[name] += (1 - decay) * (value - ema_state[name])
        else:
            ema_state[name] = value


CONFIGS = [
    dict(decay=0.9, use_warmup=False, update_after_step=0, exclude_buffers=False),
    dict(decay=0.99, use_warmup=True, warmup_power=3 / 4, min_decay=0.5, update_after_step=10,
         exclude_buffers=False),
    dict(decay=0.95, use_warmup=True, warmup_gamma=2.0, update_after_step=3, exclude_buffers=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "warmup+after", "exclude_buffers"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_matches_model_ema_v3_over_120_steps(device, config, backend):
    torch.manual_seed(0)
    model = Net().to(device)
    ema = FusedEMA(model, backend=backend, **config)
    kw = dict(decay=config["decay"], min_decay=config.get("min_decay", 0.0),
              update_after_step=config["update_after_step"], use_warmup=config["use_warmup"],
              gamma=config.get("warmup_gamma", 1.0), power=config.get("warmup_power", 2 / 3))
    ref = {k: (v.double() if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(120):
        model.train()
        loss = model(torch.randn(4, 3, 6, 6, device=device)).square().mean()  # also moves BN stats
        opt.zero_grad()
        loss.backward()
        opt.step()
        d = reference_decay(step, **kw)
        assert ema.get_decay(step) == pytest.approx(d, abs=1e-15)
        ema.update(model, step=step)
        reference_update(ref, model, d, config["exclude_buffers"])
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), ref[name], atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert torch.equal(value, ref[name]), name
    assert ema.module.bn.num_batches_tracked.item() == 120
    assert ema.get_decay(None) == config["decay"]


def test_state_dict_keys_and_round_trip():
    model = Net()
    ema = FusedEMA(model, decay=0.5)
    assert set(ema.state_dict()) == {f"module.{k}" for k in model.state_dict()}  # as ModelEmaV3
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    other = FusedEMA(Net(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(ema.module.state_dict().values(), other.module.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(ema(x), other(x))
    assert not any(p.requires_grad for p in ema.parameters())


def test_set_copies_and_device_keeps_ema_elsewhere():
    model = Net()
    ema = FusedEMA(model, decay=0.9, device="cpu")
    with torch.no_grad():
        model.fc.weight.fill_(3.0)
    ema.set(model)
    assert torch.equal(ema.module.fc.weight, model.fc.weight)
    ema = ema.to(torch.float64)
    assert ema.module.fc.weight.dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay must be in"):
        FusedEMA(Net(), decay=1.5)
    with pytest.raises(ValueError, match="min_decay must be in"):
        FusedEMA(Net(), min_decay=-1)
    ema = FusedEMA(Net())
    with pytest.raises(ValueError, match="pass the model the EMA was made from"):
        ema.update(nn.Linear(3, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_averaged_model_multi_avg_fn(device):
    torch.manual_seed(0)
    model = Net().to(device)
    ours = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.9), use_buffers=True)
    theirs = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(5):
        model(torch.randn(4, 3, 6, 6, device=device)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # torch's EMA fn averages integer buffers too (truncating); ours copies them, as ModelEmaV3 does.
    assert ours.module.bn.num_batches_tracked.item() == model.bn.num_batches_tracked.item() == 5
    with pytest.raises(ValueError, match="decay must be in"):
        ema_multi_avg_fn(2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_training_step_with_update_compiles_fullgraph(device, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net().to(device)
    eager_model = copy.deepcopy(model)
    ema, eager_ema = FusedEMA(model, decay=0.9, backend=backend), FusedEMA(eager_model, decay=0.9, backend=backend)

    def train_step(model, ema, x):
        # torch.optim's step() graph-breaks on purpose, so the step is written out (SGD).
        params = [p for p in model.parameters()]
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        ema.update(model)
        return ema(x)

    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, device=device)
        model(x).square().mean().backward()
        eager_model(x).square().mean().backward()
        torch.testing.assert_close(compiled(model, ema, x), train_step(eager_model, eager_ema, x))
        model.zero_grad()
        eager_model.zero_grad()
    for a, b in zip(ema.module.state_dict().values(), eager_ema.module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- timm 1.0.31 parity, exact copies, the cached plan ----

# timm 1.0.31's ModelEmaV3.__init__, written out so that the test runs without timm
TIMM_1_0_31_PARAMS = [("model", inspect.Parameter.empty), ("decay", 0.9999), ("min_decay", 0.0),
                      ("update_after_step", 0), ("use_warmup", False), ("warmup_gamma", 1.0),
                      ("warmup_power", 2 / 3), ("device", None), ("dtype", None), ("stochastic_rounding", True),
                      ("stochastic_rounding_seed", 0), ("foreach", True), ("exclude_buffers", False)]


def test_signature_and_methods_match_model_ema_v3():
    params = list(inspect.signature(FusedEMA.__init__).parameters.values())[1:]
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == TIMM_1_0_31_PARAMS
    assert [p.name for p in params if p.kind == p.KEYWORD_ONLY] == ["backend"]
    for method in ("update", "get_decay", "set", "apply_update_", "apply_update_no_buffers_", "forward"):
        assert callable(getattr(FusedEMA, method))
    timm = pytest.importorskip("timm.utils.model_ema")
    theirs = list(inspect.signature(timm.ModelEmaV3.__init__).parameters.values())[1:]
    assert positional == [(p.name, p.default) for p in theirs]
    ema = FusedEMA(Net(), 0.5, 0.1, 2, True, 2.0, 0.5, "cpu", torch.float64, False, 7, False, True)
    assert (ema.decay, ema.min_decay, ema.update_after_step, ema.use_warmup, ema.warmup_gamma, ema.warmup_power,
            ema.device, ema.dtype, ema.stochastic_rounding, ema.stochastic_rounding_seed, ema.foreach,
            ema.exclude_buffers) == (0.5, 0.1, 2, True, 2.0, 0.5, torch.device("cpu"), torch.float64, False, 7,
                                     False, True)
    assert ema.module.fc.weight.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_set_and_warmup_steps_copy_exactly(device, backend):
    model = Net().to(device)
    ema = FusedEMA(model, decay=0.9, update_after_step=2, backend=backend)
    with torch.no_grad():
        ema.module.fc.weight.fill_(float("nan"))
        ema.module.fc.bias.fill_(1e8)
    ema.set(model)
    for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        ema.module.fc.weight.fill_(float("nan"))
        model.fc.weight.add_(1)
    for step in range(4):  # get_decay is 0 for steps <= update_after_step + 1
        ema.update(model, step=step)
        assert torch.equal(ema.module.fc.weight, model.fc.weight), step


class _WithComplex(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.phase = nn.Parameter(torch.randn(37, dtype=torch.complex64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cpp", "cuda"])
def test_complex_parameters_are_averaged_like_averaged_model(device, backend):
    """torch.optim.swa_utils.AveragedModel lerps complex parameters (timm's ModelEmaV3 copies
    them): the real and imaginary parts each follow the fp64 EMA."""
    skip_unless_available("ema_update_", backend, device)
    torch.manual_seed(0)
    model = _WithComplex().to(device)
    ema = FusedEMA(model, decay=0.8, backend=backend)
    theirs = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.8, backend=backend),
                                                 use_buffers=True)
    exact = model.phase.detach().cdouble().clone()
    for step in range(5):
        with torch.no_grad():
            model.phase.add_(torch.randn_like(model.phase))
        ema.update(model)
        theirs.update_parameters(model)  # its first update is a copy
        exact_theirs = model.phase.detach().cdouble().clone() if step == 0 else exact_theirs
        exact += 0.2 * (model.phase.detach().cdouble() - exact)
        if step:
            exact_theirs += 0.2 * (model.phase.detach().cdouble() - exact_theirs)
    for got, want in ((ema.module.phase, exact), (theirs.module.phase, exact_theirs)):
        assert got.dtype == torch.complex64
        assert rel_err(torch.view_as_real(got), torch.view_as_real(want)) < 1e-6
    assert not torch.equal(ema.module.phase, model.phase)  # averaged, not copied


def test_a_complex_tensor_paired_with_a_real_one_is_refused():
    with pytest.raises(TypeError, match=r"ema_tensors\[1\] \(torch.complex64\) and tensors\[1\] \(torch.float32\)"):
        ema_update_([torch.zeros(2), torch.zeros(2, dtype=torch.complex64)], [torch.zeros(2), torch.zeros(2)], 0.5)


class _Tiny(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.lin = nn.Linear(67, 33).to(dtype)
        self.bn = nn.BatchNorm1d(33).to(dtype)

    def forward(self, x):
        return self.bn(self.lin(x))


@pytest.mark.parametrize("dtype,ema_dtype", [(torch.float32, None), (torch.float64, None), (torch.float16, None),
                                             (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "fp64", "fp16", "bf16", "bf16-model-fp32-ema"])
@pytest.mark.parametrize("exclude_buffers", [False, True])
@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in backends_for(d)])
def test_60_steps_against_timm_model_ema_v3(dtype, ema_dtype, exclude_buffers, device, backend):
    """A differential test against timm 1.0.31 itself (skipped without timm): warm-up, the decay-0
    steps, buffers; round to nearest on both sides (timm's bf16 stochastic rounding draws from
    torch's generator, ours hashes). The same bits where both compute the same lerp with the same
    fma: torch's CPU lerp fuses it wherever ATen's vectorised kernels run (capability AVX2 and up),
    as the cpp kernel always does; Triton's interpreter rounds twice (its fma is x*y+z)."""
    timm = pytest.importorskip("timm.utils.model_ema")
    skip_unless_available("ema_update_", backend, device)
    interpreted = backend == "triton" and device == "cpu"
    if interpreted and torch.bfloat16 in (dtype, ema_dtype):
        pytest.skip("Triton's interpreter casts fp32 to bf16 by truncation; compiled kernels round to nearest")
    torch.manual_seed(0)
    model = _Tiny(dtype).to(device)
    kw = dict(decay=0.9999, update_after_step=3, use_warmup=True, warmup_power=3 / 4, dtype=ema_dtype,
              stochastic_rounding=False, exclude_buffers=exclude_buffers)
    ours, theirs = FusedEMA(model, **kw, backend=backend), timm.ModelEmaV3(model, **kw)
    fused = device == "cuda" or torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    bitwise = ema_dtype is None and fused and not interpreted
    exact = {k: (v.double() if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}
    for step in range(60):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            model.bn.running_mean.add_(0.1)
            model.bn.num_batches_tracked += 1
        ours.update(model, step=step)
        theirs.update(model, step=step)
        reference_update(exact, model, reference_decay(step, 0.9999, 0.0, 3, True, 1.0, 3 / 4), exclude_buffers)
    tiny = torch.finfo(ema_dtype or dtype)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert a.dtype == b.dtype, name
        if not a.is_floating_point():
            assert torch.equal(a, b), name
            continue
        if bitwise:
            assert torch.equal(a, b), (name, (a.double() - b.double()).abs().max().item())
            continue
        # another rounding sequence (timm's mixed-dtype path is mul + add, not lerp; the interpreter's
        # fma rounds twice): as close to the fp64 EMA as timm is
        ours_err, timm_err = rel_err(a, exact[name]), rel_err(b, exact[name])
        assert ours_err <= max(2 * timm_err, 4 * tiny.eps), (name, ours_err, timm_err)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_stochastic_rounding_default_follows_the_exact_average(device):
    """timm's default (stochastic_rounding=True): a bf16 EMA of tiny updates moves like the fp64 EMA."""
    model = nn.Linear(200, 100, bias=False).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema, nearest = FusedEMA(model, decay=0.999), FusedEMA(model, decay=0.999, stochastic_rounding=False)
    with torch.no_grad():
        model.weight.fill_(1.01)
    exact = 1.0
    for _ in range(300):
        ema.update(model)
        nearest.update(model)
        exact += 0.001 * (model.weight[0, 0].double().item() - exact)
    assert torch.equal(nearest.module.weight, torch.ones_like(nearest.module.weight))
    mean = ema.module.weight.double().mean().item()
    assert abs((mean - 1) - (exact - 1)) < 0.05 * (exact - 1)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_resumes_exactly_with_its_step(device):
    """A bf16 EMA saved after 5 updates and resumed with state_dict + stochastic_rounding_step equals
    the uninterrupted one after 10, bit for bit; without the step it repeats the first bits."""
    model = nn.Linear(64, 32, bias=False).to(device=device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(model.weight.shape, generator=g).to(device) for _ in range(10)]

    def run(ema, updates):
        for w in updates:
            with torch.no_grad():
                model.weight.copy_(w)
            ema.update(model)

    start = model.weight.detach().clone()
    full = FusedEMA(model, decay=0.9)
    run(full, steps)
    with torch.no_grad():
        model.weight.copy_(start)
    first = FusedEMA(model, decay=0.9)
    run(first, steps[:5])
    assert first.stochastic_rounding_step == 5 and "_extra_state" not in first.state_dict()  # timm's keys
    resumed, forgetful = FusedEMA(model, decay=0.9), FusedEMA(model, decay=0.9)
    for ema in (resumed, forgetful):
        ema.load_state_dict(first.state_dict())
    resumed.stochastic_rounding_step = first.stochastic_rounding_step
    run(resumed, steps[5:])
    run(forgetful, steps[5:])
    assert torch.equal(resumed.module.weight, full.module.weight)
    assert not torch.equal(forgetful.module.weight, full.module.weight)
    with pytest.raises(ValueError, match="stochastic_rounding_step"):
        resumed.stochastic_rounding_step = -1


@pytest.mark.parametrize("device", DEVICES)
def test_cached_lists_follow_the_model(device):
    """The plan is reused across updates and rebuilt when the model's tensors change: a replaced
    Parameter (registration hook), a new storage (.to(), .data =), a new dtype."""
    model = Net().to(device)
    ema = FusedEMA(model, decay=0.5)
    ema.update(model)
    plan = ema._plan
    ema.update(model)
    assert ema._plan is plan  # reused
    with torch.no_grad():
        model.fc.weight = nn.Parameter(torch.full_like(model.fc.weight, 3.0))
    ema.set(model)
    assert torch.equal(ema.module.fc.weight, model.fc.weight)
    model.fc.bias.data = torch.full_like(model.fc.bias, 5.0)  # same Parameter, new storage
    ema.set(model)
    assert torch.equal(ema.module.fc.bias, model.fc.bias)
    model.to(torch.float64)  # an fp32 EMA of an fp64 model
    with torch.no_grad():
        model.fc.weight.fill_(7.0)
    ema.update(model)
    assert torch.equal(ema.module.fc.weight, torch.full_like(ema.module.fc.weight, 5.0))
    ema.to(torch.float64)
    ema.update(model)
    assert torch.equal(ema.module.fc.weight, torch.full_like(ema.module.fc.weight, 6.0))


def test_plan_follows_replaced_and_deleted_modules_and_names_what_does_not_pair():
    model = Net()
    ema = FusedEMA(model, decay=0.5)
    ema.update(model)
    model.fc = nn.Linear(8, 5)  # a new submodule of the same shapes: its tensors are the ones averaged
    with torch.no_grad():
        model.fc.weight.fill_(4.0)
        model.scratch.fill_(2.0)  # non-persistent: not in state_dict, so not averaged
    ema.set(model)
    assert torch.equal(ema.module.fc.weight, model.fc.weight)
    assert torch.equal(ema.module.scratch, torch.zeros(2))
    del model.fc
    with pytest.raises(ValueError, match="the model has 4 parameters, the EMA 6"):
        ema.update(model)
    model.fc = nn.Linear(8, 5)
    renamed = Net()
    renamed.norm = renamed.bn
    del renamed.bn
    with pytest.raises(ValueError, match="'fc.weight' is paired with the EMA's 'bn.weight'"):
        ema.update(renamed)
    wider = Net()
    wider.fc = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(6, 8\) in the model and \(5, 8\) in the EMA"):
        ema.update(wider)


def test_copies_update_their_own_module():
    model = Net()
    ema = FusedEMA(model, decay=0.5)
    ema.update(model)
    twin = copy.deepcopy(ema)
    with torch.no_grad():
        model.fc.weight.fill_(2.0)
    twin.set(model)
    assert torch.equal(twin.module.fc.weight, model.fc.weight)
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)  # the original is untouched
    buffer = io.BytesIO()
    torch.save(ema, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.set(model)
    assert torch.equal(loaded.module.fc.weight, model.fc.weight)


@requires_cuda
def test_update_replays_in_a_cuda_graph():
    """A steady-state update allocates nothing and copies nothing to the device: it can be captured."""
    torch.manual_seed(0)
    model = Net().cuda()
    ema = FusedEMA(model, decay=0.9, backend="cuda")
    decay = torch.tensor(0.9, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ema.apply_update_(model, decay)  # builds the plan and its device table
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.apply_update_(model, decay)
    ref = {k: v.double() for k, v in ema.module.state_dict().items()}
    for d in (0.9, 0.5, 0.0):
        decay.fill_(d)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        graph.replay()
        for name, value in model.state_dict().items():
            if ref[name].is_floating_point():
                ref[name] = value.double() if d == 0 else ref[name] + (1 - d) * (value.double() - ref[name])
            else:
                ref[name] = value.clone()
    torch.cuda.synchronize()
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value.double(), ref[name].to(value.device).double(), atol=1e-5, rtol=1e-5,
                                   msg=name)
