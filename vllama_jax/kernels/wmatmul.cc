// Weight-streaming matmul for the CPU backend: y (M, N) f32 = x (M, K) f32 @ W, W stored as float32, bfloat16,
// float16 or int8 with a per-output-channel f32 scale, accumulated in float32 without ever materialising a float32 copy of
// W (XLA CPU converts a whole bf16/int8 operand before its dot: a full-size temporary and ~1 GB/s).
//
// Two layouts: "kn" W (K, N) (a Dense kernel, in x out) and "nk" W (N, K) (an embedding table used as the tied
// LM head). Work is split into column blocks scheduled on XLA's own intra-op thread pool (no second pool fighting
// it for the same cores); each block streams its weight panel once per tile of MR rows of x, so a decode step
// (M = batch) reads every weight byte once and a prefill re-reads a panel from cache, not memory.
//
// Portable SIMD through GCC vector extensions: -march=native turns them into AVX-512 / AVX2 / NEON as available.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int8_t v16b __attribute__((vector_size(16)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f load16(const float* p) { v16f v; std::memcpy(&v, p, 64); return v; }
#if defined(__AVX512F__)
// GCC lowers a narrowing-type __builtin_convertvector (int8/uint16 -> 32-bit lanes) to scalar code: widen with the
// intrinsics where AVX-512 exists.
static inline v16f load16(const uint16_t* p) {  // bfloat16: the high half of a float32
  __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<v16f>(_mm512_castsi512_ps(u));
}
static inline v16f load16(const int8_t* p) {
  __m512i i = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<v16f>(_mm512_cvtepi32_ps(i));
}
#else
static inline v16f load16(const uint16_t* p) {  // bfloat16: the high half of a float32
  v16h h; std::memcpy(&h, p, 32);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f f; std::memcpy(&f, &u, 64); return f;
}
static inline v16f load16(const int8_t* p) {
  v16b b; std::memcpy(&b, p, 16);
  return __builtin_convertvector(__builtin_convertvector(b, v16i), v16f);
}
#endif
// float16, kept apart from bfloat16's uint16_t by its own type.
struct half_t { uint16_t bits; };
static inline float half_to_float(uint16_t h) {  // IEEE binary16 -> binary32, subnormals included
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400));
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f; std::memcpy(&f, &u, 4); return f;
}
#if defined(__AVX512F__)
static inline v16f load16(const half_t* p) {
  return reinterpret_cast<v16f>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
#else
static inline v16f load16(const half_t* p) {
  v16f f;
  for (int i = 0; i < 16; ++i) f[i] = half_to_float(p[i].bits);
  return f;
}
#endif
static inline float load1(const half_t* p) { return half_to_float(p->bits); }
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { uint32_t u = uint32_t(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline float load1(const int8_t* p) { return float(*p); }

constexpr int NB = 64;       // columns per register-tiled block (4 vectors of 16)
constexpr int MR = 4;        // rows of x per register tile
constexpr int KC = 256;      // rows of W per converted panel (KC x NB f32 = 64 KiB: stays in L2)
constexpr int SMALL_M = 16;  // up to this many rows of x: stream W once, row by row (decode)

// Few rows of x (decode): columns [n0, n1) of W (K, N) streamed row by row, 4 rows of W at a time, so every
// weight byte is read once in long contiguous runs; the M x width accumulators stay in L1/L2.
template <typename W>
static void stream_kn(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                      int64_t n0, int64_t n1) {
  int64_t width = n1 - n0, w16 = width - width % 16;
  float acc[SMALL_M * 2048] __attribute__((aligned(64)));
  std::memset(acc, 0, sizeof(float) * M * width);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const W* r0 = w + k * N + n0;
    const W* r1 = r0 + N;
    const W* r2 = r1 + N;
    const W* r3 = r2 + N;
    for (int64_t j = 0; j < w16; j += 16) {
      v16f a = load16(r0 + j), b = load16(r1 + j), c = load16(r2 + j), d = load16(r3 + j);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        v16f t = load16(acc + m * width + j);
        t += xm[0] * a + xm[1] * b + xm[2] * c + xm[3] * d;
        std::memcpy(acc + m * width + j, &t, 64);
      }
    }
    for (int64_t j = w16; j < width; ++j)
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        acc[m * width + j] += xm[0] * load1(r0 + j) + xm[1] * load1(r1 + j) + xm[2] * load1(r2 + j) +
                              xm[3] * load1(r3 + j);
      }
  }
  for (; k < K; ++k) {
    const W* r0 = w + k * N + n0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < width; ++j) acc[m * width + j] += x[m * K + k] * load1(r0 + j);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < width; ++j) y[m * N + n0 + j] = scale ? acc[m * width + j] * scale[n0 + j] : acc[m * width + j];
}

