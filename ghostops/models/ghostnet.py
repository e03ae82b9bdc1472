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

from ghostops.nn import GhostBottleneck, GhostModule, _hooked, _make_divisible, _pointwise_bn_fits
from ghostops.ops import autocast_dtype, conv_bn, linear, pointwise_bn

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

    def _forward_fused(self, x: Tensor) -> Tensor:
        """The forward, as one ``ghostops.ops.pointwise_bn`` where it computes it (a 1x1
        conv with an eval-mode BatchNorm and a plain ReLU, no hooks)."""
        act = self.act1
        if (
            type(act) is not nn.ReLU
            or _hooked([act])
            or not _pointwise_bn_fits(self.conv, self.bn1)
        ):
            return self(x)
        bn = self.bn1
        return pointwise_bn(
            x, self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            relu=True, eps=bn.eps,
        )  # fmt: skip


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

    def _fused(self, x: Tensor) -> bool:
        """Whether this network runs ghostops' ops outside its Ghost modules too on ``x``: when
        its Ghost modules are ghostops' (not in the reference network, nor after
        ``ghostops.revert``) and autocast is off for x's device, as ``GhostBottleneck`` decides
        for its depthwise convs."""
        if autocast_dtype(x) is not None:
            return False
        first = self.blocks[0] if len(self.blocks) > 1 else None
        if not isinstance(first, nn.Sequential) or len(first) == 0:
            return False
        return isinstance(getattr(first[0], "ghost1", None), GhostModule)

    def _stem(self, x: Tensor, fused: bool) -> Tensor:
        """conv_stem + bn1 + act1; one ``ghostops.ops.conv_bn`` when ``fused`` and the three
        are the plain modules it computes (in eval mode, no hooks)."""
        conv, bn, act = self.conv_stem, self.bn1, self.act1
        plain = (
            fused
            and type(conv) is nn.Conv2d
            and type(bn) is nn.BatchNorm2d
            and type(act) is nn.ReLU
            and not _hooked([conv, bn, act])
            and conv.groups == 1
            and conv.bias is None
            and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.kernel_size[0] % 2 == 1
            and conv.padding == (conv.kernel_size[0] // 2,) * 2
            and conv.stride[0] == conv.stride[1]
            and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros"
            and bn.affine
            and not bn.training
            and bn.running_mean is not None
        )
        if not plain:
            return act(bn(conv(x)))
        return conv_bn(
            x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            stride=conv.stride[0], relu=True, eps=bn.eps,
        )  # fmt: skip

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and blocks: (N, 3, H, W) -> (N, 960 * width, H / 32, W / 32)."""
        fused = self._fused(x)
        x = self._stem(x, fused)
        blocks = self.blocks
        last = blocks[-1] if len(blocks) > 0 else None
        plain_last = (
            type(blocks) is nn.Sequential
            and type(last) is nn.Sequential
            and len(last) == 1
            and type(last[0]) is ConvBnAct
            and not _hooked([blocks, last, last[0]])
        )
        if not (plain_last and fused):
            return blocks(x)
        for i in range(len(blocks) - 1):
            x = blocks[i](x)
        return last[0]._forward_fused(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """Pool, 1x1 head conv to 1280, ReLU, dropout (training), classifier."""
        pool, conv = self.global_pool, self.conv_head
        x = pool(x)
        plain = (
            type(pool) is nn.AdaptiveAvgPool2d
            and pool.output_size in (1, (1, 1))
            and type(conv) is nn.Conv2d
            and type(self.act2) is nn.ReLU
            and conv.kernel_size == (1, 1)
            and conv.groups == 1
            and conv.padding == (0, 0)
            and not _hooked([conv, self.act2])
        )
        fused = self._fused(x)
        if plain and fused:  # on the 1x1 pooled map the 1x1 conv is a linear layer
            x = linear(x.flatten(1), conv.weight.flatten(1), conv.bias, relu=True)
        else:
            x = self.act2(conv(x)).flatten(1)
        if self.dropout > 0.0:
            x = F.dropout(x, p=self.dropout, training=self.training)
        classifier = self.classifier
        if fused and type(classifier) is nn.Linear and not _hooked([classifier]):
            return linear(x, classifier.weight, classifier.bias)
        return classifier(x)

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
