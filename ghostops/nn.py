"""``ghostops.GhostModule``: a drop-in for the paper's GhostModule, backed by the fused ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ghostops.ops import (
    autocast_dtype,
    depthwise_bn,
    ghost_module,
    ghost_module_eval_cpu,
    pointwise_bn,
    squeeze_excite,
)
from ghostops.reference import ghost_channels


class GhostModule(nn.Module):
    """Ghost module (GhostNet, CVPR 2020): ``inp`` -> ``oup`` channels.

    Constructor, submodules and state dict are those of the paper's code
    (``primary_conv.{0,1}``, ``cheap_operation.{0,1}``), so its checkpoints load with
    ``strict=True``. The forward runs one fused op (see ``ghostops.ghost_module``), with
    ``nn.BatchNorm2d`` semantics for both BatchNorms, momentum and ``num_batches_tracked``.
    Input (N, inp, H, W); output (N, oup, H // stride, W // stride) rounded as Conv2d rounds.
    """

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        if ratio < 2:
            raise ValueError(f"GhostModule: ratio must be >= 2, got {ratio}")
        if dw_size < 1 or dw_size % 2 == 0:
            raise ValueError(f"GhostModule: dw_size must be odd and positive, got {dw_size}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"GhostModule: kernel_size must be odd and positive, got {kernel_size}"
            )
        self.inp, self.oup, self.ratio = inp, oup, ratio
        self.kernel_size, self.dw_size, self.stride, self.relu = kernel_size, dw_size, stride, relu
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

    def extra_repr(self) -> str:
        return (
            f"{self.inp}, {self.oup}, kernel_size={self.kernel_size}, ratio={self.ratio}, "
            f"dw_size={self.dw_size}, stride={self.stride}, relu={self.relu}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.shape[1] != self.inp:
            raise ValueError(
                f"GhostModule: expected input with {self.inp} channels (inp), got {x.shape[1]}"
            )
        # Submodules, parameters and buffers straight from their dicts where they are plain:
        # at batch 1 the two dozen Sequential.__getitem__ and nn.Module.__getattr__ lookups
        # were a third of a small module's call (GhostModule 16->16 on a 1x1 map: 19.7 -> 13
        # us; the op itself 3.5 us). In inference (eval BatchNorms, no autograd, no hooks) the
        # op is called straight, its checks left to the kernel: ghost_module_eval_cpu.
        primary, cheap = self.primary_conv, self.cheap_operation
        parts = (*primary._modules.values(), *cheap._modules.values())
        conv1, bn1, _, conv2, bn2, _ = parts
        hooked = _hooked([primary, cheap, *parts])
        if not (bn1.training or bn2.training or hooked or torch.is_grad_enabled()):
            params = _plain_eval_params(conv1, bn1, conv2, bn2)
            if params is not None:
                y = ghost_module_eval_cpu(
                    x, params, oup=self.oup, ratio=self.ratio, dw_size=self.dw_size,
                    stride=self.stride, relu=self.relu, eps=bn1.eps,
                )  # fmt: skip
                if y is not None:
                    return y
        # The paper's forward, each submodule on its own, where one fused op would not be the
        # same: BatchNorms it cannot share, hooks it would bypass, a conv bias it has no place
        # for.
        biased = _tensor(conv1, "bias") is not None or _tensor(conv2, "bias") is not None
        if not _fusable_pair(bn1, bn2) or biased or hooked:
            x1 = self.primary_conv(x)
            return torch.cat([x1, self.cheap_operation(x1)], dim=1)[:, : self.oup]
        # Each BatchNorm follows its own train flag, as in the paper's module: frozen
        # BatchNorms (bn.eval() inside a training model) normalise with running statistics.
        training = bn1.training
        momentum, use_batch_stats = _batch_norm_step(bn1, training)
        _batch_norm_step(bn2, training)
        return ghost_module(
            x,
            _tensor(conv1, "weight"),
            *_bn_tensors(bn1, training),
            _tensor(conv2, "weight"),
            *_bn_tensors(bn2, training),
            oup=self.oup,
            ratio=self.ratio,
            dw_size=self.dw_size,
            stride=self.stride,
            relu=self.relu,
            training=use_batch_stats,
            momentum=momentum,
            eps=bn1.eps,
        )


def _plain_eval_params(conv1, bn1, conv2, bn2) -> tuple | None:
    """The ten tensors of ``ghost_module`` (see ``ghostops.ops.ghost_module_eval_cpu``) from
    plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules with one eps and running statistics;
    None otherwise."""
    plain = (
        type(conv1) is nn.Conv2d
        and type(conv2) is nn.Conv2d
        and type(bn1) is nn.BatchNorm2d
        and type(bn2) is nn.BatchNorm2d
        and bn1.eps == bn2.eps
    )
    if not plain:
        return None
    params = (*_conv_bn_tensors(conv1, bn1), *_conv_bn_tensors(conv2, bn2))
    return None if any(t is None for t in params) else params


def _conv_bn_tensors(conv: nn.Module, bn: nn.Module) -> tuple:
    """(conv weight, BN weight, bias, running mean, running var), through ``_tensor``."""
    return (
        _tensor(conv, "weight"),
        _tensor(bn, "weight"),
        _tensor(bn, "bias"),
        _tensor(bn, "running_mean"),
        _tensor(bn, "running_var"),
    )


def _tensor(module: nn.Module, name: str) -> Tensor | None:
    """``getattr(module, name)`` for a parameter or buffer, read from its dict when the module
    is a plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` (a parametrized one has another class; a
    weight_norm'ed one keeps its weight outside the dicts)."""
    if type(module) in (nn.Conv2d, nn.BatchNorm2d):
        if name in module._parameters:
            return module._parameters[name]
        if name in module._buffers:
            return module._buffers[name]
    return getattr(module, name)


def _bn_tensors(bn: nn.BatchNorm2d, training: bool) -> tuple:
    """(weight, bias, running_mean, running_var) of an affine BatchNorm; the running statistics
    None in training without tracked statistics."""
    running = not training or bn.track_running_stats
    return (
        _tensor(bn, "weight"),
        _tensor(bn, "bias"),
        _tensor(bn, "running_mean") if running else None,
        _tensor(bn, "running_var") if running else None,
    )


def _fusable_pair(bn1: nn.BatchNorm2d, bn2: nn.BatchNorm2d) -> bool:
    """Whether one fused op reproduces both BatchNorms: it takes one train flag, eps and
    momentum for the two, and affine parameters. Anything else (one BN frozen, different eps or
    momentum, momentum=None with different batch counters, no affine) runs the submodules."""
    same = (
        bn1.training == bn2.training
        and bn1.eps == bn2.eps
        and bn1.momentum == bn2.momentum
        and bn1.track_running_stats == bn2.track_running_stats
        and bn1.affine
        and bn2.affine
    )
    if same and bn1.momentum is None and bn1.training and bn1.track_running_stats:
        same = bool(bn1.num_batches_tracked == bn2.num_batches_tracked)
    return same


def _batch_norm_step(bn: nn.BatchNorm2d, training: bool) -> tuple[float, bool]:
    """What ``nn.BatchNorm2d.forward`` does before normalising: bump ``num_batches_tracked``
    in training and return (momentum factor, whether batch statistics normalise)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = training or bn.running_mean is None
    return factor, use_batch_stats


def _make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, by default
    ``divisor``), going up one step where rounding would lose more than 10 %: the channel rule
    of MobileNet and GhostNet."""
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation of GhostNet's bottlenecks: global average pool, 1x1 conv down to
    ``_make_divisible(in_chs * se_ratio, 4)`` channels, ReLU, 1x1 conv back, then the input is
    scaled by the hard-sigmoid gate ``relu6(s + 3) / 6``.

    Submodules ``conv_reduce`` / ``conv_expand`` (both with bias) as in the paper's code and timm.
    """

    def __init__(self, in_chs: int, se_ratio: float = 0.25, divisor: int = 4):
        super().__init__()
        reduced_chs = _make_divisible(in_chs * se_ratio, divisor)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(in_chs, reduced_chs, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_chs, in_chs, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(self.avg_pool(x))))
        return x * (nn.functional.relu6(s + 3.0) / 6.0)


class GhostBottleneck(nn.Module):
    """Ghost bottleneck (GhostNet, arXiv 1911.11907): ``in_chs`` -> ``out_chs`` channels.

    ``ghost1`` (Ghost module to ``mid_chs``, ReLU), a depthwise ``conv_dw`` + ``bn_dw`` of kernel
    ``dw_kernel_size`` only when ``stride > 1``, optional ``se`` (when ``se_ratio > 0``),
    ``ghost2`` (Ghost module to ``out_chs``, no activation), plus the ``shortcut``: identity when
    ``in_chs == out_chs`` and ``stride == 1``, else depthwise conv + BN + 1x1 conv + BN.
    Submodule names and state dict keys are those of the paper's code and of timm.

    ``ghost_module_cls`` builds both Ghost modules (default ``ghostops.GhostModule``; pass
    ``ghostops.reference.ReferenceGhostModule`` for the unfused network, same state dict).
    """

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        dw_kernel_size: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
        ghost_module_cls: type[nn.Module] | None = None,
    ):
        super().__init__()
        ghost_cls = GhostModule if ghost_module_cls is None else ghost_module_cls
        self.stride = stride
        pad = (dw_kernel_size - 1) // 2

        self.ghost1 = ghost_cls(in_chs, mid_chs, relu=True)
        if stride > 1:
            self.conv_dw = nn.Conv2d(
                mid_chs, mid_chs, dw_kernel_size, stride, pad, groups=mid_chs, bias=False
            )
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        has_se = se_ratio is not None and se_ratio > 0
        self.se = SqueezeExcite(mid_chs, se_ratio) if has_se else None
        self.ghost2 = ghost_cls(mid_chs, out_chs, relu=False)

        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, pad, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    _PARTS = ("ghost1", "conv_dw", "se", "shortcut")

    def forward(self, x: Tensor) -> Tensor:
        # With ghostops Ghost modules (not after ghostops.revert, nor in the reference network),
        # the depthwise convs + BN run ghostops' fused eval op where it applies.
        # Submodules from their dict (None where absent): at batch 1 a bottleneck's Python is
        # as long as its kernels, and nn.Module.__getattr__ was a tenth of it.
        mods = self._modules
        ghost1, conv_dw, se, shortcut_seq = (mods.get(k) for k in self._PARTS)
        # Under torch.autocast the submodules run as nn modules do there (GhostModule casts to
        # autocast's dtype itself); the fused ops outside it take one dtype for all tensors.
        fused = isinstance(ghost1, GhostModule) and autocast_dtype(x) is None
        residual = x
        x = ghost1(x)
        if conv_dw is not None:
            x = _conv_bn(conv_dw, mods["bn_dw"], x, fused)
        if se is not None:
            x = _squeeze_excite(se, x, fused)
        ghost2 = mods["ghost2"]
        x = ghost2(x)
        plain_shortcut = type(shortcut_seq) is nn.Sequential and not _hooked([shortcut_seq])
        if fused and plain_shortcut and len(shortcut_seq) == 4:
            dw, bn, pw, bn_pw = shortcut_seq._modules.values()
            shortcut = _conv_bn(dw, bn, residual, fused)
            if _pointwise_bn_fits(pw, bn_pw):  # 1x1 conv + BN + the add, one op
                return pointwise_bn(
                    shortcut, *_conv_bn_tensors(pw, bn_pw), eps=bn_pw.eps, residual=x
                )
            shortcut = bn_pw(pw(shortcut))
        else:
            shortcut = shortcut_seq(residual)
        # In place, as the paper adds, only without autograd: a fused training op may save its
        # output for backward. (Out of place, the add allocated a fresh 51 MB output for the
        # first bottleneck at batch 32: 4.9 ms of ghostops' 67 ms inference.)
        # Only on ghost2's output from a fused GhostModule without hooks: a fresh tensor that
        # nothing else holds (a hook, or another module's output, might be kept elsewhere).
        fresh = type(ghost2) is GhostModule and not _hooked([ghost2])
        if fresh and not torch.is_grad_enabled():
            return x.add_(shortcut)
        return x + shortcut


def _hooked(modules: list[nn.Module]) -> list[str]:
    """Class names of the modules that carry forward / backward hooks (weight_norm's old-style
    pre-hook included), all of them while global module hooks are registered
    (``torch.nn.modules.module.register_module_forward_hook`` and the like): a fused module
    would silently bypass them."""
    if any(_GLOBAL_HOOKS):
        return [type(m).__name__ for m in modules]
    return [
        type(m).__name__
        for m in modules
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    ]


# nn.Module's registries of global hooks (dicts that registration fills in place).
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, {})
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
)


def _pointwise_bn_fits(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether bn(conv(x)) is what ``ghostops.ops.pointwise_bn`` computes: a plain 1x1
    ``nn.Conv2d`` without bias (stride 1, no padding, one group) and a plain affine
    ``nn.BatchNorm2d`` in eval mode with running statistics, neither with hooks."""
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and not _hooked([conv, bn])
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv._parameters.get("bias") is None
        and bn.affine
        and not bn.training
        and bn._buffers.get("running_mean") is not None
    )


def _squeeze_excite(se: nn.Module, x: Tensor, fused: bool) -> Tensor:
    """se(x); through ``ghostops.ops.squeeze_excite`` (one op in eval) when ``fused`` and ``se``
    is this file's ``SqueezeExcite`` with its submodules as built (1x1 convs with bias, ReLU,
    global average pool) and no hooks, which the op would bypass."""
    if not fused or type(se) is not SqueezeExcite:
        return se(x)
    mods = se._modules
    reduce, expand, act, pool = (mods.get(k) for k in _SE_PARTS)
    plain = (
        type(reduce) is nn.Conv2d
        and type(expand) is nn.Conv2d
        and type(act) is nn.ReLU
        and type(pool) is nn.AdaptiveAvgPool2d
        and pool.output_size in (1, (1, 1))
        and not _hooked([se, reduce, expand, act, pool])
        and all(
            c.kernel_size == (1, 1)
            and c.stride == (1, 1)
            and c.padding == (0, 0)
            and c.dilation == (1, 1)
            and c.groups == 1
            and c._parameters.get("bias") is not None
            for c in (reduce, expand)
        )
    )
    if not plain:
        return se(x)
    tensors = (_tensor(c, n) for c in (reduce, expand) for n in ("weight", "bias"))
    return squeeze_excite(x, *tensors)


_SE_PARTS = ("conv_reduce", "conv_expand", "act1", "avg_pool")


def _conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor, fused: bool) -> Tensor:
    """bn(conv(x)) for a depthwise conv; through ``ghostops.ops.depthwise_bn`` (eval and
    training) when ``fused`` and both modules are a plain ``nn.Conv2d`` and ``nn.BatchNorm2d``
    (not swapped, e.g. by ``torch.ao.quantization.fuse_modules``, and without hooks, which the op
    would bypass) in the form it computes: affine BN, square kernel and stride, padding
    kernel // 2, no conv bias."""
    fits = (
        fused
        and type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and not _hooked([conv, bn])
        and bn.affine
        and conv._parameters.get("bias") is None
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.padding == (conv.kernel_size[0] // 2,) * 2
        and conv.dilation == (1, 1)
        and conv.stride[0] == conv.stride[1]
        and conv.padding_mode == "zeros"
    )
    if not fits:
        return bn(conv(x))
    weight, bn_weight, bn_bias, mean, var = _conv_bn_tensors(conv, bn)
    args = (x, weight, bn_weight, bn_bias)
    if not bn.training and mean is not None:
        return depthwise_bn(*args, mean, var, stride=conv.stride[0], eps=bn.eps)
    momentum, _ = _batch_norm_step(bn, bn.training)  # nn.BatchNorm2d's bookkeeping
    update = bn.training and mean is not None
    return depthwise_bn(
        *args, mean if update else None, var if update else None,
        stride=conv.stride[0], eps=bn.eps, training=True, momentum=momentum,
    )  # fmt: skip
