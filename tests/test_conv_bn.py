"""The eval-mode dense conv + BatchNorm + act op for thin inputs (ghostops::conv_bn_eval, C++
CPU kernel; GhostNet's stem) and its functional entry point ``ghostops.ops.conv_bn``: against
the float64 reference, its dispatch, and its use as ghostops' GhostNet's stem."""

from __future__ import annotations

import pytest
import torch
from ghost_cases import ghostnet_pair, ops_run, rel_err

import ghostops
from ghostops import _ext
from ghostops.ops import conv_bn
from ghostops.reference import conv_bn_reference

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]

# (batch, in channels, out channels, height, width, kernel, stride)
CASES = [
    (2, 3, 16, 33, 37, 3, 2),  # GhostNet's stem, odd map
    (3, 5, 21, 17, 19, 5, 1),  # output channels in blocks of 16, 4 and 1
    (2, 2, 7, 11, 13, 3, 3),  # stride 3: the element-by-element gather; blocks of 4, 2, 1
    (1, 8, 40, 9, 70, 7, 2),  # the widest input taken, rows of several vectors
    (1, 1, 3, 1, 1, 3, 2),  # 1x1 map
    (2, 3, 8, 5, 6, 1, 1),  # 1x1 kernel
    (0, 3, 16, 8, 8, 3, 2),  # empty batch
]


def make_args(n, c, o, h, w, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(o, c, k, k, generator=g, dtype=dtype)
    gamma, beta, mean = (torch.randn(o, generator=g, dtype=dtype) for _ in range(3))
    var = torch.rand(o, generator=g, dtype=dtype) + 0.5
    return x, (weight, gamma, beta, mean, var)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "id"])
def test_matches_reference(case, dtype, relu):
    x, params = make_args(*case[:-1], dtype=dtype)
    stride = case[-1]
    act = "relu" if relu else "identity"
    out = torch.ops.ghostops.conv_bn_eval(x, *params, 1e-3, stride, act)
    want = conv_bn_reference(
        x.double(), *(t.double() for t in params), stride=stride, relu=relu, eps=1e-3
    )
    assert out.dtype == dtype and out.shape == want.shape and out.is_contiguous()
    if x.numel():
        assert rel_err(out, want) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_eps_and_non_contiguous_arguments():
    x, params = make_args(2, 3, 16, 15, 14, 3)
    strided = x.transpose(2, 3)
    weight = params[0].permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    params = (weight, *params[1:])
    out = torch.ops.ghostops.conv_bn_eval(strided, *params, 0.3, 2, "relu")
    want = conv_bn_reference(strided, *params, stride=2, relu=True, eps=0.3)
    assert rel_err(out, want) < 1e-12
    assert rel_err(out, conv_bn_reference(strided, *params, stride=2, relu=True)) > 1e-3


def test_opcheck():
    x, params = make_args(2, 3, 16, 9, 10, 3, torch.float32)
    torch.library.opcheck(torch.ops.ghostops.conv_bn_eval, (x, *params, 1e-5, 2, "relu"))


def test_bad_arguments_are_clear_errors():
    x, (w, *bn) = make_args(2, 3, 16, 9, 10, 3, torch.float32)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.ghostops.conv_bn_eval(x, w[:, :, :2], *bn, 1e-5, 2, "relu")
    with pytest.raises(RuntimeError, match="1 to 8 channels"):
        wide = torch.randn(2, 9, 5, 5)
        torch.ops.ghostops.conv_bn_eval(wide, torch.randn(16, 9, 3, 3), *bn, 1e-5, 2, "relu")
    with pytest.raises(RuntimeError, match="bn_mean"):
        torch.ops.ghostops.conv_bn_eval(x, w, bn[0], bn[1], bn[2][:3], bn[3], 1e-5, 2, "relu")
    with pytest.raises(RuntimeError, match="stride"):
        torch.ops.ghostops.conv_bn_eval(x, w, *bn, 1e-5, 0, "relu")
    with pytest.raises(RuntimeError, match="non-empty map"):
        torch.ops.ghostops.conv_bn_eval(x[:, :, :0], w, *bn, 1e-5, 2, "relu")


def test_functional_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    x, params = make_args(2, 3, 16, 9, 10, 3, torch.float32)
    want = conv_bn_reference(x, *params, stride=2, relu=True)
    assert "ghostops::conv_bn_eval" in ops_run(conv_bn, x, *params, stride=2, relu=True)
    cl = x.to(memory_format=torch.channels_last)
    assert "ghostops::conv_bn_eval" not in ops_run(conv_bn, cl, *params, stride=2, relu=True)
    torch.testing.assert_close(conv_bn(cl, *params, stride=2, relu=True), want)
    wide, wide_params = make_args(1, 9, 4, 6, 6, 3, torch.float32)
    assert "ghostops::conv_bn_eval" not in ops_run(conv_bn, wide, *wide_params)
    leaf = x.clone().requires_grad_()
    with_grad = conv_bn(leaf, *params, stride=2, relu=True)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, want)
    with ghostops.use_backend("reference"):
        assert "ghostops::conv_bn_eval" not in ops_run(conv_bn, x, *params, stride=2)
    oblong = (params[0][..., :1, :], *params[1:])  # a 1x3 kernel: the reference's
    assert "ghostops::conv_bn_eval" not in ops_run(conv_bn, x, *oblong, stride=2)


def test_ghostnet_eval_runs_its_stem_as_one_op_and_matches_the_reference_network():
    net, ref = ghostnet_pair()
    x = torch.randn(2, 3, 64, 64)
    assert "ghostops::conv_bn_eval" in ops_run(net, x)
    assert "ghostops::conv_bn_eval" not in ops_run(ref, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)
    seen = []
    net.conv_stem.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert "ghostops::conv_bn_eval" not in ops_run(net, x)  # a hooked stem runs its modules
    assert seen == [(2, 16, 32, 32)]
    net.train()  # batch statistics: the modules, with autograd
    net(x).sum().backward()
    assert net.conv_stem.weight.grad is not None
