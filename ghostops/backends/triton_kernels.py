"""Triton kernels of the Ghost module: eval forward (DESIGN.md section 2).

Two forms, chosen per shape by ``eval_plan`` (a documented heuristic, below):

- **one pass** (``_one_pass_kernel``): a program owns a tile of output pixels and a block of
  ghost channels. For each tap of the cheap op it recomputes the intrinsic channels at the
  pixels that tap reads (a ``tl.dot`` GEMM over x, BN1 and the activation in registers, zero
  outside the map) and accumulates them into the ghost channels; the centre tap's intrinsic
  values are stored into ``y[:, :init]``, the ghost channels into ``y[:, init:oup]``. Nothing is
  read back, and no program reads another's output: x is read (from L1 / L2 after the first
  tap), y written, once. The price is d*d times the primary GEMM's flops, so it is taken where
  the primary conv is thin (few input channels: GhostNet's 112x112 and 56x56 modules, bound by
  memory traffic, where the saved read of x1 is a quarter to a third of the bytes).
- **two kernels**: ``_primary_kernel`` (the GEMM, BN1 + act in its epilogue, into
  ``y[:, :init]``), then ``_cheap_kernel`` (the depthwise op reading those channels back, BN2 +
  act, into ``y[:, init:oup]``): for wide primary convs (14x14 and 7x7 maps), where d*d GEMMs
  would cost more than the re-read.

The GEMMs take x and the primary weight in x's dtype (float16 / bfloat16 tensor cores, float32
accumulation; float32 may run as TF32 on a GPU, as cuDNN's convolutions do by default), with
BN1 applied as a float32 scale and shift in the epilogue rather than folded into the weight, so
a half-precision weight is never rounded again. The cheap op folds BN2 into float32 weights.
All kernels take any strides (NCHW, channels_last, views): the output follows the input's
memory format.

Registered as ``ghostops::ghost_forward_eval_triton`` with ``torch.library.triton_op`` and
``wrap_triton``, so ``torch.compile`` sees one op. On CPU tensors it runs under
``TRITON_INTERPRET=1`` (how the tests check it without a GPU). ``GHOSTOPS_TRITON_EVAL`` =
``one_pass`` / ``two_kernels`` forces a form (``auto``, the default: the heuristic), so a GPU
session can time both.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ghostops.ops import output_size

_FORM_ENV = "GHOSTOPS_TRITON_EVAL"
_FORMS = ("auto", "one_pass", "two_kernels")
# The one-pass form recomputes the primary GEMM for every tap: taken while that costs at most
# this many flops per byte of the module's own traffic (x read, y written). GhostNet at fp16:
# 36-81 on the 112x112 and 56x56 modules, 116-154 at 28x28, 250 and more at 14x14 and 7x7. An
# H100 does about 300 dense fp16 tensor-core flops per byte of HBM traffic at peak, and small
# tl.dot tiles reach a fraction of that: a first guess, to be tuned on a GPU. Halved for
# float32, whose tl.dot runs as TF32 at half the fp16 rate.
ONE_PASS_MAX_FLOPS_PER_BYTE = 96


@triton.jit
def primary_gemm_tile(
    x_ptr, w_ptr, rows, x_pix, pix_ok, K, M, sxc,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, DOT_F32: tl.constexpr,
    VEC_K: tl.constexpr, VEC_X: tl.constexpr,
):  # fmt: skip
    """sum_k w[rows, k] x[k, pixels] with float32 accumulation (tl.dot over BLOCK_K slices, in
    the operands' dtype: w and x must share it; in float32 where ``DOT_F32``, see
    ``dot_in_float32``): the primary 1x1 conv of a tile; ``x_pix`` the pixels' offsets in x,
    ``sxc`` x's channel stride, rows >= M and pixels not ``pix_ok`` read as zero. Vector hints
    (``gemm_vectors``): VEC_K divides K, VEC_X every offset in ``x_pix``, so runs of that many
    channels move as one aligned vector where they are contiguous (w's rows; x's pixels in
    channels_last). Shared by the eval kernels here and the training forward
    (triton_train.py)."""
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    w_rows = tl.multiple_of(rows * K, [VEC_K])[:, None]
    x_pix = tl.multiple_of(x_pix, [VEC_X])[None, :]
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = tl.max_constancy(ks < K, [VEC_K])
        w = tl.load(w_ptr + w_rows + ks[None, :], mask=(rows[:, None] < M) & k_ok[None, :],
                    other=0.0)  # fmt: skip
        xv = tl.load(x_ptr + ks[:, None] * sxc + x_pix, mask=k_ok[:, None] & pix_ok[None, :],
                     other=0.0)  # fmt: skip
        if DOT_F32:
            w = w.to(tl.float32)
            xv = xv.to(tl.float32)
        acc = tl.dot(w, xv, acc)
    return acc


def vector_width(itemsize: int, *counts: int) -> int:
    """The widest run of elements, at most 16 bytes, that ``counts`` (strides, channel counts,
    block sizes) are all multiples of: a power of two, 1 where any is odd."""
    g = math.gcd(*counts)
    return min(g & -g, 16 // itemsize) if g else 1


def channel_vector(t: torch.Tensor, *counts: int) -> int:
    """Vector width along the channels of a 4-D tensor ``t`` (an activation): the width that
    divides its other strides and ``counts`` where channels are innermost, else 1."""
    if t.stride(1) != 1:
        return 1
    return vector_width(t.element_size(), t.stride(0), t.stride(2), t.stride(3), *counts)


def gemm_vectors(x: torch.Tensor) -> dict:
    """``primary_gemm_tile``'s vector hints for x (N, K, H, W) and a contiguous (M, K) weight
    of its dtype."""
    k = x.shape[1]
    return {"VEC_K": vector_width(x.element_size(), k), "VEC_X": channel_vector(x, k)}


def dot_in_float32(x: torch.Tensor) -> bool:
    """Whether ``primary_gemm_tile`` must upcast its operands: only bfloat16 under the
    interpreter (CPU tensors), which keeps bfloat16 as raw uint16 bits and would multiply
    those as integers in tl.dot. On a GPU bfloat16 runs on the tensor cores like float16."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


