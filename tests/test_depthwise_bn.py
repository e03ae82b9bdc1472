"""The eval-mode depthwise conv + BatchNorm + act op (ghostops::dw_bn_eval, C++ CPU kernel) and
its functional entry point ``ghostops.ops.depthwise_bn``: against the float64 reference, its
dispatch, and its use inside ghostops' GhostNet."""

from __future__ import annotations

import copy

import pytest
import torch
from ghost_cases import ghostnet_pair, ops_run, rel_err
from torch.profiler import profile

import ghostops
from ghostops import _ext
from ghostops.models import ghostnet
from ghostops.ops import depthwise_bn
from ghostops.reference import depthwise_bn_reference

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]

# (batch, channels, height, width, kernel, stride)
CASES = [
    (2, 48, 28, 28, 3, 2),  # GhostNet's stride-2 conv, smaller map
    (1, 72, 15, 17, 5, 2),  # odd sizes, 5x5
    (3, 5, 9, 13, 3, 1),  # the shortcut's stride-1 case
    (2, 7, 10, 11, 5, 1),
    (1, 4, 9, 9, 3, 3),  # stride 3: the element-by-element gather
    (2, 3, 1, 1, 3, 2),  # 1x1 maps
    (1, 6, 17, 5, 7, 2),  # kernel larger than the map's width
    (2, 3, 6, 40, 1, 2),  # 1x1 kernel, rows wider than two vectors
    (0, 4, 8, 8, 3, 2),  # empty batch
]


def make_args(n, c, h, w, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=dtype)
    gamma, beta, mean = (torch.randn(c, generator=g, dtype=dtype) for _ in range(3))
    var = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, (weight, gamma, beta, mean, var)


def op(x, params, stride, relu, eps=1e-5):
    act = "relu" if relu else "identity"
    return torch.ops.ghostops.dw_bn_eval(x, *params, eps, stride, act)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "id"])
def test_matches_reference(case, dtype, relu):
    n, c, h, w, k, stride = case
    x, params = make_args(n, c, h, w, k, dtype, seed=sum(case))
    out = op(x, params, stride, relu)
    ref = depthwise_bn_reference(
        x.double(), *(t.double() for t in params), stride=stride, relu=relu
    )
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    if ref.numel():
        assert not out.isnan().any(), "the kernel left elements unwritten"
        assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_eps_is_honoured():
    x, params = make_args(2, 4, 6, 6, 3)
    out = op(x, params, 1, False, eps=0.3)
    assert rel_err(out, depthwise_bn_reference(x, *params, stride=1, eps=0.3)) < 1e-12
    assert rel_err(out, depthwise_bn_reference(x, *params, stride=1, eps=1e-5)) > 1e-3


def test_opcheck():
    x, params = make_args(2, 6, 9, 7, 3, torch.float32)
    torch.library.opcheck(torch.ops.ghostops.dw_bn_eval, (x, *params, 1e-5, 2, "relu"))


def test_bad_arguments_are_clear_errors():
    x, (weight, *bn) = make_args(1, 4, 6, 6, 3, torch.float32)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.ghostops.dw_bn_eval(x, weight[:, :, :2], *bn, 1e-5, 1, "relu")
    with pytest.raises(RuntimeError, match="bn_var must have shape"):
        torch.ops.ghostops.dw_bn_eval(x, weight, *bn[:3], bn[3][:2], 1e-5, 1, "relu")
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        torch.ops.ghostops.dw_bn_eval(x, weight, *bn, 1e-5, 0, "relu")
    with pytest.raises(RuntimeError, match="act must be"):
        torch.ops.ghostops.dw_bn_eval(x, weight, *bn, 1e-5, 1, "gelu")


def test_functional_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    x, params = make_args(2, 6, 9, 9, 3, torch.float32)
    want = depthwise_bn_reference(x, *params, stride=2, relu=True)
    # channels_last input, gradients wanted, float16: the reference runs, same answer.
    cl = depthwise_bn(x.to(memory_format=torch.channels_last), *params, stride=2, relu=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, want)
    leaf = x.clone().requires_grad_()
    with_grad = depthwise_bn(leaf, *params, stride=2, relu=True)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, want)
    half = depthwise_bn(x.half(), *(t.half() for t in params), stride=2, relu=True)
    torch.testing.assert_close(half.float(), want, rtol=1e-2, atol=1e-2)