// y[m0:m0+R, n0:n0+64] += x[m0:m0+R, k0:k0+kc] @ panel (kc x 64, f32, contiguous rows).
template <int R>
static void tile_panel(const float* x, const float* panel, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0,
                       int64_t k0, int64_t kc) {
  v16f acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = load16(y + (m0 + r) * N + n0 + 16 * j);
  for (int64_t k = 0; k < kc; ++k) {
    const float* p = panel + k * NB;
    v16f w0 = load16(p), w1 = load16(p + 16), w2 = load16(p + 32), w3 = load16(p + 48);
    for (int r = 0; r < R; ++r) {
      float xv = x[(m0 + r) * K + k0 + k];
      acc[r][0] += xv * w0; acc[r][1] += xv * w1; acc[r][2] += xv * w2; acc[r][3] += xv * w3;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) std::memcpy(y + (m0 + r) * N + n0 + 16 * j, &acc[r][j], 64);
}

// Many rows of x (prefill): a 64-column block, KC rows of W at a time converted once to a float32 panel, then
// register tiles of MR x 64 over every row of x (the panel is reused from cache M / MR times).
template <typename W>
static void panel_kn(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                     int64_t n0) {
  float panel[KC * NB] __attribute__((aligned(64)));
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, sizeof(float) * NB);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    int64_t kc = std::min<int64_t>(KC, K - k0);
    for (int64_t k = 0; k < kc; ++k) {
      const W* row = w + (k0 + k) * N + n0;
      for (int j = 0; j < NB; j += 16) { v16f v = load16(row + j); std::memcpy(panel + k * NB + j, &v, 64); }
    }
    int64_t m = 0;
    for (; m + MR <= M; m += MR) tile_panel<MR>(x, panel, y, K, N, m, n0, k0, kc);
    switch (M - m) {
      case 3: tile_panel<3>(x, panel, y, K, N, m, n0, k0, kc); break;
      case 2: tile_panel<2>(x, panel, y, K, N, m, n0, k0, kc); break;
      case 1: tile_panel<1>(x, panel, y, K, N, m, n0, k0, kc); break;
    }
  }
  if (scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < NB; ++j) y[m * N + n0 + j] *= scale[n0 + j];
}

// W (N, K): rows n0 .. n0+64 of the table, each a dot product with every row of x.
template <typename W>
static void block_nk(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                     int64_t block) {
  int64_t n1 = std::min<int64_t>(N, (block + 1) * NB);
  int64_t k16 = K - K % 16;
  for (int64_t n = block * NB; n < n1; ++n) {
    const W* row = w + n * K;
    float s = scale ? scale[n] : 1.f;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      int R = int(std::min<int64_t>(MR, M - m0));
      v16f acc[MR] = {};
      for (int64_t k = 0; k < k16; k += 16) {
        v16f wv = load16(row + k);
        for (int r = 0; r < R; ++r) acc[r] += load16(x + (m0 + r) * K + k) * wv;
      }
      for (int r = 0; r < R; ++r) {
        float t = 0.f;
        for (int j = 0; j < 16; ++j) t += acc[r][j];
        for (int64_t k = k16; k < K; ++k) t += x[(m0 + r) * K + k] * load1(row + k);
        y[(m0 + r) * N + n] = t * s;
      }
    }
  }
}

