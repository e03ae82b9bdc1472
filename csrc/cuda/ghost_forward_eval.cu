// Eval-mode Ghost module on the GPU, CUDA C++: the CUDA implementation of
// ghostops::ghost_forward_eval (schema in csrc/ops.cpp, same contract as the CPU kernel), both
// BatchNorms folded beforehand (fold_kernel, one launch), on the current stream. Two forms,
// picked per shape by `use_one_pass` (a documented heuristic; GHOSTOPS_CUDA_EVAL=one_pass /
// two_kernels forces one):
//   one_pass_kernel  DESIGN.md's one pass: a block owns an 8 x 16 tile of one image's output and
//                    16 intrinsic channels; it computes their x1 = act(BN1(W1 x)) on the tile
//                    plus its d / 2 halo (recomputed, never read from a neighbour) into shared
//                    memory, writes the interior to y[:, c], then the depthwise cheap op + BN2 +
//                    act for the ghost channels of those intrinsic channels into y[:, init + j]
//                    (a thread a run of 8 outputs along a row, the window in registers; 16-byte
//                    stores of the run where y's rows are contiguous and aligned). x read
//                    once (halo aside), y written once, nothing read back. d in {1, 3, 5, 7};
//   primary_kernel + cheap_run_kernel  the 1x1 conv as a tiled GEMM (primary_gemm.cuh: 32, 64
//                    or 128 channels x 64 pixels a block, so x is read once per 128 intrinsic
//                    channels), BN1 + act in its epilogue, into y[:, :init];
//                    then the depthwise op reading those channels back (from L2), BN2 + act,
//                    into y[:, init:oup], in runs as above (cheap_kernel, an output a thread,
//                    for other d): where the halo's recomputation would cost more than the
//                    re-read (wide primaries on small maps), and for other d.
// Both primary GEMMs take the folded W1 in x's dtype (rounded as the Triton backend's tl.dot
// takes it) and run on the tensor cores (WMMA, float accumulation) for half / bfloat16 on
// sm_80 and later, as float FMAs for float (and on older GPUs). Ghost channels past oup are
// never computed. Any strides (NCHW, channels_last, views): the output follows the input's
// memory format; where x's or y's channel stride is 1 (channels_last), every kernel has
// consecutive threads access its consecutive channels, so those accesses coalesce, and both
// GEMMs read x as 16-byte vectors of channels where they can. float / half / bfloat16 (float64
// is refused: ghostops runs it through the reference).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../ghost_common.h"
#include "dtype_dispatch.cuh"
#include "primary_gemm.cuh"

