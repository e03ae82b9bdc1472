"""Models built on ghostops.GhostModule."""

from ghostops.models.ghostnet import GhostBottleneck, GhostNet, ghostnet

__all__ = ["GhostBottleneck", "GhostNet", "ghostnet"]
