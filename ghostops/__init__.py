"""ghostops: fused Ghost module kernels (GhostNet, CVPR 2020) for PyTorch.

Public API: ``GhostModule`` (drop-in for the paper's module), ``ghost_module`` (functional),
``models.ghostnet`` / ``models.GhostNet``, and backend control (``use_backend``,
``available_backends``).
"""

from ghostops import models
from ghostops.backends import available_backends, use_backend
from ghostops.nn import GhostModule
from ghostops.ops import ghost_module

__all__ = ["GhostModule", "available_backends", "ghost_module", "models", "use_backend"]
__version__ = "0.1.0"
