// Fused training-mode Ghost module on the CPU: the forward with batch-statistics BatchNorm and
// its backward (DESIGN.md section 2). nn.BatchNorm2d semantics in training: the batch mean and
// biased variance normalise; the op returns them, and the caller (ghostops/ops.py) updates the
// running statistics from them.
//
// Forward, three passes (the kernels work on NCHW-contiguous buffers; P = pixels per plane):
//   F1  primary GEMM z1 = W1 x straight into y[:, :init], with per-task mean / M2 of each
//       channel computed while the task's tile is in cache.
//   F2  per (image, intrinsic channel) plane: x1 = act(BN1(z1)) in place; the depthwise conv of
//       x1 for the ghost channels it feeds goes to y[:, init:oup] (ghost channels past oup are
//       computed for their statistics only: the reference's BatchNorm sees them); mean / M2.
//   F3  y[:, init:oup] = act(BN2(z2)) in place.
//
// The backward saves x, z1 (the primary conv before BN1, half of y's channels) and the batch
// mean / variance of both BatchNorms: about a quarter of what the unfused module keeps alive.
// It does not read y, so callers may modify y in place (GhostNet's residual `x += shortcut`).
// From z1 it recomputes x1, and from x1 z2, with the forward's code on the forward's bits, so
// the ReLU masks are the forward's. (Recovering x1hat from y, the in-place-ABN idea, does not
// suffice with a ReLU: the BatchNorm backward needs x1hat where the ReLU cut it off as well.)
//   B1  per plane: ga2 = dy2 * act'(a2); per-channel sums of ga2 and ga2 * x2hat.
//   B2  per plane: dz2 (BN2 backward), the cheap weight's gradient, dx1 = dy1 + dwconv^T(dz2),
//       ga1 = dx1 * act'(x1) into a buffer; per-channel sums of ga1 and ga1 * x1hat.
//   B3  dz1 (BN1 backward) in place, then the two GEMMs of the primary conv through ATen.
// Per-plane partial sums are combined in a fixed order, so results do not depend on threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "../ghost_common.h"
#include "kernels.h"
#include "output_pool.h"

namespace ghostops::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Reductions (runs of kRun elements, kernels.h).

template <typename T, typename F>
double reduce_runs(int64_t n, F&& term) {  // sum over i < n of term(i) (a Vectorized<T>)
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  double total = 0;
  int64_t i = 0;
  for (; i + VL <= n;) {
    Vec acc(T(0));
    for (const int64_t stop = std::min(n, i + kRun); i + VL <= stop; i += VL)
      acc = acc + term(i, VL);
    total += double(at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc));
  }
  if (i < n) {
    const Vec tail = term(i, n - i);  // lanes past n - i are zero (loadu with a count)
    total += double(at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, tail));
  }
  return total;
}

// Mean and M2 (sum of squared deviations) of n values, or with `mask` of those v[i] whose mask
// has all bits set (`count` of them; the rest have it zero): two passes over data in cache.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
};

template <typename T>
Moments moments_of(const T* v, int64_t n, const T* mask = nullptr, int64_t count = -1) {
  using Vec = Vectorized<T>;
  auto kept = [&](Vec x, int64_t i, int64_t cnt) {
    return mask == nullptr ? x : x & Vec::loadu(mask + i, cnt);
  };
  if (count < 0) count = n;
  const double mean = reduce_runs<T>(n, [&](int64_t i, int64_t cnt) {
    return kept(Vec::loadu(v + i, cnt), i, cnt);
  }) / double(count);
  const Vec c(static_cast<T>(mean));
  const double m2 = reduce_runs<T>(n, [&](int64_t i, int64_t cnt) {
    // lanes past cnt load as zero: mask them out of (v - c)
    const Vec d = cnt == Vec::size() ? Vec::loadu(v + i) - c
                                     : Vec::set(Vec(T(0)), Vec::loadu(v + i, cnt) - c, cnt);
    const Vec k = kept(d, i, cnt);
    return k * k;
  });
  // m2 is about the rounded mean; correct to the exact one (Steiner): m2 - n (mean - c)^2.
  const double shift = mean - double(static_cast<T>(mean));
  return {double(count), mean, std::max(0.0, m2 - double(count) * shift * shift)};
}