namespace ghostops::cuda {
namespace {

// Sizes and element strides of one call.
struct EvalParams {
  int64_t N, C, Ho, Wo, init, ghost, per, d, stride;
  int64_t sxn, sxc, sxh, sxw;  // x
  int64_t syn, syc, syh, syw;  // y
};

constexpr int kThreads = kGemmThreads;

// y[n, m, p] = act(b[m] + sum_k w[m, k] x[n, k, p * stride]) for a kRows x 64 tile of
// (channel, pixel) (primary_gemm.cuh); pixels run over all images (n * Ho * Wo of them), each
// pixel's y offset computed once a block (s_ypix). In channels_last the tile is staged in
// shared memory, 32 channels at a time, so that consecutive threads store consecutive channels.
template <typename T, Act A, int kRows, bool kXVectors>
__global__ void __launch_bounds__(kThreads, 2)
    primary_kernel(const T* __restrict__ x, const T* __restrict__ w,
                   const float* __restrict__ b, T* __restrict__ y, EvalParams p, GemmShape g) {
  // g: p's GEMM, a parameter of its own (read from the parameter bank as the GEMM needs it,
  // where a local copy built from p was held in registers through the K loop).
  constexpr int R = kRows / 16;  // a thread's rows of the tile: R ty + i
  const int64_t P = p.Ho * p.Wo, n_pix = p.N * P;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileP, m0 = int64_t(blockIdx.y) * kRows;
  __shared__ int64_t s_ypix[kTileP];  // y's offset of each pixel of the tile, -1 past the end
  if (threadIdx.x < kTileP) {
    const int64_t pix = pix0 + threadIdx.x, n = pix / P, r = pix % P;
    s_ypix[threadIdx.x] = pix < n_pix ? n * p.syn + r / p.Wo * p.syh + r % p.Wo * p.syw : -1;
  }
  float acc[R][4];
  primary_gemm_tile<T, kRows, kXVectors>(x, w, g, acc);
  __syncthreads();  // s_ypix
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  if (p.syc == 1) {
    // Rows of 32 + 2: each half-warp's float2 stores (a channel pair, 16 pixels) hit all 32
    // banks once.
    constexpr int kChunk = 32;
    __shared__ __align__(8) float out[kTileP][kChunk + 2];
#pragma unroll
    for (int c0 = 0; c0 < kRows; c0 += kChunk) {
      if (m0 + c0 >= p.init) break;  // the same for every thread: the rest of the tile is empty
      if (c0 > 0) __syncthreads();   // the previous chunk's readers are done with out
      if (R * ty >= c0 && R * ty < c0 + kChunk) {  // this thread's rows are in the chunk
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < R; i += 2) {
            *reinterpret_cast<float2*>(&out[tx + 16 * j][R * ty - c0 + i]) =
                make_float2(acc[i][j], acc[i + 1][j]);
          }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < kChunk * kTileP; i += kThreads) {
        const int c = i % kChunk, q = i / kChunk;
        const int64_t m = m0 + c0 + c, off = s_ypix[q];
        if (m >= p.init || off < 0) continue;
        y[off + m] = static_cast<T>(activate<A>(out[q][c] + b[m]));  // channel stride 1
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t m = m0 + R * ty + i;
    if (m >= p.init) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t off = s_ypix[tx + 16 * j];
      if (off >= 0) y[off + m * p.syc] = static_cast<T>(activate<A>(acc[i][j] + b[m]));
    }
  }
}

// The cheap op as runs: a thread computes kCheapRun consecutive outputs of one row of one
// ghost channel, the D x D taps and a row of the input window in registers, so each input
// value is loaded once per run row rather than once per tap.
constexpr int kCheapRun = 8;

// The folded cheap-op weights are passed tap-major, (d * d, init * per): w2t[tap * (init * per)
// + j], so the threads of a warp, on consecutive ghost channels j in channels_last, read a
// tap's weights from consecutive addresses.
__device__ __forceinline__ int64_t tap_stride(const EvalParams& p) { return p.init * p.per; }

// out[u] = bias + sum over (dy, dx) of taps[dy * D + dx] row_dy[u + dx], u < kCheapRun, where
// taps[t] = w2t_j[t * stride] (ghost channel j's column of the tap-major weights), and
// load_row(dy, row) fills row dy of the window (kCheapRun + D - 1 values, from the run's first
// output's leftmost tap on) and returns false where that row is all zero padding.
template <int D, typename LoadRow>
__device__ __forceinline__ void cheap_run(const float* __restrict__ w2t_j, int64_t stride,
                                          float bias, LoadRow&& load_row,
                                          float (&out)[kCheapRun]) {
  float taps[D * D];
#pragma unroll
  for (int t = 0; t < D * D; ++t) taps[t] = w2t_j[t * stride];
#pragma unroll
  for (int u = 0; u < kCheapRun; ++u) out[u] = bias;
#pragma unroll
  for (int dy = 0; dy < D; ++dy) {
    float row[kCheapRun + D - 1];
    if (!load_row(dy, row)) continue;
#pragma unroll
    for (int dx = 0; dx < D; ++dx) {
#pragma unroll
      for (int u = 0; u < kCheapRun; ++u) out[u] = fmaf(taps[dy * D + dx], row[u + dx], out[u]);
    }
  }
}

// y_run[u * syw] = act(out[u]) for u < valid: as whole 16-byte stores where the run is
// contiguous (syw == 1, NCHW), whole and 16-byte aligned, else element by element.
template <typename T, Act A>
__device__ __forceinline__ void store_run(T* y_run, const float (&out)[kCheapRun], int64_t valid,
                                          int64_t syw) {
  static_assert(kCheapRun * sizeof(T) % 16 == 0, "a run is whole 16-byte vectors");
  if (syw == 1 && valid >= kCheapRun && reinterpret_cast<std::uintptr_t>(y_run) % 16 == 0) {
    union {
      T e[kCheapRun];
      uint4 v[kCheapRun * sizeof(T) / 16];
    } run;
#pragma unroll
    for (int u = 0; u < kCheapRun; ++u) run.e[u] = static_cast<T>(activate<A>(out[u]));
#pragma unroll
    for (int u = 0; u < int(kCheapRun * sizeof(T) / 16); ++u) {
      reinterpret_cast<uint4*>(y_run)[u] = run.v[u];
    }
  } else {
#pragma unroll
    for (int u = 0; u < kCheapRun; ++u) {
      if (u < valid) y_run[u * syw] = static_cast<T>(activate<A>(out[u]));
    }
  }
}

// y[n, init + j, ho, wo] = act(b[j] + sum over taps of w[j, tap] y[n, j / per, ho + dy - h,
// wo + dx - h]) (w tap-major, tap_stride), zero outside the map, for any d (cheap_run_kernel's
// are faster). One thread an output element, grid-stride; consecutive threads take consecutive
// pixels, or in channels_last consecutive j (so y's accesses coalesce).
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads)
    cheap_kernel(T* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b,
                 EvalParams p) {
  const int64_t P = p.Ho * p.Wo, total = p.N * p.ghost * P, h = p.d / 2;
  const bool y_channels_inner = p.syc == 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = y_channels_inner ? (i / p.ghost) % P : i % P;
    const int64_t j = y_channels_inner ? i % p.ghost : (i / P) % p.ghost;
    const int64_t n = i / (P * p.ghost);
    const int64_t ho = r / p.Wo, wo = r % p.Wo;
    const T* src = y + n * p.syn + (j / p.per) * p.syc;
    const float* wj = w + j;  // tap t at wj[t * tap_stride(p)]
    const int64_t ts = tap_stride(p);
    float acc = b[j];
    for (int64_t dy = 0; dy < p.d; ++dy) {
      const int64_t hi = ho + dy - h;
      if (hi < 0 || hi >= p.Ho) continue;
      for (int64_t dx = 0; dx < p.d; ++dx) {
        const int64_t wi = wo + dx - h;
        if (wi < 0 || wi >= p.Wo) continue;
        acc = fmaf(wj[(dy * p.d + dx) * ts], static_cast<float>(src[hi * p.syh + wi * p.syw]),
                   acc);
      }
    }
    y[n * p.syn + (p.init + j) * p.syc + ho * p.syh + wo * p.syw] =
        static_cast<T>(activate<A>(acc));
  }
}

