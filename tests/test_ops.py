"""The fused eval op (ghostops::ghost_forward_eval, C++ CPU kernel) against the float64
reference, plus opcheck, torch.compile, backend choice and argument errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from ghost_cases import (
    Case,
    make_args,
    ops_run,
    rel_err,
    run_fused,
    run_reference,
    strided_views,
)

import ghostops
from ghostops import _ext
from ghostops.reference import ReferenceGhostModule

pytestmark = [
    pytest.mark.skipif(not _ext.cpu_available(), reason="the compiled extension is not built"),
    pytest.mark.usefixtures("poisoned_outputs"),
]
SHAPES_FILE = Path(__file__).resolve().parents[2] / "shared" / "ghostnet_module_shapes.json"


def ghostnet_cases() -> list[Case]:
    """The unique GhostNet-1.0x module shapes, spatial size reduced to keep the suite fast."""
    shapes = json.loads(SHAPES_FILE.read_text())["widths"]["1.0"]
    unique = dict.fromkeys(tuple(s) for s in shapes)
    return [Case(i, o, min(h, 29), min(w, 23), batch=2, relu=r) for i, o, h, w, r in unique]


EDGE_CASES = [
    Case(5, 7, 9, 11, ratio=2),  # odd oup: the last ghost channel is never computed
    Case(6, 10, 13, 5, ratio=3, dw_size=5),
    Case(4, 9, 6, 7, ratio=4, dw_size=7, relu=False),
    Case(3, 8, 1, 1),  # 1x1 maps
    Case(3, 8, 1, 1, dw_size=7),
    Case(8, 12, 1, 9, dw_size=5),  # one row
    Case(8, 12, 9, 1, dw_size=5),  # one column
    Case(7, 9, 15, 17, stride=2),
    Case(7, 9, 16, 16, stride=2, dw_size=1),
    Case(12, 11, 10, 9, stride=3, ratio=3),
    Case(16, 16, 11, 13, batch=1),
    Case(1, 2, 5, 5),  # one input channel, one intrinsic channel
    Case(40, 60, 7, 7, batch=17),  # whole small images grouped per task, odd batch
    Case(20, 24, 3, 4, batch=33, relu=False),
    Case(64, 64, 70, 20, batch=1),  # several bands per image: halo rows shared
    Case(9, 17, 2, 3, batch=5, ratio=5, dw_size=3),
    Case(10, 20, 12, 12, batch=0),  # empty batch
    # Outputs of 8 MiB and more are written with non-temporal stores (float32): whole images,
    # then bands of 37 rows whose starts are not 64-byte aligned.
    Case(16, 48, 112, 112, batch=4),
    Case(8, 120, 112, 56, batch=3),
]
LAYOUT_CASES = [
    dataclass_replace
    for base in (Case(6, 10, 9, 11), Case(7, 9, 15, 17, stride=2), Case(40, 60, 7, 7, batch=9))
    for dataclass_replace in (
        Case(**{**base.__dict__, "channels_last": True}),
        Case(**{**base.__dict__, "strided_input": True}),
        Case(**{**base.__dict__, "channels_last": True, "dw_size": 5, "ratio": 3}),
    )
]
ALL_CASES = ghostnet_cases() + EDGE_CASES + LAYOUT_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_eval_matches_reference(case, dtype):
    x, params = make_args(case, dtype, seed=hash(str(case)) % 1000)
    out = run_fused(case, x, params)
    ref = run_reference(case, x, params)
    assert out.shape == ref.shape and out.dtype == dtype
    if ref.numel() == 0:
        return
    assert not out.isnan().any(), "the kernel left elements unwritten"
    assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize(
    "case",
    [Case(6, 10, 9, 11, channels_last=True), Case(6, 10, 9, 11),
     Case(16, 48, 112, 112, batch=4, channels_last=True)],  # the last from the output pool
    ids=str,
)  # fmt: skip
def test_output_follows_input_memory_format(case):
    x, params = make_args(case)
    out = run_fused(case, x, params)
    want = torch.channels_last if case.channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=want)


def test_large_outputs_reuse_the_pools_freed_blocks():
    """Outputs of 4 MiB and more come from csrc/cpu/output_pool: a freed one's block serves
    the next call of that size, which still gets the right answer."""
    case = Case(16, 48, 112, 112, batch=4)  # a 9.6 MB output
    x, params = make_args(case)
    want = run_reference(case, x, params)
    first = run_fused(case, x, params)
    block, nbytes = first.data_ptr(), first.untyped_storage().nbytes()
    del first
    assert _ext.require().output_pool_cached_bytes() >= nbytes
    again = run_fused(case, x, params)
    assert again.data_ptr() == block
    assert rel_err(again, want) < 1e-5
    again.resize_(2 * again.numel())  # the storage stays an ordinary, resizable one
    small = run_fused(Case(6, 10, 9, 11), *make_args(Case(6, 10, 9, 11)))
    assert small.untyped_storage().nbytes() < 4 << 20  # small outputs: at::empty


def test_output_pool_limit_zero_frees_and_disables_it():
    case = Case(16, 48, 112, 112, batch=4)
    x, params = make_args(case)
    try:
        run_fused(case, x, params)
        _ext.require().set_output_pool_limit(0)
        assert _ext.require().output_pool_cached_bytes() == 0
        run_fused(case, x, params)  # freed at once, not kept
        assert _ext.require().output_pool_cached_bytes() == 0
        assert rel_err(run_fused(case, x, params), run_reference(case, x, params)) < 1e-5
    finally:
        _ext.require().set_output_pool_limit(1024 << 20)


@pytest.mark.parametrize(
    "case",
    [Case(20, 60, 9, 7, batch=1, ratio=3),  # blocks of 10 intrinsic channels
     Case(6, 45, 7, 7, batch=1),  # odd oup: the last block's last ghost is past oup
     Case(40, 80, 14, 14, batch=2, relu=False),
     Case(40, 80, 7, 7, batch=1, channels_last=True, dw_size=5)],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("threads", [2, 3])
def test_small_maps_with_fewer_images_than_threads_split_channels(case, threads):
    """Fewer images than threads on a map of at most 256 pixels: each task computes a block of
    intrinsic channels (and their ghosts) of a whole image instead of a band of rows."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, params = make_args(case, torch.float64)
        assert rel_err(run_fused(case, x, params), run_reference(case, x, params)) < 1e-12
    finally:
        torch.set_num_threads(previous)