// Chan et al.'s pairwise combination, in the order given.
inline Moments combine(const Moments* parts, int64_t count, int64_t stride) {
  Moments total;
  for (int64_t i = 0; i < count; ++i) {
    const Moments& p = parts[i * stride];
    if (p.count == 0) continue;
    const double n = total.count + p.count, delta = p.mean - total.mean;
    total.mean += delta * p.count / n;
    total.m2 += p.m2 + delta * delta * total.count * p.count / n;
    total.count = n;
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Depthwise conv over zero-padded planes, flattened (the same code in forward and backward).
//
// A plane of (H, W) padded by h = d / 2 zeros on every side is rows of wp = W + d - 1; small
// maps stack several images' planes of one channel, h zero rows apart (the padding between two
// images is shared). Pixel (g, r, c) of image g sits at pixel(g, r) + c, and its tap (dy, dx)
// at an offset of (dy - h) * wp + (dx - h), the same for every pixel: so the conv runs as
// vectors over the flat range [lo, hi) from the first pixel to the last, whatever W is, and
// over all the stacked images at once (GhostNet's 7x7 and 14x14 maps would otherwise spend
// their time on per-plane overheads). Entries of that range in the padding come out as garbage
// and are never read back as pixels.
struct Padded {
  int64_t H, W, d, h, wp, images, size, lo, hi;
  Padded(int64_t H_, int64_t W_, int64_t d_, int64_t images_ = 1)
      : H(H_), W(W_), d(d_), h(d_ / 2), wp(W_ + d_ - 1), images(images_),
        size((images_ * (H_ + h) + h) * wp), lo(pixel(0, 0)), hi(pixel(images_ - 1, H_ - 1) + W_) {}
  int64_t pixel(int64_t g, int64_t r) const { return (h + g * (H + h) + r) * wp + h; }
  int64_t offset(int64_t dy, int64_t dx) const { return (dy - h) * wp + (dx - h); }
};

// Images stacked per plane task: about kStackPixels pixels, so that fixed costs per pass
// amortise, in groups of equal size (a short last group left threads idle: 12 % of the time
// spinning). Not more: a task reads one plane of each stacked image from z1 and grad_y, and
// the planes of consecutive tasks follow on, so each image is a stream the hardware prefetcher
// must follow, and a few dozen are too many. Measured at 160->960 7x7, batch 32, in a forward
// + backward loop: 32 images a task (2048 pixels), B1 0.76-0.84 and B2 1.6-2.4 ms; 8 images
// (400 pixels), 0.37 and 0.93-0.99 ms; 4 images, 0.38-0.40 and 0.97-1.01 ms. 14x14 maps: the
// same within noise for 1, 2 or 8 images.
constexpr int64_t kStackPixels = 400;
inline int64_t images_per_plane_task(int64_t N, int64_t P) {
  const int64_t wanted =
      std::clamp<int64_t>(kStackPixels / std::max<int64_t>(P, 1), 1, std::max<int64_t>(N, 1));
  const int64_t groups = (N + wanted - 1) / wanted;
  return std::max<int64_t>(1, (N + groups - 1) / groups);
}

// out[i] = sum over taps of w[dy * d + dx] * xp[i + offset(dy, dx)], i in [lo, hi), taps in
// row-major order (ACC: out[i] += that sum). D: the kernel size as a compile-time constant (0:
// g.d at run time). The forward and the backward's recomputation run this same code, so they
// round identically.
template <typename T, int D, bool ACC>
void dw_flat_impl(const Padded& g, const T* xp, const T* w, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const int taps = D > 0 ? D * D : int(g.d * g.d);
  // Fixed arrays for a compile-time kernel size; any other size on the heap.
  Vec wv_fixed[D > 0 ? D * D : 1];
  int64_t off_fixed[D > 0 ? D * D : 1];
  std::vector<Vec> wv_heap(D > 0 ? 0 : taps);
  std::vector<int64_t> off_heap(D > 0 ? 0 : taps);
  Vec* wv = D > 0 ? wv_fixed : wv_heap.data();
  int64_t* off = D > 0 ? off_fixed : off_heap.data();
  for (int t = 0; t < taps; ++t) {
    wv[t] = Vec(w[t]);
    off[t] = g.offset(t / g.d, t % g.d);
  }
  int64_t i = g.lo;
  for (; i + VL <= g.hi; i += VL) {
    Vec acc = ACC ? Vec::loadu(out + i) : Vec(T(0));
    for (int t = 0; t < taps; ++t) acc = at::vec::fmadd(wv[t], Vec::loadu(xp + i + off[t]), acc);
    acc.store(out + i);
  }
  if (i < g.hi) {
    const int64_t count = g.hi - i;
    Vec acc = ACC ? Vec::loadu(out + i, count) : Vec(T(0));
    for (int t = 0; t < taps; ++t)
      acc = at::vec::fmadd(wv[t], Vec::loadu(xp + i + off[t], count), acc);
    acc.store(out + i, count);
  }
}

template <typename T, bool ACC = false>
void dw_flat(const Padded& g, const T* xp, const T* w, T* out) {
  switch (g.d) {
    case 3: return dw_flat_impl<T, 3, ACC>(g, xp, w, out);
    case 5: return dw_flat_impl<T, 5, ACC>(g, xp, w, out);
    default: return dw_flat_impl<T, 0, ACC>(g, xp, w, out);
  }
}

// gw[t] = sum over i in [lo, hi) of gp[i] * xp[i + offset(t)]: the depthwise weight's gradient
// when gp is a gradient plane that is zero outside its pixels.
template <typename T>
void dw_weight_grad(const Padded& g, const T* gp, const T* xp, double* gw) {
  const int64_t taps = g.d * g.d;
  std::vector<int64_t> off(taps);
  for (int64_t t = 0; t < taps; ++t) {
    off[t] = g.offset(t / g.d, t % g.d);
    gw[t] = 0;
  }
  switch (g.d) {
    case 3: return tap_correlation<T, 9>(gp, g.lo, g.hi, xp, off.data(), taps, gw);
    case 5: return tap_correlation<T, 25>(gp, g.lo, g.hi, xp, off.data(), taps, gw);
    default:
      for (int64_t t0 = 0; t0 < taps; t0 += kMaxCorrelationTaps)
        tap_correlation<T, 0>(gp, g.lo, g.hi, xp, off.data() + t0,
                              std::min<int64_t>(kMaxCorrelationTaps, taps - t0), gw + t0);
  }
}

// dst[0, n) = src[0, n), in vectors: GhostNet's rows are 7 to 112 wide, too short for
// memcpy's call to pay.
template <typename T>
inline void copy_row(const T* src, T* dst, int64_t n) {
  using Vec = Vectorized<T>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    Vec::loadu(src + i, count).store(dst + i, count);
  }
}

// Writes plane (H, W) as image `img` of a padded stack whose padding is already zero.
template <typename T>
void pad_plane(const Padded& g, int64_t img, const T* src, T* dst) {
  for (int64_t r = 0; r < g.H; ++r) copy_row(src + r * g.W, dst + g.pixel(img, r), g.W);
}

// Copies image `img` of a padded stack out to (H, W).
template <typename T>
void unpad_plane(const Padded& g, int64_t img, const T* src, T* dst) {
  for (int64_t r = 0; r < g.H; ++r) copy_row(src + g.pixel(img, r), dst + r * g.W, g.W);
}

// out = act(v * scale + shift) over n elements (out may be v).
template <typename T, Act A>
void affine_act(const T* v, T* out, int64_t n, T scale, T shift) {
  using Vec = Vectorized<T>;
  const Vec sc(scale), sh(shift);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    activate_vec<A>(at::vec::fmadd(Vec::loadu(v + i, count), sc, sh)).store(out + i, count);
  }
}

// x1 = act(z1 * scale + shift) of a plane z1 (H, W), row by row into image img of the padded
// stack xp and, if given, into out (H, W) (which may be z1). Written straight from z1: reading
// back a plane just written with vector stores at other offsets stalls on store forwarding
// (measured: a separate padding copy took 18 % of the backward's plane passes). For the same
// reason `out` is written in a second, flat pass: in place, a row's masked load right after the
// previous row's masked store to the same 64 bytes waits for that store to retire (measured:
// half the forward's plane-pass time at 160->960 7x7).
template <typename T, Act A>
void bn_act_pad(const Padded& g, int64_t img, const T* z1, T scale, T shift, T* xp, T* out) {
  using Vec = Vectorized<T>;
  const Vec sc(scale), sh(shift);
  for (int64_t r = 0; r < g.H; ++r)
    for (int64_t i = 0; i < g.W; i += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), g.W - i);
      const Vec v = activate_vec<A>(at::vec::fmadd(Vec::loadu(z1 + r * g.W + i, count), sc, sh));
      v.store(xp + g.pixel(img, r) + i, count);
    }
  if (out != nullptr) affine_act<T, A>(z1, out, g.H * g.W, scale, shift);
}

// All bits set on the pixels of a padded stack, zero on its padding: `v & mask` keeps pixels.
template <typename T>
std::vector<T> pixel_mask(const Padded& g) {
  T ones;
  std::memset(&ones, 0xff, sizeof(T));
  std::vector<T> mask(g.size, T(0));
  for (int64_t img = 0; img < g.images; ++img)
    for (int64_t r = 0; r < g.H; ++r) std::fill_n(mask.begin() + g.pixel(img, r), g.W, ones);
  return mask;
}

