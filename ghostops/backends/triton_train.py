"""Triton kernels of the Ghost module in training mode: the forward with batch-statistics
BatchNorm and its backward (DESIGN.md section 2), the same contracts as the CPU ops
``ghostops::ghost_forward_train`` and ``ghostops::ghost_backward`` (csrc/ops.cpp).

First version, correct on any config the CPU path covers; not tuned. Kernels compute in
float32 (F1's GEMM takes its operands in the input's dtype, accumulating in float32); the
outputs are in the input's dtype, the saved z1 and the batch statistics in float32 for
float16 / bfloat16 inputs (a float16 variance overflows past 65504; z1 rounded to float16 cost
a 2e-2 relative error in the input gradient) and in the input's dtype for float32. BatchNorm
parameters may be float32 with float16 inputs.

Forward, three passes:
  F1 ``_f1_primary``: z1 = W1 x, a tl.dot GEMM over pixel tiles, stored contiguous (N, init, P);
     each tile also stores its per-channel mean and M2, combined on the device (Chan et al.,
     ``_bn_stats_kernel``, which also makes BN1's scale and shift).
  F2 ``_f2_cheap``: per (image, ghost channel, pixel tile): x1 = act(BN1(z1)) recomputed from
     z1 with the halo (so no tile reads another's output), the depthwise conv into
     y[:, init + j] (ghost channels past oup: statistics only), x1 itself into y[:, c]; z2
     moments, combined as F1's.
  F3 ``_f3_affine_act``: y[:, init:] = act(BN2(z2)) in place.
Backward (z1 and the batch statistics saved; y is not read, so callers may modify it in place):
  ``_bn_affine_kernel``: both BatchNorms' scale, shift and invstd, as the forward made them.
  B1 ``_b1_ghost_sums``: z2 recomputed as F2 computes it; per-channel sums of ga2 = dy2 act'(a2)
     and ga2 x2hat.
  B2 ``_b2_dz2``: dz2 (BN2 backward) into a float32 buffer, and the cheap weight's gradient.
  B3 ``_b3_dx1``: dx1 = dy1 + dwconv^T(dz2), ga1 = dx1 act'(a1), sums of ga1 and ga1 x1hat.
  B4 ``_b4_dz1``: dz1 (BN1 backward) in x's dtype; then the primary conv's two GEMMs
     (torch.matmul).
Partial sums and moments are per tile, reduced on the device by ``_reduce_rows``'s kernels
(float64, a fixed order, no atomics): results do not depend on timing, and no torch op runs
between the kernels but the GEMMs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ghostops import ops as _ops
from ghostops.backends.triton_kernels import (
    _act,
    _pixel_tile,
    channel_tile,
    dot_in_float32,
    gemm_vectors,
    primary_gemm_tile,
)
from ghostops.ops import output_size

# (pixel, channel) outputs a program of the plane kernels in channels_last: at 2048, nine taps
# of z1 held at once spilled up to 1 KB a thread in B2 (tests/triton_gpu_compile.py).
TILE_OUTPUTS = 512


@triton.jit
def _channel_block(CHANNELS, BLOCK_C: tl.constexpr):
    """program_id(1)'s block of channels and which of them exist."""
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return ch, ch < CHANNELS


@triton.jit
def _x1_at(z_base, hi, wi, ok, ch_ok, Ho, Wo, szp, sc, sh, RELU: tl.constexpr):
    """x1 = act(z1 * sc + sh) at pixels (hi, wi) of a tile's channels, zero outside the map
    (the conv's zero padding); ``z_base`` points at each (image, channel)'s z1 plane."""
    inside = ok & (hi >= 0) & (hi < Ho) & (wi >= 0) & (wi < Wo)
    z = tl.load(z_base + ((hi * Wo + wi) * szp)[:, None], mask=inside[:, None] & ch_ok[None, :],
                other=0.0).to(tl.float32)  # fmt: skip
    return tl.where(inside[:, None], _act(z * sc[None, :] + sh[None, :], RELU), 0.0)


@triton.jit
def _z2_tile(z_base, w_rows, ho, wo, ok, ch_ok, Ho, Wo, szp, sc, sh,
             D: tl.constexpr, RELU: tl.constexpr):  # fmt: skip
    """The depthwise conv of x1 on a tile (pixels x ghost channels, ``w_rows`` each channel's
    taps), taps in row-major order (F2 and the backward run this same code, so they round
    alike)."""
    acc = tl.zeros(z_base.shape, dtype=tl.float32)
    for t in tl.static_range(D * D):
        v = _x1_at(z_base, ho + (t // D - D // 2), wo + (t % D - D // 2), ok, ch_ok, Ho, Wo,
                   szp, sc, sh, RELU)  # fmt: skip
        acc += tl.load(w_rows + t, mask=ch_ok, other=0.0).to(tl.float32)[None, :] * v
    return acc


@triton.jit
def _tile_moments(acc, ok, ch, ch_ok, mean_ptr, m2_ptr, CHANNELS):
    """The tile's per-channel mean and M2 over its valid pixels, into row program_id(0) of
    (tiles, CHANNELS) buffers."""
    count = tl.sum(ok.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(ok[:, None], acc, 0.0), axis=0) / count
    dev = tl.where(ok[:, None], acc - mean[None, :], 0.0)
    part = tl.program_id(0) * CHANNELS + ch
    tl.store(mean_ptr + part, mean, mask=ch_ok)
    tl.store(m2_ptr + part, tl.sum(dev * dev, axis=0), mask=ch_ok)


@triton.jit
def _f1_primary(
    x_ptr, w_ptr, z_ptr, mean_ptr, m2_ptr,
    n_pix, P, Wo, K, M, stride, sxn, sxc, sxh, sxw, szn, szc, szp,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr, DOT_F32: tl.constexpr,
    VEC_K: tl.constexpr, VEC_X: tl.constexpr,
):  # fmt: skip
    """z[n, m, q] = sum_k w[m, k] x[n, k, q strided]; the tile's mean / M2 per channel."""
    pid_p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK)
    q = ho * Wo + wo
    x_pix = n * sxn + (ho * stride) * sxh + (wo * stride) * sxw
    acc = primary_gemm_tile(x_ptr, w_ptr, rows, x_pix, ok, K, M, sxc, BLOCK_M, BLOCK_K, BLOCK,
                            DOT_F32, VEC_K, VEC_X)  # fmt: skip
    row_ok = rows < M
    tl.store(z_ptr + (n * szn + q * szp)[None, :] + rows[:, None] * szc,
             acc.to(z_ptr.dtype.element_ty), mask=row_ok[:, None] & ok[None, :])  # fmt: skip
    count = tl.sum(ok.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(ok[None, :], acc, 0.0), axis=1) / count
    dev = tl.where(ok[None, :], acc - mean[:, None], 0.0)
    tl.store(mean_ptr + pid_p * M + rows, mean, mask=row_ok)
    tl.store(m2_ptr + pid_p * M + rows, tl.sum(dev * dev, axis=1), mask=row_ok)


