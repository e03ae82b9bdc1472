"""GhostNet (ghostops.models) against the paper's numbers, the unfused reference network, the
module shape list in shared/ghostnet_module_shapes.json, and timm's ghostnet_050/100/130."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import ghostops
from ghostops.models import GhostBottleneck, GhostNet, ghostnet
from ghostops.nn import SqueezeExcite
from ghostops.reference import ReferenceGhostModule

# Paper / timm parameter counts (2.6M / 5.2M / 7.3M in the paper).
PARAM_COUNTS = {0.5: 2_587_292, 1.0: 5_182_508, 1.3: 7_358_820}
TIMM_NAMES = {0.5: "ghostnet_050", 1.0: "ghostnet_100", 1.3: "ghostnet_130"}


def _shapes_file() -> Path | None:
    """shared/ghostnet_module_shapes.json: $GHOSTOPS_SHARED, else ../shared beside the repo."""
    roots = [os.environ.get("GHOSTOPS_SHARED"), Path(__file__).resolve().parents[2] / "shared"]
    for root in roots:
        if root and (Path(root) / "ghostnet_module_shapes.json").is_file():
            return Path(root) / "ghostnet_module_shapes.json"
    return None


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (all other parameters
    keep PyTorch's default init), so that a wrongly wired BN cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=g)))
    return model


def _pair(width: float = 1.0, seed: int = 0) -> tuple[GhostNet, GhostNet]:
    """(reference network with random weights, ours loaded from its state dict)."""
    torch.manual_seed(seed)
    ref = _randomise(ghostnet(width, ghost_module_cls=ReferenceGhostModule), seed)
    ours = ghostnet(width)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _input(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("width", sorted(PARAM_COUNTS))
def test_parameter_and_module_counts(width):
    model = ghostnet(width)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[width]
    assert sum(isinstance(m, ghostops.GhostModule) for m in model.modules()) == 32
    assert sum(isinstance(m, GhostBottleneck) for m in model.modules()) == 16
    assert sum(isinstance(m, SqueezeExcite) for m in model.modules()) == 7
    ref = ghostnet(width, ghost_module_cls=ReferenceGhostModule)
    assert not any(isinstance(m, ghostops.GhostModule) for m in ref.modules())
    assert sum(isinstance(m, ReferenceGhostModule) for m in ref.modules()) == 32


def test_architecture_details():
    model = ghostnet(1.0, num_classes=10)
    assert model.conv_stem.out_channels == 16 and model.conv_stem.stride == (2, 2)
    assert len(model.blocks) == 10  # 9 bottleneck stages + the ConvBnAct stage
    last = model.blocks[-1][0]
    assert (last.conv.in_channels, last.conv.out_channels) == (160, 960)
    assert model.conv_head.bias is not None and model.conv_head.out_channels == 1280
    assert model.classifier.out_features == 10
    # conv_dw / bn_dw exist exactly in the four stride-2 bottlenecks.
    bottlenecks = [m for m in model.modules() if isinstance(m, GhostBottleneck)]
    assert [b.conv_dw is not None for b in bottlenecks].count(True) == 4
    for b in bottlenecks:
        assert (b.conv_dw is not None) == (b.stride > 1) == (b.bn_dw is not None)
    # SE reduction rounds to a multiple of 4: 72 * 0.25 = 18 -> 20.
    assert model.blocks[3][0].se.conv_reduce.out_channels == 20
    assert GhostNet().cfgs == ghostnet().cfgs  # cfgs=None means the paper's


def test_bottleneck_shapes_and_shortcut():
    x = torch.randn(2, 8, 10, 10)
    with ghostops.use_backend("reference"):
        b = GhostBottleneck(8, 16, 8).eval()
        assert len(b.shortcut) == 0 and b.se is None
        assert b(x).shape == (2, 8, 10, 10)
        b = GhostBottleneck(8, 24, 12, dw_kernel_size=5, stride=2, se_ratio=0.25).eval()
        assert len(b.shortcut) == 4 and b.conv_dw.kernel_size == (5, 5)
        assert b(x).shape == (2, 12, 5, 5)


@pytest.mark.parametrize("width", ["0.5", "1.0", "1.3"])
def test_module_shapes_match_shared_list(width):
    path = _shapes_file()
    if path is None:
        pytest.skip("shared/ghostnet_module_shapes.json not found (set GHOSTOPS_SHARED)")
    expected = [tuple(row) for row in json.loads(path.read_text())["widths"][width]]
    model = ghostnet(float(width)).eval()
    modules = [m for m in model.modules() if isinstance(m, ghostops.GhostModule)]
    assert [(m.inp, m.oup, m.relu) for m in modules] == [(i, o, r) for i, o, _, _, r in expected]
    for m in modules:
        assert (m.kernel_size, m.ratio, m.dw_size, m.stride) == (1, 2, 3, 1)

    seen = []

    def hook(module, args, out):
        x = args[0]
        assert out.shape[1] == module.oup and out.shape[2:] == x.shape[2:]
        seen.append((x.shape[1], out.shape[1], x.shape[2], x.shape[3], module.relu))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with ghostops.use_backend("reference"), torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
    finally:
        for h in handles:
            h.remove()
    assert seen == expected


@pytest.mark.parametrize("width", [0.5, 1.0])
def test_state_dict_keys_match_reference(width):
    ours = ghostnet(width).state_dict()
    ref = ghostnet(width, ghost_module_cls=ReferenceGhostModule).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)


def test_eval_matches_reference_network():
    ref, ours = _pair()
    ref.eval()
    ours.eval()
    x = _input()
    with torch.no_grad():
        expected = ref(x)
        with ghostops.use_backend("reference"):
            torch.testing.assert_close(ours(x), expected)
        # Default backend: the fused kernel once built, else the reference (with a warning).
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
        # The comparison can fail: an unloaded network gives other outputs.
        other = ghostnet(1.0).eval()
        with ghostops.use_backend("reference"):
            assert not torch.allclose(other(x), expected, rtol=1e-3, atol=1e-3)
    assert expected.shape == (2, 1000) and expected.std() > 1e-3


@pytest.mark.parametrize("backend", ["reference", None])
def test_train_mode_matches_reference_network(backend):
    ref, ours = _pair(width=0.5, seed=2)
    ref.train()
    ours.train()
    x = _input(seed=3)
    tol = {} if backend == "reference" else {"rtol": 1e-4, "atol": 1e-4}
    for step in range(2):
        torch.manual_seed(10 + step)  # same dropout mask for both
        expected = ref(x)
        torch.manual_seed(10 + step)
        if backend is None:
            out = ours(x)
        else:
            with ghostops.use_backend(backend):
                out = ours(x)
        torch.testing.assert_close(out, expected, **tol)
    # Both networks updated their BatchNorm buffers (running stats, num_batches_tracked) alike.
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, **tol, msg=key)


def test_train_mode_gradients_match_reference_network():
    ref, ours = _pair(width=0.5, seed=4)
    ref.train()
    ours.train()
    x = _input(seed=5)
    with ghostops.use_backend("reference"):
        for model in (ref, ours):
            torch.manual_seed(0)
            model(x).logsumexp(1).sum().backward()
    our_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(our_params[name].grad, p.grad, msg=name)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_autocast_matches_reference_network(train):
    """Under torch.autocast (bfloat16 on the CPU) the network runs as the reference network does
    there: the Ghost modules cast x and their conv weights to bfloat16 (the CPU kernels then
    hand bfloat16 to the reference), the fused float32-only ops outside them step aside. Before,
    a GhostModule fed a bfloat16 activation raised a dtype mismatch against its float32 weights."""
    ref, ours = _pair(width=0.5, seed=6)
    ref.train(train)
    ours.train(train)
    x = _input(seed=7)
    outs = []
    for model in (ref, ours):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            outs.append(model(x))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1], outs[0])
    if train:
        for out in outs:
            out.float().logsumexp(1).sum().backward()
        our_params = dict(ours.named_parameters())
        for name, p in ref.named_parameters():
            assert our_params[name].grad.dtype == torch.float32
            torch.testing.assert_close(our_params[name].grad, p.grad, msg=name)
        ref_state, our_state = ref.state_dict(), ours.state_dict()
        for key, value in ref_state.items():
            torch.testing.assert_close(our_state[key], value, msg=key)


def test_dropout_only_in_training():
    _, model = _pair(width=0.5)
    x = _input(n=1)
    with ghostops.use_backend("reference"), torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x))
        model.dropout = 0.0
        no_drop = model(x)
        model.dropout = 0.5
        torch.testing.assert_close(model(x), no_drop)


@pytest.mark.parametrize("width", sorted(TIMM_NAMES))
def test_timm_state_dict_keys(width):
    timm = pytest.importorskip("timm")
    theirs = timm.create_model(TIMM_NAMES[width], pretrained=False).state_dict()
    ours = ghostnet(width).state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_timm_ghostnet_100_outputs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = _randomise(timm.create_model("ghostnet_100", pretrained=False), seed=6).eval()
    ours = ghostnet(1.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    x = _input(seed=7)
    with torch.no_grad():
        expected = theirs(x)
        with ghostops.use_backend("reference"):
            torch.testing.assert_close(ours(x), expected)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