// y[n, init + j, ho, wo] = act(b[j] + sum over taps of w[j, tap] y[n, j / per, ho + dy - h,
// wo + dx - h]) (w tap-major, tap_stride), zero outside the map, for d == D: one thread a run
// (cheap_run) of a row, grid-stride; consecutive threads take consecutive runs, or in
// channels_last consecutive j (so y's accesses coalesce).
template <typename T, Act A, int D>
__global__ void __launch_bounds__(kThreads)
    cheap_run_kernel(T* __restrict__ y, const float* __restrict__ w,
                     const float* __restrict__ b, EvalParams p) {
  constexpr int h = D / 2;
  const int64_t runs_w = (p.Wo + kCheapRun - 1) / kCheapRun, runs = p.Ho * runs_w;
  const int64_t total = p.N * p.ghost * runs;
  const bool y_channels_inner = p.syc == 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = y_channels_inner ? (i / p.ghost) % runs : i % runs;
    const int64_t j = y_channels_inner ? i % p.ghost : (i / runs) % p.ghost;
    const int64_t n = i / (runs * p.ghost);
    const int64_t ho = r / runs_w, wo0 = r % runs_w * kCheapRun;
    const T* src = y + n * p.syn + (j / p.per) * p.syc;
    float out[kCheapRun];
    cheap_run<D>(w + j, tap_stride(p), b[j], [&](int dy, float(&row)[kCheapRun + D - 1]) {
      const int64_t hi = ho + dy - h;
      if (hi < 0 || hi >= p.Ho) return false;
#pragma unroll
      for (int u = 0; u < kCheapRun + D - 1; ++u) {
        const int64_t wi = wo0 - h + u;
        row[u] = wi >= 0 && wi < p.Wo ? static_cast<float>(src[hi * p.syh + wi * p.syw]) : 0.f;
      }
      return true;
    }, out);
    store_run<T, A>(y + n * p.syn + (p.init + j) * p.syc + ho * p.syh + wo0 * p.syw, out,
                    p.Wo - wo0, p.syw);
  }
}

// The one-pass tile: TH x TW output pixels, kOnePassChannels intrinsic channels, the halo
// of a D x D cheap op around it; K (input channels) in slices through shared memory (of
// kOnePassK with float FMAs, kOnePassMmaK on the tensor cores).
constexpr int kOnePassTH = 8, kOnePassTW = 16, kOnePassChannels = 16, kOnePassK = 16;
constexpr int kOnePassMmaK = 32, kOnePassMmaLd = kOnePassMmaK + 8;  // ldm: rows 80 bytes apart
static_assert(kOnePassTW % kCheapRun == 0, "a tile row holds whole runs");

template <int D>
struct OnePassTile {
  static constexpr int kHalo = D / 2, kRows = kOnePassTH + 2 * kHalo,
                       kCols = kOnePassTW + 2 * kHalo, kPixels = kRows * kCols;
  // x1's row length in shared memory: odd, so a warp's 16 channels at one pixel hit distinct
  // banks.
  static constexpr int kX1Ld = kPixels | 1;
  // Float FMAs: a thread's kFmaChannels channels at kFmaItems halo pixels kFmaPixelStep apart.
  static constexpr int kFmaChannels = 8;
  static constexpr int kFmaPixelStep = kThreads / (kOnePassChannels / kFmaChannels);
  static constexpr int kFmaItems = (kPixels + kFmaPixelStep - 1) / kFmaPixelStep;
  // Tensor cores: halo pixels in whole 16-pixel fragments, spread over the 8 warps; the
  // accumulator tile's row length, 8 banks past a multiple of 32 (a fragment store's two
  // halves of 8 rows each cover the banks once).
  static constexpr int kPixelsPadded = (kPixels + 15) / 16 * 16, kFrags = kPixelsPadded / 16,
                       kFragsPerWarp = (kFrags + kThreads / 32 - 1) / (kThreads / 32),
                       kAccLd = (kPixelsPadded - 8 + 31) / 32 * 32 + 8;
};

// Where a one-pass block works: image n, tile origin (r0, c0) in output pixels, intrinsic
// channels m0...
struct OnePassBlock {
  int64_t n, r0, c0, m0;
};

__device__ __forceinline__ OnePassBlock one_pass_block(const EvalParams& p) {
  const int64_t tiles_h = (p.Ho + kOnePassTH - 1) / kOnePassTH;
  const int64_t tiles_w = (p.Wo + kOnePassTW - 1) / kOnePassTW;
  const int64_t tile = int64_t(blockIdx.x) % (tiles_h * tiles_w);
  return {int64_t(blockIdx.x) / (tiles_h * tiles_w), tile / tiles_w * kOnePassTH,
          tile % tiles_w * kOnePassTW, int64_t(blockIdx.y) * kOnePassChannels};
}

// Whether halo pixel hp (halo row * kCols + halo column, < kPixels) of the block's tile lies
// inside the map.
template <int D>
__device__ __forceinline__ bool halo_in_map(const EvalParams& p, const OnePassBlock& blk,
                                            int hp) {
  constexpr int h = OnePassTile<D>::kHalo, HW = OnePassTile<D>::kCols;
  const int64_t ho = blk.r0 - h + hp / HW, wo = blk.c0 - h + hp % HW;
  return ho >= 0 && ho < p.Ho && wo >= 0 && wo < p.Wo;
}

