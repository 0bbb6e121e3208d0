"""FusedEMA against ModelEmaV3's semantics, written out here, and AveragedModel interop."""

import copy

import pytest
import torch
from torch import nn

from conftest import DEVICES
from madfast import FusedEMA, ema_multi_avg_fn


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
