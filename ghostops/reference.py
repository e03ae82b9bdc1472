"""The unfused Ghost module, in plain PyTorch: the oracle of every test, the baseline of the
benchmark, and the fallback for any configuration no fused kernel covers.

Definition (GhostNet, arXiv 1911.11907; ../shared/DESIGN.md section 1)::

    init = ceil(oup / ratio)               # intrinsic channels
    new  = init * (ratio - 1)              # ghost channels
    x1 = act(BN1(conv_k(x)))               # inp -> init, kernel k, stride s, pad k // 2
    x2 = act(BN2(dwconv_d(x1)))            # groups = init, init -> new, kernel d, pad d // 2
    y  = cat([x1, x2], dim=1)[:, :oup]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ghost_channels(oup: int, ratio: int) -> tuple[int, int]:
    """Return (init, new): the intrinsic and ghost channel counts of a Ghost module."""
    init = math.ceil(oup / ratio)
    return init, init * (ratio - 1)


def ghost_module_reference(
    x: Tensor,
    primary_weight: Tensor,
    bn1_weight: Tensor,
    bn1_bias: Tensor,
    bn1_mean: Tensor | None,
    bn1_var: Tensor | None,
    cheap_weight: Tensor,
    bn2_weight: Tensor,
    bn2_bias: Tensor,
    bn2_mean: Tensor | None,
    bn2_var: Tensor | None,
    *,
    oup: int,
    ratio: int = 2,
    dw_size: int = 3,
    stride: int = 1,
    relu: bool = True,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Ghost module forward, unfused: x (N, inp, H, W) -> (N, oup, Ho, Wo).

    BatchNorm follows ``F.batch_norm``: in training, batch statistics normalise and the running
    buffers (when given) are updated in place with ``momentum``; in eval, the running statistics
    normalise. ``momentum=None`` is the cumulative average, for which the caller passes the
    factor ``1 / num_batches_tracked`` as ``momentum`` (as ``nn.BatchNorm2d`` does).
    """
    init, new = ghost_channels(oup, ratio)
    k = primary_weight.shape[-1]
    momentum = 0.0 if momentum is None else momentum
    z1 = F.conv2d(x, primary_weight, stride=stride, padding=k // 2)
    x1 = F.batch_norm(z1, bn1_mean, bn1_var, bn1_weight, bn1_bias, training, momentum, eps)
    if relu:
        x1 = F.relu(x1)
    z2 = F.conv2d(x1, cheap_weight, padding=dw_size // 2, groups=init)
    x2 = F.batch_norm(z2, bn2_mean, bn2_var, bn2_weight, bn2_bias, training, momentum, eps)
    if relu:
        x2 = F.relu(x2)
    return torch.cat([x1, x2], dim=1)[:, :oup]


class ReferenceGhostModule(nn.Module):
    """The paper's GhostModule, layer for layer (the eager baseline the benchmark times)."""

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        self.oup = oup
        init, new = ghost_channels(oup, ratio)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, new, dw_size, 1, dw_size // 2, groups=init, bias=False),
            nn.BatchNorm2d(new),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, : self.oup, :, :]


def depthwise_bn_reference(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    *,
    stride: int = 1,
    relu: bool = False,
    eps: float = 1e-5,
) -> Tensor:
    """Eval-mode depthwise conv (groups = channels, weight (C, 1, d, d), padding d // 2, no
    bias) + BatchNorm with running statistics + optional ReLU, in stock PyTorch: the oracle of
    ``ghostops::dw_bn_eval``."""
    y = F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])
    y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, eps)
    return F.relu(y) if relu else y


def squeeze_excite_reference(
    x: Tensor,
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    expand_weight: Tensor,
    expand_bias: Tensor,
) -> Tensor:
    """GhostNet's squeeze-and-excitation in stock PyTorch (the paper's and timm's
    ``SqueezeExcite``): global average pool, 1x1 conv to R channels + ReLU, 1x1 conv back,
    and x scaled by the hard-sigmoid gate ``relu6(s + 3) / 6``; the oracle of
    ``ghostops::se_eval``."""
    s = F.conv2d(x.mean((2, 3), keepdim=True), reduce_weight, reduce_bias)
    s = F.conv2d(F.relu(s), expand_weight, expand_bias)
    return x * (F.relu6(s + 3.0) / 6.0)


def pointwise_bn_reference(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    *,
    relu: bool = False,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """Eval-mode 1x1 conv (weight (C_out, C_in, 1, 1), no bias) + BatchNorm with running
    statistics + optional ReLU, plus ``residual`` if given (added last), in stock PyTorch: the
    oracle of ``ghostops::pw_bn_eval``."""
    y = F.batch_norm(F.conv2d(x, weight), bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, eps)
    if relu:
        y = F.relu(y)
    return y if residual is None else y + residual


def conv_bn_reference(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    *,
    stride: int = 1,
    relu: bool = False,
    eps: float = 1e-5,
) -> Tensor:
    """Eval-mode dense conv (weight (C_out, C_in, d, d), padding d // 2, no bias) + BatchNorm
    with running statistics + optional ReLU, in stock PyTorch: the oracle of
    ``ghostops::conv_bn_eval`` (GhostNet's stem)."""
    y = F.conv2d(x, weight, None, stride, weight.shape[-1] // 2)
    y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, False, 0.0, eps)
    return F.relu(y) if relu else y


def linear_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, relu: bool = False
) -> Tensor:
    """``F.linear`` + optional ReLU: the oracle of ``ghostops::linear_eval`` (GhostNet's head)."""
    y = F.linear(x, weight, bias)
    return F.relu(y) if relu else y
