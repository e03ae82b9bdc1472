"""ghostops.convert / revert: swapping the Ghost modules of existing models, weights kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ghostops
from ghostops import _ext
from ghostops.models import ghostnet
from ghostops.reference import ReferenceGhostModule

pytestmark = pytest.mark.skipif(
    not _ext.cpu_available(), reason="the compiled extension is not built"
)


def randomize(model: nn.Module) -> nn.Module:
    """Random BatchNorm affine and running statistics, as in a trained network."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


def sgd_steps(model: nn.Module, steps: int = 2) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 48, 48, generator=gen, dtype=torch.float64)
        target = torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def paper_ghostnet() -> nn.Module:
    torch.manual_seed(0)
    model = ghostnet(width=0.5, num_classes=10, dropout=0.0, ghost_module_cls=ReferenceGhostModule)
    return randomize(model).double()


def test_convert_paper_model_same_outputs_and_training():
    ref = paper_ghostnet().eval()
    model, report = ghostops.convert(copy.deepcopy(ref), report=True)
    assert count(model, ghostops.GhostModule) == 32 and count(model, ReferenceGhostModule) == 0
    assert len(report.converted) == 32 and report.skipped == {}
    assert "blocks.0.0.ghost1" in report.converted
    assert not model.training and all(not m.training for m in model.modules())
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-10)
    # Training: the same losses, parameters and running statistics.
    ref.train()
    model.train()
    assert sgd_steps(model) == pytest.approx(sgd_steps(ref), rel=1e-9)
    for (key, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=key)


def test_convert_keeps_the_parameter_objects_an_optimizer_holds():
    model = paper_ghostnet()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    ghostops.convert(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert opt.param_groups[0]["params"][0] is params[0]
    assert next(model.parameters()).dtype == torch.float64


def test_convert_root_module_and_revert_round_trip():
    ref = randomize(ReferenceGhostModule(6, 11, ratio=3, dw_size=5, relu=False)).eval()
    ours = ghostops.convert(copy.deepcopy(ref))
    assert type(ours) is ghostops.GhostModule and not ours.training
    assert (ours.inp, ours.oup, ours.ratio, ours.dw_size, ours.relu) == (6, 11, 3, 5, False)
    x = torch.randn(2, 6, 9, 7)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    back = ghostops.revert(ours)
    assert type(back) is ReferenceGhostModule
    for (key, a), b in zip(back.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)
    torch.testing.assert_close(back(x), ref(x))

    model = ghostops.revert(ghostops.convert(paper_ghostnet()))
    assert count(model, ReferenceGhostModule) == 32 and count(model, ghostops.GhostModule) == 0


class SiLUGhost(nn.Module):
    """A YOLO-style Ghost module: SiLU activations, which GhostModule does not run yet."""

    def __init__(self):
        super().__init__()
        self.oup = 8
        self.primary_conv = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4),
                                          nn.SiLU())  # fmt: skip
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(4), nn.SiLU()
        )


def test_modules_it_cannot_represent_are_left_alone_and_reported():
    eps = ReferenceGhostModule(4, 8)
    eps.cheap_operation[1].eps = 1e-3
    extra = ReferenceGhostModule(4, 8)
    extra.gate = nn.Sigmoid()  # like GhostModuleV2: more than the two branches
    model = nn.Sequential(ReferenceGhostModule(4, 8), eps, SiLUGhost(), extra, nn.ReLU())
    model, report = ghostops.convert(model, report=True)
    assert report.converted == ["0", "1"]  # BNs with their own eps: GhostModule follows them
    assert set(report.skipped) == {"2", "3"}
    assert "SiLU" in report.skipped["2"] and "gate" in report.skipped["3"]
    assert [type(m) for m in model] == [ghostops.GhostModule, ghostops.GhostModule, SiLUGhost,
                                        ReferenceGhostModule, nn.ReLU]  # fmt: skip


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        ghostops.convert("model")
    with pytest.raises(TypeError, match="nn.Module"):
        ghostops.revert(None)


def test_convert_timm_ghostnet():
    timm = pytest.importorskip("timm")
    ref = randomize(timm.create_model("ghostnet_050", pretrained=False, num_classes=10)).eval()
    model, report = ghostops.convert(copy.deepcopy(ref), report=True)
    assert len(report.converted) == 32 and report.skipped == {}
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_frozen_batchnorms_and_own_bn_settings_convert_exactly():
    """Frozen BatchNorms (running statistics in a training model) and BNs with their own eps /
    momentum=None counts convert: GhostModule follows each BN's own settings."""
    x = torch.randn(4, 6, 8, 8)
    frozen = randomize(ReferenceGhostModule(6, 6)).train()
    frozen.primary_conv[1].eval()
    frozen.cheap_operation[1].eval()
    half_frozen = randomize(ReferenceGhostModule(6, 6)).train()
    half_frozen.cheap_operation[1].eval()
    cumulative = randomize(ReferenceGhostModule(6, 6)).train()
    for bn in (cumulative.primary_conv[1], cumulative.cheap_operation[1]):
        bn.momentum = None  # the cumulative average, each BN with its own count
    cumulative.primary_conv[1].num_batches_tracked.fill_(3)
    cumulative.cheap_operation[1].eps = 1e-3
    model = nn.Sequential(frozen, half_frozen, cumulative)
    expected_model = copy.deepcopy(model)
    model, report = ghostops.convert(model, report=True)
    assert report.converted == ["0", "1", "2"] and report.skipped == {}
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = model(xf), expected_model(xr)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(model.state_dict().values(), expected_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hooked_modules_are_left_alone():
    x = torch.randn(4, 6, 8, 8)
    hooked = randomize(ReferenceGhostModule(6, 6)).eval()
    hooked.primary_conv[1].register_forward_hook(lambda m, i, out: out * 2)
    model = nn.Sequential(hooked)
    expected = copy.deepcopy(model)(x)
    model, report = ghostops.convert(model, report=True)
    assert report.converted == [] and "hooks" in report.skipped["0"]
    torch.testing.assert_close(model(x), expected)


def test_a_module_registered_twice_is_replaced_by_one_module():
    ghost = ReferenceGhostModule(6, 12)
    model = nn.Sequential(ghost, nn.ReLU())
    model.add_module("again", ghost)
    model, report = ghostops.convert(model, report=True)
    assert report.converted == ["0"]
    assert type(model.again) is ghostops.GhostModule and model.again is model[0]
