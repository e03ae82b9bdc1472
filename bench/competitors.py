"""The other ways to run the reference GhostNet fast, timed beside ghostops by fused_vs_ref.py:
``torch.compile`` (Inductor) and ONNX Runtime on an ONNX export. Each returns a callable
``x -> y`` or raises ``Unavailable`` with the reason (ONNX Runtime is an optional dependency:
``pip install onnxruntime``), so the benchmark can report a skip instead of failing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import torch
from torch import nn


class Unavailable(RuntimeError):
    """This way of running the model cannot run here; the message says why."""


def compiled(model: nn.Module, example: torch.Tensor) -> tuple[Callable, float]:
    """``torch.compile(model)`` (default mode), compiled for ``example``'s shape by a first
    call under no_grad; returns the compiled module and the seconds the first call took."""
    fn = torch.compile(model)
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
        raise Unavailable("onnxruntime is not installed (pip install onnxruntime)") from e
    if example.device.type != "cpu":
        raise Unavailable("the ONNX Runtime comparison runs on the CPU only")
    start = time.perf_counter()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
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
