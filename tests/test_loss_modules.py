"""KLDivLoss, AdversarialLoss and BNStatHook."""

import pytest
import torch
from torch import nn

from madfast.nn import AdversarialLoss, BNStatHook, KLDivLoss
from madfast.ops import adversarial_loss, bn_stat_loss, kl_div
from mad_helpers import MadfastOps


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def trained_teacher():
    torch.manual_seed(0)
    teacher = Teacher()
    teacher.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            teacher(torch.randn(16, 3, 8, 8) * 2 + 1)
    return teacher.eval().requires_grad_(False)


def test_modules_match_functions():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    assert torch.equal(KLDivLoss(temperature=4.0)(s, t), kl_div(s, t, 4.0))
    assert torch.equal(KLDivLoss(reduction="none")(s, t), kl_div(s, t, reduction="none"))
    assert torch.equal(AdversarialLoss(bound=0.5, kind="l1")(s, t), adversarial_loss(s, t, 0.5, "l1"))


def test_bn_stat_hook_sums_layers_of_the_latest_forward():
    teacher = trained_teacher()
    hook = BNStatHook(teacher)
    assert hook.loss is None
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    teacher(torch.randn(4, 3, 8, 8))  # an earlier forward: must not be counted
    teacher(x)
    loss = hook.loss
    hook.remove()
    teacher(torch.randn(4, 3, 8, 8))
    assert hook.loss is not None and torch.equal(hook.loss, loss)  # no more recording after remove()
    bn1, bn2 = teacher.features[1], teacher.features[4]
    act1 = teacher.features[0](x)
    act2 = teacher.features[3](teacher.features[2](bn1(act1)))
    expected = bn_stat_loss(act1, bn1.running_mean, bn1.running_var, backend="torch") + \
        bn_stat_loss(act2, bn2.running_mean, bn2.running_var, backend="torch")
    torch.testing.assert_close(loss, expected)
    loss.backward()  # reaches the generator's output through the teacher
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bn_stat_hook_paused_records_nothing():
    teacher = trained_teacher()
    hook = BNStatHook(teacher)
    with hook.paused():
        teacher(torch.randn(2, 3, 8, 8))
    assert hook.loss is None and hook.enabled
    teacher(torch.randn(2, 3, 8, 8))
    assert hook.loss is not None


def test_bn_stat_hook_needs_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BNStatHook(nn.Linear(3, 3))


def test_bn_stat_hook_under_compiled_teacher():
    torch._dynamo.reset()
    teacher = trained_teacher()
    hook = BNStatHook(teacher)
    x = torch.randn(4, 3, 8, 8)
    teacher(x)
    eager = hook.loss
    compiled = torch.compile(teacher, backend="aot_eager")
    compiled(x)
    torch.testing.assert_close(hook.loss, eager)


def test_bn_stat_hook_one_op_for_every_layer():
    """On the C++ backend the hook adds one forward op and one backward op for all BN layers,
    computed when hook.loss is read."""
    from madfast import _backend

    assert _backend.has_kernel("bn_stat_losses", "CPU")  # the extension is always built with it (test_build.py)

    teacher = trained_teacher()
    hook = BNStatHook(teacher, backend="cpp")
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    with MadfastOps() as mode:
        teacher(x)
        assert mode.ops == []  # deferred
        loss = hook.loss
        assert hook.loss is loss  # computed once
        loss.backward()
    assert mode.ops == ["bn_stat_losses", "bn_stat_losses_backward"]
    expected = hook_reference(teacher, x.detach())
    torch.testing.assert_close(loss, expected)


def hook_reference(teacher, x):
    bn1, bn2 = teacher.features[1], teacher.features[4]
    act1 = teacher.features[0](x)
    act2 = teacher.features[3](teacher.features[2](bn1(act1)))
    return bn_stat_loss(act1, bn1.running_mean, bn1.running_var, backend="torch") + \
        bn_stat_loss(act2, bn2.running_mean, bn2.running_var, backend="torch")


def test_bn_stat_hook_loss_follows_each_forward():
    """hook.loss read after one forward, then another forward: the second read is the second
    forward's loss (the deferred value is not kept across forwards)."""
    teacher = trained_teacher()
    hook = BNStatHook(teacher)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 3
    teacher(x1)
    first = hook.loss
    teacher(x2)
    torch.testing.assert_close(hook.loss, hook_reference(teacher, x2))
    assert not torch.equal(hook.loss, first)
