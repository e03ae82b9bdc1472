"""Backend choice for the fused Ghost module ops.

``reference``: the unfused PyTorch definition (ghostops/reference.py), any device.
``cpu``: the fused C++ kernels of the compiled extension (csrc/cpu), CPU tensors.
``triton`` / ``cuda``: the GPU kernels (Triton, CUDA C++), CUDA tensors; ``triton`` also runs
CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter: how its kernels are tested
without a GPU).

The choice, first match wins: the innermost ``use_backend(...)`` context, the environment
variable ``GHOSTOPS_BACKEND``, then by device: CPU tensors go to ``cpu``, CUDA tensors to
``triton``, else ``cuda``, else ``reference``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from ghostops import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
_ENV = "GHOSTOPS_BACKEND"
_local = threading.local()


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown ghostops backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (thread-local, nests)."""
    _check_name(name, "use_backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``GHOSTOPS_BACKEND``, or None."""
    stack = _local.__dict__.get("stack")
    if stack:
        return stack[-1]
    env = os.environ.get(_ENV)
    return _check_name(env, _ENV) if env else None


def available_backends() -> list[str]:
    """Backends that can run on this machine, as built."""
    names = ["reference"]
    if _ext.cpu_available():
        names.append("cpu")
    if _ext.triton_available():
        names.append("triton")
    if _ext.cuda_available():
        names.append("cuda")
    return names


_warned_fallback = False


@torch.compiler.assume_constant_result
def select_backend(device_type: str) -> str:
    """The backend that will run a Ghost module on tensors of ``device_type``.

    Under torch.compile the choice is made once, at trace time, and baked into the graph."""
    forced = forced_backend()
    if forced == "cpu" and not _ext.cpu_available():
        _ext.require()  # raises, saying how to build
    if forced in ("triton", "cuda") and forced not in available_backends():
        raise RuntimeError(
            f"ghostops: the {forced!r} backend was asked for but is not available here "
            f"(available: {available_backends()})"
        )
    if forced is not None:
        return _prepared(forced)
    if device_type == "cpu":
        if _ext.cpu_available():
            return "cpu"
        _warn_fallback("the compiled CPU extension is missing: " + _ext.cpu_load_error())
        return "reference"
    if device_type == "cuda":
        if _ext.triton_available():
            return _prepared("triton")
        if _ext.cuda_available():
            return "cuda"
        _warn_fallback("no GPU backend (Triton or the CUDA extension) is available")
        return "reference"
    return "reference"


def _prepared(name: str) -> str:
    """``name``, with its ops registered: the Triton kernels' module registers its ops when
    imported (it imports triton, so only on first use)."""
    if name == "triton":
        import ghostops.backends.triton_kernels  # noqa: F401
        import ghostops.backends.triton_train  # noqa: F401
    return name


def _warn_fallback(why: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"ghostops runs the unfused reference: {why}", RuntimeWarning, stacklevel=3)
