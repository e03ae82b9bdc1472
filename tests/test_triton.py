"""The Triton backend (ghostops/backends/triton_kernels.py): eval forward against the float64
reference. Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in
conftest.py), on small shapes; the same tests run at real sizes on a GPU (marked ``gpu``)."""

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


def test_training_under_triton_backend_runs_the_reference():
    """No Triton training kernels yet: forcing the backend must still give the exact answer."""
    torch.manual_seed(0)
    m = ghostops.GhostModule(6, 10).to(DEVICE).train()
    x = torch.randn(2, 6, 5, 7, device=DEVICE, requires_grad=True)
    with ghostops.use_backend("triton"):
        y = m(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compile_fullgraph_on_gpu():
    m = ghostops.GhostModule(32, 64).cuda().eval()
    x = torch.randn(8, 32, 28, 28, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-3, atol=1e-3)