// Blocks are claimed from one atomic counter by the caller and by helpers on XLA's pool; the caller waits only
// for blocks already claimed, so a helper that starts late (pool busy) finds nothing to do and never stalls it.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t blocks = 0;
};

template <typename Fn>
static void run_blocks(ffi::ThreadPool& pool, int64_t blocks, Fn fn) {
  auto work = std::make_shared<Work>();
  work->blocks = blocks;
  auto loop = [work, fn]() {
    for (int64_t b; (b = work->next.fetch_add(1)) < work->blocks;) {
      fn(b);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  using Fn2 = decltype(loop);  // Schedule takes its task by value (it moves it to the heap)
  int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), blocks) - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(Fn2(loop));
  loop();
  while (work->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

template <typename W>
static void dispatch(ffi::ThreadPool& pool, const float* x, const void* wv, const float* scale, float* y, int64_t M,
                     int64_t K, int64_t N, bool nk) {
  const W* w = static_cast<const W*>(wv);
  if (nk) {
    run_blocks(pool, (N + NB - 1) / NB, [=](int64_t b) { block_nk<W>(x, w, scale, y, M, K, N, b); });
  } else if (M <= SMALL_M) {
    // Two chunks per thread (some balance when a helper starts late), 16-aligned, at most 2048 wide.
    int64_t chunks = std::max<int64_t>(2 * std::max<int64_t>(1, pool.num_threads()), (N + 2047) / 2048);
    int64_t width = std::min<int64_t>(2048, ((N + chunks - 1) / chunks + 15) / 16 * 16);
    run_blocks(pool, (N + width - 1) / width, [=](int64_t b) {
      stream_kn<W>(x, w, scale, y, M, K, N, b * width, std::min(N, (b + 1) * width));
    });
  } else {
    // Full 64-column blocks through the panel path, the ragged rest streamed in SMALL_M-row slices.
    int64_t full = N / NB;
    run_blocks(pool, full + (N % NB ? 1 : 0), [=](int64_t b) {
      if (b < full) { panel_kn<W>(x, w, scale, y, M, K, N, b * NB); return; }
      for (int64_t m = 0; m < M; m += SMALL_M)
        stream_kn<W>(x + m * K, w, scale, y + m * N, std::min<int64_t>(SMALL_M, M - m), K, N, full * NB, N);
    });
  }
}

// x (M, K) f32; w (K, N) or (N, K) f32/bf16/f16/s8; scale (N,) f32 or (0,) for none; y (M, N) f32.
static ffi::Error WMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                              ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, bool nk) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("wmatmul: x and w must be 2-D");
  int64_t M = xd[0], K = xd[1];
  int64_t N = nk ? wd[0] : wd[1];
  if ((nk ? wd[1] : wd[0]) != K) return ffi::Error::InvalidArgument("wmatmul: contraction sizes differ");
  const float* s = scale.element_count() ? scale.typed_data() : nullptr;
  if (s && int64_t(scale.element_count()) != N) return ffi::Error::InvalidArgument("wmatmul: scale must be (N,)");
  switch (w.element_type()) {
    case ffi::DataType::F32: dispatch<float>(pool, x.typed_data(), w.untyped_data(), s, y->typed_data(), M, K, N, nk); break;
    case ffi::DataType::BF16: dispatch<uint16_t>(pool, x.typed_data(), w.untyped_data(), s, y->typed_data(), M, K, N, nk); break;
    case ffi::DataType::F16: dispatch<half_t>(pool, x.typed_data(), w.untyped_data(), s, y->typed_data(), M, K, N, nk); break;
    case ffi::DataType::S8: dispatch<int8_t>(pool, x.typed_data(), w.untyped_data(), s, y->typed_data(), M, K, N, nk); break;
    default: return ffi::Error::InvalidArgument("wmatmul: weights must be f32, bf16, f16 or s8");
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VllamaWMatmul, WMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("nk"));