// Sum of vectors into a double, in runs of kRun elements.
template <typename T>
struct RunSum {
  using Vec = Vectorized<T>;
  Vec acc = Vec(T(0));
  double total = 0;
  int64_t run = 0;
  void add(Vec v) {
    acc = acc + v;
    if (++run == kRun / Vec::size()) flush();
  }
  void flush() {
    total += double(at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc));
    acc = Vec(T(0));
    run = 0;
  }
  double result() {
    flush();
    return total;
  }
};

// The primary conv's input, NCHW-contiguous, subsampled by the stride.
at::Tensor strided_input(const at::Tensor& x, int64_t stride) {
  if (stride == 1) return x.contiguous();
  return x.slice(2, 0, x.size(2), stride).slice(3, 0, x.size(3), stride).contiguous();
}

// ---------------------------------------------------------------------------------------------
// Forward.

// A pointwise conv out (N, M, P) = W b over N images of P pixels: b (N, K, P) contiguous,
// W (M, K) packed by pack_weight. Tasks are pixels of one image, or whole images when maps are
// small. With `moments` (tasks x M), also each task's per-channel mean / M2, taken while its
// tile is in cache. The forward's primary conv (W1 x), and the backward's input gradient
// (W1^T dz1).
struct PointwiseTasks {
  int64_t images, chunks, count;
};

// Several images go through a buffer of M rows, kept within L2 (1 MiB a core here): a 2 MB one
// (4 images of 672 channels, 14x14) made the backward's input gradient at 672->112 14x14 take
// 2.5-2.7 ms instead of 2.1-2.2 with one image a task. Not less: at 960->160 7x7 two images a
// task (the last of their 4 panels of 32 pixels 2 wide) took 1.24 ms, four 1.13.
inline PointwiseTasks pointwise_tasks(int64_t N, int64_t P, int64_t M, int64_t elem_size) {
  constexpr int64_t kTaskPixels = 2048, kBufferBytes = int64_t(1) << 20;
  const int64_t threads = at::get_num_threads();
  int64_t images = 1;
  const int64_t chunks = (P + kTaskPixels - 1) / kTaskPixels;
  if (chunks == 1)
    images = std::clamp<int64_t>(std::min(kTaskPixels / P, kBufferBytes / (M * P * elem_size)),
                                 1, std::max<int64_t>(1, N / (4 * threads)));
  return {images, chunks, (N + images - 1) / images * chunks};
}

template <typename T>
void pointwise_conv(int64_t N, int64_t K, int64_t M, int64_t P, const T* b_data,
                    const T* w_packed, T* out, Moments* moments) {
  const PointwiseTasks tasks = pointwise_tasks(N, P, M, sizeof(T));
  const std::vector<T> zero_bias(M, T(0));
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = (t / tasks.chunks) * tasks.images, g = std::min(tasks.images, N - n0);
      const int64_t chunk = t % tasks.chunks;
      const int64_t p0 = P * chunk / tasks.chunks, len = P * (chunk + 1) / tasks.chunks - p0;
      const int64_t cols = g * len;
      // One image's pixels go straight to `out`; several images' go through a buffer.
      const bool direct = g == 1;
      T* buf = scratch<T>((direct ? 0 : M * cols) + K * kPanel<T>);
      T* c = direct ? out + n0 * M * P + p0 : buf;
      const int64_t ldc = direct ? P : cols;
      const PixelMatrix<T> b{b_data + n0 * K * P + p0, P, K * P, len, g};
      primary_gemm<T, Act::Identity>({w_packed}, zero_bias.data(), M, K, b, c, ldc,
                                     buf + (direct ? 0 : M * cols));
      for (int64_t m = 0; m < M; ++m) {
        if (moments != nullptr) moments[t * M + m] = moments_of(c + m * ldc, cols);
        if (!direct)
          for (int64_t i = 0; i < g; ++i)
            copy_row(c + m * ldc + i * len, out + ((n0 + i) * M + m) * P + p0, len);
      }
    }
  });
}

// gw (I, C) = sum over images n and pixels p of dz[n][i][p] * x[n][c][p]: the pointwise conv's
// weight gradient, as dot products of rows (both operands are contiguous along p, so nothing is
// packed). Register tiles of RI rows of dz by RC rows of x accumulate over a group of images
// (at least kGroupPixels pixels, so the horizontal sums at the end pay off) or a slice of one
// image; each tile's sums go to gw in double. Threads split the channels of x, so every gw
// entry has one writer and the result does not depend on the thread count.
constexpr int64_t kGroupPixels = 1024;

template <typename T, int RI, int RC>
void weight_grad_tile(const T* dz, const T* x, int64_t I, int64_t C, int64_t P, int64_t n0,
                      int64_t n1, int64_t p0, int64_t p1, int64_t i0, int64_t c0, double* gw) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  Vec acc[RI][RC];
  for (int a = 0; a < RI; ++a)
    for (int b = 0; b < RC; ++b) acc[a][b] = Vec(T(0));
  auto step = [&](const T* dzp, const T* xp, auto load) {
    Vec dv[RI];
    for (int a = 0; a < RI; ++a) dv[a] = load(dzp + a * P);
    for (int b = 0; b < RC; ++b) {
      const Vec xv = load(xp + b * P);
      for (int a = 0; a < RI; ++a) acc[a][b] = at::vec::fmadd(dv[a], xv, acc[a][b]);
    }
  };
  const int64_t full = p0 + (p1 - p0) / VL * VL, rest = p1 - full;
  for (int64_t n = n0; n < n1; ++n) {
    const T* dzn = dz + (n * I + i0) * P;
    const T* xn = x + (n * C + c0) * P;
    // Full vectors, then the masked tail: one loop with masked loads kept the accumulators in
    // memory (measured 3x slower).
    for (int64_t p = p0; p < full; p += VL)
      step(dzn + p, xn + p, [](const T* ptr) { return Vec::loadu(ptr); });
    if (rest > 0)
      step(dzn + full, xn + full, [rest](const T* ptr) { return Vec::loadu(ptr, rest); });
  }
  for (int a = 0; a < RI; ++a)
    for (int b = 0; b < RC; ++b)
      gw[(i0 + a) * C + c0 + b] += double(
          at::vec::vec_reduce_all<T>([](Vec u, Vec v) { return u + v; }, acc[a][b]));
}

// Runs the tile of ri x rc rows (ri <= RI, rc <= RC) with compile-time sizes.
template <typename T, int RI, int RC>
void weight_grad_tile_dispatch(int ri, int rc, const T* dz, const T* x, int64_t I, int64_t C,
                               int64_t P, int64_t n0, int64_t n1, int64_t p0, int64_t p1,
                               int64_t i0, int64_t c0, double* gw) {
  if constexpr (RI > 1) {
    if (ri < RI)
      return weight_grad_tile_dispatch<T, RI - 1, RC>(ri, rc, dz, x, I, C, P, n0, n1, p0, p1,
                                                      i0, c0, gw);
  }
  if constexpr (RC > 1) {
    if (rc < RC)
      return weight_grad_tile_dispatch<T, RI, RC - 1>(ri, rc, dz, x, I, C, P, n0, n1, p0, p1,
                                                      i0, c0, gw);
  }
  weight_grad_tile<T, RI, RC>(dz, x, I, C, P, n0, n1, p0, p1, i0, c0, gw);
}

