// Direct 2-D convolution kernels for x86-64 CPUs with AVX-512, called from JAX through XLA's
// FFI (see unet_jax/native.py, which compiles this file on first use).
//
// Layouts are the U-Net's: images NHWC, kernels HWIO, float32, stride 1, no padding (the
// caller pads). The output-channel count must be a multiple of 16 (one AVX-512 register).
//
//   UnetJaxConvForward:    y[n, i, j, o]  = sum_{a, b, c} x[n, i + a, j + b, c] * w[a, b, c, o]
//   UnetJaxConvKernelGrad: dw[a, b, c, o] = sum_{n, i, j} x[n, i + a, j + b, c] * g[n, i, j, o]
//
// Both hold a tile of outputs in registers (pixels × 16-channel vectors for the forward pass,
// (a, b, c) rows × 16-channel vectors for the kernel gradient) and stream the rest through
// broadcast multiply-adds, so every input element is read from cache, not memory, once per
// tile. Rows of output pixels are shared out over XLA's own intra-op thread pool (a second
// pool of threads would compete with XLA's for the same cores).

#if !defined(__AVX512F__)
#error "unet_jax's native convolutions need AVX-512 (the build falls back to XLA without it)"
#endif

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define UNROLL _Pragma("GCC unroll 32")

// Calls body(row) once for every row in [0, rows), on the calling thread and on up to
// pool.num_threads() tasks of XLA's thread pool. Rows are handed out one at a time, so a task
// that starts late (its thread was busy) finds none left and returns without touching `body`;
// the caller waits only for tasks that took a row.
struct Rows {
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};
  int64_t count = 0;
};

template <typename Body>
void ParallelRows(ffi::ThreadPool& pool, int64_t rows, const Body& body) {
  auto work = std::make_shared<Rows>();
  work->count = rows;
  auto take_rows = [work, &body]() {
    work->active.fetch_add(1);
    for (int64_t row; (row = work->next.fetch_add(1)) < work->count;) body(row);
    work->active.fetch_sub(1);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), rows - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([take_rows] { take_rows(); });
  take_rows();
  while (work->next.load() < work->count || work->active.load() != 0) _mm_pause();
}

// Forward: P output pixels of one row × V vectors of 16 output channels. CIN, when not 0,
// is the number of input channels known at compile time: the P pixels' addresses are then
// constant offsets from one register instead of P registers' worth of arithmetic.
template <int P, int V, int CIN>
inline void ForwardTile(const float* __restrict x, const float* __restrict w,
                        float* __restrict y, int64_t c_in_runtime, int64_t width,
                        int64_t c_out, int64_t kh, int64_t kw) {
  const int64_t c_in = CIN ? CIN : c_in_runtime;
  __m512 acc[P][V];
  UNROLL for (int p = 0; p < P; ++p) UNROLL for (int v = 0; v < V; ++v) {
    acc[p][v] = _mm512_setzero_ps();
  }
  for (int64_t a = 0; a < kh; ++a) {
    for (int64_t b = 0; b < kw; ++b) {
      const float* xp = x + (a * width + b) * c_in;
      const float* wp = w + (a * kw + b) * c_in * c_out;
      for (int64_t c = 0; c < c_in; ++c) {
        __m512 wv[V];
        UNROLL for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(wp + c * c_out + 16 * v);
        UNROLL for (int p = 0; p < P; ++p) {
          const __m512 xv = _mm512_set1_ps(xp[p * c_in + c]);
          UNROLL for (int v = 0; v < V; ++v) acc[p][v] = _mm512_fmadd_ps(xv, wv[v], acc[p][v]);
        }
      }
    }
  }
  UNROLL for (int p = 0; p < P; ++p) UNROLL for (int v = 0; v < V; ++v) {
    _mm512_storeu_ps(y + p * c_out + 16 * v, acc[p][v]);
  }
}

// Tiles of P pixels from pixel j on while they fit; returns the first pixel left over.
template <int P, int V, int CIN>
int64_t ForwardTail(const float* x, const float* w, float* y, int64_t j, int64_t c_in,
                    int64_t width, int64_t out_width, int64_t c_out, int64_t kh, int64_t kw,
                    int64_t o0) {
  for (; j + P <= out_width; j += P) {
    ForwardTile<P, V, CIN>(x + j * c_in, w + o0, y + j * c_out + o0, c_in, width, c_out, kh,
                           kw);
  }
  return j;
}