// x's offset of halo pixel hp's channel 0 (its output pixel sampled every `stride`), or -1
// where hp is padding (>= kPixels) or outside the map.
template <int D>
__device__ __forceinline__ int64_t halo_x_offset(const EvalParams& p, const OnePassBlock& blk,
                                                 int hp) {
  constexpr int h = OnePassTile<D>::kHalo, HW = OnePassTile<D>::kCols;
  if (hp >= OnePassTile<D>::kPixels || !halo_in_map<D>(p, blk, hp)) return -1;
  const int64_t ho = blk.r0 - h + hp / HW, wo = blk.c0 - h + hp % HW;
  return blk.n * p.sxn + ho * p.stride * p.sxh + wo * p.stride * p.sxw;
}

// x1 = act(BN1(W1 x)) of the block's channels on its tile and halo into s_x1[cb][hp] (hp =
// halo row * kCols + halo column), zero outside the map (the cheap op's zero padding) and for
// channels past init: float FMAs, register-blocked. Thread t owns kFmaChannels channels from
// ch0 = t / 128 * kFmaChannels at halo pixels t % 128 + 128 i: per k, two float4 reads of those
// channels' weights (one address for the whole warp: a broadcast) and one read of x per pixel
// feed kFmaChannels FMAs a pixel.
template <typename T, Act A, int D>
__device__ __forceinline__ void one_pass_x1_fma(const T* __restrict__ x,
                                                const T* __restrict__ w1,
                                                const float* __restrict__ b1,
                                                const EvalParams& p, const OnePassBlock& blk,
                                                float (*s_x1)[OnePassTile<D>::kX1Ld]) {
  using Tile = OnePassTile<D>;
  constexpr int CB = kOnePassChannels, KC = kOnePassK, G = Tile::kFmaChannels;
  constexpr int HP = Tile::kPixels;
  constexpr int kItems = Tile::kFmaItems, kPixelStep = Tile::kFmaPixelStep;
  // Rows of HP + 2 (HP is a multiple of 4): a warp's k-fastest stores (16 k x 2 pixels) hit
  // distinct banks.
  __shared__ float s_x[KC][HP + 2];
  __shared__ __align__(16) float s_w[KC][CB];  // a k's channels contiguous: float4 reads
  const int ch0 = threadIdx.x / kPixelStep * G, hp0 = threadIdx.x % kPixelStep;
  float acc[kItems][G];
#pragma unroll
  for (int i = 0; i < kItems; ++i)
#pragma unroll
    for (int c = 0; c < G; ++c) acc[i][c] = 0.f;
  const bool x_channels_inner = p.sxc == 1;  // channels_last: consecutive threads, channels
  for (int64_t k0 = 0; k0 < p.C; k0 += KC) {
    for (int i = threadIdx.x; i < CB * KC; i += kThreads) {
      const int k = i / CB, cb = i % CB;  // channel-fastest: the stores hit distinct banks
      s_w[k][cb] = blk.m0 + cb < p.init && k0 + k < p.C
                       ? static_cast<float>(w1[(blk.m0 + cb) * p.C + k0 + k])
                       : 0.f;
    }
    for (int i = threadIdx.x; i < KC * HP; i += kThreads) {
      const int k = x_channels_inner ? i % KC : i / HP;
      const int hp = x_channels_inner ? i / KC : i % HP;
      const int64_t off = halo_x_offset<D>(p, blk, hp);
      s_x[k][hp] = off >= 0 && k0 + k < p.C ? static_cast<float>(x[off + (k0 + k) * p.sxc]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      float wk[G];
#pragma unroll
      for (int q = 0; q < G; q += 4) {
        const float4 wq = *reinterpret_cast<const float4*>(&s_w[k][ch0 + q]);
        wk[q] = wq.x, wk[q + 1] = wq.y, wk[q + 2] = wq.z, wk[q + 3] = wq.w;
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int hp = hp0 + i * kPixelStep;
        if (hp < HP) {
          const float v = s_x[k][hp];
#pragma unroll
          for (int c = 0; c < G; ++c) acc[i][c] = fmaf(wk[c], v, acc[i][c]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int hp = hp0 + i * kPixelStep;
    if (hp < HP) {
      const bool in_map = halo_in_map<D>(p, blk, hp);
#pragma unroll
      for (int c = 0; c < G; ++c) {
        const int64_t m = blk.m0 + ch0 + c;
        s_x1[ch0 + c][hp] = in_map && m < p.init ? activate<A>(acc[i][c] + b1[m]) : 0.f;
      }
    }
  }
}

// one_pass_x1_fma's result on the tensor cores, T half or bfloat16: per K slice, w1's 16 x
// kOnePassMmaK block (row-major A) and the halo pixels' channels (column-major B: a pixel's
// slice contiguous, so a 16-byte vector of its channels is one load and one store where
// x_channel_vectors holds); warp v multiplies the 16-pixel fragments v, v + 8, ... into float
// accumulators, stored through shared memory (aliasing the slices) for BN1 + act.
template <typename T, Act A, int D>
__device__ __forceinline__ void one_pass_x1_mma(const T* __restrict__ x,
                                                const T* __restrict__ w1,
                                                const float* __restrict__ b1,
                                                const EvalParams& p, const OnePassBlock& blk,
                                                float (*s_x1)[OnePassTile<D>::kX1Ld]) {
  using Tile = OnePassTile<D>;
  using E = typename MmaElement<T>::type;
  namespace wmma = nvcuda::wmma;
  constexpr int CB = kOnePassChannels, KC = kOnePassMmaK, LD = kOnePassMmaLd;
  constexpr int HP = Tile::kPixels, HPP = Tile::kPixelsPadded;
  constexpr int kVec = 16 / sizeof(E), kVecs = KC / kVec;
  constexpr int kWBytes = CB * LD * int(sizeof(E)), kXBytes = HPP * LD * int(sizeof(E));
  constexpr int kAccBytes = CB * Tile::kAccLd * int(sizeof(float));
  constexpr int kBytes = kWBytes + kXBytes > kAccBytes ? kWBytes + kXBytes : kAccBytes;
  __shared__ __align__(32) unsigned char smem[kBytes];
  auto s_w = reinterpret_cast<E(*)[LD]>(smem);
  auto s_x = reinterpret_cast<E(*)[LD]>(smem + kWBytes);
  auto s_acc = reinterpret_cast<float(*)[Tile::kAccLd]>(smem);

  const E* xe = reinterpret_cast<const E*>(x);
  const GemmShape g{p.N, p.C, p.init, p.Ho, p.Wo, p.stride, p.sxn, p.sxc, p.sxh, p.sxw};
  const bool x_vectors = x_channel_vectors(x, g, kVec);
  const bool x_channels_inner = p.sxc == 1;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Tile::kFragsPerWarp];
#pragma unroll
  for (int r = 0; r < Tile::kFragsPerWarp; ++r) wmma::fill_fragment(acc[r], 0.f);
  for (int64_t k0 = 0; k0 < p.C; k0 += KC) {
    for (int i = threadIdx.x; i < CB * KC; i += kThreads) {
      const int cb = i / KC, k = i % KC;
      const bool ok = blk.m0 + cb < p.init && k0 + k < p.C;
      s_w[cb][k] = ok ? reinterpret_cast<const E*>(w1)[(blk.m0 + cb) * p.C + k0 + k]
                      : MmaElement<T>::from_float(0.f);
    }
    if (x_vectors) {
      for (int i = threadIdx.x; i < HPP * kVecs; i += kThreads) {
        const int hp = i / kVecs, k = (i % kVecs) * kVec;
        const int64_t off = halo_x_offset<D>(p, blk, hp);
        // C is a multiple of kVec here: the vector is wholly inside or outside x.
        *reinterpret_cast<uint4*>(&s_x[hp][k]) =
            off >= 0 && k0 + k < p.C ? __ldg(reinterpret_cast<const uint4*>(xe + off + k0 + k))
                                     : make_uint4(0u, 0u, 0u, 0u);  // +0.0
      }
    } else {
      for (int i = threadIdx.x; i < HPP * KC; i += kThreads) {
        const int k = x_channels_inner ? i % KC : i / HPP;
        const int hp = x_channels_inner ? i / KC : i % HPP;
        const int64_t off = halo_x_offset<D>(p, blk, hp);
        s_x[hp][k] = off >= 0 && k0 + k < p.C ? xe[off + (k0 + k) * p.sxc]
                                              : MmaElement<T>::from_float(0.f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, &s_w[0][kk], LD);
#pragma unroll
      for (int r = 0; r < Tile::kFragsPerWarp; ++r) {
        const int f = warp + r * (kThreads / 32);
        if (f < Tile::kFrags) {  // warp-uniform
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;
          wmma::load_matrix_sync(b, &s_x[16 * f][kk], LD);
          wmma::mma_sync(acc[r], a, b, acc[r]);
        }
      }
    }
    __syncthreads();  // every warp is done with the slice: the next one, or s_acc, may overwrite
  }
#pragma unroll
  for (int r = 0; r < Tile::kFragsPerWarp; ++r) {
    const int f = warp + r * (kThreads / 32);
    if (f < Tile::kFrags) {
      wmma::store_matrix_sync(&s_acc[0][16 * f], acc[r], Tile::kAccLd, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < CB * HP; i += kThreads) {
    const int cb = i / HP, hp = i % HP;
    const int64_t m = blk.m0 + cb;
    const bool inside = m < p.init && halo_in_map<D>(p, blk, hp);
    s_x1[cb][hp] = inside ? activate<A>(s_acc[cb][hp] + b1[m]) : 0.f;
  }
}

// Grid (images x tile rows x tile columns, intrinsic channel blocks): x1 on the tile and halo
// (tensor cores for half / bfloat16 on sm_80+, float FMAs otherwise), then its interior into
// y[:, m] and the cheap op into the ghost channels.
template <typename T, Act A, int D>
__global__ void __launch_bounds__(kThreads, 2)
    one_pass_kernel(const T* __restrict__ x, const T* __restrict__ w1,
                    const float* __restrict__ b1, const float* __restrict__ w2,
                    const float* __restrict__ b2, T* __restrict__ y, EvalParams p) {
  using Tile = OnePassTile<D>;
  constexpr int CB = kOnePassChannels, TH = kOnePassTH, TW = kOnePassTW;
  constexpr int h = Tile::kHalo, HW = Tile::kCols;
  __shared__ float s_x1[CB][Tile::kX1Ld];
  const OnePassBlock blk = one_pass_block(p);
  if constexpr (kHasMma && !std::is_same_v<T, float>) {
    one_pass_x1_mma<T, A, D>(x, w1, b1, p, blk, s_x1);
  } else {
    one_pass_x1_fma<T, A, D>(x, w1, b1, p, blk, s_x1);
  }
  __syncthreads();
  const bool y_channels_inner = p.syc == 1;
  // The intrinsic channels: the tile's interior into y[:, m].
  for (int i = threadIdx.x; i < CB * TH * TW; i += kThreads) {
    const int cb = y_channels_inner ? i % CB : i / (TH * TW);
    const int pix = y_channels_inner ? i / CB : i % (TH * TW);
    const int ty = pix / TW, tx = pix % TW;
    const int64_t ho = blk.r0 + ty, wo = blk.c0 + tx, m = blk.m0 + cb;
    if (m < p.init && ho < p.Ho && wo < p.Wo) {
      y[blk.n * p.syn + m * p.syc + ho * p.syh + wo * p.syw] =
          static_cast<T>(s_x1[cb][(ty + h) * HW + tx + h]);
    }
  }
  // The ghost channels j = c * per + jj of this block's intrinsic channels c, j < ghost: a
  // thread a run of one row (cheap_run). In channels_last consecutive threads take consecutive
  // j (consecutive rows of the tile for the next 16: x1's odd row length spreads them over the
  // banks), else consecutive runs.
  constexpr int kRuns = TH * (TW / kCheapRun);
  const int64_t ghosts = CB * p.per, j0 = blk.m0 * p.per;
  for (int64_t i = threadIdx.x; i < ghosts * kRuns; i += kThreads) {
    const int64_t gi = y_channels_inner ? i % ghosts : i / kRuns;
    const int run = int(y_channels_inner ? i / ghosts : i % kRuns);
    const int ty = run % TH, tx0 = run / TH * kCheapRun;
    const int64_t j = j0 + gi, ho = blk.r0 + ty, wo0 = blk.c0 + tx0;
    if (j >= p.ghost || ho >= p.Ho || wo0 >= p.Wo) continue;
    const float* src = &s_x1[gi / p.per][ty * HW + tx0];  // the window's top-left corner
    float out[kCheapRun];
    cheap_run<D>(w2 + j, tap_stride(p), b2[j], [&](int dy, float(&row)[kCheapRun + D - 1]) {
#pragma unroll
      for (int u = 0; u < kCheapRun + D - 1; ++u) row[u] = src[dy * HW + u];
      return true;
    }, out);
    store_run<T, A>(y + blk.n * p.syn + (p.init + j) * p.syc + ho * p.syh + wo0 * p.syw, out,
                    p.Wo - wo0, p.syw);
  }
}

// Both BatchNorms folded into the kernels' parameters in one launch (the ATen ops it replaces
// came to about twenty launches a call, more GPU time than the module's own kernels take at
// 7x7): with sc = gamma / sqrt(var + eps) in float,
//   w1f[m, k] = W1[m, k] sc1[m] in T (x's dtype: the GEMMs' operand, rounded as the Triton
//   backend's tl.dot takes it), b1[m] = beta1[m] - mean1[m] sc1[m],
//   w2t[t, j] = W2[j, t] sc2[j] (tap-major: tap_stride), b2[j] = beta2[j] - mean2[j] sc2[j];
// b1, w2t and b2 are consecutive in one float buffer. Conv weights in T, BatchNorm parameters
// (all eight) in TB, contiguous (the host converts what is not).
struct FoldParams {
  int64_t init, inp, new_ch, taps;
  float eps1, eps2;
};

template <typename TB>
__device__ __forceinline__ float bn_scale(const TB* g, const TB* v, int64_t c, float eps) {
  return static_cast<float>(g[c]) / sqrtf(static_cast<float>(v[c]) + eps);
}

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
    fold_kernel(const T* __restrict__ w1, const TB* __restrict__ g1, const TB* __restrict__ bt1,
                const TB* __restrict__ m1, const TB* __restrict__ v1,
                const T* __restrict__ w2, const TB* __restrict__ g2, const TB* __restrict__ bt2,
                const TB* __restrict__ m2, const TB* __restrict__ v2, T* __restrict__ w1f,
                float* __restrict__ b1, float* __restrict__ w2t, float* __restrict__ b2,
                FoldParams f) {
  const int64_t n1 = f.init * f.inp, n2 = f.new_ch * f.taps;
  const int64_t total = n1 + f.init + n2 + f.new_ch;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t e = i;
    if (e < n1) {
      w1f[e] = static_cast<T>(static_cast<float>(w1[e]) * bn_scale(g1, v1, e / f.inp, f.eps1));
      continue;
    }
    e -= n1;
    if (e < f.init) {
      b1[e] = static_cast<float>(bt1[e]) - static_cast<float>(m1[e]) * bn_scale(g1, v1, e, f.eps1);
      continue;
    }
    e -= f.init;
    if (e < n2) {  // e = t * new + j: consecutive threads, consecutive ghost channels
      const int64_t t = e / f.new_ch, j = e % f.new_ch;
      w2t[e] = static_cast<float>(w2[j * f.taps + t]) * bn_scale(g2, v2, j, f.eps2);
      continue;
    }
    e -= n2;
    b2[e] = static_cast<float>(bt2[e]) - static_cast<float>(m2[e]) * bn_scale(g2, v2, e, f.eps2);
  }
}

// One-pass launch for a d the kernel is instantiated for; false for other d.
template <typename T, Act A>
bool launch_one_pass(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                     const at::Tensor& w2, const at::Tensor& b2, at::Tensor& y,
                     const EvalParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = ((p.Ho + kOnePassTH - 1) / kOnePassTH) *
                        ((p.Wo + kOnePassTW - 1) / kOnePassTW);
  const dim3 grid(p.N * tiles, (p.init + kOnePassChannels - 1) / kOnePassChannels);
  auto go = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<T>(), w1.const_data_ptr<T>(),
                                          b1.const_data_ptr<float>(), w2.const_data_ptr<float>(),
                                          b2.const_data_ptr<float>(), y.mutable_data_ptr<T>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  };
  switch (p.d) {
    case 1: return go(one_pass_kernel<T, A, 1>);
    case 3: return go(one_pass_kernel<T, A, 3>);
    case 5: return go(one_pass_kernel<T, A, 5>);
    case 7: return go(one_pass_kernel<T, A, 7>);
    default: return false;
  }
}

// The one-pass kernel recomputes the primary conv on the halo: (tile + halo) / tile times its
// flops. Taken while those flops stay within this many per byte the module moves (x read, y
// written), so the recompute hides under the memory traffic it saves. Float FMAs: about an
// H100's float FMA rate over its memory bandwidth (67 TFLOP/s over 3.35 TB/s). Tensor cores
// (half / bfloat16, sm_80+): twice that, lower than the Triton backend's 96 because a block
// covers 16 intrinsic channels and so reads x (from L2) once per 16 of them; with it the
// GhostNet modules at 112x112 to 28x28 run in one pass (5-32 flops a byte at fp16), those at
// 14x14 and 7x7 (51-252) in two kernels. First guesses, to be tuned on a GPU
// (GHOSTOPS_CUDA_EVAL forces a form).
constexpr double kOnePassMaxFlopsPerByte = 24, kOnePassMaxFlopsPerByteMma = 48;

// Whether the current device runs the tensor-core kernels (kHasMma: sm_80 and later).
bool device_has_mma() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

bool use_one_pass(const EvalParams& p, int64_t oup, at::ScalarType dtype) {
  const char* form = std::getenv("GHOSTOPS_CUDA_EVAL");
  const std::string f = form == nullptr ? "auto" : form;
  TORCH_CHECK(f == "auto" || f == "one_pass" || f == "two_kernels",
              "GHOSTOPS_CUDA_EVAL='", f, "': expected auto, one_pass or two_kernels");
  if (f != "auto") return f == "one_pass";
  const double tiles = double((p.Ho + kOnePassTH - 1) / kOnePassTH) *
                       double((p.Wo + kOnePassTW - 1) / kOnePassTW);
  const double halo = p.d / 2;
  const double computed = tiles * (kOnePassTH + 2 * halo) * (kOnePassTW + 2 * halo);
  const double flops = 2.0 * p.C * p.init * computed / double(p.Ho * p.Wo);
  const bool mma = dtype != at::kFloat && device_has_mma();
  const double limit = mma ? kOnePassMaxFlopsPerByteMma : kOnePassMaxFlopsPerByte;
  return flops / (double(p.C + oup) * double(c10::elementSize(dtype))) <= limit;
}

template <typename T, Act A>
void launch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
            const at::Tensor& w2, const at::Tensor& b2, at::Tensor& y, const EvalParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_pix = p.N * p.Ho * p.Wo;
  const GemmShape gemm{p.N, p.C, p.init, p.Ho, p.Wo, p.stride, p.sxn, p.sxc, p.sxh, p.sxw};
  const bool x_vectors = x_channel_vectors(x.const_data_ptr<T>(), gemm, 16 / sizeof(T));
  dispatch_gemm_tile(p.init, x_vectors, [&](auto rows_tag, auto xv_tag) {
    constexpr int kRows = decltype(rows_tag)::value;
    const dim3 grid((n_pix + kTileP - 1) / kTileP, (p.init + kRows - 1) / kRows);
    primary_kernel<T, A, kRows, decltype(xv_tag)::value><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), w1.const_data_ptr<T>(), b1.const_data_ptr<float>(),
        y.mutable_data_ptr<T>(), p, gemm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (p.ghost > 0) {
    const int64_t total = p.N * p.ghost * p.Ho * p.Wo;
    auto go = [&](auto kernel, int64_t items) {
      const int64_t blocks = std::min<int64_t>((items + kThreads - 1) / kThreads, 65535 * 8);
      kernel<<<blocks, kThreads, 0, stream>>>(y.mutable_data_ptr<T>(),
                                              w2.const_data_ptr<float>(),
                                              b2.const_data_ptr<float>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const int64_t runs = p.N * p.ghost * p.Ho * ((p.Wo + kCheapRun - 1) / kCheapRun);
    switch (p.d) {
      case 1: go(cheap_run_kernel<T, A, 1>, runs); break;
      case 3: go(cheap_run_kernel<T, A, 3>, runs); break;
      case 5: go(cheap_run_kernel<T, A, 5>, runs); break;
      case 7: go(cheap_run_kernel<T, A, 7>, runs); break;
      default: go(cheap_kernel<T, A>, total);
    }
  }
}

at::Tensor ghost_forward_eval_cuda(const at::Tensor& x, const at::Tensor& primary_weight,
                                   const at::Tensor& bn1_weight, const at::Tensor& bn1_bias,
                                   const at::Tensor& bn1_mean, const at::Tensor& bn1_var,
                                   double bn1_eps, const at::Tensor& cheap_weight,
                                   const at::Tensor& bn2_weight, const at::Tensor& bn2_bias,
                                   const at::Tensor& bn2_mean, const at::Tensor& bn2_var,
                                   double bn2_eps, int64_t oup, int64_t stride,
                                   c10::string_view act) {
  const GhostShape s = check_ghost_args(x, primary_weight, bn1_weight, bn1_bias, bn1_mean,
                                        bn1_var, cheap_weight, bn2_weight, bn2_bias, bn2_mean,
                                        bn2_var, oup, stride, VectorDtype::AnyFloat);
  TORCH_CHECK(x.is_cuda(), "ghost_forward_eval (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const Act activation = parse_act(std::string(act));
  at::Tensor y = at::empty({s.batch, s.oup, s.out_h, s.out_w},
                           x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;
  const EvalParams p{s.batch,     s.inp,       s.out_h,     s.out_w,     s.init,
                     s.ghost,     s.ratio - 1, s.dw,        s.stride,    x.stride(0),
                     x.stride(1), x.stride(2), x.stride(3), y.stride(0), y.stride(1),
                     y.stride(2), y.stride(3)};
  const bool one_pass = use_one_pass(p, s.oup, x.scalar_type());

  // fold_kernel's inputs: conv weights in x's dtype, the eight BatchNorm vectors in one dtype,
  // x's or float (anything else, or a mix, converted to float here), all contiguous: no-ops
  // for a model in one dtype.
  const std::array<const at::Tensor*, 8> bn = {&bn1_weight, &bn1_bias, &bn1_mean, &bn1_var,
                                               &bn2_weight, &bn2_bias, &bn2_mean, &bn2_var};
  at::ScalarType bn_dtype = bn1_weight.scalar_type();
  for (const at::Tensor* t : bn) {
    if (t->scalar_type() != bn_dtype) bn_dtype = at::kFloat;
  }
  if (bn_dtype != x.scalar_type()) bn_dtype = at::kFloat;
  std::array<at::Tensor, 8> bnc;
  for (size_t i = 0; i < bn.size(); ++i) bnc[i] = bn[i]->to(bn_dtype).contiguous();
  const at::Tensor w1_raw = primary_weight.to(x.scalar_type()).contiguous();
  const at::Tensor w2_raw = cheap_weight.to(x.scalar_type()).contiguous();
  const int64_t new_ch = cheap_weight.size(0), taps = s.dw * s.dw;
  // The folded parameters: w1 (init, inp) in x's dtype; b1 | w2 (tap-major) | b2 in one float
  // buffer.
  at::Tensor w1 = at::empty({s.init, s.inp}, x.options());
  const at::Tensor folded =
      at::empty({s.init + new_ch * taps + new_ch}, x.options().dtype(at::kFloat));
  const at::Tensor b1 = folded.narrow(0, 0, s.init);
  const at::Tensor w2 = folded.narrow(0, s.init, new_ch * taps);
  const at::Tensor b2 = folded.narrow(0, s.init + new_ch * taps, new_ch);
  const FoldParams f{s.init, s.inp, new_ch, taps, float(bn1_eps), float(bn2_eps)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_gpu_dtype("ghost_forward_eval (CUDA kernel)", x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto fold = [&](auto bn_tag) {
      using TB = decltype(bn_tag);
      const int64_t total = s.init * s.inp + s.init + new_ch * taps + new_ch;
      const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 1024);
      fold_kernel<T, TB><<<blocks, kThreads, 0, stream>>>(
          w1_raw.const_data_ptr<T>(), bnc[0].const_data_ptr<TB>(), bnc[1].const_data_ptr<TB>(),
          bnc[2].const_data_ptr<TB>(), bnc[3].const_data_ptr<TB>(), w2_raw.const_data_ptr<T>(),
          bnc[4].const_data_ptr<TB>(), bnc[5].const_data_ptr<TB>(), bnc[6].const_data_ptr<TB>(),
          bnc[7].const_data_ptr<TB>(), w1.mutable_data_ptr<T>(),
          folded.mutable_data_ptr<float>(), folded.mutable_data_ptr<float>() + s.init,
          folded.mutable_data_ptr<float>() + s.init + new_ch * taps, f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (bn_dtype == at::kFloat) {
      fold(float{});
    } else {
      fold(T{});
    }
    auto run = [&](auto act_tag) {
      constexpr Act A = decltype(act_tag)::value;
      if (one_pass && launch_one_pass<T, A>(x, w1, b1, w2, b2, y, p)) return;
      launch<T, A>(x, w1, b1, w2, b2, y, p);
    };
    if (activation == Act::ReLU) {
      run(std::integral_constant<Act, Act::ReLU>{});
    } else {
      run(std::integral_constant<Act, Act::Identity>{});
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CUDA, m) { m.impl("ghost_forward_eval", &ghost_forward_eval_cuda); }

}  // namespace ghostops::cuda
