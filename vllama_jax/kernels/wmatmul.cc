// Weight-streaming matmul for the CPU backend: y (M, N) f32 = x (M, K) f32 @ W, W stored as float32, bfloat16,
// float16 or int8 with a per-output-channel f32 scale, accumulated in float32 without ever materialising a float32 copy of
// W (XLA CPU converts a whole bf16/int8 operand before its dot: a full-size temporary and ~1 GB/s).
//
// Two layouts: "kn" W (K, N) (a Dense kernel, in x out) and "nk" W (N, K) (an embedding table used as the tied
// LM head). Work is split into blocks scheduled on XLA's own intra-op thread pool (no second pool fighting it for
// the same cores): a decode step (M = batch <= SMALL_M) streams ranges of whole rows of W, reading every weight byte
// once; a prefill converts 64-column panels once and re-reads them from cache for every register tile of rows of x.
//
// Portable SIMD through GCC vector extensions at the machine's native width (-march=native): 16 lanes with AVX-512,
// 8 otherwise (AVX2, NEON pairs). The widening loads of bf16 / fp16 / int8 use the intrinsics where they exist: GCC
// lowers a narrowing-type __builtin_convertvector to scalar code, which made an AVX2 int8 decode step 6x slower
// than float32's. The register tiles are sized to the register file (an AVX2 tile of 16 accumulators spilled to
// the stack and ran at 6 GFLOP/s against XLA's 140).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int L = 16;  // float lanes per vector
constexpr int TR = 4, TC = 4;  // prefill register tile: TR rows of x by TC vectors of columns (16 of 32 registers)
#else
constexpr int L = 8;
constexpr int TR = 6, TC = 2;  // 12 accumulators + 2 weight vectors + a broadcast fit AVX2's 16 registers
#endif
typedef float vf __attribute__((vector_size(4 * L)));

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
static inline float load1(const half_t* p) { return half_to_float(p->bits); }
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) { uint32_t u = uint32_t(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline float load1(const int8_t* p) { return float(*p); }

static inline vf loadv(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
#if defined(__AVX512F__)
static inline vf loadv(const uint16_t* p) {  // bfloat16: the high half of a float32
  __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<vf>(_mm512_castsi512_ps(u));
}
static inline vf loadv(const int8_t* p) {
  __m512i i = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vf>(_mm512_cvtepi32_ps(i));
}
static inline vf loadv(const half_t* p) {
  return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
#else
#if defined(__AVX2__)
static inline vf loadv(const uint16_t* p) {
  __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<vf>(_mm256_castsi256_ps(u));
}
static inline vf loadv(const int8_t* p) {
  __m256i i = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(i));
}
#else
static inline vf loadv(const uint16_t* p) { vf v; for (int i = 0; i < L; ++i) v[i] = load1(p + i); return v; }
static inline vf loadv(const int8_t* p) { vf v; for (int i = 0; i < L; ++i) v[i] = load1(p + i); return v; }
#endif
#if defined(__F16C__)
static inline vf loadv(const half_t* p) {
  return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
static inline vf loadv(const half_t* p) { vf v; for (int i = 0; i < L; ++i) v[i] = load1(p + i); return v; }
#endif
#endif
static inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

constexpr int NB = 64;       // columns per block (a multiple of TC * L)
constexpr int MR = 4;        // rows of x per tile of the (N, K) table path
constexpr int KC = 256;      // rows of W per converted panel (KC x NB f32 = 64 KiB: stays in L2)
constexpr int SMALL_M = 16;  // up to this many rows of x: stream W once, row by row (decode)

// Few rows of x (decode): rows [k0, k1) and columns [n0, n1) of W (K, N) streamed row by row, 4 rows of W at a
// time; every weight byte is read once. The M x width accumulators (at most ACC floats) stay in L1/L2. The sums go
// to out (row stride N), times the column scale when one is given.
constexpr int64_t ACC = 32768;
template <typename W>
static void stream_kn(const float* x, const W* w, const float* scale, float* out, int64_t M, int64_t K, int64_t N,
                      int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  int64_t width = n1 - n0, wl = width - width % L;
  float acc[ACC] __attribute__((aligned(64)));
  std::memset(acc, 0, sizeof(float) * M * width);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const W* r0 = w + k * N + n0;
    const W* r1 = r0 + N;
    const W* r2 = r1 + N;
    const W* r3 = r2 + N;
    for (int64_t j = 0; j < wl; j += L) {
      vf a = loadv(r0 + j), b = loadv(r1 + j), c = loadv(r2 + j), d = loadv(r3 + j);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        vf t = loadv(acc + m * width + j);
        t += xm[0] * a + xm[1] * b + xm[2] * c + xm[3] * d;
        storev(acc + m * width + j, t);
      }
    }
    for (int64_t j = wl; j < width; ++j)
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        acc[m * width + j] += xm[0] * load1(r0 + j) + xm[1] * load1(r1 + j) + xm[2] * load1(r2 + j) +
                              xm[3] * load1(r3 + j);
      }
  }
  for (; k < k1; ++k) {
    const W* r0 = w + k * N + n0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < width; ++j) acc[m * width + j] += x[m * K + k] * load1(r0 + j);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < width; ++j)
      out[m * N + n0 + j] = scale ? acc[m * width + j] * scale[n0 + j] : acc[m * width + j];
}