def test_no_input_channels_give_the_folded_bias():
    """inp == 0: the primary conv is all bias (BN1's shift); nothing divides by the width."""
    case = Case(0, 6, 8, 8, batch=1)
    x, params = make_args(case, torch.float64)
    # The same as one input channel of zeros (the reference's conv rejects zero channels).
    one = Case(1, 6, 8, 8, batch=1)
    zeros = (torch.zeros(1, 1, 8, 8, dtype=x.dtype), torch.zeros(3, 1, 1, 1, dtype=x.dtype))
    want = run_reference(one, zeros[0], (zeros[1], *params[1:]))
    assert rel_err(run_fused(case, x, params), want) < 1e-12


def test_eps_is_honoured():
    case = Case(6, 10, 5, 5)
    x, params = make_args(case, torch.float64)
    out = run_fused(case, x, params, eps=0.3)
    assert rel_err(out, run_reference(case, x, params, eps=0.3)) < 1e-12
    assert rel_err(out, run_reference(case, x, params, eps=1e-5)) > 1e-3


@pytest.mark.parametrize("case", [Case(6, 10, 9, 11), Case(5, 11, 7, 6, ratio=3, dw_size=5)],
                         ids=str)  # fmt: skip
def test_strided_weights_and_statistics(case):
    x, params = make_args(case, torch.float64)
    views = strided_views(params)
    assert not any(v.is_contiguous() for v in views if v.numel() > 1 and v.dim() == 1)
    assert rel_err(run_fused(case, x, views), run_reference(case, x, params)) < 1e-12


@pytest.mark.parametrize("case", [Case(6, 10, 9, 11), Case(5, 7, 4, 6, stride=2, ratio=3,
                                  channels_last=True)], ids=str)  # fmt: skip
def test_opcheck(case):
    x, params = make_args(case)
    p = params
    args = (x, p[0], p[1], p[2], p[3], p[4], 1e-5, p[5], p[6], p[7], p[8], p[9], 1e-5,
            case.oup, case.stride, "relu")  # fmt: skip
    torch.library.opcheck(torch.ops.ghostops.ghost_forward_eval.default, args)


