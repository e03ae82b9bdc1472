"""The fused Ghost module ops: ``torch.library`` registration and the functional entry point.

The op schemas are defined once, in C++ (csrc/ops.cpp, namespace ``ghostops``); their kernels
register per device (csrc/cpu/...). This file holds what Python owns: the fake (meta)
implementations that torch.compile traces with, and ``ghost_module``, which checks the
arguments and picks the backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ghostops import _ext
from ghostops.backends import select_backend
from ghostops.reference import (
    conv_bn_reference,
    depthwise_bn_reference,
    ghost_channels,
    ghost_module_reference,
    linear_reference,
    pointwise_bn_reference,
    squeeze_excite_reference,
)

_LIB = "ghostops"


def output_size(in_size: int, kernel_size: int, stride: int) -> int:
    """Spatial size after the primary conv (padding kernel_size // 2), as Conv2d computes it."""
    return (in_size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def _memory_format(x: Tensor) -> torch.memory_format:
    # Same rule as ATen's suggest_memory_format, which the C++ kernels use for their output.
    return torch._prims_common.suggest_memory_format(x)


def _register_fakes() -> None:
    @torch.library.register_fake(f"{_LIB}::ghost_forward_eval")
    def _(x, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, cheap_weight,
          bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps, oup, stride, act):  # fmt: skip
        n, _, h, w = x.shape
        k = primary_weight.shape[-1]
        shape = (n, oup, output_size(h, k, stride), output_size(w, k, stride))
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))

    @torch.library.register_fake(f"{_LIB}::ghost_forward_train")
    def _(x, primary_weight, bn1_weight, bn1_bias, bn1_eps, cheap_weight, bn2_weight, bn2_bias,
          bn2_eps, oup, stride, act):  # fmt: skip
        n, _, h, w = x.shape
        init, k = primary_weight.shape[0], primary_weight.shape[-1]
        ho, wo = output_size(h, k, stride), output_size(w, k, stride)
        y = torch.empty((n, oup, ho, wo), dtype=x.dtype, device=x.device,
                        memory_format=_memory_format(x))  # fmt: skip
        # z1 and the statistics in float32 for half inputs (the CUDA kernels; the CPU kernels
        # take float32 / float64 only, and keep x's dtype).
        stats = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        z1 = x.new_empty((n, init, ho, wo), dtype=stats)
        new = cheap_weight.shape[0]
        vectors = [x.new_empty(size, dtype=stats) for size in (init, init, new, new)]
        return (y, z1, *vectors)

    @torch.library.register_fake(f"{_LIB}::ghost_backward")
    def _(grad_y, x, z1, primary_weight, bn1_weight, bn1_bias, mean1, var1, bn1_eps,
          cheap_weight, bn2_weight, bn2_bias, mean2, var2, bn2_eps, stride, act,
          output_mask):  # fmt: skip
        grad_x = x.new_empty(x.shape if output_mask[0] else (0,))
        grad_w = x.new_empty(primary_weight.shape if output_mask[1] else (0,))
        return (grad_x, grad_w, torch.empty_like(bn1_weight), torch.empty_like(bn1_bias),
                cheap_weight.new_empty(cheap_weight.shape), torch.empty_like(bn2_weight),
                torch.empty_like(bn2_bias))  # fmt: skip

    @torch.library.register_fake(f"{_LIB}::dw_bn_eval")
    def _(x, weight, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, act):
        n, c, h, w = x.shape
        k = weight.shape[-1]
        return x.new_empty((n, c, output_size(h, k, stride), output_size(w, k, stride)))

    @torch.library.register_fake(f"{_LIB}::dw_bn_train")
    def _(x, weight, bn_weight, bn_bias, eps, stride, act):
        n, c, h, w = x.shape
        k = weight.shape[-1]
        shape = (n, c, output_size(h, k, stride), output_size(w, k, stride))
        return x.new_empty(shape), x.new_empty(shape), x.new_empty(c), x.new_empty(c)

    @torch.library.register_fake(f"{_LIB}::dw_bn_backward")
    def _(grad_y, x, z, weight, bn_weight, bn_bias, mean, var, eps, stride, act, need_x):
        grad_x = x.new_empty(x.shape if need_x else (0,))
        return (grad_x, torch.empty_like(weight), torch.empty_like(bn_weight),
                torch.empty_like(bn_bias))  # fmt: skip

    @torch.library.register_fake(f"{_LIB}::se_eval")
    def _(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake(f"{_LIB}::conv_bn_eval")
    def _(x, weight, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, act):
        n, _, h, w = x.shape
        k = weight.shape[-1]
        shape = (n, weight.shape[0], output_size(h, k, stride), output_size(w, k, stride))
        return x.new_empty(shape)

    @torch.library.register_fake(f"{_LIB}::linear_eval")
    def _(x, weight, bias, act):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake(f"{_LIB}::pw_bn_eval")
    def _(x, weight, bn_weight, bn_bias, bn_mean, bn_var, eps, act, residual=None):
        n, _, h, w = x.shape
        return x.new_empty((n, weight.shape[0], h, w))


def _dw_train_setup_context(ctx, inputs, output) -> None:
    x, weight, bn_weight, bn_bias, eps, stride, act = inputs
    _y, z, mean, var = output
    ctx.save_for_backward(x, z, weight, bn_weight, bn_bias, mean, var)
    ctx.eps, ctx.stride, ctx.act = eps, stride, act
    ctx.mark_non_differentiable(z, mean, var)
    ctx.set_materialize_grads(False)


def _dw_train_backward(ctx, grad_y, *_unused):
    """The autograd formula of ghostops::dw_bn_train: ghostops::dw_bn_backward."""
    if grad_y is None:
        return (None,) * 7
    if torch.is_grad_enabled():
        raise RuntimeError(
            "ghostops: double backward (create_graph=True) through the fused depthwise conv + "
            "BatchNorm op is not supported; use ghostops.use_backend('reference')"
        )
    x, z, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    grad_x, grad_w, grad_g, grad_b = torch.ops.ghostops.dw_bn_backward(
        grad_y, x, z, weight, bn_weight, bn_bias, mean, var, ctx.eps, ctx.stride, ctx.act,
        ctx.needs_input_grad[0],
    )  # fmt: skip
    return (grad_x if ctx.needs_input_grad[0] else None, grad_w, grad_g, grad_b, None, None,
            None)  # fmt: skip


def _train_setup_context(ctx, inputs, output) -> None:
    x, primary_weight, bn1_weight, bn1_bias, bn1_eps, cheap_weight = inputs[:6]
    bn2_weight, bn2_bias, bn2_eps, _oup, stride, act = inputs[6:]
    _y, z1, mean1, var1, mean2, var2 = output
    ctx.save_for_backward(x, z1, primary_weight, bn1_weight, bn1_bias, mean1, var1,
                          cheap_weight, bn2_weight, bn2_bias, mean2, var2)  # fmt: skip
    ctx.eps, ctx.stride, ctx.act = (bn1_eps, bn2_eps), stride, act
    ctx.mark_non_differentiable(z1, mean1, var1, mean2, var2)
    # No zero-filled gradients for those (z1 alone is half of y's size): they arrive as None.
    ctx.set_materialize_grads(False)


def _train_backward(ctx, grad_y, *_unused, backward_op=None):
    """The autograd formula of a training op (CPU: ghostops::ghost_forward_train; Triton:
    ghostops::ghost_forward_train_triton, which passes ``backward_op``): its backward op."""
    if grad_y is None:
        return (None,) * 12
    if torch.is_grad_enabled():  # create_graph=True: the backward op has no derivative itself
        raise RuntimeError(
            "ghostops: double backward (create_graph=True) through the fused Ghost module "
            "training op is not supported; run this module with "
            "ghostops.use_backend('reference') (or GHOSTOPS_BACKEND=reference)"
        )
    x, z1, pw, g1, b1, mean1, var1, cw, g2, b2, mean2, var2 = ctx.saved_tensors
    needs = ctx.needs_input_grad
    op = torch.ops.ghostops.ghost_backward if backward_op is None else backward_op
    grads = op(
        grad_y, x, z1, pw, g1, b1, mean1, var1, ctx.eps[0], cw, g2, b2, mean2, var2, ctx.eps[1],
        ctx.stride, ctx.act, [needs[0], needs[1]],
    )  # fmt: skip
    gx, gw1, gg1, gb1, gw2, gg2, gb2 = grads
    return (gx if needs[0] else None, gw1 if needs[1] else None, gg1, gb1, None,
            gw2, gg2, gb2, None, None, None, None)  # fmt: skip


if _ext.cpu_available():
    _register_fakes()
    torch.library.register_autograd(
        f"{_LIB}::ghost_forward_train", _train_backward, setup_context=_train_setup_context
    )
    torch.library.register_autograd(
        f"{_LIB}::dw_bn_train", _dw_train_backward, setup_context=_dw_train_setup_context
    )


def _check_args(x, primary_weight, cheap_weight, oup, ratio, dw_size, stride) -> None:
    """Clear errors for bad input, whichever backend runs (the kernels check again)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"a {x.dim()}-D tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"ghost_module: x must be a 4-D (N, C, H, W) tensor, got {got}")
    if not x.is_floating_point():
        raise TypeError(f"ghost_module: x must be a floating-point tensor, got dtype {x.dtype}")
    if ratio < 2:
        raise ValueError(f"ghost_module: ratio must be >= 2, got {ratio}")
    if dw_size < 1 or dw_size % 2 == 0:
        raise ValueError(f"ghost_module: dw_size must be odd and positive, got {dw_size}")
    if stride < 1:
        raise ValueError(f"ghost_module: stride must be >= 1, got {stride}")
    init, new = ghost_channels(oup, ratio)
    if primary_weight.dim() != 4 or primary_weight.shape[0] != init:
        raise ValueError(
            f"ghost_module: primary_weight must have shape ({init}, C_in, k, k) for oup={oup}, "
            f"ratio={ratio}; got {tuple(primary_weight.shape)}"
        )
    if x.shape[1] != primary_weight.shape[1]:
        raise ValueError(
            f"ghost_module: x has {x.shape[1]} channels but primary_weight expects "
            f"{primary_weight.shape[1]} input channels (inp)"
        )
    if tuple(cheap_weight.shape) != (new, 1, dw_size, dw_size):
        raise ValueError(
            f"ghost_module: cheap_weight must have shape ({new}, 1, {dw_size}, {dw_size}), "
            f"got {tuple(cheap_weight.shape)}"
        )
    for name, t in (("primary_weight", primary_weight), ("cheap_weight", cheap_weight)):
        if t.device != x.device:
            raise ValueError(f"ghost_module: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"ghost_module: {name} has dtype {t.dtype} but x has dtype {x.dtype}")


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs convs in on x's device where it is on, else None; None
    also on devices ghostops runs no fused op on (anything but CPU and CUDA: meta tensors, for
    one, where asking autocast raises)."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def autocast_convs(x: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
    """(x, *weights), cast to ``torch.autocast``'s dtype where it is on for x's device, as
    F.conv2d casts its input and weight there (float64 and non-floating tensors are left as
    they are, as autocast leaves them); unchanged otherwise. BatchNorm parameters are not
    passed here: nn.BatchNorm2d keeps them in float32 under autocast, and so do the kernels."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return (x, *weights)
    return tuple(
        t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (x, *weights)
    )


def ghost_module(
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
    """Ghost module forward (DESIGN.md section 1), fused where a kernel covers the call.

    Same arguments and semantics as ``ghostops.reference.ghost_module_reference``:
    x (N, inp, H, W) -> (N, oup, Ho, Wo), in x's memory format. Under ``torch.autocast`` the
    two convs run in its dtype, as nn.Conv2d does there: x and the conv weights are cast
    (autograd flows back to the float32 weights), the BatchNorm parameters are not.
    """
    x, primary_weight, cheap_weight = autocast_convs(x, primary_weight, cheap_weight)
    _check_args(x, primary_weight, cheap_weight, oup, ratio, dw_size, stride)
    backend = select_backend(x.device.type)
    params = (primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var,
              cheap_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var)  # fmt: skip
    act = "relu" if relu else "identity"
    has_running = bn1_mean is not None and bn2_mean is not None
    batch_stats = training or (bn1_mean is None and bn2_mean is None)
    one_by_one = primary_weight.shape[-1] == 1
    # The C++ CPU kernels: eval and training, float32 / float64 (other dtypes: the reference).
    fused = backend == "cpu" and one_by_one and x.dtype in (torch.float32, torch.float64)
    # The GPU kernels (CUDA C++, Triton): float32 / float16 / bfloat16 with float32 math inside;
    # float64 runs the reference.
    gpu_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    cuda = backend == "cuda" and one_by_one and x.dtype in gpu_dtypes
    fused_eval = fused or cuda
    expected = {"cpu": "cpu", "cuda": "cuda"}.get(backend)
    if expected is not None and x.device.type != expected:
        raise ValueError(
            f"ghost_module: the {backend!r} backend runs {expected.upper()} tensors, got x on "
            f"{x.device}"
        )
    # The eval kernels have no autograd: eval mode with gradients stays on the exact reference.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *params)
    )
    # Training ops: the C++ one (CPU and CUDA kernels behind one op), or Triton's.
    triton = backend == "triton" and one_by_one and x.dtype in gpu_dtypes
    if batch_stats and (fused or cuda or triton):
        return _forward_train(
            x, *params, oup=oup, stride=stride, act=act, momentum=momentum, eps=eps,
            update_running=training and has_running,
            op=torch.ops.ghostops.ghost_forward_train_triton if triton else None,
        )  # fmt: skip
    # Triton eval: float32 / float16 / bfloat16 (its GEMM runs in the input's dtype on the
    # tensor cores, which have no float64 path there): float64 runs the reference.
    if triton and not batch_stats and has_running and not needs_grad:
        return torch.ops.ghostops.ghost_forward_eval_triton(
            x, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, eps,
            cheap_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var, eps, oup, stride, act,
        )  # fmt: skip
    if fused_eval and not batch_stats and has_running and not needs_grad:
        return torch.ops.ghostops.ghost_forward_eval(
            x, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, eps,
            cheap_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var, eps, oup, stride, act,
        )  # fmt: skip
    return ghost_module_reference(
        x, *params, oup=oup, ratio=ratio, dw_size=dw_size, stride=stride, relu=relu,
        training=training, momentum=momentum, eps=eps,
    )  # fmt: skip


def ghost_module_eval_cpu(
    x: Tensor,
    params: tuple,
    *,
    oup: int,
    ratio: int,
    dw_size: int,
    stride: int,
    relu: bool,
    eps: float,
) -> Tensor | None:
    """``ghost_module`` in eval mode without autograd, straight to the C++ CPU kernel, leaving
    the argument checks to the kernel (which makes them all): the per-call path of
    ``ghostops.GhostModule`` in inference. ``params``: ``ghost_module``'s ten tensors
    (primary weight, BN1 weight, bias, running mean, var, cheap weight, BN2 the same), one
    ``eps`` for both BatchNorms. None where ``ghost_module`` must decide: another backend,
    device or dtype, a primary kernel other than 1x1, weights of other shapes than ``oup``,
    ``ratio`` and ``dw_size`` give, a non-4-D input, or autograd on.

    At batch 1 the Python around a Ghost module's kernel cost more than the kernel: the
    argument checks and backend choice of ``ghost_module`` were half of GhostModule's 49 us on
    a 16->16 2x2 map (the op alone: 13 us)."""
    pw, cheap = params[0], params[5]
    dtype = x.dtype
    init = -(-oup // ratio)
    if (
        torch.is_grad_enabled()
        or torch.is_autocast_enabled("cpu")
        or dtype not in _CPU_DTYPES
        or pw.dtype != dtype
        or cheap.dtype != dtype
        or x.device.type != "cpu"
        or x.dim() != 4
        or pw.dim() != 4
        or pw.shape[0] != init
        or pw.shape[-1] != 1
        or cheap.dim() != 4
        or cheap.shape[0] != init * (ratio - 1)
        or cheap.shape[-1] != dw_size
        or select_backend("cpu") != "cpu"
    ):
        return None
    return _GHOST_FORWARD_EVAL(
        x, *params[:5], eps, *params[5:], eps, oup, stride, "relu" if relu else "identity"
    )


_CPU_DTYPES = (torch.float32, torch.float64)
if _ext.cpu_available():
    _GHOST_FORWARD_EVAL = torch.ops.ghostops.ghost_forward_eval.default


def _forward_train(x, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, cheap_weight,
                   bn2_weight, bn2_bias, bn2_mean, bn2_var, *, oup, stride, act, momentum, eps,
                   update_running, op=None):  # fmt: skip
    """The fused training forward (batch statistics), then the running-statistics update that
    ``nn.BatchNorm2d`` makes: ``running = (1 - momentum) running + momentum batch``, with the
    unbiased variance; on the tensors' device, no host sync."""
    n, _, h, w = x.shape
    count = n * output_size(h, 1, stride) * output_size(w, 1, stride)
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )
    op = torch.ops.ghostops.ghost_forward_train if op is None else op
    y, _z1, mean1, var1, mean2, var2 = op(
        x, primary_weight, bn1_weight, bn1_bias, eps, cheap_weight, bn2_weight, bn2_bias, eps,
        oup, stride, act,
    )  # fmt: skip
    if update_running:
        _update_running_stats(
            [(bn1_mean, bn1_var, mean1, var1), (bn2_mean, bn2_var, mean2, var2)], count, momentum
        )
    return y


def _update_running_stats(stats, count: int, momentum: float | None) -> None:
    """``nn.BatchNorm2d``'s running-statistics update for each (running mean, running var,
    batch mean, biased batch var) of ``stats``: ``running += momentum * (batch - running)``
    with the unbiased variance, as one foreach kernel, on the tensors' device (no host sync)."""
    if not momentum:
        return
    unbias = count / (count - 1)
    running = [t for r_mean, r_var, _, _ in stats for t in (r_mean, r_var)]
    batch = [t for _, _, b_mean, b_var in stats for t in (b_mean, b_var * unbias)]
    with torch.no_grad():
        torch._foreach_lerp_(
            running, [b.to(r.dtype) for b, r in zip(batch, running, strict=True)], momentum
        )


def depthwise_bn(
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
    training: bool = False,
    momentum: float = 0.1,
) -> Tensor:
    """Depthwise conv + BatchNorm + optional ReLU. Eval (running statistics): as
    ``ghostops.reference.depthwise_bn_reference``: GhostNet's depthwise convs outside the Ghost
    modules. The C++ kernel (``ghostops::dw_bn_eval``) runs NCHW-contiguous float32 / float64
    CPU tensors under the ``cpu`` backend when no gradient is needed and output rows are at
    least 8 wide or the call is small (at most 64Ki outputs); anything else runs the
    reference. (The kernel's vectors run along a row: on a 7x7 output, GhostNet's 672-channel
    5x5 stride-2 conv at batch 32 took 1.8 ms against stock PyTorch's 1.5.)

    ``training=True``: batch statistics normalise, and ``bn_mean`` / ``bn_var`` (if given) are
    updated in place as ``nn.BatchNorm2d`` does with factor ``momentum``;
    ``ghostops::dw_bn_train`` (with autograd, ``ghostops::dw_bn_backward``) runs NCHW-contiguous
    float32 / float64 CPU tensors under the ``cpu`` backend, the reference anything else."""
    if training:
        return _depthwise_bn_train(
            x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=stride, relu=relu, eps=eps,
            momentum=momentum,
        )  # fmt: skip
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, weight, bn_weight, bn_bias)
    )
    k = weight.shape[-1]
    ho, wo = output_size(x.shape[-2], k, stride), output_size(x.shape[-1], k, stride)
    # Narrow rows waste most of the kernel's vector lanes, but on small calls stock PyTorch's
    # fixed costs weigh more (batch 1, 672 channels 14x14 -> 7x7, 5x5: 68 us against 95).
    small = x.shape[0] * x.shape[1] * ho * wo <= _DW_SMALL_OUTPUTS
    if _dw_kernel_applies(x, weight) and (wo >= 8 or small) and not needs_grad:
        act = "relu" if relu else "identity"
        return torch.ops.ghostops.dw_bn_eval(
            x, weight, bn_weight, bn_bias, bn_mean, bn_var, eps, stride, act
        )
    return depthwise_bn_reference(
        x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=stride, relu=relu, eps=eps
    )