def test_functional_runs_the_kernel_on_rows_of_8_outputs_or_more_or_on_small_calls():
    # 7 and 8 outputs a row at stride 2; 2 * 700 * 7 * 7 outputs are more than 64Ki.
    for channels, size, fused in ((700, 14, False), (700, 15, True), (6, 14, True)):
        x, params = make_args(2, channels, size, size, 3, torch.float32)
        with torch.no_grad(), profile() as prof:
            out = depthwise_bn(x, *params, stride=2)
        ran = "ghostops::dw_bn_eval" in {e.key for e in prof.key_averages()}
        assert ran == fused
        torch.testing.assert_close(out, depthwise_bn_reference(x, *params, stride=2))


def test_ghostnet_eval_uses_the_fused_depthwise_op_and_matches_the_reference_network():
    net, ref = ghostnet_pair()
    x = torch.randn(2, 3, 64, 64)
    assert "ghostops::dw_bn_eval" in ops_run(net, x)
    assert "ghostops::dw_bn_eval" not in ops_run(ref, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)
    ghostops.revert(net)  # reverted: the stock modules again, for export
    assert "ghostops::dw_bn_eval" not in ops_run(net, x)


def test_empty_map_is_a_clear_error():
    x, params = make_args(1, 8, 4, 64, 3, torch.float32)
    with pytest.raises(RuntimeError, match="non-empty map"):
        op(x[:, :, :0], params, 2, True)


def test_bottleneck_after_module_surgery_or_with_hooks_runs_its_modules():
    """The fused path only takes a plain Conv2d + BatchNorm2d without hooks: after
    torch.ao.quantization.fuse_modules (BN folded into the conv, an Identity in its place), with
    a hook on the conv, or with another shortcut module, the bottleneck runs its modules."""
    from ghostops.nn import GhostBottleneck

    torch.manual_seed(0)
    block = GhostBottleneck(16, 48, 24, 3, stride=2).eval()
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        want = block(x)
        fused = torch.ao.quantization.fuse_modules(
            block, [["conv_dw", "bn_dw"], ["shortcut.0", "shortcut.1"]]
        )
        assert isinstance(fused.bn_dw, torch.nn.Identity)
        torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-5)
        seen = []
        block.conv_dw.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        torch.testing.assert_close(block(x), want)
        assert seen == [(2, 48, 16, 16)]
        block.shortcut = torch.nn.Conv2d(16, 24, 1, stride=2)  # not a Sequential
        assert block(x).shape == want.shape


def test_output_pool_limit_from_the_environment_is_checked():
    import subprocess
    import sys

    code = (
        "import torch, ghostops\n"
        "m = ghostops.GhostModule(16, 48).eval()\n"
        "with torch.no_grad(): y = m(torch.randn(4, 16, 112, 112))\n"  # a pooled output
        "print(tuple(y.shape))\n"
    )
    env = {**__import__("os").environ, "GHOSTOPS_OUTPUT_POOL_MIB": "lots"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "(4, 48, 112, 112)" in run.stdout
    assert "GHOSTOPS_OUTPUT_POOL_MIB must be a whole number" in run.stderr


# --- training: ghostops::dw_bn_train / dw_bn_backward ------------------------------------------

TRAIN_CASES = [(2, 3, 7, 9, 3, 2, True), (2, 2, 6, 5, 5, 1, False), (3, 2, 5, 5, 3, 3, True),
               (2, 4, 1, 1, 3, 2, True)]  # fmt: skip


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_training_gradcheck_float64(case):
    n, c, h, w, k, stride, relu = case
    x, (weight, gamma, beta, _, _) = make_args(n, c, h, w, k, seed=sum(case[:6]))
    leaves = [t.clone().requires_grad_() for t in (x, weight, gamma, beta)]

    def f(x, weight, gamma, beta):
        return depthwise_bn(x, weight, gamma, beta, None, None, stride=stride, relu=relu,
                            training=True)  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_the_stock_modules(momentum):
    """A bottleneck's conv_dw + bn_dw in training, fused (through GhostBottleneck's path) against
    the stock modules: output, gradients, running statistics, num_batches_tracked."""
    from ghostops.nn import _conv_bn

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=False)
    bn = torch.nn.BatchNorm2d(6, momentum=momentum)
    bn.running_mean.normal_()
    bn.weight.data.uniform_(0.5, 1.5)
    conv_ref, bn_ref = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(4, 6, 17, 15)
    grad = torch.randn(4, 6, 9, 8)
    for _ in range(2):  # two steps: the cumulative average (momentum None) counts batches
        xs = [x.clone().requires_grad_() for _ in range(2)]
        y = _conv_bn(conv, bn, xs[0], fused=True)
        y_ref = bn_ref(conv_ref(xs[1]))
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(y, [xs[0], conv.weight, bn.weight, bn.bias], grad)
        want = torch.autograd.grad(y_ref, [xs[1], conv_ref.weight, bn_ref.weight, bn_ref.bias],
                                   grad)  # fmt: skip
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 2