def _module_pair(inp, oup, **kw):
    ref = ReferenceGhostModule(inp, oup, **kw)
    with torch.no_grad():
        for bn in (ref.primary_conv[1], ref.cheap_operation[1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
    ours = ghostops.GhostModule(inp, oup, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def test_module_eval_uses_fused_kernel_and_matches():
    ref, ours = _module_pair(12, 20, dw_size=5, ratio=3)
    x = torch.randn(3, 12, 10, 9)
    with torch.no_grad():
        with torch.autograd.profiler.profile() as prof:
            out = ours(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    assert any("ghostops::ghost_forward_eval" in e.name for e in prof.function_events)


def test_module_eval_fast_path_leaves_what_it_cannot_run_to_the_full_path():
    """GhostModule's inference path (``ghost_module_eval_cpu``: plain submodules, one eps, the
    kernel's checks) hands back every other case, each still exact or a clear error."""
    x = torch.randn(2, 8, 6, 7)
    ref, ours = _module_pair(8, 12)
    ours.cheap_operation[1].eps = ref.cheap_operation[1].eps = 0.25  # two eps: paper's forward
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert "ghostops::ghost_forward_eval" not in ops_run(ours, x)

    ref, ours = _module_pair(8, 12)
    for m in (ref, ours):  # old-style weight_norm: a pre-hook recomputes the weight per call
        torch.nn.utils.weight_norm(m.primary_conv[0])
        with torch.no_grad():
            m.primary_conv[0].weight_g.mul_(1.5)  # so a stale weight would show
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)

    ref, ours = _module_pair(8, 12)  # hooks on a submodule fire: it runs
    seen = []
    ours.cheap_operation[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert seen == [(2, 6, 6, 7)]

    ref, ours = _module_pair(8, 12)  # as do global module hooks
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    try:
        with torch.no_grad():
            ours(x)
    finally:
        handle.remove()
    assert "Conv2d" in seen and "BatchNorm2d" in seen

    with ghostops.use_backend("reference"):
        assert "ghostops::ghost_forward_eval" not in ops_run(ours, x)
    assert "ghostops::ghost_forward_eval" in ops_run(ours, x)
    with torch.no_grad(), pytest.raises(TypeError, match="dtype"):
        ours(x.double())


@pytest.mark.parametrize("init", [1, 6])
def test_expanded_primary_weight(init):
    """Rows of stride 0 are packed, not read in place (lda 0 would read as a packed weight)."""
    case = Case(12, 2 * init, 5, 7)
    x, params = make_args(case, torch.float64)
    pw = torch.randn(1, 12, 1, 1, dtype=torch.float64).expand(init, 12, 1, 1)
    params = (pw, *params[1:])
    out = run_fused(case, x, params)
    assert rel_err(out, run_reference(case, x, params)) < 1e-12


def test_module_with_grad_enabled_stays_differentiable():
    ref, ours = _module_pair(6, 8)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    out = ours(x)
    out.sum().backward()
    assert x.grad is not None and ours.primary_conv[0].weight.grad is not None
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)


def test_compile_module_fullgraph():
    _, ours = _module_pair(16, 24)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        compiled = torch.compile(ours, fullgraph=True)
        torch.testing.assert_close(compiled(x), ours(x))


def test_compile_ghostnet_fullgraph():
    torch.manual_seed(0)
    net = ghostops.models.ghostnet(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        compiled = torch.compile(net, fullgraph=True)
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)
    # The compiled graph calls the fused ops, those outside the Ghost modules included.
    ran = ops_run(compiled, x)
    for op in ("ghost_forward_eval", "dw_bn_eval", "se_eval", "pw_bn_eval", "conv_bn_eval",
               "linear_eval"):  # fmt: skip
        assert f"ghostops::{op}" in ran


def test_export_ghostnet():
    """torch.export (the front end of AOTInductor, see bench/competitors.py) keeps every fused
    op in the exported graph, and the exported program computes the network's output."""
    torch.manual_seed(0)
    net = ghostops.models.ghostnet(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(net, (x,))
        torch.testing.assert_close(program.module()(x), net(x), rtol=1e-4, atol=1e-4)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    for op in ("ghost_forward_eval", "dw_bn_eval", "se_eval", "pw_bn_eval", "conv_bn_eval",
               "linear_eval"):  # fmt: skip
        assert f"ghostops.{op}.default" in targets


# --- backend choice -------------------------------------------------------------------------


def test_backend_context_manager_and_env(monkeypatch):
    from ghostops.backends import select_backend

    assert select_backend("cpu") == "cpu"
    with ghostops.use_backend("reference"):
        assert select_backend("cpu") == "reference"
        with ghostops.use_backend("cpu"):
            assert select_backend("cpu") == "cpu"
    monkeypatch.setenv("GHOSTOPS_BACKEND", "reference")
    assert select_backend("cpu") == "reference"
    monkeypatch.setenv("GHOSTOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GHOSTOPS_BACKEND"):
        select_backend("cpu")
    with pytest.raises(ValueError, match="unknown ghostops backend"):
        with ghostops.use_backend("fast"):
            pass


def test_reference_backend_gives_the_same_answer():
    ref, ours = _module_pair(8, 12)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fused = ours(x)
        with ghostops.use_backend("reference"):
            torch.testing.assert_close(ours(x), fused, rtol=1e-5, atol=1e-5)


def test_unavailable_gpu_backend_is_a_clear_error():
    if "cuda" in ghostops.available_backends():
        pytest.skip("the CUDA C++ kernels are built and a GPU is present")
    _, ours = _module_pair(8, 12)
    with ghostops.use_backend("cuda"), pytest.raises(RuntimeError, match="not available"):
        ours(torch.randn(1, 8, 4, 4))


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (None, "ImportError: no _C"))
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        _ext.require()
    with ghostops.use_backend("cpu"), pytest.raises(RuntimeError, match="missing"):
        ghostops.backends.select_backend("cpu")


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    m = ghostops.GhostModule(8, 12).eval()
    with pytest.raises(ValueError, match=r"8 channels \(inp\), got 5"):
        m(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(8, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(1, 8, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 8, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="on meta"):
        m(torch.randn(1, 8, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="ratio must be >= 2"):
        ghostops.GhostModule(8, 12, ratio=1)
    with pytest.raises(ValueError, match="dw_size must be odd"):
        ghostops.GhostModule(8, 12, dw_size=4)


def test_op_checks_its_arguments():
    case = Case(6, 10, 5, 5)
    x, p = make_args(case)
    with pytest.raises(RuntimeError, match="oup=11 does not match"):
        run_fused(Case(6, 11, 5, 5), x, p)
    with pytest.raises(RuntimeError, match="bn2_var must have shape"):
        run_fused(case, x, (*p[:9], p[9][:-1]))
    with pytest.raises(RuntimeError, match="x has 5 channels"):
        run_fused(case, x[:, :5], p)
    with pytest.raises(RuntimeError, match="act must be 'relu' or 'identity'"):
        torch.ops.ghostops.ghost_forward_eval(
            x, p[0], p[1], p[2], p[3], p[4], 1e-5, p[5], p[6], p[7], p[8], p[9], 1e-5, 10, 1,
            "gelu",
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="float32 or float64"):
        run_fused(case, x.half(), tuple(t.half() for t in p))


# --- modules (training mode and BatchNorm semantics: test_train.py) ---


def test_state_dict_has_the_papers_keys():
    keys = set(ghostops.GhostModule(8, 12).state_dict())
    assert keys == set(ReferenceGhostModule(8, 12).state_dict())
    assert {"primary_conv.0.weight", "cheap_operation.1.num_batches_tracked"} <= keys


@pytest.mark.parametrize("kernel_size", [3])
def test_primary_kernel_larger_than_one_runs_the_reference(kernel_size):
    ref, ours = _module_pair(6, 10, kernel_size=kernel_size, stride=2)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_sample_of_configs_all_dims():
    """A sweep over ratio x dw_size x stride x relu on one odd shape, float64."""
    for ratio, d, s, relu in itertools.product([2, 3], [1, 3, 5, 7], [1, 2], [True, False]):
        case = Case(5, 11, 8, 7, batch=3, ratio=ratio, dw_size=d, stride=s, relu=relu)
        x, params = make_args(case, torch.float64, seed=ratio * 100 + d * 10 + s)
        out = run_fused(case, x, params)
        assert rel_err(out, run_reference(case, x, params)) < 1e-12, str(case)