// The same gradient for maps of up to kRowsWeightGradPixels pixels, as a GEMM over
// K = N P (image by image) with a register-blocked micro-kernel: out (R, L) = A (R, K) B (K, L).
// B is the operand with fewer channels, transposed once into k-major rows of Lp (L rounded up
// to vectors, zero beyond L); A is the other, read in place: row r of image n is the plane
// a + (n R + r) P, broadcast one pixel at a time, so it is never packed. Threads split the rows
// of A (each out entry has one writer, summed in a fixed order whatever the thread count);
// each register tile sums in T over a chunk of images (about kChunkPixels pixels, so that
// chunk of B stays in L2 while every row block sweeps it) and adds that to out in double.
template <typename T, int MR, int NV>
inline void rows_tile(const T* const* a, const T* b, int64_t ldb, int64_t P, int64_t n0,
                      int64_t n1, int64_t image_stride, double* out, int64_t ldo) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec(T(0));
  for (int64_t n = n0; n < n1; ++n) {
    const T* an[MR];
    for (int m = 0; m < MR; ++m) an[m] = a[m] + n * image_stride;
    const T* bn = b + n * P * ldb;
    for (int64_t p = 0; p < P; ++p, bn += ldb) {
      Vec bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(bn + v * VL);
      for (int m = 0; m < MR; ++m) {
        const Vec av(an[m][p]);
        for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(av, bv[v], acc[m][v]);
      }
    }
  }
  alignas(64) T lanes[NV * VL];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) acc[m][v].store(lanes + v * VL);
    for (int64_t l = 0; l < NV * VL; ++l) out[m * ldo + l] += double(lanes[l]);
  }
}

// rows_tile with mr <= MR rows and nv <= NV vectors chosen at run time.
template <typename T, int MR, int NV>
void rows_tile_dispatch(int mr, int nv, const T* const* a, const T* b, int64_t ldb, int64_t P,
                        int64_t n0, int64_t n1, int64_t image_stride, double* out, int64_t ldo) {
  if constexpr (MR > 1) {
    if (mr < MR)
      return rows_tile_dispatch<T, MR - 1, NV>(mr, nv, a, b, ldb, P, n0, n1, image_stride, out,
                                               ldo);
  }
  if constexpr (NV > 1) {
    if (nv < NV)
      return rows_tile_dispatch<T, MR, NV - 1>(mr, nv, a, b, ldb, P, n0, n1, image_stride, out,
                                               ldo);
  }
  rows_tile<T, MR, NV>(a, b, ldb, P, n0, n1, image_stride, out, ldo);
}

// dst[p * ldd + l] = src[l * lds + p] for l < rows, p < cols (at most 16 each). A full block
// of floats on AVX-512 is transposed in registers (4 shuffle rounds); the rest element by element.
template <typename T>
void transpose_block(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                     int64_t cols) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (rows == 16 && cols == 16) {
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
      for (int k = 0; k < 8; ++k) {  // per 128-bit lane: pairs of rows interleaved
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
      }
      auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
      for (int k = 0; k < 4; ++k) {  // r[4k + c], lane q: column 4q + c of rows 4k..4k+3
        r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * k]), pd(t[4 * k + 2])));
        r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * k]), pd(t[4 * k + 2])));
        r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * k + 1]), pd(t[4 * k + 3])));
        r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * k + 1]), pd(t[4 * k + 3])));
      }
      for (int c = 0; c < 4; ++c) {  // column 4q + c: lane q of r[c], r[4 + c], r[8 + c], r[12 + c]
        const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
        const __m512 v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
        const __m512 w0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
        const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
        _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(v0, w0, 0x88));
        _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(v0, w0, 0xDD));
        _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(v1, w1, 0x88));
        _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(v1, w1, 0xDD));
      }
      return;
    }
  }
#endif
  for (int64_t p = 0; p < cols; ++p)
    for (int64_t l = 0; l < rows; ++l) dst[p * ldd + l] = src[l * lds + p];
}

// Measured at batch 32 against the kernels before it (dot products on 14x14, x packed k-major
// on 7x7): 672->112 14x14 3.4-3.9 -> 2.6-2.8 ms, 80->200 14x14 0.69-0.75 -> 0.51-0.55,
// 240->80 14x14 0.82 -> 0.62, 960->160 7x7 1.3-1.5 -> 1.1. On 28x28 maps, where one operand
// has 20 to 60 channels, the tiles are narrow and the dot products stay faster (72->40,
// 0.40 against 0.61 ms; 40->240, 1.7-2.2 against 2.3-2.4).
constexpr int64_t kRowsWeightGradPixels = 256;

template <typename T>
void weight_grad_rows(const T* dz, const T* x, int64_t N, int64_t I, int64_t C, int64_t P,
                      double* gw) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  // 6 x 4 tiles: 24 accumulators, 6 broadcasts and 4 loads per 24 FMAs (AVX-512); 3 x 4 on
  // AVX2's 16 registers.
  constexpr int MR = VL * sizeof(T) >= 64 ? 6 : 3, NV = 4;
  constexpr int64_t kChunkPixels = 512;
  const bool b_is_x = C < I;  // transpose the smaller operand
  const T* a_data = b_is_x ? dz : x;
  const T* b_data = b_is_x ? x : dz;
  const int64_t R = b_is_x ? I : C, L = b_is_x ? C : I;
  const int64_t Lp = (L + VL - 1) / VL * VL;
  const std::unique_ptr<T[]> bt_buffer(new T[N * P * Lp]);  // every element written below
  T* bt = bt_buffer.get();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t p0 = 0; p0 < P; p0 += 16) {
        const int64_t cols = std::min<int64_t>(16, P - p0);
        T* dst = bt + (n * P + p0) * Lp;
        for (int64_t l0 = 0; l0 < L; l0 += 16)
          transpose_block(b_data + (n * L + l0) * P + p0, P, dst + l0, Lp,
                          std::min<int64_t>(16, L - l0), cols);
        for (int64_t p = 0; p < cols; ++p) std::fill(dst + p * Lp + L, dst + (p + 1) * Lp, T(0));
      }
  });
  std::vector<double> out(R * Lp, 0.0);
  const int64_t images = std::clamp<int64_t>(kChunkPixels / P, 1, N);
  const int64_t blocks = (R + MR - 1) / MR;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = 0; n0 < N; n0 += images)
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * MR, mr = std::min<int64_t>(MR, R - r0);
        const T* rows[MR];
        for (int64_t m = 0; m < mr; ++m) rows[m] = a_data + (r0 + m) * P;
        for (int64_t j = 0; j < Lp; j += NV * VL)
          rows_tile_dispatch<T, MR, NV>(int(mr), int(std::min<int64_t>(NV, (Lp - j) / VL)),
                                        rows, bt + j, Lp, P, n0,
                                        std::min(N, n0 + images), R * P, out.data() + r0 * Lp + j,
                                        Lp);
      }
  });
  for (int64_t r = 0; r < R; ++r)
    for (int64_t l = 0; l < L; ++l) {
      const double v = out[r * Lp + l];
      if (b_is_x) {
        gw[r * C + l] = v;
      } else {
        gw[l * C + r] = v;
      }
    }
}

