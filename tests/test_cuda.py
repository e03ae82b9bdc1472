"""The CUDA C++ backend (csrc/cuda): the extension exposes its kernels when built with CUDA; on
a GPU, the eval kernel and the training forward and backward against the float64 reference
(marked ``gpu``, skipped without one; the training cases are the Triton backend's, from
ghost_cases.py)."""

from __future__ import annotations

import pytest
import torch
from ghost_cases import (
    GPU_TRAIN_CASES,
    Case,
    check_training,
    make_args,
    rel_err,
    run_fused,
    run_reference,
)

import ghostops
from ghostops import _ext

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]


@pytest.mark.parametrize("op", ["ghost_forward_eval", "ghost_forward_train", "ghost_backward"])
def test_cuda_kernels_are_registered_when_built_with_cuda(op):
    built = _ext.require().built_with_cuda()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"ghostops::{op}", "CUDA")
    assert has_kernel == built
    if torch.version.cuda is None:
        assert not built


@pytest.mark.skipif(
    not _ext.cpu_available() or not _ext.require().built_with_cuda(),
    reason="the extension was built without the CUDA kernels",
)
def test_cuda_kernels_compile_for_sm90_without_spills():
    """Every CUDA kernel instantiation (tests/cuda_resource_usage.py: nvcc for sm_90, ptxas's
    resource report, no GPU needed) compiles, spills no register and keeps its shared memory
    within the 48 KB a block gets without opting in; every kernel of the three ops is there,
    for float / half / bfloat16 only (float64 is refused, not run in float; only the
    reductions read float64, their own chunk sums); the half and bfloat16 primary GEMMs have
    tensor-core instructions."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("cuda_resource_usage.py")
    run = subprocess.run([sys.executable, str(script), "--arch", "90"], capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines and all(line.startswith("ok    sm_90 ") for line in lines), run.stdout
    names = {re.search(r"::(\w+)[<(]", line.split("; ", 1)[1]).group(1) for line in lines}
    assert names == {"fold_kernel", "one_pass_kernel", "primary_kernel", "cheap_kernel",
                     "cheap_run_kernel", "f1_primary", "f2_cheap", "f3_affine_act",
                     "b1_ghost_sums", "b2_dz2", "b3_dx1", "b4_dz1", "bn_affine_kernel",
                     "chunk_sums_kernel", "finish_kernel"}  # fmt: skip
    # (bn_reduce.cuh's finishing kernels read float64 chunk sums: no input is float64)
    assert not any("<double" in line for line in lines if "finish_kernel<" not in line)
    smem = [int(re.search(r"smem (\d+) B", line).group(1)) for line in lines]
    assert max(smem) <= 48 * 1024, run.stdout
    # The primary GEMMs of half / bfloat16 run on the tensor cores, float's and the rest do not.
    gemms = ("one_pass_kernel<", "primary_kernel<", "f1_primary<")
    for line in lines:
        mma = int(re.search(r"mma (\d+);", line).group(1))
        half = any(f"{k}c10::Half" in line or f"{k}c10::BFloat16" in line for k in gemms)
        assert (mma > 0) == half, line


CASES = [
    Case(6, 10, 9, 11),
    Case(5, 7, 9, 11, relu=False),
    Case(6, 10, 13, 5, ratio=3, dw_size=5),
    Case(3, 8, 1, 1),
    Case(7, 9, 15, 17, stride=2),
    Case(40, 60, 7, 7, batch=17),
    Case(6, 10, 9, 11, channels_last=True),
    Case(7, 9, 15, 17, stride=2, strided_input=True),
    Case(160, 960, 7, 7, batch=32),
    Case(16, 48, 112, 112, batch=8),
    Case(4, 9, 6, 7, ratio=4, dw_size=7, relu=False),
    Case(20, 200, 19, 37, ratio=3, channels_last=True),  # several channel blocks and tiles
    Case(8, 12, 10, 9, dw_size=9),  # d 9: the two-kernel form whatever is forced
    # channels_last with C a multiple of 8: the GEMMs' 16-byte vector loads of x, K in several
    # tensor-core slices with a remainder (64 + 8; 32 + 32 + 8), odd oup, 2 channel blocks.
    Case(72, 57, 28, 28, batch=3, channels_last=True),
    Case(200, 80, 14, 14, batch=4, channels_last=True, relu=False),
    # d 1: both forms' cheap op with a 1-tap window.
    Case(8, 12, 1, 9, dw_size=1),
    Case(24, 40, 14, 30, dw_size=1, channels_last=True),
    # channels_last, C a multiple of 8: the GEMMs' 64- and 128-row tiles (init 100: one 128-row
    # tile, its last 28 rows empty; init 168: three 64-row tiles; init 240: two 128-row tiles).
    Case(64, 200, 9, 13, batch=3, channels_last=True),
    Case(48, 336, 7, 7, batch=5, channels_last=True, relu=False),
    Case(40, 480, 5, 5, batch=3, channels_last=True),
]


def check_eval(case: Case, dtype: torch.dtype) -> None:
    """The CUDA eval op on fresh random inputs in ``dtype`` against the float64 reference."""
    x, params = make_args(case, torch.float32)
    x, params = x.cuda().to(dtype), [t.cuda().to(dtype) for t in params]
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = run_fused(case, x, params)
    ref = run_reference(case, x.cpu().float(), [t.cpu().float() for t in params])
    assert y.shape == ref.shape and y.dtype == dtype and y.is_cuda
    assert rel_err(y.cpu(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])  # fmt: skip
@pytest.mark.parametrize("form", ["one_pass", "two_kernels"])
@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="needs a GPU and the CUDA kernels")
def test_cuda_eval_matches_reference(case, dtype, form, monkeypatch):
    monkeypatch.setenv("GHOSTOPS_CUDA_EVAL", form)
    check_eval(case, dtype)


@pytest.mark.parametrize("bn_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="needs a GPU and the CUDA kernels")
def test_cuda_eval_with_batchnorms_of_another_dtype(bn_dtype):
    """Half x and conv weights, BatchNorm vectors in float32 (as autocast leaves them: the fold
    kernel reads them as float) or bfloat16 (another dtype: converted to float first)."""
    case = Case(40, 120, 9, 13, batch=2, channels_last=True)
    x, params = make_args(case, torch.float32)
    x = x.cuda().half().contiguous(memory_format=torch.channels_last)
    params = [t.cuda().to(torch.half if t.dim() == 4 else bn_dtype) for t in params]
    y = run_fused(case, x, params)
    ref = run_reference(case, x.cpu().float(), [t.cpu().float() for t in params])
    assert y.dtype == torch.half and rel_err(y.cpu(), ref) < 1e-2


@pytest.mark.parametrize("rows", ["32", "64", "128"])
@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="needs a GPU and the CUDA kernels")
def test_cuda_gemm_rows_override_matches_reference(rows, monkeypatch):
    """Each height of the GEMM tile forced (GHOSTOPS_CUDA_GEMM_ROWS) on one shape, init 100 in
    4, 2 or 1 tiles: the two-kernel eval in float32 and float16 (tensor cores), and training
    (its first pass is the same GEMM)."""
    monkeypatch.setenv("GHOSTOPS_CUDA_GEMM_ROWS", rows)
    monkeypatch.setenv("GHOSTOPS_CUDA_EVAL", "two_kernels")
    case = Case(48, 200, 11, 13, batch=3, channels_last=True)
    for dtype in (torch.float32, torch.float16):
        check_eval(case, dtype)
    x, params = make_args(case, torch.float32)
    check_training(case, x, params, torch.float16, "cuda", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="needs a GPU and the CUDA kernels")
def test_cuda_backend_module():
    m = ghostops.GhostModule(32, 64).cuda().eval()
    x = torch.randn(4, 32, 14, 14, device="cuda")
    with torch.no_grad():
        with ghostops.use_backend("cuda"):
            y = m(x)
        with ghostops.use_backend("reference"):
            ref = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


needs_gpu = pytest.mark.skipif(not _ext.cuda_available(), reason="needs a GPU and the CUDA kernels")
TRAIN_PARAMS = [pytest.param(c, torch.float32, id=f"f32-{c}") for c in GPU_TRAIN_CASES] + [
    pytest.param(c, dt, id=f"{name}-{c}")
    for dt, name in ((torch.float16, "f16"), (torch.bfloat16, "bf16"))
    for c in GPU_TRAIN_CASES[:4]
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case, dtype", TRAIN_PARAMS)
def test_cuda_training_matches_reference(case, dtype):
    """Output, all seven gradients and the running statistics against the float64 reference."""
    x, params = make_args(case, torch.float32)
    check_training(case, x, params, dtype, "cuda", "cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "case",
    [Case(16, 48, 112, 112, batch=4), Case(80, 480, 14, 14, batch=16),
     Case(960, 160, 7, 7, batch=32, relu=False), Case(40, 120, 28, 28, batch=8,
     channels_last=True)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_cuda_training_matches_reference_at_real_sizes(case, dtype):
    x, params = make_args(case, torch.float32)
    check_training(case, x, params, dtype, "cuda", "cuda")


@pytest.mark.gpu
@needs_gpu
def test_cuda_training_module_with_float32_batchnorms_under_autocast():
    """GhostModule in training under torch.autocast(float16) on the CUDA backend: float16 convs
    with the float32 BatchNorm parameters and buffers, against the paper's module."""
    from ghostops.reference import ReferenceGhostModule

    torch.manual_seed(0)
    m = ghostops.GhostModule(32, 64).cuda().train()
    ref = ReferenceGhostModule(32, 64).cuda().train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(8, 32, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        with ghostops.use_backend("cuda"):
            y = m(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype == torch.float16
    assert y.grad_fn.name().startswith("GeneratedBackwardFor_ghostops_ghost_forward_train_")
    assert rel_err(y.float().cpu(), y_ref.double().cpu()) < 1e-2
    (g,) = torch.autograd.grad(y.float().square().sum(), [m.primary_conv[0].weight])
    (g_ref,) = torch.autograd.grad(y_ref.float().square().sum(), [ref.primary_conv[0].weight])
    assert g.dtype == torch.float32 and rel_err(g.cpu(), g_ref.double().cpu()) < 3e-2
    torch.testing.assert_close(m.primary_conv[1].running_mean, ref.primary_conv[1].running_mean,
                               rtol=1e-2, atol=1e-3)  # fmt: skip


@pytest.mark.gpu
@needs_gpu
def test_cuda_training_ops_reject_bad_input():
    case = Case(6, 10, 5, 5)
    x, p = make_args(case)
    x, p = x.cuda(), [t.cuda() for t in p]

    def forward(*changes):
        args = [x, p[0], p[1], p[2], 1e-5, p[5], p[6], p[7], 1e-5, 10, 1, "relu"]
        for i, value in changes:
            args[i] = value
        return torch.ops.ghostops.ghost_forward_train(*args)

    with pytest.raises(RuntimeError, match="oup=12 does not match 5 intrinsic channels"):
        forward((9, 12))
    with pytest.raises(RuntimeError, match="bn2_bias must have shape"):
        forward((7, p[7][:4]))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        forward((0, x.double()), (1, p[0].double()), (5, p[5].double()))
    y, z1, *stats = forward()
    gy = torch.randn_like(y)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        torch.ops.ghostops.ghost_backward(gy[:, :, :4], x, z1, p[0], p[1], p[2], stats[0],
                                          stats[1], 1e-5, p[5], p[6], p[7], stats[2], stats[3],
                                          1e-5, 1, "relu", [True, True])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_training_fake_matches_the_cuda_kernels_dtypes(dtype):
    """The fake (meta) implementation that torch.compile traces with says what the CUDA
    training kernels return: y in x's dtype, z1 and the statistics in float32 for half inputs
    (x's dtype for float32, as the CPU kernels)."""
    x = torch.empty(2, 6, 5, 5, device="meta", dtype=dtype)
    w1 = torch.empty(5, 6, 1, 1, device="meta", dtype=dtype)
    w2 = torch.empty(5, 1, 3, 3, device="meta", dtype=dtype)
    vec = torch.empty(5, device="meta")
    y, z1, *stats = torch.ops.ghostops.ghost_forward_train(
        x, w1, vec, vec, 1e-5, w2, vec, vec, 1e-5, 10, 1, "relu"
    )
    assert y.dtype == dtype and y.shape == (2, 10, 5, 5)
    assert z1.dtype == torch.float32 and z1.shape == (2, 5, 5, 5)
    assert [s.dtype for s in stats] == [torch.float32] * 4


@pytest.mark.gpu
@needs_gpu
def test_cuda_eval_form_override_is_checked(monkeypatch):
    case = Case(6, 10, 5, 5)
    x, p = make_args(case)
    monkeypatch.setenv("GHOSTOPS_CUDA_EVAL", "fast")
    with pytest.raises(RuntimeError, match="GHOSTOPS_CUDA_EVAL='fast'"):
        run_fused(case, x.cuda(), [t.cuda() for t in p])
    monkeypatch.setenv("GHOSTOPS_CUDA_EVAL", "two_kernels")
    monkeypatch.setenv("GHOSTOPS_CUDA_GEMM_ROWS", "96")
    with pytest.raises(RuntimeError, match="GHOSTOPS_CUDA_GEMM_ROWS='96'"):
        run_fused(case, x.cuda(), [t.cuda() for t in p])


@pytest.mark.gpu
@needs_gpu
def test_cuda_eval_op_refuses_float64():
    """The kernels compute in float: a float64 call is an error, not a silently float answer
    (GhostModule sends float64 to the reference before it gets here)."""
    case = Case(6, 10, 5, 5)
    x, p = make_args(case)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 on the GPU"):
        run_fused(case, x.cuda().double(), [t.cuda().double() for t in p])