template <int V, int P, int CIN>
void ForwardRow(const float* x, const float* w, float* y, int64_t c_in, int64_t width,
                int64_t out_width, int64_t c_out, int64_t kh, int64_t kw, int64_t o0) {
  // Full tiles, then the last pixels of the row in ever smaller tiles: a tile of one pixel and
  // one vector is a single chain of dependent multiply-adds, several times slower per pixel.
  const auto tail = [&](auto tile, int64_t j) {
    return ForwardTail<decltype(tile)::value, V, CIN>(x, w, y, j, c_in, width, out_width,
                                                       c_out, kh, kw, o0);
  };
  int64_t j = tail(std::integral_constant<int, P>(), 0);
  if constexpr (P > 8) j = tail(std::integral_constant<int, 8>(), j);
  if constexpr (P > 4) j = tail(std::integral_constant<int, 4>(), j);
  if constexpr (P > 2) j = tail(std::integral_constant<int, 2>(), j);
  tail(std::integral_constant<int, 1>(), j);
}

template <int CIN>
void ForwardRows(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t n,
                 int64_t height, int64_t width, int64_t c_in, int64_t kh, int64_t kw,
                 int64_t c_out) {
  const int64_t out_height = height - kh + 1, out_width = width - kw + 1;
  ParallelRows(pool, n * out_height, [&](int64_t r) {
    const int64_t image = r / out_height, i = r % out_height;
    const float* xr = x + (image * height + i) * width * c_in;
    float* yr = y + r * out_width * c_out;
    int64_t o0 = 0;
    for (; o0 + 64 <= c_out; o0 += 64) {
      ForwardRow<4, 6, CIN>(xr, w, yr, c_in, width, out_width, c_out, kh, kw, o0);
    }
    for (; o0 + 32 <= c_out; o0 += 32) {
      ForwardRow<2, 12, CIN>(xr, w, yr, c_in, width, out_width, c_out, kh, kw, o0);
    }
    for (; o0 + 16 <= c_out; o0 += 16) {
      ForwardRow<1, 24, CIN>(xr, w, yr, c_in, width, out_width, c_out, kh, kw, o0);
    }
  });
}

void Forward(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t n,
             int64_t height, int64_t width, int64_t c_in, int64_t kh, int64_t kw,
             int64_t c_out) {
  switch (c_in) {
    case 16: return ForwardRows<16>(pool, x, w, y, n, height, width, c_in, kh, kw, c_out);
    case 32: return ForwardRows<32>(pool, x, w, y, n, height, width, c_in, kh, kw, c_out);
    case 64: return ForwardRows<64>(pool, x, w, y, n, height, width, c_in, kh, kw, c_out);
    case 128: return ForwardRows<128>(pool, x, w, y, n, height, width, c_in, kh, kw, c_out);
    default: return ForwardRows<0>(pool, x, w, y, n, height, width, c_in, kh, kw, c_out);
  }
}

// Kernel gradient: R consecutive input channels of one kernel tap (a, b) × V vectors of 16
// output channels, summed over one row of output pixels and added to `dw` (the partial sum
// of a block of rows). `x` points at the tap's first channel for the row's first pixel, so
// the R broadcasts are constant offsets from one register. Small tiles (R · V < 8, for few
// input channels) keep U partial sums over alternate pixels, so that at least 8 independent
// chains of multiply-adds are in flight.
template <int R, int V>
inline void KernelGradTile(const float* __restrict x, const float* __restrict g,
                           float* __restrict dw, int64_t pixels, int64_t c_in, int64_t c_out) {
  constexpr int U = R * V >= 8 ? 1 : 8 / (R * V);
  __m512 acc[U][R][V];
  UNROLL for (int u = 0; u < U; ++u) UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < V; ++v) acc[u][r][v] = _mm512_setzero_ps();
  }
  auto accumulate = [&](int u, int64_t p) __attribute__((always_inline)) {
    __m512 gv[V];
    UNROLL for (int v = 0; v < V; ++v) gv[v] = _mm512_loadu_ps(g + p * c_out + 16 * v);
    const float* xp = x + p * c_in;
    UNROLL for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(xp[r]);
      UNROLL for (int v = 0; v < V; ++v) {
        acc[u][r][v] = _mm512_fmadd_ps(xv, gv[v], acc[u][r][v]);
      }
    }
  };
  int64_t p = 0;
  for (; p + U <= pixels; p += U) UNROLL for (int u = 0; u < U; ++u) accumulate(u, p + u);
  for (; p < pixels; ++p) accumulate(0, p);
  UNROLL for (int u = 1; u < U; ++u) UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int v = 0; v < V; ++v) acc[0][r][v] = _mm512_add_ps(acc[0][r][v], acc[u][r][v]);
  }
  UNROLL for (int r = 0; r < R; ++r) UNROLL for (int v = 0; v < V; ++v) {
    float* out = dw + r * c_out + 16 * v;
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[0][r][v]));
  }
}

