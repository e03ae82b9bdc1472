"""The eval-mode squeeze-and-excitation op (ghostops::se_eval, C++ CPU kernel) and its
functional entry point ``ghostops.ops.squeeze_excite``: against the float64 reference, its
dispatch, and its use inside ghostops' GhostNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ghost_cases import ghostnet_pair, ops_run, rel_err
from torch.profiler import profile

import ghostops
from ghostops import _ext
from ghostops.nn import GhostBottleneck
from ghostops.ops import squeeze_excite
from ghostops.reference import squeeze_excite_reference

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]

# (batch, channels, reduced channels, height, width)
CASES = [
    (2, 72, 20, 28, 28),  # GhostNet's first SE, smaller map
    (3, 13, 5, 7, 9),  # odd sizes, channels not a multiple of a vector
    (1, 40, 1, 1, 1),  # 1x1 map, one reduced channel
    (2, 33, 17, 3, 37),  # rows wider than two vectors
    (0, 8, 4, 5, 5),  # empty batch
]


def make_args(n, c, r, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype) + 0.5  # means away from zero
    reduce_weight = torch.randn(r, c, 1, 1, generator=g, dtype=dtype) / c**0.5
    reduce_bias = torch.randn(r, generator=g, dtype=dtype)
    # Gates on both sides of the hard sigmoid's clamps (pre-activations beyond -3 and 3).
    expand_weight = 3 * torch.randn(c, r, 1, 1, generator=g, dtype=dtype)
    expand_bias = torch.randn(c, generator=g, dtype=dtype)
    return x, (reduce_weight, reduce_bias, expand_weight, expand_bias)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(case, dtype):
    x, params = make_args(*case, dtype=dtype)
    out = torch.ops.ghostops.se_eval(x, *params)
    want = squeeze_excite_reference(x.double(), *(t.double() for t in params))
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    if x.numel():
        assert rel_err(out, want) < (1e-12 if dtype == torch.float64 else 1e-5)
        rw, rb, ew, eb = (t.double() for t in params)
        pooled = x.double().mean((2, 3), keepdim=True)
        s = F.conv2d(torch.relu(F.conv2d(pooled, rw, rb)), ew, eb)
        if case[2] >= 5:  # the gate's both clamps are exercised
            assert (s < -3).any() and (s > 3).any()


def test_non_contiguous_input():
    x, params = make_args(2, 12, 3, 9, 11)
    strided = x.transpose(2, 3)
    torch.testing.assert_close(
        torch.ops.ghostops.se_eval(strided, *params), squeeze_excite_reference(strided, *params)
    )


def test_nan_pixel_spreads_through_the_gate_as_in_the_reference():
    """A NaN pixel makes its channel's mean NaN, then every reduced value (ReLU keeps NaN, as
    F.relu does), then every gate of that image: the whole image comes out NaN."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 5, 5, generator=g)
    x[0, 2, 1, 1] = float("nan")
    weights = (torch.randn(4, 8, 1, 1, generator=g), torch.randn(4, generator=g),
               torch.randn(8, 4, 1, 1, generator=g), torch.randn(8, generator=g))  # fmt: skip
    out = torch.ops.ghostops.se_eval(x, *weights)
    want = squeeze_excite_reference(x, *weights)
    assert out[0].isnan().all() and want[0].isnan().all()
    torch.testing.assert_close(out[1], want[1])


def test_opcheck():
    x, params = make_args(2, 12, 4, 5, 7, torch.float32)
    torch.library.opcheck(torch.ops.ghostops.se_eval, (x, *params))


def test_bad_arguments_are_clear_errors():
    x, (rw, rb, ew, eb) = make_args(2, 12, 4, 5, 7, torch.float32)
    with pytest.raises(RuntimeError, match="reduce_weight must have shape"):
        torch.ops.ghostops.se_eval(x, rw[:, :5], rb, ew, eb)
    with pytest.raises(RuntimeError, match="expand_weight must have shape"):
        torch.ops.ghostops.se_eval(x, rw, rb, ew[:, :3], eb)
    with pytest.raises(RuntimeError, match="expand_bias"):
        torch.ops.ghostops.se_eval(x, rw, rb, ew, eb[:5])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ghostops.se_eval(x.half(), rw.half(), rb.half(), ew.half(), eb.half())
    with pytest.raises(RuntimeError, match="non-empty map"):
        torch.ops.ghostops.se_eval(x[:, :, :0], rw, rb, ew, eb)


def test_functional_falls_back_to_the_reference_where_the_kernel_does_not_apply():
    x, params = make_args(2, 12, 4, 5, 7, torch.float32)
    want = squeeze_excite_reference(x, *params)
    assert "ghostops::se_eval" in ops_run(squeeze_excite, x, *params)
    cl = x.to(memory_format=torch.channels_last)
    assert "ghostops::se_eval" not in ops_run(squeeze_excite, cl, *params)
    torch.testing.assert_close(squeeze_excite(cl, *params), want)
    leaf = x.clone().requires_grad_()
    with_grad = squeeze_excite(leaf, *params)
    assert with_grad.grad_fn is not None
    torch.testing.assert_close(with_grad, want)
    with ghostops.use_backend("reference"):
        assert "ghostops::se_eval" not in ops_run(squeeze_excite, x, *params)


def test_ghostnet_eval_uses_the_fused_se_op_and_matches_the_reference_network():
    net, ref = ghostnet_pair()
    x = torch.randn(2, 3, 64, 64)
    assert "ghostops::se_eval" in ops_run(net, x)
    assert "ghostops::se_eval" not in ops_run(ref, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)
    # With gradients (training): the stock modules, which autograd differentiates.
    net.train()
    with profile() as prof:
        net(x).sum().backward()
    assert "ghostops::se_eval" not in {event.key for event in prof.key_averages()}
    assert net.blocks[3][0].se.conv_reduce.weight.grad is not None


def test_bottleneck_with_a_hooked_or_swapped_se_runs_its_modules():
    torch.manual_seed(0)
    block = GhostBottleneck(16, 48, 24, 3, stride=2, se_ratio=0.25).eval()
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        want = block(x)
    assert "ghostops::se_eval" in ops_run(block, x)
    seen = []
    handle = block.se.conv_reduce.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert "ghostops::se_eval" not in ops_run(block, x)
    assert seen == [(2, 12, 1, 1)]
    handle.remove()
    block.se.act1 = torch.nn.SiLU()  # a different activation: the module's own forward
    assert "ghostops::se_eval" not in ops_run(block, x)
    with torch.no_grad():
        assert not torch.allclose(block(x), want)