template <typename T>
void weight_grad_gemm(const T* dz, const T* x, int64_t N, int64_t I, int64_t C, int64_t P,
                      double* gw) {
  // 4 x 6 tiles: 24 accumulators + 5 operands fit AVX-512's 32 registers (4 x 8 measured 3x
  // slower: 37 live vectors spill); 2 x 4 fit AVX2's 16.
  constexpr bool kWide = Vectorized<T>::size() * sizeof(T) >= 64;
  constexpr int RI = kWide ? 4 : 2, RC = kWide ? 6 : 4;
  const int64_t images = std::clamp<int64_t>(kGroupPixels / P, 1, N);
  const int64_t slices = (P + kGroupPixels - 1) / kGroupPixels;
  std::fill(gw, gw + I * C, 0.0);
  at::parallel_for(0, (C + RC - 1) / RC, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = 0; n0 < N; n0 += images)
      for (int64_t sl = 0; sl < slices; ++sl) {
        const int64_t p0 = P * sl / slices, p1 = P * (sl + 1) / slices;
        for (int64_t cb = begin; cb < end; ++cb)
          for (int64_t i0 = 0; i0 < I; i0 += RI) {
            const int64_t c0 = cb * RC;
            weight_grad_tile_dispatch<T, RI, RC>(
                int(std::min<int64_t>(RI, I - i0)), int(std::min<int64_t>(RC, C - c0)), dz, x,
                I, C, P, n0, std::min(N, n0 + images), p0, p1, i0, c0, gw);
          }
      }
  });
}

// Packs a weight matrix (M, K), any strides, for primary_gemm.
template <typename T>
at::Tensor packed_weight(const at::Tensor& w) {
  at::Tensor packed = at::empty({w.size(0), w.size(1)}, w.options());
  pack_weight(w.const_data_ptr<T>(), w.size(0), w.size(1), w.stride(0), w.stride(1),
              static_cast<const T*>(nullptr), packed.mutable_data_ptr<T>());
  return packed;
}

// Rounds a BatchNorm's batch moments of channel c to T into mean[c] and var[c] (biased) and
// returns the affine they give.
template <typename T>
std::pair<T, T> finalize_bn(const Moments& mo, int64_t c, double eps, const T* gamma,
                            const T* beta, T* mean_out, T* var_out) {
  const T mean = T(mo.mean), var = T(mo.m2 / mo.count);
  mean_out[c] = mean;
  var_out[c] = var;
  return bn_affine(mean, var, gamma[c], beta[c], eps);
}

template <typename T, Act A>
void train_forward(const GhostShape& s, const T* xs, const T* w1_packed, const T* w2,
                   const T* g1, const T* b1, const T* g2, const T* b2, double eps1, double eps2,
                   T* y, T* z1, T* mean1, T* var1, T* mean2, T* var2) {
  const int64_t P = s.out_h * s.out_w, N = s.batch, I = s.init;
  const int64_t new_ch = s.init * (s.ratio - 1), d = s.dw;

  // F1: z1 (saved for the backward), with moments.
  const int64_t tasks = pointwise_tasks(N, P, I, sizeof(T)).count;
  std::vector<Moments> part1(tasks * I);
  pointwise_conv(N, s.inp, I, P, xs, w1_packed, z1, part1.data());
  std::vector<std::pair<T, T>> affine1(I), affine2(new_ch);
  for (int64_t m = 0; m < I; ++m)
    affine1[m] = finalize_bn(combine(part1.data() + m, tasks, I), m, eps1, g1, b1,
                             mean1, var1);

  // F2: per intrinsic channel and group of images. The moments of z2 are taken on the padded
  // stack, masked to its pixels: read back from y right after the row-by-row copy out, they
  // waited on store forwarding (17 % of the forward at 160->960 7x7).
  const int64_t per = s.ratio - 1, gi = images_per_plane_task(N, P), groups = (N + gi - 1) / gi;
  std::vector<Moments> part2(groups * new_ch);
  const Padded full(s.out_h, s.out_w, d, gi);
  const std::vector<T> mask = pixel_mask<T>(full);
  at::parallel_for(0, groups * I, 1, [&](int64_t begin, int64_t end) {
    T* xp = scratch<T>(2 * full.size);
    T* tmp = xp + full.size;
    std::fill(xp, xp + full.size, T(0));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t q = t / I, c = t % I, n0 = q * gi;
      const Padded geo(s.out_h, s.out_w, d, std::min(gi, N - n0));
      for (int64_t g = 0; g < geo.images; ++g)
        bn_act_pad<T, A>(geo, g, z1 + ((n0 + g) * I + c) * P, affine1[c].first,
                         affine1[c].second, xp, y + ((n0 + g) * s.oup + c) * P);
      for (int64_t j = c * per; j < (c + 1) * per; ++j) {
        dw_flat(geo, xp, w2 + j * d * d, tmp);
        part2[q * new_ch + j] = moments_of(tmp + geo.lo, geo.hi - geo.lo,
                                           mask.data() + geo.lo, geo.images * P);
        if (j >= s.ghost) continue;  // past oup: computed for its statistics only
        for (int64_t g = 0; g < geo.images; ++g)
          unpad_plane(geo, g, tmp, y + ((n0 + g) * s.oup + I + j) * P);
      }
    }
  });
  for (int64_t j = 0; j < new_ch; ++j)
    affine2[j] = finalize_bn(combine(part2.data() + j, groups, new_ch), j, eps2, g2, b2,
                             mean2, var2);

  // F3: BN2 + act in place on the ghost half of y.
  at::parallel_for(0, N * s.ghost, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / s.ghost, j = t % s.ghost;
      T* plane = y + (n * s.oup + I + j) * P;
      affine_act<T, A>(plane, plane, P, affine2[j].first, affine2[j].second);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ghost_forward_train_cpu(
    const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& bn1_weight,
    const at::Tensor& bn1_bias, double bn1_eps, const at::Tensor& cheap_weight,
    const at::Tensor& bn2_weight, const at::Tensor& bn2_bias, double bn2_eps, int64_t oup,
    int64_t stride, c10::string_view act) {
  const char* op = "ghost_forward_train";
  const GhostShape s = check_ghost_shape(op, x, primary_weight, cheap_weight, oup, stride);
  const int64_t new_ch = cheap_weight.size(0);
  check_vector(op, bn1_weight, "bn1_weight", s.init, x);
  check_vector(op, bn1_bias, "bn1_bias", s.init, x);
  check_vector(op, bn2_weight, "bn2_weight", new_ch, x);
  check_vector(op, bn2_bias, "bn2_bias", new_ch, x);
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(s.batch * s.out_h * s.out_w > 1, op,
              ": expected more than 1 value per channel when training, got input size ",
              x.sizes());
  const Act activation = parse_act(std::string(act));
  const auto opts = x.options();
  at::Tensor y = at::empty({s.batch, s.oup, s.out_h, s.out_w}, opts);
  at::Tensor z1 = at::empty({s.batch, s.init, s.out_h, s.out_w}, opts);
  at::Tensor mean1 = at::empty({s.init}, opts), var1 = at::empty({s.init}, opts);
  at::Tensor mean2 = at::empty({new_ch}, opts), var2 = at::empty({new_ch}, opts);
  advise_huge_pages(y.mutable_data_ptr(), y.nbytes());
  advise_huge_pages(z1.mutable_data_ptr(), z1.nbytes());
  const at::Tensor xs = strided_input(x, stride);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_forward_train_cpu", [&] {
    using T = scalar_t;
    const at::Tensor w1_packed = packed_weight<T>(primary_weight.reshape({s.init, s.inp}));
    const at::Tensor w2 = cheap_weight.contiguous();
    const at::Tensor g1 = bn1_weight.contiguous(), b1 = bn1_bias.contiguous();
    const at::Tensor g2 = bn2_weight.contiguous(), b2 = bn2_bias.contiguous();
    auto run = [&](auto act_tag) {
      train_forward<T, decltype(act_tag)::value>(
          s, xs.const_data_ptr<T>(), w1_packed.const_data_ptr<T>(), w2.const_data_ptr<T>(),
          g1.const_data_ptr<T>(), b1.const_data_ptr<T>(), g2.const_data_ptr<T>(),
          b2.const_data_ptr<T>(), bn1_eps, bn2_eps, y.mutable_data_ptr<T>(),
          z1.mutable_data_ptr<T>(), mean1.mutable_data_ptr<T>(), var1.mutable_data_ptr<T>(),
          mean2.mutable_data_ptr<T>(), var2.mutable_data_ptr<T>());
    };
    if (activation == Act::ReLU) {
      run(std::integral_constant<Act, Act::ReLU>{});
    } else {
      run(std::integral_constant<Act, Act::Identity>{});
    }
  });
  const auto format = x.suggest_memory_format();
  if (format != at::MemoryFormat::Contiguous) y = y.contiguous(format);
  return {y, z1, mean1, var1, mean2, var2};
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename T>
struct BackwardParams {
  GhostShape s;
  int64_t P;
  const T* z1;  // the saved primary conv output (N, init, P)
  const T* gy;  // grad of y, NCHW-contiguous
  const T* w2;  // cheap weight (new, d * d)
  std::vector<T> mean1, invstd1, gamma1, mean2, invstd2, gamma2;
  std::vector<std::pair<T, T>> affine1, affine2;  // the forward's BN affines
};

