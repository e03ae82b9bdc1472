"""The CUDA C++ backend (csrc/cuda): the extension exposes its kernels when built with CUDA; on
a GPU, the eval kernel against the float64 reference (marked ``gpu``, skipped without one)."""

from __future__ import annotations

import pytest
import torch
from ghost_cases import Case, make_args, rel_err, run_fused, run_reference

import ghostops
from ghostops import _ext

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]


def test_cuda_kernels_are_registered_when_built_with_cuda():
    built = _ext.require().built_with_cuda()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "ghostops::ghost_forward_eval", "CUDA"
    )
    assert has_kernel == built
    if torch.version.cuda is None:
        assert not built


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
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])  # fmt: skip
@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="needs a GPU and the CUDA kernels")
def test_cuda_eval_matches_reference(case, dtype):
    x, params = make_args(case, torch.float32)
    x, params = x.cuda().to(dtype), [t.cuda().to(dtype) for t in params]
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = run_fused(case, x, params)
    ref = run_reference(case, x.cpu().float(), [t.cpu().float() for t in params])
    assert y.shape == ref.shape and y.dtype == dtype and y.is_cuda
    assert rel_err(y.cpu(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


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
