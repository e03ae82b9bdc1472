"""The eval-mode linear + act op (ghostops::linear_eval, C++ CPU kernel; GhostNet's head) and its
functional entry point ``ghostops.ops.linear``: against the float64 reference, its dispatch,
and its use in ghostops' GhostNet."""

from __future__ import annotations

import pytest
import torch
from ghost_cases import ghostnet_pair, ops_run, rel_err
from torch.profiler import profile

import ghostops
from ghostops import _ext
from ghostops.ops import linear
from ghostops.reference import linear_reference

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]

# (rows of x, in features, out features): up to 4 rows the matrix-vector kernel, then addmm.
CASES = [(1, 960, 1280), (3, 37, 11), (4, 70, 129), (5, 33, 17), (1, 1, 1), (0, 8, 5)]


def make_args(n, k, m, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=dtype)
    weight = torch.randn(m, k, generator=g, dtype=dtype) / k**0.5
    bias = torch.randn(m, generator=g, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "id"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(case, dtype, relu, with_bias):
    x, weight, bias = make_args(*case, dtype=dtype)
    bias = bias if with_bias else None
    out = torch.ops.ghostops.linear_eval(x, weight, bias, "relu" if relu else "identity")
    b64 = None if bias is None else bias.double()
    want = linear_reference(x.double(), weight.double(), b64, relu=relu)
    assert out.dtype == dtype and out.shape == want.shape
    if out.numel():
        assert rel_err(out, want) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_strided_arguments():
    x, weight, bias = make_args(2, 40, 24)
    # A weight read through its transpose (rows not contiguous), a column of a wider x, every
    # other element of a longer bias.
    wt = weight.t().contiguous().t()
    xs = torch.cat([x, x], dim=1)[:, ::2]
    longer = torch.zeros(48, dtype=bias.dtype)
    longer[::2] = bias
    out = torch.ops.ghostops.linear_eval(xs, wt, longer[::2], "relu")
    assert rel_err(out, linear_reference(xs, weight, bias, relu=True)) < 1e-12


def test_opcheck():
    x, weight, bias = make_args(2, 40, 24, torch.float32)
    torch.library.opcheck(torch.ops.ghostops.linear_eval, (x, weight, bias, "relu"))
    torch.library.opcheck(torch.ops.ghostops.linear_eval, (x, weight, None, "identity"))


def test_bad_arguments_are_clear_errors():
    x, weight, bias = make_args(2, 40, 24, torch.float32)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.ghostops.linear_eval(x, weight[:, :7], bias, "relu")
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.ghostops.linear_eval(x[None], weight, bias, "relu")
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.ghostops.linear_eval(x, weight, bias[:3], "relu")
    with pytest.raises(RuntimeError, match="act must be"):
        torch.ops.ghostops.linear_eval(x, weight, bias, "gelu")


def test_functional_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    x, weight, bias = make_args(2, 40, 24, torch.float32)
    want = linear_reference(x, weight, bias, relu=True)
    assert "ghostops::linear_eval" in ops_run(linear, x, weight, bias, relu=True)
    leaf = x.clone().requires_grad_()
    with_grad = linear(leaf, weight, bias, relu=True)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, want)
    assert "ghostops::linear_eval" not in ops_run(linear, x[None], weight, bias)  # 3-D x
    with ghostops.use_backend("reference"):
        assert "ghostops::linear_eval" not in ops_run(linear, x, weight, bias)


@pytest.mark.parametrize("rows", [2, 7])  # the matrix-vector kernel, and addmm
def test_nan_stays_nan_through_relu_as_in_f_relu(rows):
    x, weight, bias = make_args(rows, 40, 24, torch.float32)
    x[0, 3] = float("nan")
    out = torch.ops.ghostops.linear_eval(x, weight, bias, "relu")
    want = linear_reference(x, weight, bias, relu=True)
    assert out[0].isnan().all() and want[0].isnan().all()
    torch.testing.assert_close(out[1:], want[1:])


def test_ghostnet_head_runs_the_op_and_matches_the_reference_network():
    net, ref = ghostnet_pair()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), profile(record_shapes=True) as prof:
        out = net(x)
    shapes = [e.input_shapes[1] for e in prof.events() if e.name == "ghostops::linear_eval"]
    assert shapes == [[1280, 960], [10, 1280]]  # the head's 1x1 conv, the classifier
    assert "ghostops::linear_eval" not in ops_run(ref, x)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
    seen = []
    net.classifier.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        net(x)
    assert seen == [(1, 10)]  # a hooked classifier runs as its module