// x1 = act(BN1(z1)) of plane (n, c), computed as the forward computed it, into image img of
// the padded stack xp.
template <typename T, Act A>
void x1_padded(const BackwardParams<T>& p, const Padded& geo, int64_t img, int64_t n, int64_t c,
               T* xp) {
  bn_act_pad<T, A>(geo, img, p.z1 + (n * p.s.init + c) * p.P, p.affine1[c].first,
                   p.affine1[c].second, xp, static_cast<T*>(nullptr));
}

// The BN2 + act backward of ghost channel j, element by element over a padded plane's flat
// range, from z2 (recomputed, in tmp) and gyp (dy2 padded; zero in the padding, so padding
// entries contribute nothing): ga2 = dy2 * act'(a2) with a2 = BN2(z2) rounded as the forward
// rounded it, x2hat = (z2 - mean2) * invstd2. f(i, count, ga2, x2hat) consumes each vector.
template <typename T, Act A, typename F>
inline void ghost_elementwise(const BackwardParams<T>& p, const Padded& geo, int64_t j,
                              const T* tmp, const T* gyp, F&& f) {
  using Vec = Vectorized<T>;
  const Vec scale(p.affine2[j].first), shift(p.affine2[j].second);
  const Vec hs(p.invstd2[j]), hb(-p.mean2[j] * p.invstd2[j]), zero(T(0));
  for (int64_t i = geo.lo; i < geo.hi; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), geo.hi - i);
    const Vec z = Vec::loadu(tmp + i, count);
    Vec ga = Vec::loadu(gyp + i, count);
    if constexpr (A == Act::ReLU) ga = ga & (at::vec::fmadd(z, scale, shift) > zero);
    f(i, count, ga, at::vec::fmadd(z, hs, hb));
  }
}

// Per-channel totals of per-(part, channel) partial sums (parts: images or groups), in order.
inline void sum_over_images(const std::vector<double>& parts, int64_t N, int64_t channels,
                            int64_t width, double* out) {
  for (int64_t q = 0; q < channels * width; ++q) {
    double a = 0;
    for (int64_t n = 0; n < N; ++n) a += parts[n * channels * width + q];
    out[q] = a;
  }
}

