"""The eval-mode 1x1 conv + BatchNorm + act (+ residual) op (ghostops::pw_bn_eval, C++ CPU
kernel) and its functional entry point ``ghostops.ops.pointwise_bn``: against the float64
reference, its dispatch, and its use inside ghostops' GhostNet (the shortcut's 1x1 conv + BN
with the bottleneck's add, the 1x1 ConvBnAct before the head)."""

from __future__ import annotations

import copy

import pytest
import torch
from ghost_cases import ghostnet_pair, ops_run, rel_err
from torch.profiler import profile

import ghostops
from ghostops import _ext
from ghostops.nn import GhostBottleneck
from ghostops.ops import pointwise_bn
from ghostops.reference import pointwise_bn_reference

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]

# (batch, in channels, out channels, height, width)
CASES = [
    (2, 40, 80, 14, 14),  # a GhostNet shortcut, channels split across threads
    (1, 160, 960, 7, 7),  # the ConvBnAct before the head, batch 1
    (3, 5, 13, 9, 11),  # odd sizes, output rows not a multiple of the register block
    (2, 16, 24, 40, 41),  # a map of several pixel chunks
    (1, 3, 1, 1, 1),  # 1x1 map, one output channel
    (0, 4, 6, 5, 5),  # empty batch
]


def make_args(n, k, m, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, h, w, generator=g, dtype=dtype)
    weight = torch.randn(m, k, 1, 1, generator=g, dtype=dtype) / k**0.5
    gamma, beta, mean = (torch.randn(m, generator=g, dtype=dtype) for _ in range(3))
    var = torch.rand(m, generator=g, dtype=dtype) + 0.5
    residual = torch.randn(n, m, h, w, generator=g, dtype=dtype)
    return x, (weight, gamma, beta, mean, var), residual


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "id"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
def test_matches_reference(case, dtype, relu, with_residual):
    x, params, residual = make_args(*case, dtype=dtype)
    residual = residual if with_residual else None
    act = "relu" if relu else "identity"
    out = torch.ops.ghostops.pw_bn_eval(x, *params, 1e-3, act, residual)
    want = pointwise_bn_reference(
        x.double(),
        *(t.double() for t in params),
        relu=relu,
        eps=1e-3,
        residual=None if residual is None else residual.double(),
    )
    assert out.dtype == dtype and out.shape == want.shape and out.is_contiguous()
    if x.numel():
        assert rel_err(out, want) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_eps_and_non_contiguous_arguments():
    x, params, residual = make_args(2, 12, 10, 9, 11)
    strided = x.transpose(2, 3)
    res = residual.transpose(2, 3)
    # A weight whose rows are not contiguous: packed (with the scale) instead of read in place.
    weight = params[0].permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    assert weight.stride(1) != 1
    params = (weight, *params[1:])
    out = torch.ops.ghostops.pw_bn_eval(strided, *params, 0.3, "relu", res)
    want = pointwise_bn_reference(strided, *params, relu=True, eps=0.3, residual=res)
    assert rel_err(out, want) < 1e-12
    assert rel_err(out, pointwise_bn_reference(strided, *params, relu=True, residual=res)) > 1e-3


def test_opcheck():
    x, params, residual = make_args(2, 12, 10, 5, 7, torch.float32)
    torch.library.opcheck(torch.ops.ghostops.pw_bn_eval, (x, *params, 1e-5, "relu", residual))
    torch.library.opcheck(torch.ops.ghostops.pw_bn_eval, (x, *params, 1e-5, "identity", None))


def test_bad_arguments_are_clear_errors():
    x, (w, *bn), residual = make_args(2, 12, 10, 5, 7, torch.float32)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.ghostops.pw_bn_eval(x, w[:, :5], *bn, 1e-5, "relu", None)
    with pytest.raises(RuntimeError, match="bn_var"):
        torch.ops.ghostops.pw_bn_eval(x, w, *bn[:3], bn[3][:4], 1e-5, "relu", None)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        torch.ops.ghostops.pw_bn_eval(x, w, *bn, 1e-5, "relu", residual[:, :4])
    with pytest.raises(RuntimeError, match="act must be"):
        torch.ops.ghostops.pw_bn_eval(x, w, *bn, 1e-5, "gelu", None)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ghostops.pw_bn_eval(x.half(), w.half(), *(t.half() for t in bn), 1e-5, "relu")