@triton.jit
def _act(v, RELU: tl.constexpr):
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as in F.relu
    return v


@triton.jit
def _pixel_tile(n_pix, P, Wo, BLOCK_P: tl.constexpr):
    """The flat output pixels (over images) of program_id(0)'s tile: (ok, n, ho, wo)."""
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = pix % P
    return pix < n_pix, pix // P, q // Wo, q % Wo


@triton.jit
def _primary_kernel(
    x_ptr, w_ptr, sc_ptr, sh_ptr, y_ptr,
    n_pix, P, Wo, K, M, stride,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_F32: tl.constexpr, VEC_K: tl.constexpr, VEC_X: tl.constexpr, VEC_Y: tl.constexpr,
):  # fmt: skip
    """y[n, m, ho, wo] = act(sc[m] sum_k w[m, k] x[n, k, ho * stride, wo * stride] + sh[m]).
    VEC_Y divides M and y's pixel strides (``channel_vector``)."""
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_pix = n * sxn + (ho * stride) * sxh + (wo * stride) * sxw
    acc = primary_gemm_tile(x_ptr, w_ptr, rows, x_pix, ok, K, M, sxc,
                            BLOCK_M, BLOCK_K, BLOCK_P, DOT_F32, VEC_K, VEC_X)  # fmt: skip
    row_ok = tl.max_constancy(rows < M, [VEC_Y])
    sc = tl.load(sc_ptr + rows, mask=row_ok, other=0.0)
    sh = tl.load(sh_ptr + rows, mask=row_ok, other=0.0)
    acc = _act(acc * sc[:, None] + sh[:, None], RELU)
    y_pix = tl.multiple_of(n * syn + ho * syh + wo * syw, [VEC_Y])
    y_off = rows[:, None] * syc + y_pix[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & ok[None, :])  # fmt: skip


