"""Swap the Ghost modules of an existing model for ``ghostops.GhostModule``, and back.

``convert(model)`` recognises the Ghost modules of the paper's code and of timm
(``timm.models.ghostnet.GhostModule``) by structure, not by class: a module whose only children
are ``primary_conv`` = Sequential(Conv2d, BatchNorm2d, activation) and ``cheap_operation`` =
Sequential(depthwise Conv2d, BatchNorm2d, activation), with ReLU or identity activations and an
``oup`` (paper) or ``out_chs`` (timm) attribute. The replacement takes over the original conv and
BatchNorm modules themselves, so parameters, buffers, device, dtype, train/eval flag and any
optimizer already holding those parameters carry over unchanged; each BatchNorm keeps its own
train flag (frozen BNs), eps and momentum, which ``GhostModule`` follows. A module that looks
like a Ghost module but cannot be represented exactly (other activations, hooks, extra
children...) is left alone and listed in the report.

``revert(model)`` turns every ``ghostops.GhostModule`` back into the paper's module
(``ghostops.reference.ReferenceGhostModule``), for export to tools that do not know ghostops' ops.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from ghostops.nn import GhostModule, _hooked
from ghostops.reference import ReferenceGhostModule

_GHOST_CHILDREN = ("primary_conv", "cheap_operation")


@dataclasses.dataclass
class ConvertReport:
    """What ``convert`` did: qualified names converted, and skipped ones with the reason."""

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def _activation(module: nn.Module) -> str | None:
    """'relu', 'identity', or None for an activation GhostModule cannot run."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.Identity or (type(module) is nn.Sequential and len(module) == 0):
        return "identity"
    return None


