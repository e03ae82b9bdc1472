"""Triton kernels of the Ghost module: eval forward (DESIGN.md section 2).

First version, two kernels: ``_primary_kernel`` computes the primary 1x1 conv as a tiled GEMM
(``tl.dot``, float32 accumulation) with the folded BN1 and the activation in its epilogue and
writes the intrinsic channels into ``y[:, :init]``; ``_cheap_kernel`` reads them back (from L2 on
a GPU) for the depthwise cheap op with the folded BN2 and the activation, into ``y[:, init:oup]``.
Both work on any strides (NCHW, channels_last, views), so the output follows the input's memory
format. The one-pass form, with the intrinsic tile and its halo kept on chip, is the next step.

Registered as ``ghostops::ghost_forward_eval_triton`` with ``torch.library.triton_op`` and
``wrap_triton``, so ``torch.compile`` sees one op. On CPU tensors it runs under
``TRITON_INTERPRET=1`` (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ghostops.ops import output_size


@triton.jit
def primary_gemm_tile(
    x_ptr, w_ptr, rows, x_pix, pix_ok, K, M, sxc,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """sum_k w[rows, k] x[k, pixels] in float32 (tl.dot over BLOCK_K slices): the primary 1x1
    conv of a tile; ``x_pix`` the pixels' offsets in x, ``sxc`` x's channel stride. Shared by
    the eval kernel here and the training forward (triton_train.py)."""
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)  # fmt: skip
        xv = tl.load(x_ptr + ks[:, None] * sxc + x_pix[None, :],
                     mask=(ks[:, None] < K) & pix_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(w.to(tl.float32), xv.to(tl.float32))
    return acc


@triton.jit
def plane_tile(CHANNELS, P, Wo, BLOCK: tl.constexpr):
    """The tile of a plane kernel whose grid is (image x channel, pixel tiles): (n, channel, q,
    ok, ho, wo), q the tile's flat pixel indices, ok those inside the (Ho, Wo) plane."""
    pid = tl.program_id(0)
    q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return pid // CHANNELS, pid % CHANNELS, q, q < P, q // Wo, q % Wo


@triton.jit
def _primary_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    n_pix, P, Wo, K, M, stride,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """y[n, m, ho, wo] = act(b[m] + sum_k w[m, k] x[n, k, ho * stride, wo * stride])."""
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < n_pix
    n = pix // P
    q = pix % P
    ho = q // Wo
    wo = q % Wo
    x_pix = n * sxn + (ho * stride) * sxh + (wo * stride) * sxw
    acc = primary_gemm_tile(x_ptr, w_ptr, rows, x_pix, pix_ok, K, M, sxc,
                            BLOCK_M, BLOCK_K, BLOCK_P)  # fmt: skip
    acc += tl.load(b_ptr + rows, mask=rows < M, other=0.0)[:, None]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in F.relu
    y_off = rows[:, None] * syc + (n * syn + ho * syh + wo * syw)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & pix_ok[None, :])  # fmt: skip


@triton.jit
def _cheap_kernel(
    y_ptr, w_ptr, b_ptr,
    P, Ho, Wo, INIT, GHOST, PER,
    syn, syc, syh, syw,
    D: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """y[n, INIT + j] = act(b[j] + depthwise D x D conv of y[n, j // PER]), zero padded."""
    n, j, q, ok, ho, wo = plane_tile(GHOST, P, Wo, BLOCK_P)  # (image, ghost channel)
    src = y_ptr + n * syn + (j // PER) * syc
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t in tl.static_range(D * D):
        hi = ho + (t // D - D // 2)
        wi = wo + (t % D - D // 2)
        inside = ok & (hi >= 0) & (hi < Ho) & (wi >= 0) & (wi < Wo)
        v = tl.load(src + hi * syh + wi * syw, mask=inside, other=0.0)
        acc += tl.load(w_ptr + j * D * D + t).to(tl.float32) * v.to(tl.float32)
    acc += tl.load(b_ptr + j).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in F.relu
    dst = y_ptr + n * syn + (INIT + j) * syc + ho * syh + wo * syw
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _fold(weight, gamma, beta, mean, var, eps):
    """BN folded into the conv before it, in float32: (weight (C, fan_in), bias (C,))."""
    scale = gamma.float() * torch.rsqrt(var.float() + eps)
    folded = weight.reshape(weight.shape[0], -1).float() * scale[:, None]
    return folded.contiguous(), (beta.float() - mean.float() * scale).contiguous()


@triton_op("ghostops::ghost_forward_eval_triton", mutates_args=())
def ghost_forward_eval_triton(
    x: torch.Tensor,
    primary_weight: torch.Tensor,
    bn1_weight: torch.Tensor,
    bn1_bias: torch.Tensor,
    bn1_mean: torch.Tensor,
    bn1_var: torch.Tensor,
    bn1_eps: float,
    cheap_weight: torch.Tensor,
    bn2_weight: torch.Tensor,
    bn2_bias: torch.Tensor,
    bn2_mean: torch.Tensor,
    bn2_var: torch.Tensor,
    bn2_eps: float,
    oup: int,
    stride: int,
    act: str,
) -> torch.Tensor:
    """Eval-mode Ghost module, the same contract as ``ghostops::ghost_forward_eval``."""
    n, inp, h, w = x.shape
    init = primary_weight.shape[0]
    ghost = oup - init
    d = cheap_weight.shape[-1]
    ho, wo = output_size(h, 1, stride), output_size(w, 1, stride)
    fmt = torch._prims_common.suggest_memory_format(x)
    y = torch.empty((n, oup, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    w1, b1 = _fold(primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    w2, b2 = _fold(cheap_weight, bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps)
    relu = act == "relu"
    P = ho * wo
    block_m = max(16, min(64, triton.next_power_of_2(init)))
    block_k = max(16, min(32, triton.next_power_of_2(inp)))
    block_p = 64
    grid = (triton.cdiv(n * P, block_p), triton.cdiv(init, block_m))
    wrap_triton(_primary_kernel)[grid](
        x, w1, b1, y, n * P, P, wo, inp, init, stride, *x.stride(), *y.stride(),
        RELU=relu, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_P=block_p,
    )  # fmt: skip
    if ghost > 0:
        block = max(16, min(256, triton.next_power_of_2(P)))
        grid2 = (n * ghost, triton.cdiv(P, block))
        wrap_triton(_cheap_kernel)[grid2](
            y, w2, b2, P, ho, wo, init, ghost, cheap_weight.shape[0] // init, *y.stride(),
            D=d, RELU=relu, BLOCK_P=block,
        )  # fmt: skip
    return y
