"""GhostNet (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020,
arXiv 1911.11907), built on ``ghostops.GhostModule``.

Module names and state dict keys follow the paper's public PyTorch code and timm's
``ghostnet_050`` / ``ghostnet_100`` / ``ghostnet_130``, so their checkpoints load with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from ghostops.nn import GhostBottleneck, _make_divisible

__all__ = ["GHOSTNET_CFGS", "ConvBnAct", "GhostBottleneck", "GhostNet", "ghostnet"]

# The paper's configuration: one list of bottlenecks per stage, each
# [dw kernel k, expansion (mid) channels, output channels, SE ratio, stride].
GHOSTNET_CFGS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[5, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [
        [3, 200, 80, 0, 1],
        [3, 184, 80, 0, 1],
        [3, 184, 80, 0, 1],
        [3, 480, 112, 0.25, 1],
        [3, 672, 112, 0.25, 1],
    ],
    [[5, 672, 160, 0.25, 2]],
    [
        [5, 960, 160, 0, 1],
        [5, 960, 160, 0.25, 1],
        [5, 960, 160, 0, 1],
        [5, 960, 160, 0.25, 1],
    ],
]


class ConvBnAct(nn.Module):
    """Conv (no bias, padding ``kernel_size // 2``) + BatchNorm + ReLU; submodules ``conv``,
    ``bn1``, ``act1`` as in the paper's code (GhostNet's last stage is one of these, 1x1)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostNet(nn.Module):
    """GhostNet image classifier: (N, 3, H, W) -> (N, num_classes) logits.

    ``cfgs`` lists the stages (default: the paper's ``GHOSTNET_CFGS``); ``width`` multiplies
    every channel count (rounded to a multiple of 4); ``dropout`` is applied before the
    classifier in training. Every Ghost module is a ``ghost_module_cls`` (default
    ``ghostops.GhostModule``; ``ghostops.reference.ReferenceGhostModule`` gives the unfused
    network with the same state dict).
    """

    def __init__(
        self,
        cfgs: list | None = None,
        num_classes: int = 1000,
        width: float = 1.0,
        dropout: float = 0.2,
        ghost_module_cls: type[nn.Module] | None = None,
    ):
        super().__init__()
        self.cfgs = copy.deepcopy(GHOSTNET_CFGS if cfgs is None else cfgs)
        self.num_classes = num_classes
        self.width = width
        self.dropout = dropout

        chs = _make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(3, chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs)
        self.act1 = nn.ReLU(inplace=True)

        stages = []
        exp_size = None
        for stage_cfg in self.cfgs:
            layers = []
            for k, exp_size, c, se_ratio, s in stage_cfg:
                out_chs = _make_divisible(c * width, 4)
                mid_chs = _make_divisible(exp_size * width, 4)
                layers.append(
                    GhostBottleneck(
                        chs,
                        mid_chs,
                        out_chs,
                        k,
                        s,
                        se_ratio=se_ratio,
                        ghost_module_cls=ghost_module_cls,
                    )
                )
                chs = out_chs
            stages.append(nn.Sequential(*layers))
        if exp_size is None:
            raise ValueError("GhostNet: cfgs must hold at least one bottleneck")
        # The last stage widens to the last bottleneck's expansion size (960 in the paper).
        head_in = _make_divisible(exp_size * width, 4)
        stages.append(nn.Sequential(ConvBnAct(chs, head_in, 1)))
        self.blocks = nn.Sequential(*stages)

        self.num_features = 1280
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(head_in, self.num_features, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and blocks: (N, 3, H, W) -> (N, 960 * width, H / 32, W / 32)."""
        return self.blocks(self.act1(self.bn1(self.conv_stem(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        """Pool, 1x1 head conv to 1280, ReLU, dropout (training), classifier."""
        x = self.act2(self.conv_head(self.global_pool(x))).flatten(1)
        if self.dropout > 0.0:
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def ghostnet(
    width: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    ghost_module_cls: type[nn.Module] | None = None,
) -> GhostNet:
    """The paper's GhostNet at ``width`` (0.5, 1.0 and 1.3 in the paper: 2.6M / 5.2M / 7.3M
    parameters), with ``ghostops.GhostModule`` (or ``ghost_module_cls``) Ghost modules."""
    return GhostNet(
        None,
        num_classes=num_classes,
        width=width,
        dropout=dropout,
        ghost_module_cls=ghost_module_cls,
    )