def _conv_problem(conv: nn.Module, what: str, *, depthwise: bool) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{what} is {type(conv).__name__}, not Conv2d"
    k = conv.kernel_size
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"{what} has kernel {k}; a square odd kernel is needed"
    if conv.bias is not None:
        return f"{what} has a bias"
    if conv.dilation != (1, 1) or conv.padding != (k[0] // 2, k[0] // 2):
        return f"{what} has dilation {conv.dilation} / padding {conv.padding}, not 1 / k // 2"
    if conv.padding_mode != "zeros":
        return f"{what} pads with {conv.padding_mode!r}"
    if conv.stride[0] != conv.stride[1] or (depthwise and conv.stride != (1, 1)):
        return f"{what} has stride {conv.stride}"
    if depthwise and conv.groups != conv.in_channels:
        return f"{what} is not depthwise (groups={conv.groups}, in={conv.in_channels})"
    if not depthwise and conv.groups != 1:
        return f"{what} is grouped (groups={conv.groups})"
    return None


def _ghost_spec(module: nn.Module) -> tuple[dict | None, str | None]:
    """GhostModule constructor arguments for ``module``, or (None, why it cannot convert)."""
    children = dict(module.named_children())
    extra = sorted(set(children) - set(_GHOST_CHILDREN))
    if extra:
        return None, f"has other submodules {extra}"
    primary, cheap = module.primary_conv, module.cheap_operation
    if not all(isinstance(s, nn.Sequential) and len(s) == 3 for s in (primary, cheap)):
        return None, "primary_conv / cheap_operation are not Sequential(conv, BatchNorm, act)"
    conv1, bn1, act1 = primary
    conv2, bn2, act2 = cheap
    problem = _conv_problem(conv1, "primary_conv[0]", depthwise=False) or _conv_problem(
        conv2, "cheap_operation[0]", depthwise=True
    )
    if problem:
        return None, problem
    init = conv1.out_channels
    if conv2.in_channels != init or conv2.out_channels % init or conv2.out_channels < init:
        return None, f"cheap_operation[0] maps {conv2.in_channels} -> {conv2.out_channels}"
    ratio = conv2.out_channels // init + 1
    for bn, conv, what in ((bn1, conv1, "primary_conv[1]"), (bn2, conv2, "cheap_operation[1]")):
        if type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels:
            return None, f"{what} is not a BatchNorm2d of {conv.out_channels} channels"
        if not bn.affine:
            return None, f"{what} is not affine"
    kinds = {_activation(act1), _activation(act2)}
    if None in kinds or len(kinds) != 1:
        return None, (
            f"activations {type(act1).__name__} / {type(act2).__name__}: GhostModule runs ReLU "
            "or identity, the same in both halves"
        )
    hooked = _hooked([module, conv1, bn1, act1, conv2, bn2, act2])
    if hooked:
        return None, f"has hooks on {hooked} (GhostModule calls none of its submodules)"
    oup = getattr(module, "oup", getattr(module, "out_chs", None))
    if not isinstance(oup, int) or math.ceil(oup / ratio) != init:
        return None, f"output channels {oup!r} do not match {init} intrinsic channels"
    return {
        "inp": conv1.in_channels,
        "oup": oup,
        "kernel_size": conv1.kernel_size[0],
        "ratio": ratio,
        "dw_size": conv2.kernel_size[0],
        "stride": conv1.stride[0],
        "relu": kinds == {"relu"},
    }, None


def _rebuild(cls: type[nn.Module], spec: dict, source: nn.Module) -> nn.Module:
    """A ``cls`` Ghost module built from ``spec`` that takes over ``source``'s conv and
    BatchNorm modules (so their parameters and buffers are shared, not copied)."""
    new = cls(**spec)
    for seq in _GHOST_CHILDREN:
        for i in (0, 1):
            getattr(new, seq)[i] = getattr(source, seq)[i]
    # Every module keeps its own train flag (not new.train(...), which would unfreeze frozen
    # BatchNorms); the activations hold no tensors: nothing else to carry.
    sources = dict(source.named_modules())
    for name, m in new.named_modules():
        if name in sources:
            m.training = sources[name].training
    return new


def _swap(model: nn.Module, make, prefix: str = "", done: dict | None = None):
    """Replace, depth first, every child for which ``make(child, name)`` returns a module.
    A module registered under several names (shared) is looked at once and replaced by the
    same new module everywhere."""
    done = {} if done is None else done
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        qualified = f"{prefix}.{name}" if prefix else name
        if id(child) in done:
            if done[id(child)] is not None:
                setattr(model, name, done[id(child)])
            continue
        new = make(child, qualified)
        done[id(child)] = new
        if new is not None:
            setattr(model, name, new)
        else:
            _swap(child, make, qualified, done)


def convert(model: nn.Module, *, report: bool = False):
    """Replace in place every Ghost module of ``model`` (paper's code, timm) that
    ``ghostops.GhostModule`` can represent exactly; return the model, or ``(model, report)``
    with ``report=True`` (a ``ConvertReport`` of converted and skipped module names).

    A model that is itself a Ghost module comes back as its replacement."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    result = ConvertReport()

    def make(module: nn.Module, name: str) -> nn.Module | None:
        if isinstance(module, GhostModule):
            return None
        if not all(hasattr(module, child) for child in _GHOST_CHILDREN):
            return None
        spec, problem = _ghost_spec(module)
        if spec is None:
            result.skipped[name] = problem
            return None
        result.converted.append(name)
        return _rebuild(GhostModule, spec, module)

    root = make(model, "(root)")
    if root is not None:
        model = root
    elif "(root)" not in result.skipped:
        _swap(model, make)
    return (model, result) if report else model


def revert(model: nn.Module) -> nn.Module:
    """Replace in place every ``ghostops.GhostModule`` of ``model`` by the paper's module
    (``ReferenceGhostModule``) over the same conv and BatchNorm modules; return the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: expected an nn.Module, got {type(model).__name__}")

    def make(module: nn.Module, name: str) -> nn.Module | None:
        if not isinstance(module, GhostModule):
            return None
        spec = {
            "inp": module.inp,
            "oup": module.oup,
            "kernel_size": module.kernel_size,
            "ratio": module.ratio,
            "dw_size": module.dw_size,
            "stride": module.stride,
            "relu": module.relu,
        }
        return _rebuild(ReferenceGhostModule, spec, module)

    root = make(model, "")
    if root is not None:
        return root
    _swap(model, make)
    return model