@triton.jit
def _f2_cheap(
    z_ptr, y_ptr, w2_ptr, sc1_ptr, sh1_ptr, mean_ptr, m2_ptr,
    n_pix, P, Ho, Wo, INIT, GHOST, NEW, PER, szn, szc, szp, syn, syc, syh, syw,
    D: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    j, j_ok = _channel_block(NEW, BLOCK_C)  # ghost channels j < NEW
    c = j // PER
    z_base = z_ptr + (n * szn)[:, None] + (c * szc)[None, :]
    sc = tl.load(sc1_ptr + c, mask=j_ok, other=0.0)
    sh = tl.load(sh1_ptr + c, mask=j_ok, other=0.0)
    acc = _z2_tile(z_base, w2_ptr + j * D * D, ho, wo, ok, j_ok, Ho, Wo, szp, sc, sh, D, RELU)
    y_pix = y_ptr + (n * syn + ho * syh + wo * syw)[:, None]
    first = j_ok & (j % PER == 0)  # the first ghost channel of c also writes x1 itself
    x1 = _x1_at(z_base, ho, wo, ok, first, Ho, Wo, szp, sc, sh, RELU)
    tl.store(y_pix + (c * syc)[None, :], x1.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & first[None, :])  # fmt: skip
    tl.store(y_pix + ((INIT + j) * syc)[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & (j < GHOST)[None, :])  # fmt: skip
    _tile_moments(acc, ok, j, j_ok, mean_ptr, m2_ptr, NEW)


@triton.jit
def _f3_affine_act(
    y_ptr, sc_ptr, sh_ptr, n_pix, P, Wo, INIT, GHOST, syn, syc, syh, syw,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    j, j_ok = _channel_block(GHOST, BLOCK_C)
    ptr = y_ptr + (n * syn + ho * syh + wo * syw)[:, None] + ((INIT + j) * syc)[None, :]
    valid = ok[:, None] & j_ok[None, :]
    v = tl.load(ptr, mask=valid, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + j, mask=j_ok, other=0.0)
    sh = tl.load(sh_ptr + j, mask=j_ok, other=0.0)
    v = _act(v * sc[None, :] + sh[None, :], RELU)
    tl.store(ptr, v.to(y_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------
# Per-channel reductions of the kernels' per-tile rows (tiles, C), and the BatchNorm terms made
# from them, on the device in a fixed order (no atomics): where a map has more than
# REDUCE_ITERS row blocks, ``_partial_sums_kernel`` first sums chunks of rows (float64, one
# program a chunk), then a finishing kernel sums the chunks; else the finishing kernel reads the
# rows itself. These replace about twenty torch ops per BatchNorm per call.

REDUCE_ELEMS = 1024  # (row, channel) pairs a reduction program loads at once
REDUCE_ITERS = 4  # row blocks a program sums


@triton.jit
def _column_sums(a_ptr, b_ptr, r0, r1, C, n_pix, TILE: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Sums over rows r0 <= r < r1 of (rows, C) tables a and b, in float64, of
    program_id(1)'s BLOCK_C columns: (columns, their mask, sum a, sum b). With TILE > 0, row r
    of a, b holds a tile's (mean, M2) over min(TILE, n_pix - r TILE) values, and the sums are
    sum count mean and sum (M2 + count mean^2): the batch's first and second raw moments
    (Chan et al.; within a tile the moment stays centred, so only the spread of the tile means
    cancels, in float64)."""
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    sa = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    sb = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for start in range(r0, r1, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = (r < r1)[:, None] & ch_ok[None, :]
        off = r[:, None] * C + ch[None, :]
        a = tl.load(a_ptr + off, mask=ok, other=0.0).to(tl.float64)
        if HAS_B:
            b = tl.load(b_ptr + off, mask=ok, other=0.0).to(tl.float64)
            if TILE > 0:
                count = tl.minimum(n_pix - r * TILE, TILE).to(tl.float64)[:, None]
                b += count * a * a
                a *= count
            sb += b
        sa += a
    return ch, ch_ok, tl.sum(sa, axis=0), tl.sum(sb, axis=0)


@triton.jit
def _partial_sums_kernel(
    a_ptr, b_ptr, out_ptr, rows, C, n_pix, TILE: tl.constexpr, HAS_B: tl.constexpr,
    ITERS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``_column_sums`` of chunk program_id(0), ITERS row blocks, into rows of out
    (2, chunks, C) float64: sum a, then sum b."""
    chunk = tl.program_id(0)
    r0 = chunk * (ITERS * BLOCK_R)
    r1 = tl.minimum(r0 + ITERS * BLOCK_R, rows)
    ch, ch_ok, sa, sb = _column_sums(a_ptr, b_ptr, r0, r1, C, n_pix, TILE, HAS_B, BLOCK_R,
                                     BLOCK_C)  # fmt: skip
    tl.store(out_ptr + chunk * C + ch, sa, mask=ch_ok)
    if HAS_B:
        tl.store(out_ptr + (tl.num_programs(0) + chunk) * C + ch, sb, mask=ch_ok)


@triton.jit
def _bn_affine(mean, var, g_ptr, b_ptr, eps, ch, ch_ok):
    """A BatchNorm with these float32 statistics as x -> sc x + sh: (sc, sh, invstd). The
    training forward and backward both take it from here, so they recompute alike."""
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    sc = tl.load(g_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32) * invstd
    return sc, tl.load(b_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32) - mean * sc, invstd


@triton.jit
def _bn_stats_kernel(
    a_ptr, b_ptr, rows, C, n_pix, g_ptr, bt_ptr, eps, mean_ptr, var_ptr, sc_ptr, sh_ptr,
    TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The batch mean and biased variance of C channels from per-tile (mean, M2) rows (TILE
    > 0: F1's or F2's) or from ``_partial_sums_kernel``'s chunks of them (TILE = 0), and the
    BatchNorm's (sc, sh) with them."""
    ch, ch_ok, s1, s2 = _column_sums(a_ptr, b_ptr, 0, rows, C, n_pix, TILE, True, BLOCK_R,
                                     BLOCK_C)  # fmt: skip
    mu = s1 / n_pix
    mean = mu.to(tl.float32)
    var = tl.maximum(s2 / n_pix - mu * mu, 0.0).to(tl.float32)
    tl.store(mean_ptr + ch, mean, mask=ch_ok)
    tl.store(var_ptr + ch, var, mask=ch_ok)
    sc, sh, _ = _bn_affine(mean, var, g_ptr, bt_ptr, eps, ch, ch_ok)
    tl.store(sc_ptr + ch, sc, mask=ch_ok)
    tl.store(sh_ptr + ch, sh, mask=ch_ok)


@triton.jit
def _bn_affine_store(m_ptr, v_ptr, g_ptr, bt_ptr, eps, out_ptr, C, BLOCK: tl.constexpr):
    ch = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = ch < C
    mean = tl.load(m_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    var = tl.load(v_ptr + ch, mask=ok, other=1.0).to(tl.float32)
    sc, sh, invstd = _bn_affine(mean, var, g_ptr, bt_ptr, eps, ch, ok)
    tl.store(out_ptr + ch, sc, mask=ok)
    tl.store(out_ptr + C + ch, sh, mask=ok)
    tl.store(out_ptr + 2 * C + ch, invstd, mask=ok)


@triton.jit
def _bn_affine_kernel(
    m1_ptr, v1_ptr, g1_ptr, bt1_ptr, eps1, m2_ptr, v2_ptr, g2_ptr, bt2_ptr, eps2, out_ptr,
    INIT, NEW, BLOCK: tl.constexpr,
):  # fmt: skip
    """The backward's view of both BatchNorms in one launch: out = sc1 | sh1 | invstd1 (INIT
    each), then sc2 | sh2 | invstd2 (NEW each), float32."""
    _bn_affine_store(m1_ptr, v1_ptr, g1_ptr, bt1_ptr, eps1, out_ptr, INIT, BLOCK)
    _bn_affine_store(m2_ptr, v2_ptr, g2_ptr, bt2_ptr, eps2, out_ptr + 3 * INIT, NEW, BLOCK)


@triton.jit
def _bn_grad_kernel(
    a_ptr, b_ptr, rows, C, n_pix, g_ptr, invstd_ptr, dbeta_ptr, dgamma_ptr, coef_ptr,
    TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """A BatchNorm backward's per-channel terms from per-tile sums of ga and ga xhat (or
    ``_partial_sums_kernel``'s chunks of them): dbeta = sum ga and dgamma = sum ga xhat
    (float32), and coef (3, C) = k = gamma invstd, mean ga = dbeta / n_pix, mean ga xhat =
    dgamma / n_pix (TILE is 0: plain sums)."""
    ch, ch_ok, sa, sb = _column_sums(a_ptr, b_ptr, 0, rows, C, 0, TILE, True, BLOCK_R, BLOCK_C)
    dbeta, dgamma = sa.to(tl.float32), sb.to(tl.float32)
    tl.store(dbeta_ptr + ch, dbeta, mask=ch_ok)
    tl.store(dgamma_ptr + ch, dgamma, mask=ch_ok)
    g = tl.load(g_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    tl.store(coef_ptr + ch, g * tl.load(invstd_ptr + ch, mask=ch_ok, other=0.0), mask=ch_ok)
    tl.store(coef_ptr + C + ch, dbeta / n_pix, mask=ch_ok)
    tl.store(coef_ptr + 2 * C + ch, dgamma / n_pix, mask=ch_ok)


@triton.jit
def _column_sum_kernel(
    a_ptr, b_ptr, rows, C, n_pix, out_ptr,
    TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[c] = sum over rows of a[:, c] (or of ``_partial_sums_kernel``'s chunks), in out's
    dtype (b unused, TILE 0)."""
    ch, ch_ok, sa, _ = _column_sums(a_ptr, b_ptr, 0, rows, C, 0, TILE, False, BLOCK_R, BLOCK_C)
    tl.store(out_ptr + ch, sa.to(out_ptr.dtype.element_ty), mask=ch_ok)


def _reduce_block(C: int) -> dict:
    block_c = max(2, min(32, triton.next_power_of_2(C)))
    return {"BLOCK_R": REDUCE_ELEMS // block_c, "BLOCK_C": block_c}


def _reduce_rows(finish, a, b, *args, n_pix: int = 0, tile: int = 0) -> None:
    """Run ``finish`` (a finishing kernel: arguments (a, b, rows, C, n_pix, *args), grid the
    blocks of columns) over the (rows, C) tables a and b (b may be None), directly where they
    have at most REDUCE_ITERS row blocks, else over ``_partial_sums_kernel``'s float64 chunk
    sums. tile > 0: a and b are per-tile (mean, M2) over n_pix values in tiles of ``tile``
    (``_column_sums``); their chunk sums, already raw moments, are finished with tile 0."""
    rows, C = a.shape
    block = _reduce_block(C)
    grid_c = triton.cdiv(C, block["BLOCK_C"])
    chunk = REDUCE_ITERS * block["BLOCK_R"]
    b = a if b is None else b
    if rows > chunk:
        chunks = triton.cdiv(rows, chunk)
        part = torch.empty((2, chunks, C), dtype=torch.float64, device=a.device)
        wrap_triton(_partial_sums_kernel)[(chunks, grid_c)](
            a, b, part, rows, C, n_pix, TILE=tile, HAS_B=b is not a, ITERS=REDUCE_ITERS,
            **block,
        )  # fmt: skip
        a, b, rows, tile = part[0], part[1], chunks, 0
    wrap_triton(finish)[(1, grid_c)](a, b, rows, C, n_pix, *args, TILE=tile, **block)


@triton.jit
def _ghost_grads(
    z_ptr, gy_ptr, w2_ptr, sc1_ptr, sh1_ptr, sc2_ptr, sh2_ptr, mean2_ptr, invstd2_ptr,
    n_pix, P, Ho, Wo, INIT, GHOST, PER, szn, szc, szp, sgn, sgc, sgh, sgw,
    D: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The program's tile, grid (pixel tiles, blocks of ghost channels j < GHOST): its pixels,
    channels, z1 planes and ga2, x2hat there, z2 recomputed as F2 computes it. B1 and B2 both
    start here."""
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    j, j_ok = _channel_block(GHOST, BLOCK_C)
    c = j // PER
    z_base = z_ptr + (n * szn)[:, None] + (c * szc)[None, :]
    sc = tl.load(sc1_ptr + c, mask=j_ok, other=0.0)
    sh = tl.load(sh1_ptr + c, mask=j_ok, other=0.0)
    z2 = _z2_tile(z_base, w2_ptr + j * D * D, ho, wo, ok, j_ok, Ho, Wo, szp, sc, sh, D, RELU)
    # z2 rounded to y's dtype, as F2 stored it before F3's BN2 + act: the forward's ReLU mask.
    z2 = z2.to(gy_ptr.dtype.element_ty).to(tl.float32)
    valid = ok[:, None] & j_ok[None, :]
    g = tl.load(gy_ptr + (n * sgn + ho * sgh + wo * sgw)[:, None] + ((INIT + j) * sgc)[None, :],
                mask=valid, other=0.0)  # fmt: skip
    ga = g.to(tl.float32)
    if RELU:
        sc2 = tl.load(sc2_ptr + j, mask=j_ok, other=0.0)
        sh2 = tl.load(sh2_ptr + j, mask=j_ok, other=0.0)
        ga = tl.where(z2 * sc2[None, :] + sh2[None, :] > 0.0, ga, 0.0)
    ga = tl.where(valid, ga, 0.0)
    mean2 = tl.load(mean2_ptr + j, mask=j_ok, other=0.0)
    xh = (z2 - mean2[None, :]) * tl.load(invstd2_ptr + j, mask=j_ok, other=0.0)[None, :]
    return ok, n, ho, wo, j, j_ok, z_base, sc, sh, ga, xh


@triton.jit
def _b1_ghost_sums(
    z_ptr, gy_ptr, w2_ptr, sc1_ptr, sh1_ptr, sc2_ptr, sh2_ptr, mean2_ptr, invstd2_ptr,
    sum_ga_ptr, sum_gx_ptr, n_pix, P, Ho, Wo, INIT, GHOST, PER, szn, szc, szp,
    sgn, sgc, sgh, sgw,
    D: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    ok, n, ho, wo, j, j_ok, z_base, sc, sh, ga, xh = _ghost_grads(
        z_ptr, gy_ptr, w2_ptr, sc1_ptr, sh1_ptr, sc2_ptr, sh2_ptr, mean2_ptr, invstd2_ptr,
        n_pix, P, Ho, Wo, INIT, GHOST, PER, szn, szc, szp, sgn, sgc, sgh, sgw,
        D, RELU, BLOCK_P, BLOCK_C,
    )  # fmt: skip
    part = tl.program_id(0) * GHOST + j
    tl.store(sum_ga_ptr + part, tl.sum(ga, axis=0), mask=j_ok)
    tl.store(sum_gx_ptr + part, tl.sum(ga * xh, axis=0), mask=j_ok)


@triton.jit
def _b2_dz2(
    z_ptr, gy_ptr, w2_ptr, sc1_ptr, sh1_ptr, sc2_ptr, sh2_ptr, mean2_ptr, invstd2_ptr,
    k2_ptr, mg2_ptr, mx2_ptr, dz2_ptr, dw_ptr, n_pix, P, Ho, Wo, INIT, GHOST, PER,
    szn, szc, szp, sgn, sgc, sgh, sgw, sdn, sdc, sdp,
    D: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dz2 = k2 (ga2 - mean(ga2) - x2hat mean(ga2 x2hat)) into dz2 (N, GHOST, P) (strides
    sd*), and per tile and tap the cheap weight's gradient sum dz2[q] x1[q + offset(tap)]."""
    ok, n, ho, wo, j, j_ok, z_base, sc, sh, ga, xh = _ghost_grads(
        z_ptr, gy_ptr, w2_ptr, sc1_ptr, sh1_ptr, sc2_ptr, sh2_ptr, mean2_ptr, invstd2_ptr,
        n_pix, P, Ho, Wo, INIT, GHOST, PER, szn, szc, szp, sgn, sgc, sgh, sgw,
        D, RELU, BLOCK_P, BLOCK_C,
    )  # fmt: skip
    k2 = tl.load(k2_ptr + j, mask=j_ok, other=0.0)[None, :]
    mg2 = tl.load(mg2_ptr + j, mask=j_ok, other=0.0)[None, :]
    mx2 = tl.load(mx2_ptr + j, mask=j_ok, other=0.0)[None, :]
    valid = ok[:, None] & j_ok[None, :]
    dz = tl.where(valid, k2 * (ga - mg2 - xh * mx2), 0.0)
    d_off = (n * sdn + (ho * Wo + wo) * sdp)[:, None] + (j * sdc)[None, :]
    tl.store(dz2_ptr + d_off, dz, mask=valid)
    part = (tl.program_id(0) * GHOST + j) * D * D
    for t in tl.static_range(D * D):
        v = _x1_at(z_base, ho + (t // D - D // 2), wo + (t % D - D // 2), ok, j_ok, Ho, Wo, szp,
                   sc, sh, RELU)  # fmt: skip
        tl.store(dw_ptr + part + t, tl.sum(dz * v, axis=0), mask=j_ok)


@triton.jit
def _b3_dx1(
    z_ptr, gy_ptr, dz2_ptr, w2_ptr, sc1_ptr, sh1_ptr, mean1_ptr, invstd1_ptr, ga1_ptr,
    sum_ga_ptr, sum_gx_ptr, n_pix, P, Ho, Wo, INIT, GHOST, PER, szn, szc, szp,
    sgn, sgc, sgh, sgw, sdn, sdc, sdp,
    D: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """ga1 = (dy1 + dwconv^T(dz2)) act'(a1) into ga1 (z1's sizes and strides); its sums and
    ga1 x1hat's."""
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    c, c_ok = _channel_block(INIT, BLOCK_C)  # intrinsic channels c
    valid = ok[:, None] & c_ok[None, :]
    dx = tl.load(gy_ptr + (n * sgn + ho * sgh + wo * sgw)[:, None] + (c * sgc)[None, :],
                 mask=valid, other=0.0).to(tl.float32)  # fmt: skip
    for jj in range(PER):
        j = c * PER + jj
        j_ok = c_ok & (j < GHOST)
        for t in tl.static_range(D * D):  # the transposed conv: taps from the other side
            hi = ho - (t // D - D // 2)
            wi = wo - (t % D - D // 2)
            inside = ok & (hi >= 0) & (hi < Ho) & (wi >= 0) & (wi < Wo)
            g = tl.load(dz2_ptr + (n * sdn + (hi * Wo + wi) * sdp)[:, None] + (j * sdc)[None, :],
                        mask=inside[:, None] & j_ok[None, :], other=0.0)  # fmt: skip
            w = tl.load(w2_ptr + j * D * D + t, mask=j_ok, other=0.0).to(tl.float32)
            dx += w[None, :] * g
    z_off = (n * szn + (ho * Wo + wo) * szp)[:, None] + (c * szc)[None, :]
    z = tl.load(z_ptr + z_off, mask=valid, other=0.0).to(tl.float32)
    ga = dx
    if RELU:
        sc1 = tl.load(sc1_ptr + c, mask=c_ok, other=0.0)[None, :]
        sh1 = tl.load(sh1_ptr + c, mask=c_ok, other=0.0)[None, :]
        ga = tl.where(z * sc1 + sh1 > 0.0, ga, 0.0)
    ga = tl.where(valid, ga, 0.0)
    tl.store(ga1_ptr + z_off, ga, mask=valid)
    mean1 = tl.load(mean1_ptr + c, mask=c_ok, other=0.0)[None, :]
    xh = (z - mean1) * tl.load(invstd1_ptr + c, mask=c_ok, other=0.0)[None, :]
    part = tl.program_id(0) * INIT + c
    tl.store(sum_ga_ptr + part, tl.sum(ga, axis=0), mask=c_ok)
    tl.store(sum_gx_ptr + part, tl.sum(ga * xh, axis=0), mask=c_ok)


@triton.jit
def _b4_dz1(
    z_ptr, ga_ptr, dz_ptr, mean_ptr, invstd_ptr, coef_ptr, n_pix, P, Wo, INIT, szn, szc, szp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dz1 = k1 (ga1 - mean(ga1) - x1hat mean(ga1 x1hat)) in dz's dtype (BN1's backward; coef
    from ``_bn_grad_kernel``); z, ga and dz share z1's sizes and strides."""
    ok, n, ho, wo = _pixel_tile(n_pix, P, Wo, BLOCK_P)
    c, c_ok = _channel_block(INIT, BLOCK_C)
    valid = ok[:, None] & c_ok[None, :]
    off = (n * szn + (ho * Wo + wo) * szp)[:, None] + (c * szc)[None, :]
    z = tl.load(z_ptr + off, mask=valid, other=0.0).to(tl.float32)
    ga = tl.load(ga_ptr + off, mask=valid, other=0.0)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :]
    xh = (z - mean) * tl.load(invstd_ptr + c, mask=c_ok, other=0.0)[None, :]
    k = tl.load(coef_ptr + c, mask=c_ok, other=0.0)[None, :]
    mg = tl.load(coef_ptr + INIT + c, mask=c_ok, other=0.0)[None, :]
    mx = tl.load(coef_ptr + 2 * INIT + c, mask=c_ok, other=0.0)[None, :]
    tl.store(dz_ptr + off, (k * (ga - mg - xh * mx)).to(dz_ptr.dtype.element_ty), mask=valid)


def _check_args(op, x, primary_weight, cheap_weight, oup, stride, vectors):
    """The CPU op's argument checks (csrc/ghost_common.cpp), compile-friendly: a bad call is an
    error, never an out-of-bounds read. ``vectors``: (name, tensor, expected length)."""
    torch._check(x.dim() == 4, lambda: f"{op}: x must be 4-D, got {tuple(x.shape)}")
    init = primary_weight.shape[0]
    torch._check(
        primary_weight.dim() == 4 and tuple(primary_weight.shape[1:]) == (x.shape[1], 1, 1),
        lambda: (
            f"{op}: primary_weight must be ({init}, {x.shape[1]}, 1, 1), got "
            f"{tuple(primary_weight.shape)}"
        ),
    )
    new, d = cheap_weight.shape[0], cheap_weight.shape[-1]
    torch._check(
        cheap_weight.dim() == 4 and tuple(cheap_weight.shape[1:]) == (1, d, d) and d % 2 == 1,
        lambda: (
            f"{op}: cheap_weight must be (new, 1, d, d) with d odd, got {tuple(cheap_weight.shape)}"
        ),
    )
    ratio = new // init + 1 if init > 0 else 0
    torch._check(
        init > 0 and new % init == 0 and new >= init and -(-oup // ratio) == init,
        lambda: f"{op}: oup={oup} does not match {init} intrinsic channels at ratio {ratio}",
    )
    torch._check(stride >= 1, lambda: f"{op}: stride must be >= 1, got {stride}")
    torch._check(x.numel() < 2**31, lambda: f"{op}: tensors of 2^31 elements or more")
    for t in (primary_weight, cheap_weight):
        torch._check(t.dtype == x.dtype and t.device == x.device,
                     lambda: f"{op}: the conv weights must match x's dtype and device")  # fmt: skip
    for name, t, size in vectors:
        torch._check(
            t.dim() == 1 and t.shape[0] == size and t.device == x.device,
            lambda name=name, t=t, size=size: (
                f"{op}: {name} must be a vector of {size} on "
                f"{x.device}, got {tuple(t.shape)} on {t.device}"
            ),
        )


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Batch statistics: float32 for half inputs (a float16 variance overflows past 65504)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _plane_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, channel, flat pixel) strides of a (N, C, Ho, Wo) buffer whose pixels are evenly
    spaced (z1, dz2, ga1: NCHW or channels_last)."""
    return t.stride(0), t.stride(1), t.stride(3)


def _evenly_spaced(t: torch.Tensor) -> bool:
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


@triton_op("ghostops::ghost_forward_train_triton", mutates_args=())
def ghost_forward_train_triton(
    x: torch.Tensor,
    primary_weight: torch.Tensor,
    bn1_weight: torch.Tensor,
    bn1_bias: torch.Tensor,
    bn1_eps: float,
    cheap_weight: torch.Tensor,
    bn2_weight: torch.Tensor,
    bn2_bias: torch.Tensor,
    bn2_eps: float,
    oup: int,
    stride: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode Ghost module, the contract of ``ghostops::ghost_forward_train``:
    (y, z1, batch mean1, biased var1, mean2, var2)."""
    init, new = primary_weight.shape[0], cheap_weight.shape[0]
    _check_args("ghost_forward_train_triton", x, primary_weight, cheap_weight, oup, stride, (
        ("bn1_weight", bn1_weight, init), ("bn1_bias", bn1_bias, init),
        ("bn2_weight", bn2_weight, new), ("bn2_bias", bn2_bias, new)))  # fmt: skip
    n, inp, h, w = x.shape
    d = cheap_weight.shape[-1]
    ghost, per = oup - init, new // init
    ho, wo = output_size(h, 1, stride), output_size(w, 1, stride)
    P, dev = ho * wo, x.device
    fmt = torch._prims_common.suggest_memory_format(x)
    y = torch.empty((n, oup, ho, wo), dtype=x.dtype, device=dev, memory_format=fmt)
    # z1 in x's layout (float32 for half inputs): the plane kernels read it, y and the
    # backward's buffers alike, channels innermost in channels_last.
    z1 = torch.empty((n, init, ho, wo), dtype=_stats_dtype(x), device=dev, memory_format=fmt)
    zs = _plane_strides(z1)
    relu = act == "relu"

    block_p1 = 64
    tiles1 = triton.cdiv(n * P, block_p1)
    part_mean1 = torch.empty((tiles1, init), dtype=torch.float32, device=dev)
    part_m21 = torch.empty_like(part_mean1)
    block_m = max(16, min(64, triton.next_power_of_2(init)))
    block_k = max(16, min(32, triton.next_power_of_2(inp)))
    w1 = primary_weight.reshape(init, inp).contiguous()
    wrap_triton(_f1_primary)[(tiles1, triton.cdiv(init, block_m))](
        x, w1, z1, part_mean1, part_m21, n * P, P, wo, inp, init, stride, *x.stride(), *zs,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK=block_p1, DOT_F32=dot_in_float32(x),
        **gemm_vectors(x),
    )  # fmt: skip
    mean1 = torch.empty(init, dtype=_stats_dtype(x), device=dev)
    var1 = torch.empty_like(mean1)
    sc1, sh1 = torch.empty((2, init), dtype=torch.float32, device=dev)
    _reduce_rows(_bn_stats_kernel, part_mean1, part_m21, bn1_weight.contiguous(),
                 bn1_bias.contiguous(), bn1_eps, mean1, var1, sc1, sh1, n_pix=n * P,
                 tile=block_p1)  # fmt: skip

    tile = channel_tile(new, y.stride(1) == 1, TILE_OUTPUTS)
    tiles = triton.cdiv(n * P, tile["BLOCK_P"])
    part_mean2 = torch.empty((tiles, new), dtype=torch.float32, device=dev)
    part_m22 = torch.empty_like(part_mean2)
    w2 = cheap_weight.reshape(new, d * d).contiguous()
    wrap_triton(_f2_cheap)[(tiles, triton.cdiv(new, tile["BLOCK_C"]))](
        z1, y, w2, sc1, sh1, part_mean2, part_m22, n * P, P, ho, wo, init, ghost, new, per,
        *zs, *y.stride(), D=d, RELU=relu, **tile,
    )  # fmt: skip
    mean2 = torch.empty(new, dtype=_stats_dtype(x), device=dev)
    var2 = torch.empty_like(mean2)
    sc2, sh2 = torch.empty((2, new), dtype=torch.float32, device=dev)
    _reduce_rows(_bn_stats_kernel, part_mean2, part_m22, bn2_weight.contiguous(),
                 bn2_bias.contiguous(), bn2_eps, mean2, var2, sc2, sh2, n_pix=n * P,
                 tile=tile["BLOCK_P"])  # fmt: skip
    if ghost > 0:
        tile = channel_tile(ghost, y.stride(1) == 1, TILE_OUTPUTS)
        grid = (triton.cdiv(n * P, tile["BLOCK_P"]), triton.cdiv(ghost, tile["BLOCK_C"]))
        wrap_triton(_f3_affine_act)[grid](
            y, sc2, sh2, n * P, P, wo, init, ghost, *y.stride(), RELU=relu, **tile
        )
    return y, z1, mean1, var1, mean2, var2


@triton_op("ghostops::ghost_backward_triton", mutates_args=())
def ghost_backward_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    z1: torch.Tensor,
    primary_weight: torch.Tensor,
    bn1_weight: torch.Tensor,
    bn1_bias: torch.Tensor,
    mean1: torch.Tensor,
    var1: torch.Tensor,
    bn1_eps: float,
    cheap_weight: torch.Tensor,
    bn2_weight: torch.Tensor,
    bn2_bias: torch.Tensor,
    mean2: torch.Tensor,
    var2: torch.Tensor,
    bn2_eps: float,
    stride: int,
    act: str,
    output_mask: list[bool],
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:  # fmt: skip
    """The backward of ghost_forward_train_triton, the contract of ``ghostops::ghost_backward``:
    grads of (x, primary weight, bn1 weight, bn1 bias, cheap weight, bn2 weight, bn2 bias);
    those of x and the primary weight only where output_mask asks (else empty)."""
    init, new = primary_weight.shape[0], cheap_weight.shape[0]
    oup = grad_y.shape[1] if grad_y.dim() == 4 else -1
    _check_args("ghost_backward_triton", x, primary_weight, cheap_weight, oup, stride, (
        ("bn1_weight", bn1_weight, init), ("bn1_bias", bn1_bias, init), ("mean1", mean1, init),
        ("var1", var1, init), ("bn2_weight", bn2_weight, new), ("bn2_bias", bn2_bias, new),
        ("mean2", mean2, new), ("var2", var2, new)))  # fmt: skip
    n, inp, h, w = x.shape
    ho, wo = output_size(h, 1, stride), output_size(w, 1, stride)
    d = cheap_weight.shape[-1]
    for name, t, c, dt in (("grad_y", grad_y, oup, x.dtype), ("z1", z1, init, _stats_dtype(x))):
        torch._check(
            tuple(t.shape) == (n, c, ho, wo) and t.dtype == dt and t.device == x.device,
            lambda name=name, t=t, c=c, dt=dt: (
                f"ghost_backward_triton: {name} must be ({n}, "
                f"{c}, {ho}, {wo}) {dt} on x's device, got {tuple(t.shape)} {t.dtype}"
            ),
        )
    ghost, per = oup - init, new // init
    P, dev, f32 = ho * wo, x.device, torch.float32
    M = n * P
    relu = act == "relu"
    bn1 = [t.contiguous() for t in (mean1, var1, bn1_weight, bn1_bias)]
    bn2 = [t.contiguous() for t in (mean2, var2, bn2_weight, bn2_bias)]
    affine = torch.empty(3 * (init + new), dtype=f32, device=dev)
    wrap_triton(_bn_affine_kernel)[(triton.cdiv(max(init, new), 1024),)](
        *bn1, bn1_eps, *bn2, bn2_eps, affine, init, new, BLOCK=1024
    )
    sc1, sh1, invstd1, sc2, sh2, invstd2 = affine.split([init] * 3 + [new] * 3)
    mean1f, mean2f = mean1.float().contiguous(), mean2.float().contiguous()
    w2 = cheap_weight.reshape(new, d * d).contiguous()
    z1 = z1 if _evenly_spaced(z1) else z1.contiguous()
    zs, gs = _plane_strides(z1), grad_y.stride()
    # The backward's buffers (dz2, ga1) and tiles follow z1's layout (the forward's input's).
    fmt = torch._prims_common.suggest_memory_format(z1)
    channels_inner = z1.stride(1) == 1

    # Ghost channels past oup (j >= ghost) change nothing: their gradients are zero.
    alloc = torch.empty if ghost == new else torch.zeros
    dgamma2 = alloc(new, dtype=f32, device=dev)
    dbeta2 = alloc(new, dtype=f32, device=dev)
    dw2 = alloc((new, d * d), dtype=f32, device=dev)
    dz2 = torch.empty((n, max(ghost, 1), ho, wo), dtype=f32, device=dev, memory_format=fmt)
    ds = _plane_strides(dz2)
    if ghost > 0:
        tile = channel_tile(ghost, channels_inner, TILE_OUTPUTS)
        tiles = triton.cdiv(M, tile["BLOCK_P"])
        grid = (tiles, triton.cdiv(ghost, tile["BLOCK_C"]))
        sum_ga = torch.empty((tiles, ghost), dtype=f32, device=dev)
        sum_gx = torch.empty_like(sum_ga)
        common = (z1, grad_y, w2, sc1, sh1, sc2, sh2, mean2f, invstd2)
        wrap_triton(_b1_ghost_sums)[grid](
            *common, sum_ga, sum_gx, M, P, ho, wo, init, ghost, per, *zs, *gs,
            D=d, RELU=relu, **tile,
        )  # fmt: skip
        k2, mg2, mx2 = coef2 = torch.empty((3, ghost), dtype=f32, device=dev)
        _reduce_rows(_bn_grad_kernel, sum_ga, sum_gx, bn2[2], invstd2, dbeta2, dgamma2, coef2,
                     n_pix=M)  # fmt: skip
        dw_part = torch.empty((tiles, ghost, d * d), dtype=f32, device=dev)
        wrap_triton(_b2_dz2)[grid](
            *common, k2, mg2, mx2, dz2, dw_part, M, P, ho, wo, init, ghost, per, *zs, *gs, *ds,
            D=d, RELU=relu, **tile,
        )  # fmt: skip
        _reduce_rows(_column_sum_kernel, dw_part.view(tiles, ghost * d * d), None, dw2)

    ga1 = torch.empty_like(z1, dtype=f32)
    tile = channel_tile(init, channels_inner, TILE_OUTPUTS)
    tiles = triton.cdiv(M, tile["BLOCK_P"])
    sum_ga1 = torch.empty((tiles, init), dtype=f32, device=dev)
    sum_gx1 = torch.empty_like(sum_ga1)
    wrap_triton(_b3_dx1)[(tiles, triton.cdiv(init, tile["BLOCK_C"]))](
        z1, grad_y, dz2, w2, sc1, sh1, mean1f, invstd1, ga1, sum_ga1, sum_gx1,
        M, P, ho, wo, init, ghost, per, *zs, *gs, *ds, D=d, RELU=relu, **tile,
    )  # fmt: skip
    dbeta1 = torch.empty(init, dtype=f32, device=dev)
    dgamma1 = torch.empty_like(dbeta1)
    coef1 = torch.empty((3, init), dtype=f32, device=dev)
    _reduce_rows(_bn_grad_kernel, sum_ga1, sum_gx1, bn1[2], invstd1, dbeta1, dgamma1, coef1,
                 n_pix=M)  # fmt: skip
    dz1 = torch.empty_like(z1, dtype=x.dtype)
    wrap_triton(_b4_dz1)[(tiles, triton.cdiv(init, tile["BLOCK_C"]))](
        z1, ga1, dz1, mean1f, invstd1, coef1, M, P, wo, init, *zs, **tile
    )

    # The primary conv's GEMMs in x's dtype (tensor cores for half inputs, float32
    # accumulation, as cuDNN's conv backward), pixels x channels where channels are innermost.
    w1 = primary_weight.reshape(init, inp)
    grad_x = x.new_empty(0)
    grad_w1 = x.new_empty(0)
    if output_mask[0]:
        if channels_inner:
            gxs = torch.matmul(dz1.permute(0, 2, 3, 1), w1).permute(0, 3, 1, 2)
        else:
            gxs = torch.matmul(w1.t(), dz1.reshape(n, init, P)).reshape(n, inp, ho, wo)
        if stride == 1:
            grad_x = gxs.contiguous(memory_format=torch._prims_common.suggest_memory_format(x))
        else:
            grad_x = torch.zeros_like(x)
            grad_x[:, :, ::stride, ::stride] = gxs
    if output_mask[1]:
        gw = torch.einsum("nchw,nihw->ci", dz1, x[:, :, ::stride, ::stride])
        grad_w1 = gw.reshape(primary_weight.shape)
    return (grad_x, grad_w1, dgamma1.to(bn1_weight.dtype), dbeta1.to(bn1_bias.dtype),
            dw2.reshape(cheap_weight.shape).to(x.dtype), dgamma2.to(bn2_weight.dtype),
            dbeta2.to(bn2_bias.dtype))  # fmt: skip


torch.library.register_autograd(
    "ghostops::ghost_forward_train_triton",
    functools.partial(_ops._train_backward, backward_op=torch.ops.ghostops.ghost_backward_triton),
    setup_context=_ops._train_setup_context,
)