// y[m0:m0+R, col:col+TC*L] += x[m0:m0+R, k0:k0+kc] @ panel[:, pcol:pcol+TC*L] (the panel: kc rows of NB f32).
template <int R>
static void tile_panel(const float* x, const float* panel, float* y, int64_t K, int64_t N, int64_t m0, int64_t col,
                       int64_t pcol, int64_t k0, int64_t kc) {
  vf acc[R][TC];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < TC; ++j) acc[r][j] = loadv(y + (m0 + r) * N + col + L * j);
  const float* xr = x + m0 * K + k0;
  for (int64_t k = 0; k < kc; ++k) {
    const float* p = panel + k * NB + pcol;
    vf wv[TC];
    for (int j = 0; j < TC; ++j) wv[j] = loadv(p + L * j);
    for (int r = 0; r < R; ++r) {
      float xv = xr[r * K + k];
      for (int j = 0; j < TC; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < TC; ++j) storev(y + (m0 + r) * N + col + L * j, acc[r][j]);
}

template <int R>
static void tile_rest(int64_t rest, const float* x, const float* panel, float* y, int64_t K, int64_t N, int64_t m0,
                      int64_t col, int64_t pcol, int64_t k0, int64_t kc) {
  if constexpr (R > 0) {
    if (rest == R) return tile_panel<R>(x, panel, y, K, N, m0, col, pcol, k0, kc);
    tile_rest<R - 1>(rest, x, panel, y, K, N, m0, col, pcol, k0, kc);
  }
}

// Many rows of x (prefill): a 64-column block, KC rows of W at a time converted once to a float32 panel, then
// register tiles of TR rows x TC vectors over every row of x, strip by strip (a strip of the panel stays in L1).
template <typename W>
static void panel_kn(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                     int64_t n0) {
  float panel[KC * NB] __attribute__((aligned(64)));
  for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, sizeof(float) * NB);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    int64_t kc = std::min<int64_t>(KC, K - k0);
    for (int64_t k = 0; k < kc; ++k) {
      const W* row = w + (k0 + k) * N + n0;
      for (int j = 0; j < NB; j += L) storev(panel + k * NB + j, loadv(row + j));
    }
    for (int64_t s = 0; s < NB; s += TC * L) {
      int64_t m = 0;
      for (; m + TR <= M; m += TR) tile_panel<TR>(x, panel, y, K, N, m, n0 + s, s, k0, kc);
      tile_rest<TR - 1>(M - m, x, panel, y, K, N, m, n0 + s, s, k0, kc);
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
  int64_t kl = K - K % L;
  for (int64_t n = block * NB; n < n1; ++n) {
    const W* row = w + n * K;
    float s = scale ? scale[n] : 1.f;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      int R = int(std::min<int64_t>(MR, M - m0));
      vf acc[MR] = {};
      for (int64_t k = 0; k < kl; k += L) {
        vf wv = loadv(row + k);
        for (int r = 0; r < R; ++r) acc[r] += loadv(x + (m0 + r) * K + k) * wv;
      }
      for (int r = 0; r < R; ++r) {
        float t = 0.f;
        for (int j = 0; j < L; ++j) t += acc[r][j];
        for (int64_t k = kl; k < K; ++k) t += x[(m0 + r) * K + k] * load1(row + k);
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
    // Blocks as wide as the accumulators allow (whole rows of W at batch 1: long contiguous reads, which the
    // hardware prefetchers follow; 2048-column slices of rows 22 KB apart ran at half the copy bandwidth), and
    // the rows split into ranges so that every thread has two blocks; the ranges' partial sums are added after.
    int64_t threads = std::max<int64_t>(1, pool.num_threads());
    int64_t width = std::min<int64_t>(N, std::max<int64_t>(L, ACC / M / L * L));
    int64_t col_blocks = (N + width - 1) / width;
    int64_t row_blocks = std::min<int64_t>(std::max<int64_t>(1, (2 * threads + col_blocks - 1) / col_blocks),
                                           std::max<int64_t>(1, K / 64));
    int64_t rows = (K + row_blocks - 1) / row_blocks;
    rows = (rows + 3) / 4 * 4;
    row_blocks = (K + rows - 1) / rows;
    if (row_blocks == 1) {
      run_blocks(pool, col_blocks, [=](int64_t b) {
        stream_kn<W>(x, w, scale, y, M, K, N, b * width, std::min(N, (b + 1) * width), 0, K);
      });
      return;
    }
    std::unique_ptr<float[]> part(new float[row_blocks * M * N]);
    float* pp = part.get();
    run_blocks(pool, row_blocks * col_blocks, [=](int64_t b) {
      int64_t r = b / col_blocks, c = b % col_blocks;
      stream_kn<W>(x, w, nullptr, pp + r * M * N, M, K, N, c * width, std::min(N, (c + 1) * width), r * rows,
                   std::min(K, (r + 1) * rows));
    });
    for (int64_t i = 0; i < M * N; ++i) {
      float t = 0.f;
      for (int64_t r = 0; r < row_blocks; ++r) t += pp[r * M * N + i];
      y[i] = scale ? t * scale[i % N] : t;
    }
  } else {
    // Full 64-column blocks through the panel path, the ragged rest streamed in SMALL_M-row slices.
    int64_t full = N / NB;
    run_blocks(pool, full + (N % NB ? 1 : 0), [=](int64_t b) {
      if (b < full) { panel_kn<W>(x, w, scale, y, M, K, N, b * NB); return; }
      for (int64_t m = 0; m < M; m += SMALL_M)
        stream_kn<W>(x + m * K, w, scale, y + m * N, std::min<int64_t>(SMALL_M, M - m), K, N, full * NB, N, 0,
                     K);
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

// The float lanes of one vector in this build (16 with AVX-512, 8 otherwise): the Python side picks, by width, the
// row counts at which float32 weights go through this kernel rather than XLA's dot (`models.layers`).
extern "C" int VllamaWMatmulLanes() { return L; }
