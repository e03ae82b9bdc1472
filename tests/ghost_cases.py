"""Test cases of the Ghost module ops: shapes, random arguments, the reference and error
measure, shared by the eval (test_ops.py) and training (test_train.py) tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghostops.reference import ghost_channels, ghost_module_reference


@dataclass(frozen=True)
class Case:
    inp: int
    oup: int
    height: int
    width: int
    batch: int = 2
    ratio: int = 2
    dw_size: int = 3
    stride: int = 1
    relu: bool = True
    channels_last: bool = False
    strided_input: bool = False  # x a non-contiguous view

    def __str__(self):
        return (
            f"{self.inp}->{self.oup}@{self.batch}x{self.height}x{self.width}"
            f"-r{self.ratio}-d{self.dw_size}-s{self.stride}-{'relu' if self.relu else 'id'}"
            f"{'-cl' if self.channels_last else ''}{'-view' if self.strided_input else ''}"
        )


def make_args(case: Case, dtype=torch.float32, seed=0):
    """Fresh random input and parameters (BN statistics far from identity)."""
    g = torch.Generator().manual_seed(seed)
    init, new = ghost_channels(case.oup, case.ratio)

    def rnd(*shape, positive=False):
        t = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        return t.to(dtype)

    if case.strided_input:  # every other column and a channel slice of a larger tensor
        x = rnd(case.batch, case.inp + 3, case.height, 2 * case.width)[:, 1 : case.inp + 1, :, ::2]
    else:
        x = rnd(case.batch, case.inp, case.height, case.width)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = (
        rnd(init, case.inp, 1, 1),
        rnd(init, positive=True),
        rnd(init),
        rnd(init),
        rnd(init, positive=True),
        rnd(new, 1, case.dw_size, case.dw_size),
        rnd(new, positive=True),
        rnd(new),
        rnd(new),
        rnd(new, positive=True),
    )
    return x, params


def strided_views(params):
    """The same values as views with other strides: each 1-D vector every other element of a
    longer one, the conv weights transposed copies seen through permute."""
    views = []
    for t in params:
        if t.dim() == 1:
            longer = torch.empty(2 * t.numel(), dtype=t.dtype).fill_(float("nan"))
            longer[::2] = t
            views.append(longer[::2])
        else:  # (out, in, kh, kw) through a (kw, kh, in, out) buffer
            views.append(t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0))
    return views


def run_fused(case: Case, x, params, eps=1e-5, op=None):
    """An eval op with ghostops::ghost_forward_eval's schema (default: that op itself)."""
    p = params
    op = torch.ops.ghostops.ghost_forward_eval if op is None else op
    return op(
        x, p[0], p[1], p[2], p[3], p[4], eps, p[5], p[6], p[7], p[8], p[9], eps,
        case.oup, case.stride, "relu" if case.relu else "identity",
    )  # fmt: skip


def run_reference(case: Case, x, params, eps=1e-5):
    return ghost_module_reference(
        x.double(), *(t.double() for t in params), oup=case.oup, ratio=case.ratio,
        dw_size=case.dw_size, stride=case.stride, relu=case.relu, eps=eps,
    )  # fmt: skip


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def ops_run(fn, *args, **kwargs) -> set[str]:
    """Names of the ops that ``fn(*args, **kwargs)`` runs under no_grad."""
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        fn(*args, **kwargs)
    return {event.key for event in prof.key_averages()}


def ghostnet_pair(num_classes=10, seed=0):
    """ghostops' GhostNet in eval mode with BatchNorm statistics far from identity, and the
    reference network (the paper's unfused modules) with the same state dict."""
    from ghostops.models import ghostnet
    from ghostops.reference import ReferenceGhostModule

    torch.manual_seed(seed)
    net = ghostnet(num_classes=num_classes).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ref = ghostnet(num_classes=num_classes, ghost_module_cls=ReferenceGhostModule).eval()
    ref.load_state_dict(net.state_dict())
    return net, ref
