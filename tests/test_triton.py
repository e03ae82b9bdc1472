"""The Triton backend (ghostops/backends/triton_kernels.py, triton_train.py): the eval forward,
and the training forward, gradients and running statistics, against the float64 reference.
Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py), on
small shapes; the same tests run at real sizes on a GPU (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch
from ghost_cases import (
    GPU_TRAIN_CASES,
    Case,
    check_training,
    gpu_train_tolerances,
    make_args,
    rel_err,
    run_fused,
    run_reference,
    train_step,
)

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
    Case(8, 200, 5, 6, ratio=3),  # 134 ghost rows: three row blocks, two per intrinsic channel
    # channels_last: the cheap kernel's channel tiles, vector widths 8 (f16) / 4 (f32) for
    # 32 -> 16 + 16, 1 for odd counts, several channel blocks, ratio 3
    Case(24, 32, 5, 7, batch=3, channels_last=True),
    Case(5, 7, 9, 11, relu=False, channels_last=True),
    Case(8, 200, 5, 6, ratio=3, channels_last=True),
    Case(6, 10, 8, 5, ratio=3, dw_size=5, stride=2, channels_last=True),
]
FORMS = ("one_pass", "two_kernels")  # the eval kernels' two forms (triton_kernels.eval_plan)


@pytest.fixture(scope="module", autouse=True)
def registered():
    with ghostops.use_backend("triton"):
        ghostops.backends.select_backend("cpu")  # imports the kernels, registering the op


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("form", FORMS)
def test_eval_matches_reference(case, dtype, form, monkeypatch):
    if dtype == torch.float16 and DEVICE == "cpu" and case.batch == 0:
        pytest.skip("nothing to compute")
    monkeypatch.setenv("GHOSTOPS_TRITON_EVAL", form)
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


def test_eval_bfloat16_matches_reference():
    case = Case(6, 10, 9, 11)
    x, params = make_args(case)
    x, params = x.to(DEVICE, torch.bfloat16), [t.to(DEVICE, torch.bfloat16) for t in params]
    y = run_fused(case, x, params, op=torch.ops.ghostops.ghost_forward_eval_triton)
    ref = run_reference(case, x.cpu().double(), [t.cpu().double() for t in params])
    assert y.dtype == torch.bfloat16 and rel_err(y.cpu(), ref) < 2e-2


def test_eval_plan_takes_one_pass_for_thin_primaries(monkeypatch):
    """The heuristic's choices on GhostNet's shapes in float16 (and float32, at half the
    limit), and its block sizes."""
    from ghostops.backends.triton_kernels import eval_plan

    monkeypatch.delenv("GHOSTOPS_TRITON_EVAL", raising=False)

    def form(inp, oup):
        init = -(-oup // 2)
        return eval_plan(inp, init, oup, init, 3, 2)["form"]

    assert [form(16, 16), form(16, 48), form(24, 72), form(72, 24)] == ["one_pass"] * 4
    assert [form(240, 80), form(80, 480), form(960, 160)] == ["two_kernels"] * 3
    # float32: 58 flops a byte for 72->40 (28x28), under the float16 limit, over float32's
    assert eval_plan(72, 20, 40, 20, 3, 4)["form"] == "two_kernels"
    assert eval_plan(24, 36, 72, 36, 3, 4)["form"] == "one_pass"  # 41 flops a byte
    plan = eval_plan(960, 80, 160, 80, 3, 2)  # 80 rows in one block of 128, not two of 64
    assert (plan["BLOCK_M"], plan["BLOCK_K"], plan["num_warps"]) == (128, 64, 4)
    assert eval_plan(960, 80, 160, 80, 3, 4)["BLOCK_M"] == 64  # float32: at most 64
    assert eval_plan(960, 480, 960, 480, 3, 2)["BLOCK_M"] == 128  # 4 blocks, 512 rows
    assert eval_plan(960, 130, 260, 130, 3, 2)["BLOCK_M"] == 64  # 192 rows, not 256
    plan = eval_plan(24, 36, 72, 36, 3, 2)  # one pass: at most 32 rows, then 8 warps
    assert (plan["form"], plan["BLOCK_M"], plan["num_warps"]) == ("one_pass", 32, 8)
    assert eval_plan(6, 5, 10, 5, 3, 4)["BLOCK_M"] == 16


def test_eval_form_override_is_checked(monkeypatch):
    from ghostops.backends.triton_kernels import eval_plan

    monkeypatch.setenv("GHOSTOPS_TRITON_EVAL", "two_kernels")
    assert eval_plan(16, 8, 16, 8, 3, 2)["form"] == "two_kernels"
    monkeypatch.setenv("GHOSTOPS_TRITON_EVAL", "fast")
    with pytest.raises(ValueError, match="GHOSTOPS_TRITON_EVAL='fast': expected one of"):
        eval_plan(16, 8, 16, 8, 3, 2)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_module_under_autocast(train, monkeypatch):
    """torch.autocast to bfloat16 with float32 weights: the module runs its convs in bfloat16
    on the Triton kernels, as the paper's module runs under autocast (same dtype, close)."""
    from ghostops.reference import ReferenceGhostModule

    eval_op, calls = torch.ops.ghostops.ghost_forward_eval_triton, []
    monkeypatch.setattr(torch.ops.ghostops, "ghost_forward_eval_triton",
                        lambda *a: calls.append(a[0].dtype) or eval_op(*a))  # fmt: skip
    torch.manual_seed(0)
    m = ghostops.GhostModule(6, 10).to(DEVICE).train(train)
    ref = ReferenceGhostModule(6, 10).to(DEVICE).train(train)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 6, 5, 7, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), torch.set_grad_enabled(train):
        with ghostops.use_backend("triton"):
            y = m(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert rel_err(y.float(), y_ref.double()) < 2e-2
    if train:
        assert "ghost_forward_train_triton" in y.grad_fn.name()
        (g,) = torch.autograd.grad(y.float().square().sum(), [m.primary_conv[0].weight])
        (g_ref,) = torch.autograd.grad(y_ref.float().square().sum(), [ref.primary_conv[0].weight])
        assert g.dtype == torch.float32 and rel_err(g, g_ref.double()) < 5e-2
        torch.testing.assert_close(m.primary_conv[1].running_var, ref.primary_conv[1].running_var,
                                   rtol=1e-2, atol=1e-3)  # fmt: skip
    else:
        assert calls == [torch.bfloat16]  # the kernel ran, on the cast input


def test_eval_float64_runs_the_reference(monkeypatch):
    """The Triton GEMM has no float64 path on a GPU (tl.dot's float64 result would not fit its
    float32 accumulator): float64 stays on the exact reference, and the op says so if called."""
    eval_op, calls = torch.ops.ghostops.ghost_forward_eval_triton, []
    monkeypatch.setattr(torch.ops.ghostops, "ghost_forward_eval_triton",
                        lambda *a: calls.append(a[0].dtype) or eval_op(*a))  # fmt: skip
    m = ghostops.GhostModule(6, 10).to(DEVICE, torch.float64).eval()
    x = torch.randn(2, 6, 5, 7, device=DEVICE, dtype=torch.float64)
    with torch.no_grad(), ghostops.use_backend("triton"):
        y = m(x)
    assert calls == [] and y.dtype == torch.float64
    case = Case(6, 10, 5, 7)
    x, params = make_args(case, torch.float64)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        run_fused(case, x.to(DEVICE), [t.to(DEVICE) for t in params], op=eval_op)


def test_kernels_compile_for_a_gpu():
    """Every Triton kernel, as its op launches it on GhostNet shapes in both layouts, compiled
    for sm_90 (H100) through Triton's ahead-of-time path in a subprocess without the
    interpreter (tests/triton_gpu_compile.py): what only a real compile rejects, such as a
    float64 tl.dot against a float32 accumulator, fails here. No kernel spills registers, and
    in channels_last half precision the eval kernels move whole 16-byte vectors of channels
    (for 16->48: 24 intrinsic and 24 ghost channels, a multiple of 8)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("triton_gpu_compile.py")
    run = subprocess.run([sys.executable, str(script), "--dtypes", "fp16", "bf16", "fp32"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines and all(line.startswith("ok   sm_90 ") for line in lines), run.stdout
    assert all(" 0 bytes spilled" in line for line in lines), run.stdout
    kernels = {}
    for line in lines:
        dtype, layout, shape, _, name = line.split(":")[0].split()[2:7]
        kernels.setdefault((dtype, layout, shape, name), line.split(";", 1)[1])
    names = "_fold_kernel _one_pass_kernel _primary_kernel _cheap_kernel _f1_primary _f2_cheap"
    names += " _f3_affine_act _b1_ghost_sums _b2_dz2 _b3_dx1 _b4_dz1 _bn_stats_kernel"
    names += " _bn_affine_kernel _bn_grad_kernel _column_sum_kernel _partial_sums_kernel"
    # (every kernel of the three ops)
    assert {k[3] for k in kernels} == set(names.split())
    for dtype in ("fp16", "bf16"):
        for name in ("_one_pass_kernel", "_primary_kernel", "_cheap_kernel"):
            access = kernels[(dtype, "channels_last", "16->48", name)]
            stores = re.search(r"st ([^;]*)", access).group(1).split()
            assert stores and all(s.startswith("16Bx") for s in stores), (name, access)
        cheap = kernels[(dtype, "channels_last", "16->48", "_cheap_kernel")]
        assert re.search(r"ld 16Bx", cheap), cheap  # y's intrinsic channels read as vectors
        primary = kernels[(dtype, "channels_last", "16->48", "_primary_kernel")]
        assert re.search(r"cp 16Bx", primary), primary  # x's channels copied as vectors


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

TRAIN_CASES = GPU_TRAIN_CASES
TRAIN_TOL = gpu_train_tolerances(DEVICE)


def _check_against_reference(case, x, params, dtype, grad_y=None, running_stats=True):
    """The Triton training step against the float64 reference (ghost_cases.check_training)."""
    check_training(case, x, params, dtype, "triton", DEVICE, grad_y, running_stats)


# Every case in float32; half precision on two (the interpreter is slow).
TRAIN_PARAMS = [pytest.param(c, torch.float32, id=f"f32-{c}") for c in TRAIN_CASES] + [
    pytest.param(c, dt, id=f"{name}-{c}")
    for dt, name in ((torch.float16, "f16"), (torch.bfloat16, "bf16"))
    for c in TRAIN_CASES[:2]
]


@pytest.mark.parametrize("case, dtype", TRAIN_PARAMS)
def test_training_matches_reference(case, dtype):
    """Output, all seven gradients and the running statistics against the float64 reference."""
    x, params = make_args(case, torch.float32)
    _check_against_reference(case, x, params, dtype)


def test_training_gradient_may_be_a_broadcast():
    """grad_y with zero strides, as ``y.sum().backward()`` gives."""
    case = Case(6, 10, 9, 11)
    x, params = make_args(case)
    _check_against_reference(case, x, params, torch.float32, torch.ones(1).expand(2, 10, 9, 11))


def test_training_float16_with_large_activations():
    """z1 with a standard deviation of several hundred: its float16 variance would overflow,
    so the batch statistics are kept in float32. (The float16 running variance itself
    overflows, as nn.BatchNorm2d's float16 buffers would: not compared.)"""
    case = Case(6, 10, 9, 11)
    x, params = make_args(case)
    _check_against_reference(case, x * 300, params, torch.float16, running_stats=False)


def test_training_float16_with_float32_batchnorms():
    """float16 activations and conv weights, float32 BatchNorm parameters and buffers (the
    usual mixed-precision layout): gradients and running statistics keep their dtypes."""
    case = Case(6, 10, 9, 11)
    x, p = make_args(case)
    half = [t.half() if i in (0, 5) else t for i, t in enumerate(p)]
    y_ref, grads_ref, running_ref = train_step(
        case, x.half().double(), [t.double() for t in half], "reference"
    )
    y, grads, running = train_step(
        case, x.half().to(DEVICE), [t.to(DEVICE) for t in half], "triton"
    )
    assert "ghost_forward_train_triton" in y.grad_fn.name()
    assert [g.dtype for g in grads] == [torch.float16] * 2 + [torch.float32] * 2 + [
        torch.float16
    ] + [torch.float32] * 2
    assert all(r.dtype == torch.float32 for r in running)
    assert rel_err(y.cpu(), y_ref) < TRAIN_TOL[torch.float16]
    for g, ref in zip(grads, grads_ref):
        assert rel_err(g.cpu(), ref) < 5 * TRAIN_TOL[torch.float16]
    for r, ref in zip(running, running_ref):
        assert rel_err(r.cpu(), ref) < TRAIN_TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "case",
    [Case(16, 48, 112, 112, batch=4), Case(80, 480, 14, 14, batch=16), Case(960, 160, 7, 7,
     batch=32, relu=False), Case(40, 120, 28, 28, batch=8, channels_last=True)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_training_matches_reference_at_real_sizes(case, dtype):
    x, params = make_args(case, torch.float32)
    _check_against_reference(case, x, params, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compile_training_step_fullgraph_on_gpu():
    torch.manual_seed(0)
    m = ghostops.GhostModule(32, 64).cuda().train()
    x = torch.randn(8, 32, 28, 28, device="cuda")

    def step(x):
        return m(x).square().mean()

    with ghostops.use_backend("triton"):
        eager = step(x)
        eager_grads = torch.autograd.grad(eager, list(m.parameters()))
        loss = torch.compile(step, fullgraph=True)(x)
        grads = torch.autograd.grad(loss, list(m.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-4)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def _op_args(case):
    x, p = make_args(case)
    x, p = x.to(DEVICE), [t.to(DEVICE) for t in p]
    fwd = (x, p[0], p[1], p[2], 1e-5, p[5], p[6], p[7], 1e-5, case.oup, case.stride,
           "relu" if case.relu else "identity")  # fmt: skip
    y, z1, m1, v1, m2, v2 = torch.ops.ghostops.ghost_forward_train_triton(*fwd)
    bwd = (torch.randn_like(y), x, z1, p[0], p[1], p[2], m1, v1, 1e-5, p[5], p[6], p[7], m2, v2,
           1e-5, case.stride, fwd[-1])  # fmt: skip
    return fwd, bwd


@pytest.mark.parametrize("mask", [[True, False], [False, True], [False, False]], ids=str)
def test_training_backward_computes_only_what_is_asked(mask):
    _, bwd = _op_args(Case(6, 10, 9, 11, stride=2))
    full = torch.ops.ghostops.ghost_backward_triton(*bwd, [True, True])
    part = torch.ops.ghostops.ghost_backward_triton(*bwd, mask)
    for i in (0, 1):
        if mask[i]:
            torch.testing.assert_close(part[i], full[i])
        else:
            assert part[i].numel() == 0
    for a, b in zip(full[2:], part[2:]):
        torch.testing.assert_close(a, b)


def test_training_ops_reject_inconsistent_arguments():
    fwd, bwd = _op_args(Case(6, 10, 5, 5))
    with pytest.raises(RuntimeError, match="oup=12 does not match 5 intrinsic channels"):
        torch.ops.ghostops.ghost_forward_train_triton(*fwd[:9], 12, *fwd[10:])
    with pytest.raises(RuntimeError, match="bn2_bias must be a vector of 5"):
        torch.ops.ghostops.ghost_forward_train_triton(*fwd[:7], fwd[7][:4], *fwd[8:])
    with pytest.raises(RuntimeError, match="grad_y must be"):
        torch.ops.ghostops.ghost_backward_triton(bwd[0][:, :, :4], *bwd[1:], [True, True])


def test_training_output_may_be_modified_in_place():
    """The backward reads z1, never y: GhostNet's residual ``y += shortcut`` is safe."""
    case = Case(6, 10, 9, 11)
    x, params = make_args(case)
    x, params = x.to(DEVICE), [t.to(DEVICE) for t in params]
    _, grads, _ = train_step(case, x, params, "triton")
    w = params[0].detach().clone().requires_grad_()
    with ghostops.use_backend("triton"):
        y = ghostops.ghost_module(x, w, *params[1:5], params[5], *params[6:10], oup=case.oup,
                                  training=True)  # fmt: skip
    ramp = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    y.add_(7.0)
    (gw,) = torch.autograd.grad(y, [w], ramp.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(gw, grads[1])


def test_opcheck_training_ops():
    """Schemas and autograd registration everywhere; on a GPU also the fake (meta) kernels and
    AOT dispatch (under TRITON_INTERPRET=1 the interpreter runs even on fake tensors)."""
    fwd, bwd = _op_args(Case(5, 7, 6, 5, relu=False))
    utils = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.ghostops.ghost_forward_train_triton.default, fwd, **kwargs)
    torch.library.opcheck(
        torch.ops.ghostops.ghost_backward_triton.default, (*bwd, [True, True]), **kwargs
    )


def test_training_float64_runs_the_reference():
    """The Triton kernels compute in float32: float64 stays on the exact reference."""
    m = ghostops.GhostModule(6, 10).to(DEVICE, torch.float64).train()
    with ghostops.use_backend("triton"):
        y = m(torch.randn(2, 6, 5, 7, device=DEVICE, dtype=torch.float64))
    assert "triton" not in y.grad_fn.name()


# --------------------------------------------------------------------------------------------
# The training kernels' per-channel reductions of per-tile rows (triton_train._reduce_rows):
# read directly, and in float64 chunks past REDUCE_ITERS row blocks (the 1500- and 300-row
# tables), over one and several blocks of columns.

REDUCE_SHAPES = [(7, 3), (1500, 5), (300, 40), (2, 70)]


def _reduce(finish, a, b, *args, **kwargs):
    """triton_train._reduce_rows on DEVICE copies; outputs (args that are tensors) poisoned
    with NaN beforehand, returned in float64 on the CPU."""
    from ghostops.backends import triton_train

    dev = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in args]
    outs = [t for t, src in zip(dev, args) if isinstance(src, torch.Tensor) and src.isnan().all()]
    triton_train._reduce_rows(finish, a.to(DEVICE), None if b is None else b.to(DEVICE), *dev,
                              **kwargs)  # fmt: skip
    return [o.cpu().double() for o in outs]


def _nan(*shape):
    return torch.full(shape, float("nan"))


@pytest.mark.parametrize("rows, C", REDUCE_SHAPES, ids=str)
def test_batch_statistics_from_tile_moments(rows, C):
    """_bn_stats_kernel: the batch mean and biased variance of per-tile (mean, M2) rows (tiles
    of 64 values, the last one partial) against their float64 combination (Chan et al.), with
    tile means near 1000 and a variance near 0.3, where float32 raw moments would cancel; and
    BN's scale and shift from them."""
    from ghostops.backends import triton_train

    tile = 64
    n_pix = (rows - 1) * tile + 23
    counts = torch.full((rows, 1), float(tile), dtype=torch.float64)
    counts[-1] = 23
    mean_t = (1000 + 0.2 * torch.randn(rows, C)).float()
    m2_t = (torch.rand(rows, C) * 0.5 * counts).float()
    mu = (mean_t.double() * counts).sum(0) / n_pix
    var = (m2_t.double().sum(0) + (counts * (mean_t.double() - mu) ** 2).sum(0)) / n_pix
    g, b = torch.rand(C) + 0.5, torch.randn(C)
    outs = [_nan(C) for _ in range(4)]  # mean, var, scale, shift
    mean, v, sc, sh = _reduce(
        triton_train._bn_stats_kernel, mean_t, m2_t, g, b, 1e-3, *outs, n_pix=n_pix, tile=tile
    )
    torch.testing.assert_close(mean, mu, rtol=1e-6, atol=0)
    torch.testing.assert_close(v, var, rtol=1e-5, atol=0)
    torch.testing.assert_close(sc, g.double() / torch.sqrt(v + 1e-3), rtol=1e-6, atol=0)
    torch.testing.assert_close(sh, b.double() - mean * sc, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, C", REDUCE_SHAPES, ids=str)
def test_batchnorm_gradient_terms_from_tile_sums(rows, C):
    """_bn_grad_kernel: dbeta, dgamma (column sums of per-tile sums) and (gamma invstd,
    dbeta / M, dgamma / M); _column_sum_kernel: a plain column sum."""
    from ghostops.backends import triton_train

    ga, gx = torch.randn(rows, C), torch.randn(rows, C)
    g, invstd, M = torch.randn(C), torch.rand(C) + 0.1, 1000 * rows
    db, dg, coef = _reduce(triton_train._bn_grad_kernel, ga, gx, g, invstd, _nan(C), _nan(C),
                           _nan(3, C), n_pix=M)  # fmt: skip
    torch.testing.assert_close(db, ga.double().sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dg, gx.double().sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(coef[0], (g * invstd).double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(coef[1:], torch.stack([db, dg]) / M, rtol=1e-6, atol=0)
    (sums,) = _reduce(triton_train._column_sum_kernel, ga, None, _nan(C))
    torch.testing.assert_close(sums, ga.double().sum(0), rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compile_fullgraph_on_gpu():
    m = ghostops.GhostModule(32, 64).cuda().eval()
    x = torch.randn(8, 32, 28, 28, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-3, atol=1e-3)