template <typename T, Act A>
void train_backward(const BackwardParams<T>& p, T* dz1, double* dgamma1, double* dbeta1,
                    double* dgamma2, double* dbeta2, double* dw2) {
  using Vec = Vectorized<T>;
  const GhostShape& s = p.s;
  const int64_t N = s.batch, I = s.init, P = p.P, G = s.ghost, d = s.dw, taps = d * d;
  const int64_t per = s.ratio - 1;
  const int64_t gi = images_per_plane_task(N, P), groups = (N + gi - 1) / gi;
  const Padded full(s.out_h, s.out_w, d, gi);
  const double M = double(N * P);
  auto ghosts_of = [&](int64_t c) {  // ghost channels [first, last) computed from intrinsic c
    return std::pair{std::min(c * per, G), std::min((c + 1) * per, G)};
  };
  // Tasks: an intrinsic channel c of a group of images [n0, n0 + geo.images).
  auto task_geometry = [&](int64_t t, int64_t& n0, int64_t& c) {
    n0 = (t / I) * gi;
    c = t % I;
    return Padded(s.out_h, s.out_w, d, std::min(gi, N - n0));
  };
  // B1: sums of ga2 and ga2 * x2hat per (group of images, ghost channel).
  std::vector<double> sum_ga2(groups * G), sum_gx2(groups * G);
  at::parallel_for(0, groups * I, 1, [&](int64_t begin, int64_t end) {
    T* xp = scratch<T>(3 * full.size);
    T* gyp = xp + full.size;
    T* tmp = gyp + full.size;
    std::fill(xp, xp + 2 * full.size, T(0));  // the padding of xp and gyp stays zero
    for (int64_t t = begin; t < end; ++t) {
      int64_t n0, c;
      const Padded geo = task_geometry(t, n0, c);
      const auto [j0, j1] = ghosts_of(c);
      if (j0 == j1) continue;
      for (int64_t g = 0; g < geo.images; ++g) x1_padded<T, A>(p, geo, g, n0 + g, c, xp);
      for (int64_t j = j0; j < j1; ++j) {
        dw_flat(geo, xp, p.w2 + j * taps, tmp);
        for (int64_t g = 0; g < geo.images; ++g)
          pad_plane(geo, g, p.gy + ((n0 + g) * s.oup + I + j) * P, gyp);
        RunSum<T> a, b;
        ghost_elementwise<T, A>(p, geo, j, tmp, gyp, [&](int64_t, int64_t, Vec ga, Vec xh) {
          a.add(ga);
          b.add(ga * xh);
        });
        sum_ga2[(t / I) * G + j] = a.result();
        sum_gx2[(t / I) * G + j] = b.result();
      }
    }
  });
  sum_over_images(sum_ga2, groups, G, 1, dbeta2);
  sum_over_images(sum_gx2, groups, G, 1, dgamma2);

  // The transposed depthwise conv is the conv with the kernel flipped.
  std::vector<T> w2_flipped(G * taps);
  for (int64_t j = 0; j < G; ++j)
    std::reverse_copy(p.w2 + j * taps, p.w2 + (j + 1) * taps, w2_flipped.data() + j * taps);
  const std::vector<T> mask = pixel_mask<T>(full);

  // B2: dz2, the cheap weight's gradient, dx1 = dy1 + dwconv^T(dz2), ga1 = dx1 * act'(x1)
  // (into dz1), and the sums of ga1 and ga1 * x1hat. dx1 is accumulated on a padded stack
  // (dy1, then each transposed conv added in its flat pass), and read out row by row once.
  std::vector<double> dw2_part(groups * G * taps), sum_ga1(groups * I), sum_gx1(groups * I);
  at::parallel_for(0, groups * I, 1, [&](int64_t begin, int64_t end) {
    T* xp = scratch<T>(4 * full.size);
    T* gyp = xp + full.size;
    T* gp = gyp + full.size;
    T* dxp = gp + full.size;
    std::fill(xp, xp + 3 * full.size, T(0));  // padding of xp, gyp; gp outside [lo, hi)
    for (int64_t t = begin; t < end; ++t) {
      int64_t n0, c;
      const Padded geo = task_geometry(t, n0, c);
      const int64_t q = t / I;
      const auto [j0, j1] = ghosts_of(c);
      std::fill(dxp + geo.lo, dxp + geo.hi, T(0));
      for (int64_t g = 0; g < geo.images; ++g) {
        pad_plane(geo, g, p.gy + ((n0 + g) * s.oup + c) * P, dxp);
        if (j0 < j1) x1_padded<T, A>(p, geo, g, n0 + g, c, xp);
      }
      for (int64_t j = j0; j < j1; ++j) {
        dw_flat(geo, xp, p.w2 + j * taps, gp);  // z2, then overwritten by dz2
        for (int64_t g = 0; g < geo.images; ++g)
          pad_plane(geo, g, p.gy + ((n0 + g) * s.oup + I + j) * P, gyp);
        const Vec k(p.gamma2[j] * p.invstd2[j]);
        const Vec mg(T(dbeta2[j] / M)), mx(T(dgamma2[j] / M));
        ghost_elementwise<T, A>(p, geo, j, gp, gyp, [&](int64_t i, int64_t count, Vec ga, Vec xh) {
          const Vec dz = k * (ga - mg - xh * mx) & Vec::loadu(mask.data() + i, count);
          dz.store(gp + i, count);
        });
        dw_weight_grad(geo, gp, xp, dw2_part.data() + (q * G + j) * taps);
        dw_flat<T, true>(geo, gp, w2_flipped.data() + j * taps, dxp);
      }
      // ga1 = dx1 * act'(x1), the activation's input recomputed from z1 as the forward did.
      const Vec sc(p.affine1[c].first), sh(p.affine1[c].second), zero(T(0));
      const Vec mean(p.mean1[c]), invstd(p.invstd1[c]);
      RunSum<T> a, b;
      for (int64_t g = 0; g < geo.images; ++g) {
        T* ga1 = dz1 + ((n0 + g) * I + c) * P;
        const T* z1 = p.z1 + ((n0 + g) * I + c) * P;
        for (int64_t r = 0; r < geo.H; ++r)
          for (int64_t i = 0; i < geo.W; i += Vec::size()) {
            const int64_t count = std::min<int64_t>(Vec::size(), geo.W - i), o = r * geo.W + i;
            const Vec z = Vec::loadu(z1 + o, count);
            Vec ga = Vec::loadu(dxp + geo.pixel(g, r) + i, count);
            if constexpr (A == Act::ReLU) ga = ga & (at::vec::fmadd(z, sc, sh) > zero);
            ga.store(ga1 + o, count);
            a.add(ga);
            b.add(ga * ((z - mean) * invstd));
          }
      }
      sum_ga1[q * I + c] = a.result();
      sum_gx1[q * I + c] = b.result();
    }
  });
  sum_over_images(dw2_part, groups, G, taps, dw2);
  sum_over_images(sum_ga1, groups, I, 1, dbeta1);
  sum_over_images(sum_gx1, groups, I, 1, dgamma1);

  // B3 (first half): dz1 = k1 (ga1 - dbeta1 / M - x1hat dgamma1 / M), in place.
  at::parallel_for(0, N * I, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / I, c = t % I;
      T* g = dz1 + (n * I + c) * P;
      const T* z1 = p.z1 + (n * I + c) * P;
      const T k = p.gamma1[c] * p.invstd1[c], mean = p.mean1[c], invstd = p.invstd1[c];
      const T mg = T(dbeta1[c] / M), mx = T(dgamma1[c] / M);
      for (int64_t i = 0; i < P; ++i) g[i] = k * (g[i] - mg - (z1[i] - mean) * invstd * mx);
    }
  });
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

