"""The Triton backend (ghostops/backends/triton_kernels.py, triton_train.py): the eval forward,
and the training forward, gradients and running statistics, against the float64 reference.
Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py), on
small shapes; the same tests run at real sizes on a GPU (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch
from ghost_cases import Case, make_args, rel_err, run_fused, run_reference

import ghostops
from ghostops import _ext

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(not _ext.triton_available(), reason="no GPU and no TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("poisoned_outputs"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    Case(6, 10, 9, 11),
    Case(5, 7, 9, 11, relu=False),  # odd oup
    Case(6, 10, 8, 5, ratio=3, dw_size=5),
    Case(4, 9, 6, 7, ratio=4, dw_size=7, relu=False),
    Case(3, 8, 1, 1),  # 1x1 maps
    Case(8, 12, 1, 9, dw_size=1),
    Case(7, 9, 15, 17, stride=2),
    Case(40, 24, 7, 7, batch=3),  # several K blocks
    Case(6, 10, 9, 11, channels_last=True),
    Case(7, 9, 15, 17, stride=2, strided_input=True),
    Case(10, 20, 12, 12, batch=0),  # empty batch
]


@pytest.fixture(scope="module", autouse=True)
def registered():
    with ghostops.use_backend("triton"):
        ghostops.backends.select_backend("cpu")  # imports the kernels, registering the op


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_eval_matches_reference(case, dtype):
    if dtype == torch.float16 and DEVICE == "cpu" and case.batch == 0:
        pytest.skip("nothing to compute")
    x, params = make_args(case, torch.float32)
    x, params = x.to(DEVICE, dtype), [t.to(DEVICE, dtype) for t in params]
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = run_fused(case, x, params, op=torch.ops.ghostops.ghost_forward_eval_triton)
    ref = run_reference(case, x.cpu().float(), [t.cpu().float() for t in params])
    assert y.shape == ref.shape and y.dtype == dtype
    if case.channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    if y.numel():
        # float32 through tl.dot may use TF32 on a GPU (DESIGN.md section 5: about 3e-4).
        assert rel_err(y.cpu(), ref) < (1e-2 if dtype == torch.float16 else 1e-3)


def test_module_uses_triton_backend_when_forced():
    torch.manual_seed(0)
    m = ghostops.GhostModule(6, 10).to(DEVICE).eval()
    x = torch.randn(2, 6, 5, 7, device=DEVICE)
    with torch.no_grad():
        with ghostops.use_backend("triton"):
            y = m(x)
        with ghostops.use_backend("reference"):
            ref = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Training: ghostops::ghost_forward_train_triton / ghost_backward_triton

TRAIN_CASES = [
    Case(6, 10, 9, 11),
    Case(5, 7, 9, 11, relu=False),  # odd oup: a ghost channel only BN2's statistics see
    Case(6, 10, 8, 5, ratio=3, dw_size=5),
    Case(3, 8, 1, 1, batch=3),  # 1x1 maps
    Case(8, 12, 1, 9, dw_size=1),
    Case(7, 9, 15, 17, stride=2),
    Case(40, 24, 7, 7, batch=3),  # several K blocks and pixel tiles
    Case(6, 10, 9, 11, channels_last=True),
    Case(7, 9, 15, 17, stride=2, strided_input=True),
]
# float32 through tl.dot may use TF32 on a GPU (DESIGN.md section 5).
TRAIN_TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 3e-3, torch.float16: 2e-2}


def _train_step(case, x, params, backend, momentum=0.1):
    """y, the gradients of x and of the seven trainable tensors under grad_y (a fixed ramp),
    and the four running statistics after the step, with ``backend`` forced."""
    p = params
    x = x.detach().clone().requires_grad_()
    leaves = [x] + [p[i].detach().clone().requires_grad_() for i in (0, 1, 2, 5, 6, 7)]
    running = [p[i].detach().clone() for i in (3, 4, 8, 9)]
    w1, g1, b1, w2, g2, b2 = leaves[1:]
    with ghostops.use_backend(backend):
        y = ghostops.ghost_module(
            x, w1, g1, b1, running[0], running[1], w2, g2, b2, running[2], running[3],
            oup=case.oup, ratio=case.ratio, dw_size=case.dw_size, stride=case.stride,
            relu=case.relu, training=True, momentum=momentum,
        )  # fmt: skip
    grad_y = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
    return y, torch.autograd.grad(y, leaves, grad_y), running


@pytest.mark.parametrize("case", TRAIN_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_training_matches_reference(case, dtype):
    """Output, all seven gradients and the running statistics against the float64 reference
    autograd from the same data."""
    if dtype == torch.float16 and case not in TRAIN_CASES[:2]:
        pytest.skip("float16: two cases are enough under the interpreter")
    x, params = make_args(case, torch.float32)
    x64, p64 = x.double(), [t.double() for t in params]
    y_ref, grads_ref, running_ref = _train_step(case, x64, p64, "reference")
    x, params = x.to(DEVICE, dtype), [t.to(DEVICE, dtype) for t in params]
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, grads, running = _train_step(case, x, params, "triton")
    assert "ghost_forward_train_triton" in y.grad_fn.name()  # the kernels ran, not the reference
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = TRAIN_TOL[dtype]
    assert rel_err(y.cpu(), y_ref) < tol
    for name, g, ref in zip(("x", "w1", "g1", "b1", "w2", "g2", "b2"), grads, grads_ref):
        assert g.shape == ref.shape and g.dtype == dtype, name
        assert rel_err(g.cpu(), ref) < 5 * tol, name
    for r, ref in zip(running, running_ref):
        assert rel_err(r.cpu(), ref) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "case",
    [Case(16, 48, 112, 112, batch=4), Case(80, 480, 14, 14, batch=16), Case(960, 160, 7, 7,
     batch=32, relu=False), Case(40, 120, 28, 28, batch=8, channels_last=True)],
    ids=str,
)  # fmt: skip
def test_training_matches_reference_at_real_sizes(case):
    x, params = make_args(case, torch.float32)
    y_ref, grads_ref, _ = _train_step(case, x.double(), [t.double() for t in params], "reference")
    x, params = x.to(DEVICE), [t.to(DEVICE) for t in params]
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, grads, _ = _train_step(case, x, params, "triton")
    assert rel_err(y.cpu(), y_ref) < TRAIN_TOL[torch.float32]
    for g, ref in zip(grads, grads_ref):
        assert rel_err(g.cpu(), ref) < 5 * TRAIN_TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compile_training_step_fullgraph_on_gpu():
    m = ghostops.GhostModule(32, 64).cuda().train()
    x = torch.randn(8, 32, 28, 28, device="cuda")

    def step(x):
        return m(x).square().mean()

    with ghostops.use_backend("triton"):
        loss = torch.compile(step, fullgraph=True)(x)
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())


def test_training_backward_computes_only_what_is_asked():
    case = Case(6, 10, 9, 11)
    x, p = make_args(case)
    x, p = x.to(DEVICE), [t.to(DEVICE) for t in p]
    y, z1, m1, v1, m2, v2 = torch.ops.ghostops.ghost_forward_train_triton(
        x, p[0], p[1], p[2], 1e-5, p[5], p[6], p[7], 1e-5, case.oup, 1, "relu"
    )
    gy = torch.randn_like(y)
    args = (gy, x, z1, p[0], p[1], p[2], m1, v1, 1e-5, p[5], p[6], p[7], m2, v2, 1e-5, 1, "relu")
    full = torch.ops.ghostops.ghost_backward_triton(*args, [True, True])
    only_w = torch.ops.ghostops.ghost_backward_triton(*args, [False, True])
    assert only_w[0].numel() == 0 and full[0].shape == x.shape
    for a, b in zip(full[1:], only_w[1:]):
        torch.testing.assert_close(a, b)


def test_training_output_may_be_modified_in_place():
    """The backward reads z1, never y: GhostNet's residual ``y += shortcut`` is safe."""
    case = Case(6, 10, 9, 11)
    x, params = make_args(case)
    x, params = x.to(DEVICE), [t.to(DEVICE) for t in params]
    _, grads, _ = _train_step(case, x, params, "triton")
    w = params[0].detach().clone().requires_grad_()
    with ghostops.use_backend("triton"):
        y = ghostops.ghost_module(x, w, *params[1:5], params[5], *params[6:10], oup=case.oup,
                                  training=True)  # fmt: skip
    ramp = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    y.add_(7.0)
    (gw,) = torch.autograd.grad(y, [w], ramp)
    torch.testing.assert_close(gw, grads[1])


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a GPU: under TRITON_INTERPRET=1 the interpreter runs even on fake tensors",
)
def test_opcheck_training_ops():
    case = Case(5, 7, 6, 5, relu=False)
    x, p = make_args(case)
    x, p = x.to(DEVICE), [t.to(DEVICE) for t in p]
    fwd = (x, p[0], p[1], p[2], 1e-5, p[5], p[6], p[7], 1e-5, case.oup, 1, "identity")
    torch.library.opcheck(torch.ops.ghostops.ghost_forward_train_triton.default, fwd)
    y, z1, m1, v1, m2, v2 = torch.ops.ghostops.ghost_forward_train_triton(*fwd)
    bwd = (torch.randn_like(y), x, z1, p[0], p[1], p[2], m1, v1, 1e-5, p[5], p[6], p[7], m2, v2,
           1e-5, 1, "identity", [True, True])  # fmt: skip
    torch.library.opcheck(torch.ops.ghostops.ghost_backward_triton.default, bwd)


def test_training_float64_runs_the_reference():
    """The Triton kernels compute in float32: float64 stays on the exact reference."""
    m = ghostops.GhostModule(6, 10).to(DEVICE, torch.float64).train()
    with ghostops.use_backend("triton"):
        y = m(torch.randn(2, 6, 5, 7, device=DEVICE, dtype=torch.float64))
    assert "triton" not in y.grad_fn.name()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compile_fullgraph_on_gpu():
    m = ghostops.GhostModule(32, 64).cuda().eval()
    x = torch.randn(8, 32, 28, 28, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-3, atol=1e-3)