# (batch, channels, height, width, kernel, stride): the backward's phase planes
BACKWARD_CASES = [
    (3, 5, 14, 14, 5, 2),  # GhostNet's 672-channel conv at 14x14: 7x7 outputs
    (2, 4, 14, 14, 3, 1),  # the shortcut's stride-1 conv at 14x14
    (2, 3, 15, 13, 5, 2),  # odd sizes
    (2, 2, 9, 37, 3, 2),  # rows wider than two vectors
    (2, 3, 8, 8, 7, 1),
    (2, 2, 11, 10, 9, 2),  # 81 taps: the weight gradient 49 taps at a time
    (3, 2, 10, 11, 3, 3),  # stride 3: nine phase planes
    (2, 2, 3, 2, 5, 2),  # kernel wider than the map
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "id"])
def test_training_backward_matches_autograd_of_the_reference(case, relu):
    """dw_bn_backward against autograd through F.conv2d + F.batch_norm (+ relu), float64, on
    fresh data, with and without the input gradient."""
    n, c, h, w, k, stride = case
    x, (weight, gamma, beta, _, _) = make_args(n, c, h, w, k, seed=sum(case))
    act = "relu" if relu else "identity"
    y, z, mean, var = torch.ops.ghostops.dw_bn_train(x, weight, gamma, beta, 1e-5, stride, act)
    grad_y = torch.randn_like(y)
    leaves = [t.clone().requires_grad_() for t in (x, weight, gamma, beta)]
    z_ref = torch.nn.functional.conv2d(leaves[0], leaves[1], None, stride, k // 2, 1, c)
    y_ref = torch.nn.functional.batch_norm(z_ref, None, None, leaves[2], leaves[3], True, 0.1)
    if relu:
        y_ref = torch.relu(y_ref)
    want = torch.autograd.grad(y_ref, leaves, grad_y)
    for need_x in (True, False):
        got = torch.ops.ghostops.dw_bn_backward(
            grad_y, x, z, weight, gamma, beta, mean, var, 1e-5, stride, act, need_x
        )
        assert got[0].numel() == (x.numel() if need_x else 0)
        for a, b in zip(got if need_x else got[1:], want if need_x else want[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_training_opcheck_and_errors():
    x, (weight, gamma, beta, _, _) = make_args(2, 3, 7, 9, 3, torch.float32)
    args = (x, weight, gamma, beta, 1e-5, 2, "relu")
    torch.library.opcheck(torch.ops.ghostops.dw_bn_train, args)
    leaves = [t.clone().requires_grad_() for t in (x, weight, gamma, beta)]
    torch.library.opcheck(torch.ops.ghostops.dw_bn_train, (*leaves, 1e-5, 2, "relu"))
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        torch.ops.ghostops.dw_bn_train(x[:1, :, :1, :1], weight, gamma, beta, 1e-5, 2, "relu")


def test_ghostnet_training_uses_the_fused_depthwise_training_op():
    torch.manual_seed(0)
    net = ghostnet(num_classes=10).train()
    with profile() as prof:
        net(torch.randn(2, 3, 64, 64)).sum().backward()
    keys = {e.key for e in prof.key_averages()}
    assert {"ghostops::dw_bn_train", "ghostops::dw_bn_backward"} <= keys
