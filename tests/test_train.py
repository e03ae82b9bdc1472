"""The fused training ops (ghostops::ghost_forward_train / ghost_backward, C++ CPU kernels):
batch-statistics forward, running statistics, gradients (gradcheck in float64, reference
autograd in float32), opcheck, torch.compile, and several SGD steps of a whole GhostNet against
the reference network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ghost_cases import Case, make_args, rel_err, strided_views

import ghostops
from ghostops import _ext
from ghostops.models import ghostnet
from ghostops.reference import ReferenceGhostModule, ghost_channels, ghost_module_reference

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]

TRAIN_CASES = [
    Case(6, 10, 9, 11),
    Case(5, 7, 9, 11, relu=False),  # odd oup: a ghost channel only BN2's statistics see
    Case(6, 10, 13, 5, ratio=3, dw_size=5),
    Case(4, 9, 6, 7, ratio=4, dw_size=7, relu=False),
    Case(3, 8, 1, 1, batch=3),  # 1x1 maps: three values per channel
    Case(8, 12, 1, 9, dw_size=1),
    Case(7, 9, 15, 17, stride=2),
    Case(12, 11, 10, 9, stride=3, ratio=3),
    Case(40, 60, 7, 7, batch=9),  # several images per GEMM task and per plane task
    Case(6, 10, 10, 10, batch=7, ratio=3),  # plane tasks of 4 images: the last one has 3
    Case(16, 24, 50, 47, batch=2),  # several pixel chunks per image
    Case(70, 160, 5, 6, batch=3),  # weight gradient by rows: x transposed, 4 + 1 vectors wide
    Case(8, 40, 9, 11, batch=5),  # and with 13 images a chunk
    Case(4, 8, 6, 7, batch=3, dw_size=9),  # 81 taps: kernel sizes past 7x7 at run time
    Case(6, 10, 9, 11, channels_last=True),
    Case(7, 9, 15, 17, stride=2, strided_input=True),
]
GRAD_NAMES = ("x", "primary_weight", "bn1_weight", "bn1_bias", "cheap_weight", "bn2_weight",
              "bn2_bias")  # fmt: skip


def act(case: Case) -> str:
    return "relu" if case.relu else "identity"


def train_forward(case: Case, x, params, eps=1e-5):
    p = params
    return torch.ops.ghostops.ghost_forward_train(
        x, p[0], p[1], p[2], eps, p[5], p[6], p[7], eps, case.oup, case.stride, act(case)
    )


def reference_forward(case: Case, x, params, eps=1e-5):
    """Training-mode reference in float64, without running statistics."""
    p = [t.double() for t in params]
    return ghost_module_reference(
        x.double(), p[0], p[1], p[2], None, None, p[5], p[6], p[7], None, None, oup=case.oup,
        ratio=case.ratio, dw_size=case.dw_size, stride=case.stride, relu=case.relu, training=True,
    )  # fmt: skip


def differentiable(case: Case, x, params):
    """The leaves gradients flow to: x and the seven trainable tensors (running stats: no)."""
    p = params
    return [t.detach().clone().requires_grad_() for t in (x, p[0], p[1], p[2], p[5], p[6], p[7])]


def fused_loss_grads(case: Case, leaves, grad_y):
    x, w1, g1, b1, w2, g2, b2 = leaves
    y = ghostops.ghost_module(
        x, w1, g1, b1, None, None, w2, g2, b2, None, None, oup=case.oup, ratio=case.ratio,
        dw_size=case.dw_size, stride=case.stride, relu=case.relu, training=True,
    )  # fmt: skip
    return torch.autograd.grad(y, leaves, grad_y)


@pytest.mark.parametrize("case", TRAIN_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_train_forward_matches_reference(case, dtype):
    x, params = make_args(case, dtype)
    y, z1, mean1, var1, mean2, var2 = train_forward(case, x, params)
    ref = reference_forward(case, x, params)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert y.shape == ref.shape and y.dtype == dtype
    assert rel_err(y, ref) < tol
    # The batch statistics the running statistics are updated from.
    init, _ = ghost_channels(case.oup, case.ratio)
    z1_ref = F.conv2d(x.double(), params[0].double(), stride=case.stride)
    assert rel_err(z1, z1_ref) < tol
    assert rel_err(mean1, z1_ref.mean((0, 2, 3))) < tol
    assert rel_err(var1, z1_ref.var((0, 2, 3), unbiased=False)) < tol
    assert mean2.shape == var2.shape == (params[5].shape[0],)
    assert var2.min() >= 0 and mean1.shape == (init,)


@pytest.mark.parametrize("case", TRAIN_CASES, ids=str)
def test_gradients_match_reference_autograd(case):
    x, params = make_args(case, torch.float32, seed=1)
    shape = reference_forward(case, x, params).shape
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    grads = fused_loss_grads(case, differentiable(case, x, params), grad_y)
    ref_leaves = [t.double() for t in differentiable(case, x, params)]
    ref_leaves = [t.detach().requires_grad_() for t in ref_leaves]
    xr, w1, g1, b1, w2, g2, b2 = ref_leaves
    y = ghost_module_reference(
        xr, w1, g1, b1, None, None, w2, g2, b2, None, None, oup=case.oup, ratio=case.ratio,
        dw_size=case.dw_size, stride=case.stride, relu=case.relu, training=True,
    )  # fmt: skip
    ref_grads = torch.autograd.grad(y, ref_leaves, grad_y.double())
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        # Gradients that cancel to ~0 (BN makes sum(dz) = 0; a 1x1 map leaves one tap of the
        # cheap weight) are compared on the scale of the largest gradient. float32 sums of
        # dz2 * x1 cancel (sum dz2 = 0 while x1 > 0 has a large mean): 1e-4 is their rounding.
        scale = max(want.norm().item(), 1e-2 * max(g.norm().item() for g in ref_grads))
        assert (got.double() - want).norm().item() / scale < 1e-4, name


GRADCHECK_CASES = [
    Case(3, 4, 4, 5, batch=2),
    Case(3, 5, 3, 4, batch=2, ratio=3, relu=False),
    Case(2, 3, 5, 3, batch=2, dw_size=1),
    Case(3, 6, 4, 4, batch=2, dw_size=5, stride=2),
    Case(4, 7, 3, 3, batch=3, channels_last=True),
    Case(2, 3, 12, 11, batch=1),  # 132 pixels: the weight gradient by rows
    Case(3, 2, 17, 16, batch=1),  # 272 pixels: the dot-product weight-gradient kernel
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(case):
    x, params = make_args(case, torch.float64, seed=2)
    leaves = differentiable(case, x, params)
    if case.channels_last:
        leaves[0] = leaves[0].detach().to(memory_format=torch.channels_last).requires_grad_()

    def fn(*leaves):
        x, w1, g1, b1, w2, g2, b2 = leaves
        return ghostops.ghost_module(
            x, w1, g1, b1, None, None, w2, g2, b2, None, None, oup=case.oup, ratio=case.ratio,
            dw_size=case.dw_size, stride=case.stride, relu=case.relu, training=True,
        )  # fmt: skip

    with ghostops.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_computes_only_what_is_asked():
    case = Case(6, 10, 9, 11)
    x, params = make_args(case, torch.float32)
    y, z1, mean1, var1, mean2, var2 = train_forward(case, x, params)
    p = params
    grads = torch.ops.ghostops.ghost_backward(
        torch.randn_like(y), x, z1, p[0], p[1], p[2], mean1, var1, 1e-5, p[5], p[6], p[7],
        mean2, var2, 1e-5, case.stride, act(case), [False, True],
    )  # fmt: skip
    assert grads[0].numel() == 0 and grads[1].shape == p[0].shape
    # Through autograd: x without requires_grad gets no gradient computed.
    leaves = differentiable(case, x, params)
    leaves[0].requires_grad_(False)
    x0, w1, g1, b1, w2, g2, b2 = leaves
    y = ghostops.ghost_module(
        x0, w1, g1, b1, None, None, w2, g2, b2, None, None, oup=case.oup, training=True
    )
    y.sum().backward()
    assert leaves[1].grad is not None and leaves[0].grad is None


def test_strided_weights_and_statistics_give_the_same_results():
    case = Case(5, 11, 7, 6, ratio=3, dw_size=5)
    x, params = make_args(case, torch.float64)
    grad_y = torch.randn(case.batch, case.oup, case.height, case.width, dtype=torch.float64)

    def forward_backward(p):
        y, z1, mean1, var1, mean2, var2 = train_forward(case, x, p)
        grads = torch.ops.ghostops.ghost_backward(
            grad_y, x, z1, p[0], p[1], p[2], mean1, var1, 1e-5, p[5], p[6], p[7], mean2, var2,
            1e-5, case.stride, act(case), [True, True],
        )  # fmt: skip
        return (y, z1, mean1, var1, mean2, var2, *grads)

    for got, want in zip(forward_backward(strided_views(params)), forward_backward(params)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_output_may_be_modified_in_place_before_backward():
    """GhostNet's residual does `x += shortcut` on a Ghost module's output: the backward must
    not depend on y."""
    ref, ours = module_pair(8, 8, relu=False)
    x = torch.randn(4, 8, 6, 6)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = []
    for m, xi in zip((ref, ours), xs, strict=True):
        y = m(xi)
        y += xi  # in place, as GhostBottleneck does
        (y * y).sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [TRAIN_CASES[0], TRAIN_CASES[6]], ids=str)
def test_opcheck_train_ops(case):
    x, params = make_args(case, torch.float32)
    p = params
    fwd_args = (x, p[0], p[1], p[2], 1e-5, p[5], p[6], p[7], 1e-5, case.oup, case.stride,
                act(case))  # fmt: skip
    torch.library.opcheck(torch.ops.ghostops.ghost_forward_train.default, fwd_args)
    y, z1, mean1, var1, mean2, var2 = torch.ops.ghostops.ghost_forward_train(*fwd_args)
    bwd_args = (torch.randn_like(y), x, z1, p[0], p[1], p[2], mean1, var1, 1e-5, p[5], p[6],
                p[7], mean2, var2, 1e-5, case.stride, act(case), [True, True])  # fmt: skip
    torch.library.opcheck(torch.ops.ghostops.ghost_backward.default, bwd_args)


def test_one_value_per_channel_is_an_error():
    m = ghostops.GhostModule(3, 4).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))


def module_pair(inp, oup, **kw):
    """A reference module with random weights and BN state, and ours loaded from it."""
    torch.manual_seed(0)
    ref = ReferenceGhostModule(inp, oup, **kw)
    for bn in (ref.primary_conv[1], ref.cheap_operation[1]):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    ours = ghostops.GhostModule(inp, oup, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_batchnorm(momentum):
    ref, ours = module_pair(6, 11, ratio=3)  # odd oup: unused ghost channels update too
    for m in (ref, ours):
        for bn in (m.primary_conv[1], m.cheap_operation[1]):
            bn.momentum = momentum
    for step in range(3):
        x = torch.randn(4, 6, 7, 5, generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_without_running_statistics_batch_statistics_are_used_in_eval_too():
    ref, ours = module_pair(6, 10)
    for m in (ref, ours):
        for bn in (m.primary_conv[1], m.cheap_operation[1]):
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
        m.eval()
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_compile_training_step_fullgraph():
    ref, ours = module_pair(8, 12)
    compiled = torch.compile(copy.deepcopy(ours), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 6, 5)
    for m in (ours, compiled):
        m(x).square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_ghostnet_sgd_steps_match_reference_network():
    """Several SGD-with-momentum steps of ghostops' GhostNet and of the same network built from
    the reference modules, from the same weights: same losses, parameters, running stats."""
    torch.manual_seed(0)
    # float64: the networks' rounding differences stay far below what is compared, even after
    # ReLU kinks and BatchNorm over small batches amplify them step after step.
    ours = ghostnet(width=0.5, num_classes=10, dropout=0.0).double()
    ref = ghostnet(width=0.5, num_classes=10, dropout=0.0, ghost_module_cls=ReferenceGhostModule)
    ref = ref.double()
    ref.load_state_dict(ours.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, ref)]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 48, 48, generator=gen, dtype=torch.float64)
        target = torch.randint(0, 10, (4,), generator=gen)
        losses = []
        for m, opt in zip((ours, ref), opts, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-9), step
    for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cpu_dtypes_without_kernels_run_the_reference(dtype):
    """The C++ CPU kernels are float32 / float64: other dtypes get the exact reference."""
    ref, ours = module_pair(4, 8)
    x = torch.randn(3, 4, 5, 5)
    for train in (True, False):
        r, o = ref.to(dtype).train(train), ours.to(dtype).train(train)
        with torch.no_grad():
            torch.testing.assert_close(o(x.to(dtype)), r(x.to(dtype)))


def test_double_backward_is_a_clear_error():
    _, ours = module_pair(4, 8)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    (g,) = torch.autograd.grad(ours(x).square().sum(), x)  # first order: fine
    assert g.shape == x.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)


def _pair_with_reference(configure):
    """(ghostops.GhostModule, ReferenceGhostModule) with one random state, in train mode, then
    ``configure(module)`` applied to each (freezing a BatchNorm, changing its eps...)."""
    torch.manual_seed(0)
    ref = ReferenceGhostModule(6, 10).train()
    for bn in (ref.primary_conv[1], ref.cheap_operation[1]):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    fused = ghostops.GhostModule(6, 10).train()
    fused.load_state_dict(ref.state_dict())
    configure(ref)
    configure(fused)
    return fused, ref


@pytest.mark.parametrize(
    "name, configure",
    [
        ("both BNs frozen", lambda m: (m.primary_conv[1].eval(), m.cheap_operation[1].eval())),
        ("BN1 frozen", lambda m: m.primary_conv[1].eval()),
        ("BN2 frozen", lambda m: m.cheap_operation[1].eval()),
        ("different eps", lambda m: setattr(m.cheap_operation[1], "eps", 1e-3)),
        ("different momentum", lambda m: setattr(m.primary_conv[1], "momentum", 0.3)),
    ],
)
def test_each_batchnorm_follows_its_own_settings(name, configure):
    """As in the paper's module, each BatchNorm uses its own train flag, eps and momentum (a
    frozen BN inside a training model normalises with its running statistics)."""
    fused, ref = _pair_with_reference(configure)
    x = torch.randn(3, 6, 7, 9)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = fused(xf), ref(xr)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    ramp = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.backward(ramp)
    y_ref.backward(ramp)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    for (pname, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=f"{name}: {pname}")