@triton.jit
def _cheap_kernel(
    y_ptr, w_ptr, b_ptr,
    n_pix, P, Ho, Wo, INIT, GHOST, PER,
    syn, syc, syh, syw,
    D: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):  # fmt: skip
    """y[n, INIT + j] = act(b[j] + depthwise D x D conv of y[n, j // PER]), zero padded, on a
    tile of BLOCK_P output pixels (flat over images) x BLOCK_C ghost channels j. The launcher
    shapes the tile to y's layout (``cheap_tile``): BLOCK_C = 1 on channel planes (NCHW: a warp
    reads a row of pixels), a block of channels where they are innermost (channels_last: a warp
    reads runs of channels, whole sectors rather than one element of each). VEC divides y's
    strides, INIT and GHOST: runs of VEC channels are aligned and all in or all out of range,
    which lets the compiler move them as one vector."""
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = tl.max_constancy(j < GHOST, [VEC])
    src = ((j // PER) * syc)[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for t in tl.static_range(D * D):
        hi = ho + (t // D - D // 2)
        wi = wo + (t % D - D // 2)
        inside = ok & (hi >= 0) & (hi < Ho) & (wi >= 0) & (wi < Wo)
        pix = tl.multiple_of(n * syn + hi * syh + wi * syw, [VEC])
        v = tl.load(y_ptr + pix[:, None] + src, mask=inside[:, None] & j_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + j * (D * D) + t, mask=j_ok, other=0.0)
        acc += wt[None, :] * v.to(tl.float32)
    acc = _act(acc + tl.load(b_ptr + j, mask=j_ok, other=0.0)[None, :], RELU)
    pix = tl.multiple_of(n * syn + ho * syh + wo * syw, [VEC])
    dst = pix[:, None] + (tl.multiple_of(INIT + j, [VEC]) * syc)[None, :]
    tl.store(y_ptr + dst, acc.to(y_ptr.dtype.element_ty), mask=ok[:, None] & j_ok[None, :])


def channel_tile(channels: int, channels_inner: bool, outputs: int = 2048) -> dict:
    """The tile of the kernels that work on (pixel, channel) planes (the cheap op here, the
    training passes in triton_train.py), a heuristic for 4 warps: ``outputs`` (pixel, channel)
    pairs a program in a block of channels where they are innermost in memory (channels_last;
    NCHW on 1x1 maps), so a warp reads runs of channels, whole sectors rather than one element
    of each; else one channel's plane, 128 pixels a tile."""
    if not channels_inner:
        return {"BLOCK_P": 128, "BLOCK_C": 1}
    block_c = max(2, min(64, triton.next_power_of_2(channels)))
    return {"BLOCK_P": max(1, outputs // block_c), "BLOCK_C": block_c}


def cheap_tile(y: torch.Tensor, init: int, ghost: int) -> dict:
    """The cheap kernel's tile (``channel_tile``) and vector width for y."""
    tile = channel_tile(ghost, y.stride(1) == 1)
    return {**tile, "VEC": channel_vector(y, init, ghost, tile["BLOCK_C"])}


@triton.jit
def _one_pass_kernel(
    x_ptr, w1_ptr, sc1_ptr, sh1_ptr, w2_ptr, b2_ptr, y_ptr,
    n_pix, P, Ho, Wo, K, INIT, GHOST, NEW, PER, stride,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    D: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, DOT_F32: tl.constexpr,
    VEC_K: tl.constexpr, VEC_X: tl.constexpr, VEC_Y: tl.constexpr,
):  # fmt: skip
    """The whole module on a tile: rows are ghost channels j (intrinsic channel c = j // PER
    feeds them), columns output pixels. Per tap: x1 = act(BN1(W1 x)) at the pixels the tap
    reads, zero outside the map, accumulated with w2[j, tap]; the centre tap's x1 goes to
    y[:, c] from the rows j % PER == 0, and act(z2 + b2) to y[:, INIT + j] for j < GHOST.
    VEC_Y divides INIT, GHOST, NEW and y's pixel strides (``channel_vector``)."""
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    j = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = j // PER
    row_ok = tl.max_constancy(j < NEW, [VEC_Y])
    y_pix = tl.multiple_of(n * syn + ho * syh + wo * syw, [VEC_Y])[None, :]
    sc1 = tl.load(sc1_ptr + c, mask=row_ok, other=0.0)[:, None]
    sh1 = tl.load(sh1_ptr + c, mask=row_ok, other=0.0)[:, None]
    z2 = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for t in tl.static_range(D * D):
        hi = ho + (t // D - D // 2)
        wi = wo + (t % D - D // 2)
        inside = ok & (hi >= 0) & (hi < Ho) & (wi >= 0) & (wi < Wo)
        x_pix = n * sxn + (hi * stride) * sxh + (wi * stride) * sxw
        z1 = primary_gemm_tile(x_ptr, w1_ptr, c, x_pix, inside, K, INIT, sxc,
                               BLOCK_M, BLOCK_K, BLOCK_P, DOT_F32, VEC_K, VEC_X)  # fmt: skip
        x1 = tl.where(inside[None, :], _act(z1 * sc1 + sh1, RELU), 0.0)
        if t == (D * D) // 2:  # the centre tap reads the tile's own pixels: store x1
            keep = row_ok & (j % PER == 0)
            y1 = c[:, None] * syc + y_pix
            tl.store(y_ptr + y1, x1.to(y_ptr.dtype.element_ty), mask=keep[:, None] & ok[None, :])
        w2 = tl.load(w2_ptr + j * (D * D) + t, mask=row_ok, other=0.0)
        z2 += w2[:, None] * x1
    b2 = tl.load(b2_ptr + j, mask=row_ok, other=0.0)
    x2 = _act(z2 + b2[:, None], RELU)
    y2 = tl.multiple_of(INIT + j, [VEC_Y])[:, None] * syc + y_pix
    ghost_ok = tl.max_constancy(j < GHOST, [VEC_Y])
    tl.store(y_ptr + y2, x2.to(y_ptr.dtype.element_ty), mask=ghost_ok[:, None] & ok[None, :])


@triton.jit
def _fold_kernel(
    g1_ptr, bt1_ptr, m1_ptr, v1_ptr, eps1, g2_ptr, bt2_ptr, m2_ptr, v2_ptr, eps2, w2_ptr,
    sc1_ptr, sh1_ptr, w2f_ptr, b2_ptr, INIT, NEW, TAPS, BLOCK: tl.constexpr,
):  # fmt: skip
    """Both eval BatchNorms as the kernels take them, in one launch (about twenty torch ops a
    call before): sc1 = g1 / sqrt(v1 + eps1),
    sh1 = bt1 - m1 sc1 (init channels); w2f[j, t] = w2[j, t] sc2[j], b2 = bt2 - m2 sc2 (new
    ghost channels); float32, whatever dtype the vectors come in."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < INIT
    g = tl.load(g1_ptr + e, mask=ok, other=1.0).to(tl.float32)
    v = tl.load(v1_ptr + e, mask=ok, other=1.0).to(tl.float32)
    sc = g / tl.sqrt_rn(v + eps1)
    tl.store(sc1_ptr + e, sc, mask=ok)
    bt = tl.load(bt1_ptr + e, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m1_ptr + e, mask=ok, other=0.0).to(tl.float32)
    tl.store(sh1_ptr + e, bt - m * sc, mask=ok)
    ok = e < NEW * TAPS
    j = e // TAPS
    g = tl.load(g2_ptr + j, mask=ok, other=1.0).to(tl.float32)
    v = tl.load(v2_ptr + j, mask=ok, other=1.0).to(tl.float32)
    w = tl.load(w2_ptr + e, mask=ok, other=0.0).to(tl.float32)
    tl.store(w2f_ptr + e, w * (g / tl.sqrt_rn(v + eps2)), mask=ok)
    ok = e < NEW
    g = tl.load(g2_ptr + e, mask=ok, other=1.0).to(tl.float32)
    v = tl.load(v2_ptr + e, mask=ok, other=1.0).to(tl.float32)
    bt = tl.load(bt2_ptr + e, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m2_ptr + e, mask=ok, other=0.0).to(tl.float32)
    tl.store(b2_ptr + e, bt - m * (g / tl.sqrt_rn(v + eps2)), mask=ok)


def fold_eval_params(bn1, bn1_eps, cheap_weight, bn2, bn2_eps):
    """(sc1, sh1, w2f, b2) of ``_fold_kernel`` from bn = (weight, bias, running mean, running
    var) and the cheap weights (new, 1, d, d): float32 views of one buffer, one launch."""
    init, new = bn1[0].shape[0], cheap_weight.shape[0]
    taps = cheap_weight.shape[-1] * cheap_weight.shape[-2]
    out = torch.empty(2 * init + new * taps + new, dtype=torch.float32, device=cheap_weight.device)
    sc1, sh1, w2f, b2 = out.split([init, init, new * taps, new])
    block = 1024
    grid = (triton.cdiv(max(init, new * taps), block),)
    g1, bt1, m1, v1 = (t.contiguous() for t in bn1)
    g2, bt2, m2, v2 = (t.contiguous() for t in bn2)
    wrap_triton(_fold_kernel)[grid](
        g1, bt1, m1, v1, bn1_eps, g2, bt2, m2, v2, bn2_eps, cheap_weight.contiguous(),
        sc1, sh1, w2f, b2, init, new, taps, BLOCK=block,
    )  # fmt: skip
    return sc1, sh1, w2f, b2


def eval_plan(inp: int, init: int, oup: int, new: int, d: int, itemsize: int) -> dict:
    """The eval kernels' form and block sizes for a shape (a heuristic, documented here; the
    benchmark and ``GHOSTOPS_TRITON_EVAL`` are how a GPU session checks it):

    - ``one_pass`` while its GEMM recompute, ``new * inp * 2 * d * d`` flops per output pixel
      (rows are ghost channels: ratio > 2 repeats each intrinsic row ratio - 1 times), stays
      within ``ONE_PASS_MAX_FLOPS_PER_BYTE`` (half that for float32) of the
      ``(inp + oup) * itemsize`` bytes the module moves per output pixel; else ``two_kernels``.
    - Row blocks (channels) of 16-128, the power of two that covers them where it can, so small
      modules do not compute empty rows and a GEMM reads x once per 128 intrinsic channels
      rather than once per 64 (GhostNet's 80- to 120-channel primaries: once, not twice, for
      the same rows computed); past 128, blocks of 64 where 128 would compute more empty rows.
      At most 64 in float32 (its pipeline stages' tiles take twice the bytes) and 32 in one
      pass (whose nine unrolled taps would spill registers at 64 rows: 1.1 KB a thread for
      24->72 in a compile for sm_90); K blocks of
      16-64 (at most 32 in a float32 one pass: at 64, channels_last 72->24 spilled 216 bytes a
      thread); 64 pixels a tile (the cheap op's tile: ``cheap_tile``); 8 warps in one pass
      (with 4, float32 72->24 spilled 500 bytes a thread), else 4. ``python
      tests/triton_gpu_compile.py`` compiles each kernel as its op launches it for sm_90 and
      prints its registers, spills and global access widths.

    Under torch.compile the form is chosen when the graph is traced (the variable read then).
    """
    form = os.environ.get(_FORM_ENV, "auto")
    if form not in _FORMS:
        raise ValueError(f"{_FORM_ENV}={form!r}: expected one of {_FORMS}")
    if form == "auto":
        intensity = new * inp * 2 * d * d / ((inp + oup) * itemsize)
        limit = ONE_PASS_MAX_FLOPS_PER_BYTE / (2 if itemsize == 4 else 1)
        form = "one_pass" if intensity <= limit else "two_kernels"
    one_pass = form == "one_pass"
    rows = triton.next_power_of_2(new if one_pass else init)
    block_m = max(16, min(32 if one_pass else 64 if itemsize == 4 else 128, rows))
    if block_m == 128 and init > 128 and -(-init // 64) * 64 < -(-init // 128) * 128:
        block_m = 64
    block_k = 32 if one_pass and itemsize == 4 else 64
    return {
        "form": form,
        "BLOCK_M": block_m,
        "BLOCK_K": max(16, min(block_k, triton.next_power_of_2(inp))),
        "BLOCK_P": 64,
        "num_warps": 8 if one_pass else 4,
    }


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
    """Eval-mode Ghost module, the same contract as ``ghostops::ghost_forward_eval``, for
    float32 / float16 / bfloat16 x with conv weights of x's dtype (``ghost_module`` sends
    float64 to the reference)."""
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and primary_weight.dtype == x.dtype
        and cheap_weight.dtype == x.dtype,
        lambda: (
            "ghost_forward_eval_triton: x must be float32, float16 or bfloat16 with conv "
            f"weights of its dtype, got {x.dtype}, {primary_weight.dtype}, {cheap_weight.dtype}"
        ),
    )
    n, inp, h, w = x.shape
    init, new = primary_weight.shape[0], cheap_weight.shape[0]
    ghost = oup - init
    d = cheap_weight.shape[-1]
    ho, wo = output_size(h, 1, stride), output_size(w, 1, stride)
    fmt = torch._prims_common.suggest_memory_format(x)
    y = torch.empty((n, oup, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    w1 = primary_weight.reshape(init, inp).contiguous()
    sc1, sh1, w2, b2 = fold_eval_params(
        (bn1_weight, bn1_bias, bn1_mean, bn1_var), bn1_eps, cheap_weight,
        (bn2_weight, bn2_bias, bn2_mean, bn2_var), bn2_eps,
    )  # fmt: skip
    relu = act == "relu"
    P = ho * wo
    plan = eval_plan(inp, init, oup, new, d, x.element_size())
    blocks = {k: plan[k] for k in ("BLOCK_M", "BLOCK_K", "BLOCK_P", "num_warps")}
    blocks["DOT_F32"] = dot_in_float32(x)
    blocks.update(gemm_vectors(x))
    tiles = triton.cdiv(n * P, plan["BLOCK_P"])
    if plan["form"] == "one_pass":
        wrap_triton(_one_pass_kernel)[(tiles, triton.cdiv(new, plan["BLOCK_M"]))](
            x, w1, sc1, sh1, w2, b2, y, n * P, P, ho, wo, inp, init, ghost, new, new // init,
            stride, *x.stride(), *y.stride(), D=d, RELU=relu,
            VEC_Y=channel_vector(y, init, ghost, new), **blocks,
        )  # fmt: skip
        return y
    wrap_triton(_primary_kernel)[(tiles, triton.cdiv(init, plan["BLOCK_M"]))](
        x, w1, sc1, sh1, y, n * P, P, wo, inp, init, stride, *x.stride(), *y.stride(),
        RELU=relu, VEC_Y=channel_vector(y, init), **blocks,
    )  # fmt: skip
    if ghost > 0:
        tile = cheap_tile(y, init, ghost)
        grid = (triton.cdiv(n * P, tile["BLOCK_P"]), triton.cdiv(ghost, tile["BLOCK_C"]))
        wrap_triton(_cheap_kernel)[grid](
            y, w2, b2, n * P, P, ho, wo, init, ghost, new // init, *y.stride(),
            D=d, RELU=relu, **tile,
        )  # fmt: skip
    return y