template <int V, int R>
void KernelGradRow(const float* x, const float* g, float* dw, int64_t pixels, int64_t c_in,
                   int64_t width, int64_t c_out, int64_t kh, int64_t kw, int64_t o0) {
  for (int64_t a = 0; a < kh; ++a) {
    for (int64_t b = 0; b < kw; ++b) {
      const float* xt = x + (a * width + b) * c_in;
      float* dwt = dw + (a * kw + b) * c_in * c_out + o0;
      int64_t c = 0;
      for (; c + R <= c_in; c += R) {
        KernelGradTile<R, V>(xt + c, g + o0, dwt + c * c_out, pixels, c_in, c_out);
      }
      if (R > 4 && c + 4 <= c_in) {
        KernelGradTile<4, V>(xt + c, g + o0, dwt + c * c_out, pixels, c_in, c_out);
        c += 4;
      }
      for (; c + 2 <= c_in; c += 2) {
        KernelGradTile<2, V>(xt + c, g + o0, dwt + c * c_out, pixels, c_in, c_out);
      }
      if (c < c_in) KernelGradTile<1, V>(xt + c, g + o0, dwt + c * c_out, pixels, c_in, c_out);
    }
  }
}

// The rows of output pixels are cut into a fixed number of contiguous blocks, each summed
// into its own partial kernel gradient in row order, and the partials are added in block
// order: the result does not depend on which thread took which block, so the gradient is the
// same, bit for bit, from one call to the next.
void KernelGrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dw, int64_t n,
                int64_t height, int64_t width, int64_t c_in, int64_t kh, int64_t kw,
                int64_t c_out) {
  const int64_t out_height = height - kh + 1, out_width = width - kw + 1;
  const int64_t size = kh * kw * c_in * c_out, rows = n * out_height;
  // 4 blocks for each thread that can take part: the calling one and the pool's.
  const int64_t blocks = std::min<int64_t>(rows, 4 * (pool.num_threads() + 1));
  std::unique_ptr<float[]> partial(new float[static_cast<size_t>(blocks * size)]);
  ParallelRows(pool, blocks, [&](int64_t block) {
    float* mine = partial.get() + block * size;
    std::fill(mine, mine + size, 0.0f);
    for (int64_t r = rows * block / blocks; r < rows * (block + 1) / blocks; ++r) {
      const int64_t image = r / out_height, i = r % out_height;
      const float* xr = x + (image * height + i) * width * c_in;
      const float* gr = g + r * out_width * c_out;
      int64_t o0 = 0;
      for (; o0 + 64 <= c_out; o0 += 64) {
        KernelGradRow<4, 6>(xr, gr, mine, out_width, c_in, width, c_out, kh, kw, o0);
      }
      for (; o0 + 32 <= c_out; o0 += 32) {
        KernelGradRow<2, 8>(xr, gr, mine, out_width, c_in, width, c_out, kh, kw, o0);
      }
      for (; o0 + 16 <= c_out; o0 += 16) {
        KernelGradRow<1, 16>(xr, gr, mine, out_width, c_in, width, c_out, kh, kw, o0);
      }
    }
  });
  constexpr int64_t kChunk = 4096;  // floats of dw summed by one task
  ParallelRows(pool, (size + kChunk - 1) / kChunk, [&](int64_t chunk) {
    const int64_t end = std::min(size, (chunk + 1) * kChunk);
    for (int64_t k = chunk * kChunk; k < end; ++k) dw[k] = partial[k];
    for (int64_t block = 1; block < blocks; ++block) {
      const float* from = partial.get() + block * size;
      for (int64_t k = chunk * kChunk; k < end; ++k) dw[k] += from[k];
    }
  });
}

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                       ffi::Span<const int64_t> y) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("unet_jax native convolution: expected 4-D arrays");
  }
  if (k[3] % 16 != 0 || x[3] != k[2] || y[3] != k[3] || y[0] != x[0] ||
      y[1] != x[1] - k[0] + 1 || y[2] != x[2] - k[1] + 1) {
    return ffi::Error::InvalidArgument("unet_jax native convolution: inconsistent shapes");
  }
  return ffi::Error::Success();
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xs = x.dimensions(), ws = w.dimensions(), ys = y->dimensions();
  if (ffi::Error error = CheckShapes(xs, ws, ys); error.failure()) return error;
  Forward(pool, x.typed_data(), w.typed_data(), y->typed_data(), xs[0], xs[1], xs[2], xs[3],
          ws[0], ws[1], ws[3]);
  return ffi::Error::Success();
}

ffi::Error ConvKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw) {
  const auto xs = x.dimensions(), gs = g.dimensions(), ws = dw->dimensions();
  if (ffi::Error error = CheckShapes(xs, ws, gs); error.failure()) return error;
  KernelGrad(pool, x.typed_data(), g.typed_data(), dw->typed_data(), xs[0], xs[1], xs[2], xs[3],
             ws[0], ws[1], ws[3]);
  return ffi::Error::Success();
}

// Both kernels take XLA's thread pool and two float32 arrays, and return one.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetJaxConvForward, ConvForwardImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(UnetJaxConvKernelGrad, ConvKernelGradImpl, Binding());
