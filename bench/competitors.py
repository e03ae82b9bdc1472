"""The other ways to run GhostNet fast, timed beside eager ghostops by fused_vs_ref.py:
``torch.compile`` (Inductor), AOTInductor on a ``torch.export`` (both for the reference and for
ghostops' network), and ONNX Runtime on an ONNX export of the reference. Each returns a callable
``x -> y`` or raises ``Unavailable`` with the reason (ONNX Runtime and the exporter's onnx
package are optional dependencies: ``pip install onnxruntime onnx``), so the benchmark can
report a skip instead of failing.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn


class Unavailable(RuntimeError):
    """This way of running the model cannot run here; the message says why."""


def compiled(model: nn.Module, example: torch.Tensor) -> tuple[Callable, float]:
    """``torch.compile(model, dynamic=False)`` (default mode), compiled for ``example``'s shape
    by a first call under no_grad; returns the compiled module and the seconds the first call
    took. Static shapes: each batch size gets its own graph, not a dynamic-batch one compiled
    after the first shape change.

    Dynamo's caches are reset first: its recompile limit (8 per code object) would otherwise
    have the benchmark's ninth module shape run eager under the compiled name, silently (a new
    module of the same class is a recompile of the same ``forward``); hitting the limit is made
    an error for the same reason."""
    torch._dynamo.reset()
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    fn = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        fn(example)
    return fn, time.perf_counter() - start


def onnxruntime_runner(
    model: nn.Module, example: torch.Tensor, threads: int
) -> tuple[Callable, float]:
    """The model exported to ONNX (TorchScript exporter, batch dimension dynamic) and run by an
    ONNX Runtime CPU session with ``threads`` intra-op threads; returns a callable on torch
    tensors and the seconds the export and session creation took."""
    try:
        import onnxruntime
    except ImportError as e:
        raise Unavailable("onnxruntime is not installed (pip install onnxruntime onnx)") from e
    if example.device.type != "cpu":
        raise Unavailable("the ONNX Runtime comparison runs on the CPU only")
    start = time.perf_counter()
    buffer = io.BytesIO()
    # torch's TorchScript exporter (it needs the onnx package); torch deprecates it in favour
    # of the torch.export-based one, which needs onnxscript as well.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
        except Exception as e:  # onnx missing, or an exporter this torch no longer has
            raise Unavailable(f"torch.onnx.export failed: {e}") from e
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(
        buffer.getvalue(), options, providers=["CPUExecutionProvider"]
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        (y,) = session.run(None, {"x": x.detach().numpy()})
        return torch.from_numpy(y)

    return run, time.perf_counter() - start


def aot_inductor(model: nn.Module, example: torch.Tensor) -> tuple[Callable, float]:
    """``torch.export`` of the model for ``example``'s shape, compiled ahead of time by
    AOTInductor into a package (generated C++ and its wrapper: no Python and no guards at run
    time) and loaded; returns the runner and the seconds export, compile and load took. Custom
    ops (ghostops') are called through the dispatcher from the compiled code."""
    import tempfile

    start = time.perf_counter()
    directory = tempfile.TemporaryDirectory(prefix="ghostops-aoti-")
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,))
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=f"{directory.name}/model.pt2"
            )
            runner = torch._inductor.aoti_load_package(path)
    except Exception as e:  # an exporter or compiler this torch lacks, an unsupported op
        directory.cleanup()
        raise Unavailable(f"torch.export / AOTInductor failed: {e}") from e

    def run(x: torch.Tensor) -> torch.Tensor:
        return runner(x)

    run.package_directory = directory  # removed with the runner
    return run, time.perf_counter() - start
