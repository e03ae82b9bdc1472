"""Loading of the compiled extension ``ghostops._C`` (csrc/), once, on first need.

Importing ``ghostops`` never fails for want of a build: the first fused call says how to build.
"""

from __future__ import annotations

import functools
import importlib

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(it must be built against the torch that imports it)"
)


@functools.cache
def _load():
    """Import ghostops._C, which registers the ghostops:: ops; return (module, error)."""
    try:
        return importlib.import_module("ghostops._C"), None
    except ImportError as err:  # a source checkout that was never built, or a stale build
        return None, f"{type(err).__name__}: {err}"


def require():
    """The compiled extension, or a RuntimeError that says how to build it."""
    module, error = _load()
    if module is None:
        raise RuntimeError(
            f"ghostops: the compiled extension ghostops._C is missing ({error}); {BUILD_HINT}"
        )
    return module


def cpu_available() -> bool:
    return _load()[0] is not None


def cpu_load_error() -> str:
    error = _load()[1]
    return f"{error}; {BUILD_HINT}" if error else ""


def cuda_available() -> bool:
    """The extension was built with the CUDA kernels (csrc/cuda) and a GPU is visible."""
    import torch

    module = _load()[0]
    return module is not None and module.built_with_cuda() and torch.cuda.is_available()


@functools.cache
def triton_available() -> bool:
    """The Triton kernels can run here: triton imports, and there is a GPU, or
    ``TRITON_INTERPRET=1`` (Triton's interpreter runs the kernels on CPU tensors, slowly)."""
    import importlib.util
    import os

    import torch

    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
