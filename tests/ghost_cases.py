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


# --------------------------------------------------------------------------------------------
# Training on the GPU backends (Triton, CUDA C++): one suite of cases and checks for both.

GPU_TRAIN_CASES = [
    Case(6, 10, 9, 11),
    Case(5, 7, 9, 11, relu=False),  # odd oup: a ghost channel only BN2's statistics see
    Case(6, 10, 8, 5, ratio=3, dw_size=5),
    Case(4, 9, 6, 7, ratio=4, dw_size=7, relu=False),
    Case(3, 8, 1, 1, batch=3),  # 1x1 maps
    Case(8, 12, 1, 9, dw_size=1),
    Case(3, 1, 5, 5),  # oup 1: no ghost channel kept
    Case(7, 9, 15, 17, stride=2),
    Case(8, 140, 3, 4),  # 70 intrinsic channels: two row blocks of the GEMM
    Case(40, 24, 7, 7, batch=3),  # several K blocks and pixel tiles
    Case(6, 10, 9, 11, channels_last=True),
    Case(7, 9, 15, 17, stride=2, channels_last=True),
    Case(7, 9, 15, 17, stride=2, strided_input=True),
]
# A GPU backend's training op and the name autograd gives its node.
GPU_TRAIN_OPS = {"triton": "ghost_forward_train_triton", "cuda": "ghost_forward_train"}
GRAD_FACTOR = {torch.float32: 5, torch.float16: 5, torch.bfloat16: 6}


def gpu_train_tolerances(device: str) -> dict:
    """Relative error bounds of y (gradients: GRAD_FACTOR times more) against the float64
    reference on the same rounded inputs. float32 through tl.dot may use TF32 on a GPU
    (DESIGN.md section 5); half precision: the outputs and the gradients are rounded to it."""
    return {
        torch.float32: 1e-4 if device == "cpu" else 3e-3,
        torch.float16: 3e-3,
        torch.bfloat16: 2.5e-2,
    }


def train_step(case: Case, x, params, backend, momentum=0.1, grad_y=None):
    """y, the gradients of x and of the seven trainable tensors under ``grad_y`` (default a
    fixed ramp in channels_last strides, so the kernels' gradient strides are exercised), and
    the four running statistics after the step, with ``backend`` forced."""
    import ghostops

    p = params
    x = x.detach().clone().requires_grad_()
    leaves = [x] + [p[i].detach().clone().requires_grad_() for i in (0, 1, 2, 5, 6, 7)]
    running = [p[i].detach().clone() for i in (3, 4, 8, 9)]
    w1, g1, b1, w2, g2, b2 = leaves[1:]
    with ghostops.use_backend(backend):
        y = ghostops.ghost_module(
            x, w1, g1, b1, running[0], running[1], w2, g2, b2, running[2], running[3],
            oup=case.oup, ratio=case.ratio, dw_size=case.dw_size, stride=case.stride,
            relu=case.relu, training=True, momentum=momentum,
        )  # fmt: skip
    if grad_y is None:
        grad_y = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device)
        grad_y = grad_y.reshape(y.shape).contiguous(memory_format=torch.channels_last)
    return y, torch.autograd.grad(y, leaves, grad_y.to(y.dtype)), running


def check_training(case: Case, x, params, dtype, backend, device, grad_y=None,
                   running_stats=True):  # fmt: skip
    """``backend``'s training step (a GPU backend's op, on ``device``) in ``dtype`` against the
    float64 reference run on the same values (the inputs rounded to ``dtype`` first): y, the
    seven gradients and the running statistics."""
    x, params = x.to(dtype), [t.to(dtype) for t in params]
    y_ref, grads_ref, running_ref = train_step(
        case, x.double(), [t.double() for t in params], "reference", grad_y=grad_y
    )
    x, params = x.to(device), [t.to(device) for t in params]
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gy = None if grad_y is None else grad_y.to(device)
    y, grads, running = train_step(case, x, params, backend, grad_y=gy)
    # The kernels ran, not the reference.
    assert y.grad_fn.name().startswith(f"GeneratedBackwardFor_ghostops_{GPU_TRAIN_OPS[backend]}_")
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = gpu_train_tolerances(device)[dtype]
    assert rel_err(y.cpu(), y_ref) < tol
    for name, g, ref in zip(("x", "w1", "g1", "b1", "w2", "g2", "b2"), grads, grads_ref):
        assert g.shape == ref.shape and g.dtype == dtype, name
        assert rel_err(g.cpu(), ref) < GRAD_FACTOR[dtype] * tol, name
    for r, ref in zip(running if running_stats else [], running_ref):
        assert rel_err(r.cpu(), ref) < tol