def test_functional_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    x, params, residual = make_args(2, 12, 10, 5, 7, torch.float32)
    want = pointwise_bn_reference(x, *params, relu=True, residual=residual)
    assert "ghostops::pw_bn_eval" in ops_run(pointwise_bn, x, *params, relu=True)
    cl = x.to(memory_format=torch.channels_last)
    assert "ghostops::pw_bn_eval" not in ops_run(pointwise_bn, cl, *params, relu=True)
    torch.testing.assert_close(pointwise_bn(cl, *params, relu=True, residual=residual), want)
    leaf = x.clone().requires_grad_()
    with_grad = pointwise_bn(leaf, *params, relu=True, residual=residual)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, want)
    with ghostops.use_backend("reference"):
        assert "ghostops::pw_bn_eval" not in ops_run(pointwise_bn, x, *params)
    # A residual that broadcasts, and a kernel that is not 1x1: the reference computes them.
    small = residual[:1, :, :1]
    assert "ghostops::pw_bn_eval" not in ops_run(pointwise_bn, x, *params, residual=small)
    want = pointwise_bn_reference(x, *params, residual=small)
    torch.testing.assert_close(pointwise_bn(x, *params, residual=small), want)
    wide = (torch.randn(10, 12, 3, 3), *params[1:])
    assert "ghostops::pw_bn_eval" not in ops_run(pointwise_bn, x, *wide)


@pytest.mark.parametrize("m", [1, 6])
def test_expanded_weight_rows(m):
    """Rows of stride 0 (an expanded weight) cannot be read in place as rows lda apart: lda 0
    means a packed weight. The kernel packs them, BatchNorm scale included."""
    x, (_, *bn), residual = make_args(2, 12, m, 5, 7)
    weight = torch.randn(1, 12, 1, 1, dtype=x.dtype).expand(m, 12, 1, 1)
    out = torch.ops.ghostops.pw_bn_eval(x, weight, *bn, 1e-5, "relu", residual)
    want = pointwise_bn_reference(x, weight, *bn, relu=True, residual=residual)
    assert rel_err(out, want) < 1e-12


def randomize_batchnorm(net):
    for m in net.modules():  # BN statistics far from identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def test_ghostnet_eval_uses_the_fused_pointwise_op_and_matches_the_reference_network():
    net, ref = ghostnet_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), profile(record_shapes=True) as prof:
        out = net(x)
    shapes = [e.input_shapes[1] for e in prof.events() if e.name == "ghostops::pw_bn_eval"]
    # Five shortcuts with a 1x1 conv, and the ConvBnAct before the head.
    assert len(shapes) == 6 and [960, 160, 1, 1] in shapes
    assert "ghostops::pw_bn_eval" not in ops_run(ref, x)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
    ghostops.revert(net)  # the paper's modules again: stock ops only, e.g. for export
    assert not any(k.startswith("ghostops::") for k in ops_run(net, x))


def test_bottleneck_with_a_training_or_hooked_shortcut_runs_its_modules():
    torch.manual_seed(0)
    block = randomize_batchnorm(GhostBottleneck(16, 48, 24, 3, stride=1)).eval()
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        want = block(x)
    assert "ghostops::pw_bn_eval" in ops_run(block, x)
    training = copy.deepcopy(block)
    training.shortcut[3].train()  # batch statistics in that BN: the module runs
    assert "ghostops::pw_bn_eval" not in ops_run(training, x)
    seen = []
    block.shortcut[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert "ghostops::pw_bn_eval" not in ops_run(block, x)
    assert seen == [(2, 24, 10, 10)]
    with torch.no_grad():
        torch.testing.assert_close(block(x), want)


def test_bottleneck_adds_in_place_only_to_an_output_nothing_else_holds():
    """Without autograd the residual add goes into ghost2's output, unless a hook on ghost2 may
    have kept that tensor (or ghost2 is not ghostops' module, whose output is always fresh)."""
    torch.manual_seed(0)
    block = randomize_batchnorm(GhostBottleneck(16, 48, 16, 3, stride=1)).eval()
    x = torch.randn(2, 16, 6, 6)
    kept = []
    block.ghost2.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        y = block(x)
        torch.testing.assert_close(y, kept[0] + x)  # the hook's tensor is ghost2's output
    assert y is not kept[0]
