"""ghostops: fused Ghost module kernels (GhostNet, CVPR 2020) for PyTorch.

Public API: ``GhostModule`` (drop-in for the paper's module), ``ghost_module`` (functional),
``convert`` / ``revert`` (swap the Ghost modules of an existing model, weights kept),
``models.ghostnet`` / ``models.GhostNet``, and backend control (``use_backend``,
``available_backends``).
"""

from ghostops import models
from ghostops.backends import available_backends, use_backend
from ghostops.convert import ConvertReport, convert, revert
from ghostops.nn import GhostModule
from ghostops.ops import ghost_module

__all__ = [
    "ConvertReport",
    "GhostModule",
    "available_backends",
    "convert",
    "ghost_module",
    "models",
    "revert",
    "use_backend",
]
__version__ = "0.1.0"