_DW_SMALL_OUTPUTS = 65536


def _depthwise_bn_train(x, weight, bn_weight, bn_bias, bn_mean, bn_var, *, stride, relu, eps,
                        momentum):  # fmt: skip
    act = "relu" if relu else "identity"
    if not _dw_kernel_applies(x, weight):
        y = F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])
        y = F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, True, momentum, eps)
        return F.relu(y) if relu else y
    y, _z, mean, var = torch.ops.ghostops.dw_bn_train(
        x, weight, bn_weight, bn_bias, eps, stride, act
    )
    if bn_mean is not None:
        _update_running_stats([(bn_mean, bn_var, mean, var)], y.numel() // y.shape[1], momentum)
    return y


def _dw_kernel_applies(x: Tensor, weight: Tensor) -> bool:
    """The dw_bn C++ kernels take what ``_plane_kernel_applies`` says, with an odd kernel."""
    return _plane_kernel_applies(x) and weight.shape[-1] % 2 == 1


def _plane_kernel_applies(x: Tensor) -> bool:
    """The C++ kernels that work plane by plane (dw_bn, se_eval) take NCHW-contiguous
    float32 / float64 CPU tensors with a non-empty map, under the ``cpu`` backend."""
    return (
        select_backend(x.device.type) == "cpu"
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 4
        and x.is_contiguous()
        and x.shape[-2] > 0
        and x.shape[-1] > 0
    )


def squeeze_excite(
    x: Tensor,
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    expand_weight: Tensor,
    expand_bias: Tensor,
) -> Tensor:
    """GhostNet's squeeze-and-excitation, as ``ghostops.reference.squeeze_excite_reference``:
    x (N, C, H, W) scaled per channel by ``relu6(W_e relu(W_r mean_hw(x) + b_r) + b_e + 3) / 6``
    with 1x1 conv weights (R, C, 1, 1) and (C, R, 1, 1). The C++ kernel
    (``ghostops::se_eval``) runs NCHW-contiguous float32 / float64 CPU tensors under the
    ``cpu`` backend when no gradient is needed; anything else (training, channels_last, other
    devices) runs the reference."""
    args = (x, reduce_weight, reduce_bias, expand_weight, expand_bias)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    weights_fit = all(t.dtype == x.dtype and t.device == x.device for t in args[1:])
    if _plane_kernel_applies(x) and weights_fit and not needs_grad:
        return torch.ops.ghostops.se_eval(*args)
    return squeeze_excite_reference(*args)


def pointwise_bn(
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
    """Eval-mode 1x1 conv + BatchNorm (running statistics) + optional ReLU, plus ``residual``
    if given, as ``ghostops.reference.pointwise_bn_reference``: GhostNet's shortcut 1x1 conv +
    BN with the bottleneck's add, and its 1x1 ConvBnAct. The C++ kernel
    (``ghostops::pw_bn_eval``) runs NCHW-contiguous float32 / float64 CPU tensors under the
    ``cpu`` backend when no gradient is needed; anything else runs the reference."""
    args = (x, weight, bn_weight, bn_bias, bn_mean, bn_var)
    tensors = args if residual is None else (*args, residual)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fits = all(t.dtype == x.dtype and t.device == x.device for t in tensors[1:])
    one_by_one = weight.dim() == 4 and weight.shape[-2:] == (1, 1)
    # The kernel adds a residual of the output's own shape; the reference also broadcasts.
    out_shape = (x.shape[0], weight.shape[0], *x.shape[2:]) if x.dim() == 4 else None
    fits = (
        fits
        and one_by_one
        and (residual is None or (residual.is_contiguous() and residual.shape == out_shape))
    )
    if _plane_kernel_applies(x) and fits and not needs_grad:
        act = "relu" if relu else "identity"
        return torch.ops.ghostops.pw_bn_eval(*args, eps, act, residual)
    return pointwise_bn_reference(*args, relu=relu, eps=eps, residual=residual)


# Input channels ghostops::conv_bn_eval takes (its kernel keeps every input tap in registers
# for up to 16 output channels; csrc/cpu/conv_bn.cpp).
_CONV_MAX_INPUT_CHANNELS = 8


def conv_bn(
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
    """Eval-mode dense conv (padding d // 2, odd d, no bias) + BatchNorm (running statistics) +
    optional ReLU, as ``ghostops.reference.conv_bn_reference``: GhostNet's stem. The C++
    kernel (``ghostops::conv_bn_eval``) runs NCHW-contiguous float32 / float64 CPU tensors
    with 1 to 8 input channels under the ``cpu`` backend when no gradient is needed; anything
    else runs the reference."""
    args = (x, weight, bn_weight, bn_bias, bn_mean, bn_var)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    fits = all(t.dtype == x.dtype and t.device == x.device for t in args[1:])
    thin = x.dim() == 4 and 1 <= x.shape[1] <= _CONV_MAX_INPUT_CHANNELS
    thin = thin and weight.dim() == 4 and weight.shape[-1] == weight.shape[-2]  # square kernel
    if _dw_kernel_applies(x, weight) and thin and fits and not needs_grad:
        act = "relu" if relu else "identity"
        return torch.ops.ghostops.conv_bn_eval(*args, eps, stride, act)
    return conv_bn_reference(*args, stride=stride, relu=relu, eps=eps)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, relu: bool = False) -> Tensor:
    """``F.linear`` + optional ReLU, as ``ghostops.reference.linear_reference``: GhostNet's head.
    The C++ kernel (``ghostops::linear_eval``: matrix-vector products that stream the weight
    once, split over the threads, for up to 4 rows of x; ATen's addmm beyond) runs 2-D
    float32 / float64 CPU tensors under the ``cpu`` backend when no gradient is needed;
    anything else runs the reference."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fits = (
        x.dim() == 2
        and weight.dim() == 2
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors[1:])
        and select_backend(x.device.type) == "cpu"
    )
    if fits and not needs_grad:
        return torch.ops.ghostops.linear_eval(x, weight, bias, "relu" if relu else "identity")
    return linear_reference(x, weight, bias, relu=relu)