Grads ghost_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& z1,
                         const at::Tensor& primary_weight, const at::Tensor& bn1_weight,
                         const at::Tensor& bn1_bias, const at::Tensor& mean1,
                         const at::Tensor& var1, double bn1_eps, const at::Tensor& cheap_weight,
                         const at::Tensor& bn2_weight, const at::Tensor& bn2_bias,
                         const at::Tensor& mean2, const at::Tensor& var2, double bn2_eps,
                         int64_t stride, c10::string_view act, std::array<bool, 2> output_mask) {
  const char* op = "ghost_backward";
  TORCH_CHECK(grad_y.dim() == 4, op, ": grad_y must be 4-D, got ", grad_y.sizes());
  const GhostShape s =
      check_ghost_shape(op, x, primary_weight, cheap_weight, grad_y.size(1), stride);
  const int64_t new_ch = cheap_weight.size(0), P = s.out_h * s.out_w;
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({s.batch, s.oup, s.out_h, s.out_w}), op,
              ": grad_y has shape ", grad_y.sizes(), ", expected (", s.batch, ", ", s.oup, ", ",
              s.out_h, ", ", s.out_w, ")");
  TORCH_CHECK(z1.sizes() == at::IntArrayRef({s.batch, s.init, s.out_h, s.out_w}), op,
              ": z1 has shape ", z1.sizes(), ", expected (", s.batch, ", ", s.init, ", ", s.out_h,
              ", ", s.out_w, ")");
  for (auto [t, name] : {std::pair{&grad_y, "grad_y"}, std::pair{&z1, "z1"}})
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), op, ": ",
                name, " must match x's device and dtype");
  for (auto [t, name, size] :
       {std::tuple{&bn1_weight, "bn1_weight", s.init}, std::tuple{&bn1_bias, "bn1_bias", s.init},
        std::tuple{&mean1, "mean1", s.init}, std::tuple{&var1, "var1", s.init},
        std::tuple{&bn2_weight, "bn2_weight", new_ch}, std::tuple{&bn2_bias, "bn2_bias", new_ch},
        std::tuple{&mean2, "mean2", new_ch}, std::tuple{&var2, "var2", new_ch}})
    check_vector(op, *t, name, size, x);
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): dtype must be float32 or float64, got ", x.scalar_type());
  const Act activation = parse_act(std::string(act));

  const at::Tensor xs = strided_input(x, stride);
  const at::Tensor gy = grad_y.contiguous();
  const at::Tensor z1c = z1.contiguous();
  // dz1 lives for this call only and the input gradient until the layer below has used it:
  // from the output pool, memory already faulted in (a fresh 38 MB dz1 at 16->48 112x112,
  // batch 32, made B2 49 ms instead of 7.5 for a dozen calls). The forward's y and z1 are not
  // pooled: they live until the backward, and pooling them raised a training step's peak
  // memory by a quarter.
  at::Tensor dz1 = pooled_empty({s.batch, s.init, s.out_h, s.out_w}, x.options(),
                                 at::MemoryFormat::Contiguous);
  const auto dopts = x.options().dtype(at::kDouble);
  at::Tensor dg1 = at::zeros({s.init}, dopts), db1 = at::zeros({s.init}, dopts);
  at::Tensor dg2 = at::zeros({new_ch}, dopts), db2 = at::zeros({new_ch}, dopts);
  at::Tensor dw2 = at::zeros({new_ch, 1, s.dw, s.dw}, dopts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_backward_cpu", [&] {
    using T = scalar_t;
    const at::Tensor w2 = cheap_weight.contiguous();
    auto vec = [](const at::Tensor& t) {
      const at::Tensor c = t.contiguous();
      return std::vector<T>(c.const_data_ptr<T>(), c.const_data_ptr<T>() + c.numel());
    };
    BackwardParams<T> p{s, P, z1c.const_data_ptr<T>(), gy.const_data_ptr<T>(),
                        w2.const_data_ptr<T>()};
    p.mean1 = vec(mean1), p.gamma1 = vec(bn1_weight), p.mean2 = vec(mean2);
    p.gamma2 = vec(bn2_weight);
    const std::vector<T> v1 = vec(var1), v2 = vec(var2), b1 = vec(bn1_bias), b2 = vec(bn2_bias);
    for (int64_t c = 0; c < s.init; ++c) {
      p.invstd1.push_back(T(1.0 / std::sqrt(double(v1[c]) + bn1_eps)));
      p.affine1.push_back(bn_affine(p.mean1[c], v1[c], p.gamma1[c], b1[c], bn1_eps));
    }
    for (int64_t j = 0; j < new_ch; ++j) {
      p.invstd2.push_back(T(1.0 / std::sqrt(double(v2[j]) + bn2_eps)));
      p.affine2.push_back(bn_affine(p.mean2[j], v2[j], p.gamma2[j], b2[j], bn2_eps));
    }
    auto run = [&](auto act_tag) {
      train_backward<T, decltype(act_tag)::value>(
          p, dz1.mutable_data_ptr<T>(), dg1.mutable_data_ptr<double>(),
          db1.mutable_data_ptr<double>(), dg2.mutable_data_ptr<double>(),
          db2.mutable_data_ptr<double>(), dw2.mutable_data_ptr<double>());
    };
    if (activation == Act::ReLU) {
      run(std::integral_constant<Act, Act::ReLU>{});
    } else {
      run(std::integral_constant<Act, Act::Identity>{});
    }
  });

  // B3 (second half): the primary conv's two GEMMs on dz1, with the forward's GEMM kernel
  // (grad_xs = W1^T dz1) and, for grad_w1 = dz1 xs^T, weight_grad_rows on maps of up to
  // kRowsWeightGradPixels pixels, else the dot-product kernel over pixels.
  at::Tensor grad_x = at::empty({0}, x.options()), grad_w1 = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ghost_backward_cpu_gemms", [&] {
    using T = scalar_t;
    if (output_mask[0]) {
      at::Tensor gxs = pooled_empty({s.batch, s.inp, s.out_h, s.out_w}, x.options(),
                                    at::MemoryFormat::Contiguous);
      const at::Tensor w1t = packed_weight<T>(primary_weight.reshape({s.init, s.inp}).t());
      pointwise_conv(s.batch, s.init, s.inp, P, dz1.const_data_ptr<T>(),
                     w1t.const_data_ptr<T>(), gxs.mutable_data_ptr<T>(), nullptr);
      if (stride == 1) {
        grad_x = gxs;
      } else {
        grad_x = at::zeros(x.sizes(), x.options());
        grad_x.slice(2, 0, s.height, stride).slice(3, 0, s.width, stride).copy_(gxs);
      }
    }
    if (output_mask[1]) {
      at::Tensor gw = at::empty({s.init, s.inp}, dopts);
      auto* kernel = P <= kRowsWeightGradPixels ? &weight_grad_rows<T> : &weight_grad_gemm<T>;
      kernel(dz1.const_data_ptr<T>(), xs.const_data_ptr<T>(), s.batch, s.init, s.inp, P,
             gw.mutable_data_ptr<double>());
      grad_w1 = gw.to(x.scalar_type()).view(primary_weight.sizes());
    }
  });
  const auto dt = x.scalar_type();
  return {grad_x, grad_w1, dg1.to(dt), db1.to(dt), dw2.to(dt), dg2.to(dt), db2.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostops, CPU, m) {
  m.impl("ghost_forward_train", &ghost_forward_train_cpu);
  m.impl("ghost_backward", &ghost_backward_cpu);
}

}  // namespace ghostops::cpu
