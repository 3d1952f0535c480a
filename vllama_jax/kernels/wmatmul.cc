// Weight-streaming matmul for the CPU backend: y (M, N) f32 = x (M, K) f32 @ W, W stored as float32, bfloat16,
// float16 or int8 with a per-output-channel f32 scale, accumulated in float32 without ever materialising a float32
// copy of W (XLA CPU converts a whole bf16/int8 operand before its dot: a full-size temporary and ~1 GB/s).
//
// Three layouts: "kn" W (K, N) (a Dense kernel, in x out), "nk" W (N, K) (an embedding table used as the tied
// LM head), and for int8 on AVX-512 VNNI the packed (K/4, N, 4) of a Dense kernel (`kernels.pack_int8`). Work is
// split into blocks scheduled on XLA's own intra-op thread pool (no second pool fighting it for the same cores): a
// decode step (M = batch <= SMALL_M) streams ranges of whole rows of W, reading every weight byte once; a prefill
// converts slivers of columns to float32 once and re-reads them from cache for every register tile of rows of x.
//
// Portable SIMD through GCC vector extensions at the machine's native width (-march=native): 16 lanes with AVX-512,
// 8 otherwise (AVX2, NEON pairs). The widening loads of bf16 / fp16 / int8 use the intrinsics where they exist: GCC
// lowers a narrowing-type __builtin_convertvector to scalar code, which made an AVX2 int8 decode step 6x slower
// than float32's. The register tiles are sized to the register file (an AVX2 tile of 16 accumulators spilled to
// the stack and ran at 6 GFLOP/s against XLA's 140).
//
// Two more calls serve the KV cache: the attention of a prefill or decode step over it (scores, softmax and values in
// one call, `VllamaAttention`) and the in-place write of the step's keys and values into it (`VllamaWriteRows`),
// each rotating its rows by RoPE on the way when given cos and sin.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // _mm_pause everywhere, the vector intrinsics where the target has them
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int L = 16;  // float lanes per vector
constexpr int GR = 8, GV = 3;  // prefill register tile: GR rows of x by GV vectors (24 accumulators of 32 registers)
#else
constexpr int L = 8;
constexpr int GR = 4, GV = 3;  // 12 accumulators + 3 weight vectors + a broadcast fit AVX2's 16 registers
#endif
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));

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
static inline uint32_t bit_cast_u32(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline void store_bf16(uint16_t* dst, vf v) {  // exact values only (the low half of each float32 is zero)
  vi u;
  std::memcpy(&u, &v, sizeof(vf));
#if defined(__AVX512F__)
  __m512i x;
  std::memcpy(&x, &u, sizeof(x));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
#else
  for (int i = 0; i < L; ++i) dst[i] = uint16_t(uint32_t(u[i]) >> 16);
#endif
}

constexpr int NB = 64;       // columns per block of the (N, K) table path
constexpr int MR = 4;        // rows of x per tile of the (N, K) table path
constexpr int SMALL_M = 16;  // up to this many rows of x: stream W once, row by row (decode)

// Few rows of x (decode): rows [k0, k1) and columns [n0, n1) of W (K, N) streamed row by row, 8 rows of W at a
// time; every weight byte is read once. The M x width accumulators (at most ACC floats) stay in L1/L2. The sums go
// to out (row stride N), times the column scale when one is given.
constexpr int64_t ACC = 32768;
// A streaming pass prefetches the rows of the next pass into L2 when a pass spans at most this many bytes of W (the
// lines then wait there until used; with 256 KB passes, a 32000-column bf16 head read slower with them). A/B in one
// process on the 2-core AMD EPYC, LLaMA-7B's shapes at batch 1: bf16 4096 x 4096 read at 49 GB/s with the 8-row
// pass and the prefetch, 43 without the prefetch, 32 with the earlier 4-row pass (the machine's memory speed
// varies by the minute: compare within a run).
constexpr int64_t PREFETCH_PASS_BYTES = 128 << 10;
// The columns past the last whole vector ([wl, width)), one at a time: R rows of W (row k on) for each row of x.
template <int R, typename W>
static inline void ragged_columns(const float* x, const W* r0, float* acc, int64_t M, int64_t K, int64_t N, int64_t k,
                                  int64_t width, int64_t wl) {
  for (int64_t j = wl; j < width; ++j)
    for (int64_t m = 0; m < M; ++m) {
      float t = 0.f;
      for (int i = 0; i < R; ++i) t += x[m * K + k + i] * load1(r0 + i * N + j);
      acc[m * width + j] += t;
    }
}
// One pass of R rows of W (row k on, from r0) over `width` columns into the M x width accumulators: each accumulator
// vector is loaded and stored once for the R rows (two partial sums keep the multiply-add chains short). The
// 8-row passes of one row of x, and the last few rows of W of a range (several rows of x take their 8-row passes
// in register tiles: `tile_pass`).
template <int R, typename W>
static inline void stream_rows(const float* x, const W* r0, float* acc, int64_t M, int64_t K, int64_t N, int64_t k,
                               int64_t width, int64_t wl, bool prefetch) {
  for (int64_t j = 0; j < wl; j += L) {
    vf a[R];
    for (int i = 0; i < R; ++i) {
      a[i] = loadv(r0 + i * N + j);
      if (prefetch) __builtin_prefetch(r0 + (i + R) * N + j, 0, 2);
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      vf even = xm[0] * a[0], odd = {};
      for (int i = 1; i < R; ++i) (i % 2 ? odd : even) += xm[i] * a[i];
      storev(acc + m * width + j, loadv(acc + m * width + j) + (even + odd));
    }
  }
  ragged_columns<R>(x, r0, acc, M, K, N, k, width, wl);
}

// Two or more rows of x: register tiles of MG rows of x by C vectors of columns (MG x C accumulators, loaded once per
// pass of 8 rows of W and stored once), each weight vector loaded once for the MG rows and each x value broadcast
// once for the C vectors. The row-at-a-time pass above spends a load and a store of the accumulator per row of x
// and vector of columns: at 8 rows of x it ran at ~140 GFLOP/s on the 2-core Intel Xeon with W in L2, about the
// memory's speed (~35 GB/s of float32 weights), so the products did not hide behind the weights' stream. With the
// tiles (a 576 x 1536 W in L2, one process each): float32 at 8 rows 142 -> 163 GFLOP/s, bfloat16 at 4 rows 113 ->
// 154, at 2 rows 84 -> 108; from memory (a C loop, 530 MB) 8 rows streamed as fast as one (29.2 vs 26.7-30.8 GB/s);
// SmolLM2's float32 batch-8 decode step, medians of 7 alternating rounds in one process: 31.80 -> 30.72 ms.
#if defined(__AVX512F__)
constexpr int VREGS = 32;
#else
constexpr int VREGS = 16;
#endif
// vectors of columns per tile of MG rows: MG x C accumulators, C weight vectors and a broadcast in the registers
template <int MG>
constexpr int tile_vectors() {
  constexpr int c = (VREGS - 2) / (MG + 1);
  return c < 1 ? 1 : (c > 4 ? 4 : c);
}
// With several rows of x each row of W is also prefetched STREAM_AHEAD_BYTES ahead (into L1), once per cache line.
// Measured on the row-at-a-time pass the tiles replaced (SmolLM2-135M's float32 batch-8 decode, medians of 7
// alternating rounds in one process, twice): 266.7 -> 273.7 and 262.6 -> 274.3 tok/s (256 bytes ahead 274.4, 1024
// 264.5); at one row of x it gained nothing, so `stream_rows` goes without it.
constexpr int64_t STREAM_AHEAD_BYTES = 512;
// 8 rows of W (from r0) by MG rows of x (from xm, the pass's first column of K) over columns [j, j + C L) of acc.
// `lead`: this tile's rows of W are prefetched (into L1 STREAM_AHEAD_BYTES ahead, and the next pass's into L2 when
// `next`) by the first group of rows of x only.
template <int MG, int C, typename W>
static inline void tile_pass(const float* xm, int64_t K, const W* r0, int64_t N, float* acc, int64_t width, int64_t j,
                             bool lead, bool next) {
  vf a[MG][C];
  for (int m = 0; m < MG; ++m)
    for (int c = 0; c < C; ++c) a[m][c] = loadv(acc + m * width + j + c * L);
  constexpr int64_t bytes = C * L * int64_t(sizeof(W));
  for (int i = 0; i < 8; ++i) {
    const W* row = r0 + i * N + j;
    if (lead)
      for (int64_t b = 0; b < bytes; b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(row) + b + STREAM_AHEAD_BYTES, 0, 3);
        if (next) __builtin_prefetch(reinterpret_cast<const char*>(row + 8 * N) + b, 0, 2);
      }
    vf wv[C];
    for (int c = 0; c < C; ++c) wv[c] = loadv(row + c * L);
    for (int m = 0; m < MG; ++m) {
      const vf xb = xm[m * K + i] - vf{};  // a broadcast: x - 0 is x (`vf{} + x` would keep the addition: -0)
      for (int c = 0; c < C; ++c) a[m][c] += xb * wv[c];
    }
  }
  for (int m = 0; m < MG; ++m)
    for (int c = 0; c < C; ++c) storev(acc + m * width + j + c * L, a[m][c]);
}
// Every row of x, in groups of 8, 4, 2 and 1, over one tile of C vectors (at most the group's own maximum).
template <int C, typename W>
static inline void tile_rows(const float* x, int64_t M, int64_t K, int64_t k, const W* r0, int64_t N, float* acc,
                             int64_t width, int64_t j, bool next) {
  constexpr int C8 = C < tile_vectors<8>() ? C : tile_vectors<8>();
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) tile_pass<8, C8, W>(x + m * K + k, K, r0, N, acc + m * width, width, j, m == 0, next);
  if (M - m >= 4) {
    tile_pass<4, C, W>(x + m * K + k, K, r0, N, acc + m * width, width, j, m == 0, next);
    m += 4;
  }
  if (M - m >= 2) {
    tile_pass<2, C, W>(x + m * K + k, K, r0, N, acc + m * width, width, j, m == 0, next);
    m += 2;
  }
  if (M - m >= 1) tile_pass<1, C, W>(x + m * K + k, K, r0, N, acc + m * width, width, j, m == 0, next);
}
// One pass of 8 rows of W (row k on) over `width` columns for all M >= 2 rows of x: the widest tiles the first
// group of rows allows, then single vectors, then the ragged columns one at a time.
template <typename W>
static void tile_rows_pass(const float* x, const W* r0, float* acc, int64_t M, int64_t K, int64_t N, int64_t k,
                           int64_t width, int64_t wl, bool next) {
  constexpr int C8 = tile_vectors<8>(), C4 = tile_vectors<4>();
  int64_t j = 0;
  if (M >= 8) {
    for (; j + C8 * L <= wl; j += C8 * L) tile_rows<C8, W>(x, M, K, k, r0, N, acc, width, j, next);
  } else {
    for (; j + C4 * L <= wl; j += C4 * L) tile_rows<C4, W>(x, M, K, k, r0, N, acc, width, j, next);
  }
  for (; j < wl; j += L) tile_rows<1, W>(x, M, K, k, r0, N, acc, width, j, next);
  ragged_columns<8>(x, r0, acc, M, K, N, k, width, wl);
}

template <typename W>
static void stream_kn(const float* x, const W* w, const float* scale, float* out, int64_t M, int64_t K, int64_t N,
                      int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  int64_t width = n1 - n0, wl = width - width % L;
  float acc[ACC] __attribute__((aligned(64)));
  std::memset(acc, 0, sizeof(float) * M * width);
  // 8 rows of W per pass (register tiles from two rows of x on), then 4, then 1; the next pass's rows prefetched
  // into L2 as for the int8 path below
  const bool prefetch = 8 * width * int64_t(sizeof(W)) <= PREFETCH_PASS_BYTES;
  int64_t k = k0;
  if (M > 1) {
    for (; k + 8 <= k1; k += 8) tile_rows_pass<W>(x, w + k * N + n0, acc, M, K, N, k, width, wl, prefetch);
  } else {
    for (; k + 8 <= k1; k += 8) stream_rows<8>(x, w + k * N + n0, acc, M, K, N, k, width, wl, prefetch);
  }
  for (; k + 4 <= k1; k += 4) stream_rows<4>(x, w + k * N + n0, acc, M, K, N, k, width, wl, false);
  for (; k < k1; ++k) stream_rows<1>(x, w + k * N + n0, acc, M, K, N, k, width, wl, false);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < width; ++j)
      out[m * N + n0 + j] = scale ? acc[m * width + j] * scale[n0 + j] : acc[m * width + j];
}

// Many rows of x (prefill): a Goto-style product. The columns of W are split into blocks (one or more per thread);
// each block converts its W, at most GEMM_KC rows at a time, into slivers of GN float32 columns (by fill(sliver, k0,
// kc, col, width), per layout and dtype: the conversion happens once per weight) and runs every row of x through
// each sliver in register tiles of GR rows by GV vectors, the sliver read from L1/L2 and x's rows broadcast.
// The float32 products of SmolLM2-135M's batch-8 prefill (1024 rows), one process, against XLA's dot (YNNPACK):
// 354 vs 290 GFLOP/s at 576 x 576, 341 vs 274 at 576 x 192, 363 vs 329 at 576 x 1536, 337 vs 310 at 1536 x 576
// (2-core Intel Xeon; the 64-column panels with 4 x 4 tiles this replaced: 236-246); 8 x 3 tiles against 6 x 4,
// 12 x 2, 14 x 2 and 4 x 5: the best sum over a layer's shapes.
constexpr int64_t GN = GV * L;
constexpr int64_t GEMM_KC = 640;  // rows of W per conversion (a sliver: 640 x 48 f32 = 120 KB)
// With fewer rows of x than GEMM_FEW_ROWS each converted weight serves fewer tiles: shorter conversions, a sliver in
// L1 (256 x 48 f32 = 48 KB). 24 x 4096 x 4096, GFLOP/s at 640 / 256 rows: AVX-512 bf16 191 / 198, int8 190 / 217; the
// AVX2 build on the same host bf16 121-124 / 131, int8 130-135 / 164 (at 128 rows AVX-512 bf16 329 / 269).
constexpr int64_t GEMM_KC_FEW = 256, GEMM_FEW_ROWS = 64;
constexpr int64_t GEMM_MC = 128;  // rows of x per pass over the block's slivers (128 x 640 f32 = 320 KB, in L2)
constexpr int64_t GEMM_NC = 384;  // columns per block, about (its converted W: GEMM_KC x GEMM_NC f32 ~ 1 MB, in L2)
template <int R>
static inline void gemm_tile(const float* x, int64_t K, const float* b, float* y, int64_t ldy, int64_t kc,
                             bool first) {
  vf acc[R][GV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < GV; ++v) acc[r][v] = first ? vf{} : loadv(y + r * ldy + v * L);
  for (int64_t k = 0; k < kc; ++k) {
    vf wv[GV];
    for (int v = 0; v < GV; ++v) wv[v] = loadv(b + k * GN + v * L);
    for (int r = 0; r < R; ++r) {
      const vf xb = x[r * K + k] - vf{};  // a broadcast (see tile_pass)
      for (int v = 0; v < GV; ++v) acc[r][v] += xb * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < GV; ++v) storev(y + r * ldy + v * L, acc[r][v]);
}
template <int R>
static void gemm_tile_rest(int64_t rows, const float* x, int64_t K, const float* b, float* y, int64_t ldy, int64_t kc,
                           bool first) {
  if constexpr (R > 0) {
    if (rows == R) return gemm_tile<R>(x, K, b, y, ldy, kc, first);
    gemm_tile_rest<R - 1>(rows, x, K, b, y, ldy, kc, first);
  }
}
// Every row of x (from column k0 of K) by one sliver into y's columns [col, col + width): width < GN (the ragged last
// sliver, its missing columns converted as zeros) goes through a tile of its own.
static void gemm_sliver(const float* x, int64_t M, int64_t K, const float* b, float* y, int64_t N, int64_t col,
                        int64_t width, int64_t kc, bool first) {
  for (int64_t m = 0; m < M; m += GR) {
    const int64_t rows = std::min<int64_t>(GR, M - m);
    if (width == GN) {
      gemm_tile_rest<GR>(rows, x + m * K, K, b, y + m * N + col, N, kc, first);
      continue;
    }
    float t[GR * GN] __attribute__((aligned(64))) = {};
    for (int64_t r = 0; r < rows; ++r) std::memcpy(t + r * GN, y + (m + r) * N + col, sizeof(float) * width);
    gemm_tile_rest<GR>(rows, x + m * K, K, b, t, GN, kc, first);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + (m + r) * N + col, t + r * GN, sizeof(float) * width);
  }
}
// y[:, n0:n1] = x @ W[:, n0:n1] (times scale when given); row blocks of W are multiples of `kalign` rows (4 for
// the packed int8 layout's groups).
template <typename Fill>
static void gemm_block(const float* x, const float* scale, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                       int64_t n1, int64_t kalign, Fill fill) {
  static thread_local std::vector<float> store;  // the block's slivers, kept for the thread's next call
  const int64_t kcap = M < GEMM_FEW_ROWS ? GEMM_KC_FEW : GEMM_KC;
  const int64_t kblocks = (K + kcap - 1) / kcap;
  const int64_t kcmax = ((K + kblocks - 1) / kblocks + kalign - 1) / kalign * kalign;
  const int64_t slivers = (n1 - n0 + GN - 1) / GN;
  auto width = [=](int64_t i) { return std::min<int64_t>(GN, n1 - n0 - i * GN); };  // the last one may be ragged
  store.resize(slivers * GN * kcmax + 64 / sizeof(float));
  float* bp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t(63));
  for (int64_t k0 = 0; k0 < K; k0 += kcmax) {
    const int64_t kc = std::min(kcmax, K - k0);
    for (int64_t i = 0; i < slivers; ++i) fill(bp + i * GN * kc, k0, kc, n0 + i * GN, width(i));
    for (int64_t m0 = 0; m0 < M; m0 += GEMM_MC)
      for (int64_t i = 0; i < slivers; ++i)
        gemm_sliver(x + m0 * K + k0, std::min(GEMM_MC, M - m0), K, bp + i * GN * kc, y + m0 * N, N, n0 + i * GN,
                    width(i), kc, k0 == 0);
  }
  if (scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = n0; j < n1; ++j) y[m * N + j] *= scale[j];
}
// A sliver of W (K, N) as stored, converted to float32.
template <typename W>
static void fill_kn(const W* w, int64_t N, float* b, int64_t k0, int64_t kc, int64_t col, int64_t width) {
  for (int64_t k = 0; k < kc; ++k) {
    const W* row = w + (k0 + k) * N + col;
    if (width == GN) {
      for (int v = 0; v < GV; ++v) storev(b + k * GN + v * L, loadv(row + v * L));
    } else {
      for (int64_t j = 0; j < width; ++j) b[k * GN + j] = load1(row + j);
      for (int64_t j = width; j < GN; ++j) b[k * GN + j] = 0.f;
    }
  }
}

// The lane sums of L vectors as one vector: r[i] = sum of v[i]'s lanes. A tree of two-source shuffles halves the
// vectors at every level (log2 L levels, L - 1 adds) where L horizontal sums would take L * (L - 1) scalar adds;
// the tree leaves lane i holding the vector at the bit-reversed index, so the inputs are taken in that order.
// Lane i of the two-source shuffle at chunk size C (a: chunks of C lanes, then b's): the even (lo) or odd (hi) chunks
// of each pair, so lo + hi halves the vectors. Built from an index sequence: a constant mask, one vpermt2ps.
template <int C, bool HI, int... I>
static inline vi level_mask(std::integer_sequence<int, I...>) {
  return vi{((I / C) / 2 * 2 * C + I % C + (HI ? C : 0) + ((I / C) % 2) * L)...};
}
template <int C>
static inline void lane_level(vf* t) {  // 2C vectors -> C
  constexpr auto lanes = std::make_integer_sequence<int, L>{};
  for (int j = 0; j < C; ++j)
    t[j] = __builtin_shuffle(t[2 * j], t[2 * j + 1], level_mask<C, false>(lanes)) +
           __builtin_shuffle(t[2 * j], t[2 * j + 1], level_mask<C, true>(lanes));
  if constexpr (C > 1) lane_level<C / 2>(t);
}
static constexpr int bit_reversed(int i) {
  int r = 0;
  for (int b = 1; b < L; b <<= 1, i >>= 1) r = (r << 1) | (i & 1);
  return r;
}
static inline vf lane_sums(const vf* v) {
  vf t[L];
  for (int i = 0; i < L; ++i) t[i] = v[bit_reversed(i)];
  lane_level<L / 2>(t);
  return t[0];
}

// W (N, K): rows n0 .. n1 of the table, each a dot product with every row of x, one at a time (horizontal sums).
template <typename W>
static void rows_nk_each(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                         int64_t n0, int64_t n1) {
  int64_t kl = K - K % L;
  for (int64_t n = n0; n < n1; ++n) {
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

// R rows of x (from m0) by L / R rows of W (from n): L accumulator vectors over the whole vectors of K, reduced into
// one vector by `lane_sums` (lane r * (L / R) + t: row m0 + r, column n + t), the ragged end of K added per sum.
// `prefetch`: the next tile's rows of W are fetched into cache meanwhile (A/B, SmolLM2's 49152 x 576 f32 table:
// 4 rows of x 4.6 -> 2.5 ms, 8 rows 5.9 -> 3.9; at one row, 16 rows of W per tile, it cost 1-14% in float32 but
// pays for the narrow types, whose rows are shorter and whose widening leaves the hardware prefetchers behind: one
// row, 2-core Intel Xeon, int8 1.82 -> 1.21 ms, bf16 3.63 -> 2.58, fp16 3.44 -> 2.45).
template <int R, typename W>
static inline void tile_nk(const float* x, const W* w, const float* scale, float* y, int64_t K, int64_t N,
                           int64_t m0, int64_t n, bool prefetch) {
  constexpr int T = L / R;
  const int64_t kl = K - K % L;
  vf acc[L] = {};
  for (int64_t k = 0; k < kl; k += L) {
    vf wv[T], xv[R];
    for (int t = 0; t < T; ++t) {
      wv[t] = loadv(w + (n + t) * K + k);
      if (prefetch) __builtin_prefetch(w + (n + t + T) * K + k, 0, 3);
    }
    for (int r = 0; r < R; ++r) xv[r] = loadv(x + (m0 + r) * K + k);
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r * T + t] += xv[r] * wv[t];
  }
  vf sums = lane_sums(acc);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float v = sums[r * T + t];
      for (int64_t k = kl; k < K; ++k) v += x[(m0 + r) * K + k] * load1(w + (n + t) * K + k);
      y[(m0 + r) * N + n + t] = scale ? v * scale[n + t] : v;
    }
}

// Rows m0 .. m1 of x (a multiple of R of them) by rows n0 .. n1 of W (N, K): tiles of L / R rows of W, each met by
// every R rows of x while it is in L1; the ragged end of W one row at a time.
template <int R, typename W>
static void group_nk(const float* x, const W* w, const float* scale, float* y, int64_t K, int64_t N, int64_t m0,
                     int64_t m1, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + L / R <= n1; n += L / R)
    for (int64_t m = m0; m < m1; m += R)
      tile_nk<R, W>(x, w, scale, y, K, N, m, n, (R > 1 || sizeof(W) < 4) && m == m0);
  rows_nk_each<W>(x + m0 * K, w, scale, y + m0 * N, m1 - m0, K, N, n, n1);
}

// W (N, K): rows n0 .. n1 of the table, each a dot product with every row of x: 4 rows of x at a time by L / 4 rows
// of W, L sums per `lane_sums`. One horizontal sum per product cost more than the products at a few rows
// (SmolLM2-135M's tied LM head at batch 8: 9.2 ms of a 43 ms decode step). A narrow table takes 8 rows of x at a
// time where it can: each widened vector of W then serves 8 products instead of 4 (SmolLM2's 49152 x 576 table at 8
// rows, A/B of two builds in one process: bf16 4.28 -> 3.61 ms, fp16 4.10 -> 3.55, int8 within noise).
template <typename W>
static void rows_nk(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                    int64_t n0, int64_t n1) {
  if (K < L) return rows_nk_each<W>(x, w, scale, y, M, K, N, n0, n1);
  const int64_t m8 = sizeof(W) < 4 ? M / 8 * 8 : 0;
  if (m8) group_nk<8, W>(x, w, scale, y, K, N, 0, m8, n0, n1);
  const int64_t m4 = m8 + (M - m8) / 4 * 4;
  if (m4 > m8) group_nk<4, W>(x, w, scale, y, K, N, m8, m4, n0, n1);
  if (M - m4 >= 2) group_nk<2, W>(x, w, scale, y, K, N, m4, m4 + 2, n0, n1);
  if (M % 2) group_nk<1, W>(x, w, scale, y, K, N, M - 1, M, n0, n1);
}

template <typename W>
static void block_nk(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                     int64_t block) {
  rows_nk<W>(x, w, scale, y, M, K, N, block * NB, std::min<int64_t>(N, (block + 1) * NB));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VLLAMA_VNNI 1
// int8 weights by VNNI: vpdpbusd multiplies 64 unsigned by 64 signed bytes and adds them in fours into 16 int32
// lanes, one instruction for what the widening path does in 12 (sign-extend, convert, multiply-add, four times), so
// a decode step reads int8 weights at memory speed instead of at the speed of their conversion to float32.
// x is not rounded to int8: each row's 256-deep block b of K is scaled to 16 bits, x ~ sx[b] (256 hi + lo) with hi
// and lo int8, and the two halves take one instruction each (error <= sx / 2 = max |x in the block| / 65278, well
// below the weights' own int8 rounding; an outlier costs precision only inside its block). The weights are the
// unsigned operand: w ^ 0x80 = w + 128, so every sum carries 128 * (sum of hi or lo over its terms), taken off in
// int32 (exact) before anything is converted.
constexpr int64_t QB = 256;   // rows of K per activation scale
// Where VNNI wins (A/B in one process, GB/s of int8 weights): the (K, N) path at one row of x only (LLaMA-7B's MLP
// shapes: 34 vs 39 at 2 rows, 21 vs 28 at 4, 7 vs 17 at 8: the int32 accumulators' traffic grows with the rows,
// while the widening path's float accumulators take 8 rows of W per pass); the (N, K) table when rows are long
// (a 32000 x 4096 head: 36 vs 25 at one row; SmolLM2's 49152 x 576 table: 23 vs 27, the per-row flushes dominate;
// inside SmolLM2's int8 decode step the two were within noise, 95-108 tok/s each).
constexpr int64_t VNNI_ROWS = 1;
constexpr int64_t VNNI_TABLE_MIN_K = 1024;
constexpr int32_t QMAX = 32639;  // hi = (v + 128) >> 8 and lo = v - 256 hi stay in [-128, 127] for |v| <= QMAX

struct QuantX {
  int64_t KP = 0, blocks = 0, kvec = 0;  // kvec: rows of K done by VNNI (the rest in float32)
  std::vector<int8_t> hi, lo;                   // (M, KP), zero beyond K
  std::vector<float> sx;                        // (M, blocks)
  std::vector<int32_t> ch, cl;                  // (M, blocks, 16): 128 * the sums of hi / lo each int32 lane meets
};

// Quantizes x (M, K) for rows [0, kvec) of K; false if x holds inf or NaN (the float path then keeps IEEE results).
// The lane corrections follow the (N, K) table's layout (lane j of a 64-byte step meets k % 64 in [4j, 4j + 4));
// the (K, N) path broadcasts 4 k at a time to every lane, so it uses their sum over the lanes.
static bool quantize_x(const float* x, int64_t M, int64_t K, int64_t kvec, QuantX& q) {
  q.kvec = kvec; q.KP = (K + 63) / 64 * 64; q.blocks = (K + QB - 1) / QB;
  q.hi.assign(M * q.KP, 0); q.lo.assign(M * q.KP, 0); q.sx.assign(M * q.blocks, 0.f);
  q.ch.assign(M * q.blocks * 16, 0); q.cl.assign(M * q.blocks * 16, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < q.blocks; ++b) {
      int64_t k0 = b * QB, k1 = std::min(kvec, k0 + QB);
      int64_t ke = std::min(K, k0 + QB), k = k0;
      const float* xm = x + m * K;
      __m512 vmax = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (; k + 16 <= ke; k += 16) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(xm + k));
        bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.0e38f), _CMP_NLE_UQ);  // inf, NaN
        vmax = _mm512_max_ps(vmax, a);
      }
      float amax = _mm512_reduce_max_ps(vmax);
      for (; k < ke; ++k) {
        float a = std::fabs(xm[k]);
        if (!(a <= 3.0e38f)) return false;
        amax = std::max(amax, a);
      }
      if (bad) return false;
      if (amax == 0.f || k0 >= k1) continue;
      q.sx[m * q.blocks + b] = amax / QMAX;
      float inv = QMAX / amax;
      int32_t* ch = q.ch.data() + (m * q.blocks + b) * 16;
      int32_t* cl = q.cl.data() + (m * q.blocks + b) * 16;
      int8_t* hi = q.hi.data() + m * q.KP;
      int8_t* lo = q.lo.data() + m * q.KP;
      // 16 k at a time (k0 is a multiple of 64, so the vector c of a 64-byte step is k % 64 / 16)
      __m512i hs[4] = {}, ls[4] = {};
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i qmax = _mm512_set1_epi32(QMAX), qmin = _mm512_set1_epi32(-QMAX), c128 = _mm512_set1_epi32(128);
      for (k = k0; k + 16 <= k1; k += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + k), vinv));  // round to nearest even
        v = _mm512_min_epi32(qmax, _mm512_max_epi32(qmin, v));
        __m512i h = _mm512_srai_epi32(_mm512_add_epi32(v, c128), 8);
        __m512i l = _mm512_sub_epi32(v, _mm512_slli_epi32(h, 8));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), _mm512_cvtepi32_epi8(l));
        int c = int((k % 64) / 16);
        hs[c] = _mm512_add_epi32(hs[c], h);
        ls[c] = _mm512_add_epi32(ls[c], l);
      }
      for (int c = 0; c < 4; ++c) {
        alignas(64) int32_t th[16], tl[16];
        _mm512_store_si512(th, hs[c]);
        _mm512_store_si512(tl, ls[c]);
        for (int j = 0; j < 16; ++j) { ch[4 * c + j / 4] += 128 * th[j]; cl[4 * c + j / 4] += 128 * tl[j]; }
      }
      for (; k < k1; ++k) {
        int32_t v = std::min<int32_t>(QMAX, std::max<int32_t>(-QMAX, int32_t(std::nearbyint(xm[k] * inv))));
        int32_t h = (v + 128) >> 8, l = v - 256 * h;
        hi[k] = int8_t(h);
        lo[k] = int8_t(l);
        ch[(k % 64) / 4] += 128 * h;
        cl[(k % 64) / 4] += 128 * l;
      }
    }
  return true;
}

static inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
static inline int32_t load4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }
static inline int32_t lane_total(const int32_t* c) {
  int32_t t = 0;
  for (int j = 0; j < 16; ++j) t += c[j];
  return t;
}

// Where column o of a 64-column step sits among the accumulators after the 4 x 4 byte transpose below: the
// vector i of the four holds, in its 128-bit lane L, columns 16 L + 4 i .. + 3 (the permutation is its own inverse).
static inline int64_t vnni_slot(int64_t j) { int64_t o = j & 63; return (j & ~int64_t(63)) | ((o >> 2) & 3) << 4 | (o >> 4) << 2 | (o & 3); }

// Groups of 4 rows of W taken per pass over the columns: the accumulators are loaded and stored once per pass.
// While a pass reads its rows, the same columns of the next pass's rows are prefetched into L2 (PREFETCH_PASS_BYTES):
// with N = 4096 each row is one 4 KB page, where the hardware prefetchers start over every 64 lines (LLaMA-7B's int8
// 4096 x 4096 projections, A/B in one process: 41-44 GB/s without, 45-50 with; the other shapes within noise).
constexpr int VG = 2;
// One 64-column step of G groups of 4 rows, as vpdpbusd operands t[g][0..3] (unsigned: w ^ 0x80), into the int32
// accumulators of every row of x (ph / pl: row m's 64 sums at m * stride): loaded and stored once for the G groups.
template <int G>
static inline void vnni_step(const QuantX& q, const __m512i (&t)[G][4], int64_t k, int64_t M, int32_t* ph,
                             int32_t* pl, int64_t stride) {
  for (int64_t m = 0; m < M; ++m, ph += stride, pl += stride) {
    __m512i h[4], l[4];
    for (int i = 0; i < 4; ++i) { h[i] = load512(ph + 16 * i); l[i] = load512(pl + 16 * i); }
    for (int g = 0; g < G; ++g) {
      __m512i bh = _mm512_set1_epi32(load4(q.hi.data() + m * q.KP + k + 4 * g));
      __m512i bl = _mm512_set1_epi32(load4(q.lo.data() + m * q.KP + k + 4 * g));
      for (int i = 0; i < 4; ++i) {
        h[i] = _mm512_dpbusd_epi32(h[i], t[g][i], bh);
        l[i] = _mm512_dpbusd_epi32(l[i], t[g][i], bl);
      }
    }
    for (int i = 0; i < 4; ++i) { _mm512_storeu_si512(ph + 16 * i, h[i]); _mm512_storeu_si512(pl + 16 * i, l[i]); }
  }
}

// 4 G rows of W (from r0, row stride N) into the int32 accumulators ih / il (M x wv, slot order): every 64-column
// step loads the accumulators once for its G groups of 4 rows (each a 4 x 4 byte transpose into 4 vectors).
template <int G>
static inline void vnni_rows(const QuantX& q, const int8_t* r0, int64_t N, int64_t k, int64_t wv, int64_t M,
                             int32_t* ih, int32_t* il, bool prefetch) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t c = 0; c < wv; c += 64) {
    __m512i t[G][4];
    for (int g = 0; g < G; ++g) {
      const int8_t* r = r0 + 4 * g * N + c;
      if (prefetch) for (int i = 0; i < 4; ++i) __builtin_prefetch(r + (i + 4 * G) * N, 0, 2);  // into L2
      __m512i a0 = _mm512_xor_si512(load512(r), flip), a1 = _mm512_xor_si512(load512(r + N), flip);
      __m512i a2 = _mm512_xor_si512(load512(r + 2 * N), flip), a3 = _mm512_xor_si512(load512(r + 3 * N), flip);
      __m512i p01 = _mm512_unpacklo_epi8(a0, a1), q01 = _mm512_unpackhi_epi8(a0, a1);
      __m512i p23 = _mm512_unpacklo_epi8(a2, a3), q23 = _mm512_unpackhi_epi8(a2, a3);
      t[g][0] = _mm512_unpacklo_epi16(p01, p23); t[g][1] = _mm512_unpackhi_epi16(p01, p23);
      t[g][2] = _mm512_unpacklo_epi16(q01, q23); t[g][3] = _mm512_unpackhi_epi16(q01, q23);
    }
    vnni_step<G>(q, t, k, M, ih + c, il + c, wv);
  }
}

// A VNNI range's per-thread accumulators: int32 sums of the hi / lo halves (M x wv each) and the float sums
// (M x width, zeroed).
struct VnniAcc { int32_t* ih; int32_t* il; float* fa; };
static VnniAcc vnni_acc(int64_t M, int64_t wv, int64_t width) {
  thread_local std::vector<int32_t> ibuf;
  thread_local std::vector<float> fbuf;
  ibuf.resize(2 * M * wv);
  fbuf.assign(M * width, 0.f);
  return {ibuf.data(), ibuf.data() + M * wv, fbuf.data()};
}

// Activation block b's integer sums (ih / il: M rows of stride wv) into the float accumulators (fa: stride width):
// the 128-per-byte offsets of the unsigned weights taken off in int32, then (256 hi + lo) times the block's scale.
static inline void flush_block(const QuantX& q, int64_t b, int64_t M, int64_t wv, int64_t width, const int32_t* ih,
                               const int32_t* il, float* fa) {
  const __m512 two8 = _mm512_set1_ps(256.f);
  for (int64_t m = 0; m < M; ++m) {
    __m512i ch = _mm512_set1_epi32(lane_total(q.ch.data() + (m * q.blocks + b) * 16));
    __m512i cl = _mm512_set1_epi32(lane_total(q.cl.data() + (m * q.blocks + b) * 16));
    __m512 s = _mm512_set1_ps(q.sx[m * q.blocks + b]);
    for (int64_t c = 0; c < wv; c += 16) {
      __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(load512(ih + m * wv + c), ch));
      __m512 l = _mm512_cvtepi32_ps(_mm512_sub_epi32(load512(il + m * wv + c), cl));
      __m512 f = _mm512_loadu_ps(fa + m * width + c);
      _mm512_storeu_ps(fa + m * width + c, _mm512_fmadd_ps(_mm512_fmadd_ps(h, two8, l), s, f));
    }
  }
}

// (K, N) int8 weights, rows [k0, k1) (k0 a multiple of QB) and columns [n0, n1): stream_kn's contract (every
// weight byte read once, whole rows at a time, the sums to out, times scale when given), by VNNI.
static void stream_kn_vnni(const QuantX& q, const float* x, const int8_t* w, const float* scale, float* out,
                           int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  int64_t width = n1 - n0, wv = width - width % 64;
  auto [ih, il, fa] = vnni_acc(M, wv, width);
  const bool prefetch = 4 * VG * width <= PREFETCH_PASS_BYTES;
  for (int64_t b = k0 / QB; b * QB < k1; ++b) {
    int64_t kb0 = std::max(k0, b * QB), kb1 = std::min({k1, (b + 1) * QB, q.kvec});
    if (kb0 >= kb1) break;
    std::memset(ih, 0, sizeof(int32_t) * 2 * M * wv);
    int64_t k = kb0;
    for (; k + 4 * VG <= kb1; k += 4 * VG) vnni_rows<VG>(q, w + k * N + n0, N, k, wv, M, ih, il, prefetch);
    for (; k < kb1; k += 4) vnni_rows<1>(q, w + k * N + n0, N, k, wv, M, ih, il, false);
    // the rows [kb0, kb1) of a range are the whole block's vector rows (ranges start at block boundaries)
    flush_block(q, b, M, wv, width, ih, il, fa);
  }
  // rows past the vector ones (K % 4) for every column, and the ragged columns (width % 64) for every row: float32
  for (int64_t k = std::max(k0, q.kvec); k < k1; ++k)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < wv; ++j) fa[m * width + vnni_slot(j)] += x[m * K + k] * float(w[k * N + n0 + j]);
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = wv; j < width; ++j) fa[m * width + j] += x[m * K + k] * float(w[k * N + n0 + j]);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < width; ++j) {
      float v = fa[m * width + (j < wv ? vnni_slot(j) : j)];
      out[m * N + n0 + j] = scale ? v * scale[n0 + j] : v;
    }
}

// (N, K) int8 table, rows n of block `block`: block_nk's contract by VNNI (K's rows past q.kvec in float32).
static void block_nk_vnni(const QuantX& q, const float* x, const int8_t* w, const float* scale, float* y,
                          int64_t M, int64_t K, int64_t N, int64_t block) {
  int64_t n1 = std::min<int64_t>(N, (block + 1) * NB);
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const __m512 two8 = _mm512_set1_ps(256.f);
  for (int64_t n = block * NB; n < n1; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      int R = int(std::min<int64_t>(MR, M - m0));
      __m512 fa[MR];
      for (int r = 0; r < MR; ++r) fa[r] = _mm512_setzero_ps();
      for (int64_t b = 0; b * QB < q.kvec; ++b) {
        __m512i ih[MR], il[MR];
        for (int r = 0; r < MR; ++r) ih[r] = il[r] = _mm512_setzero_si512();
        for (int64_t k = b * QB; k < std::min(q.kvec, (b + 1) * QB); k += 64) {
          __m512i wv = _mm512_xor_si512(load512(row + k), flip);
          for (int r = 0; r < R; ++r) {
            ih[r] = _mm512_dpbusd_epi32(ih[r], wv, load512(q.hi.data() + (m0 + r) * q.KP + k));
            il[r] = _mm512_dpbusd_epi32(il[r], wv, load512(q.lo.data() + (m0 + r) * q.KP + k));
          }
        }
        for (int r = 0; r < R; ++r) {
          int64_t mb = (m0 + r) * q.blocks + b;
          __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(ih[r], load512(q.ch.data() + mb * 16)));
          __m512 l = _mm512_cvtepi32_ps(_mm512_sub_epi32(il[r], load512(q.cl.data() + mb * 16)));
          fa[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(h, two8, l), _mm512_set1_ps(q.sx[mb]), fa[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        float t = _mm512_reduce_add_ps(fa[r]);
        for (int64_t k = q.kvec; k < K; ++k) t += x[(m0 + r) * K + k] * float(row[k]);
        y[(m0 + r) * N + n] = scale ? t * scale[n] : t;
      }
    }
  }
}

// ---- int8 weights in the packed layout (`kernels.pack_int8`): W (K, N) stored as (K/4, N, 4), the 4 rows of K of a
// column side by side, which is vpdpbusd's operand layout. The (K, N) path above transposes 4 rows of W in registers
// for every 64 columns (4 xors, 8 byte shuffles per 256 bytes); here a 64-byte load is one operand as it lies, and a
// pass of PG groups of rows reads PG contiguous streams. A/B outside XLA, 2 threads, LLaMA-7B's MLP shapes, GB/s of
// int8 weights: 38-40 (K, N) vs 49 packed at 4096 x 11008, 37.5 vs 43 at 11008 x 4096 (a plain read: 42-54).
// Packed weights have K % 4 == 0 and N % 64 == 0 (the caller packs only such leaves); element (k, n) is at
// ((k / 4) * N + n) * 4 + k % 4.
constexpr int PG = 8;  // groups of 4 rows of W per pass over the columns at one row of x
// Each stream of a VNNI pass is prefetched this far ahead of its loads (into L1), where the earlier form prefetched
// the next pass's rows into L2. A/B in one process on the 2-core Intel Xeon host (24 alternating 4096 x 11008 and
// 11008 x 4096 int8 matrices in huge pages, one row, medians of 6 rounds; GB/s): 27.3-27.8 with 4 groups and the
// next pass prefetched, 30.9-31.1 with 4 groups and this prefetch, 31.3-31.7 with 8 groups (bf16's stream, same
// harness: 31.8); 256 bytes ahead 27.4, 768 30.8, 1024 30.8, 2048 30.5, 4096 29.6. Bit-identical results: only
// the order of loads changed.
constexpr int64_t PACKED_PREFETCH_BYTES = 512;
// A pass spanning at most this many bytes also prefetches the next pass's rows into L2, as the earlier form did:
// SmolLM2-135M's int8 decode (passes of 6-48 KB), medians of 9 alternating rounds in one process: 129.8 tok/s with
// the in-stream prefetch alone, 140.5 with the earlier form, 143.4 with both (LLaMA-7B's passes, 128 KB and up:
// in-stream only, as above).
constexpr int64_t PACKED_NEXT_PASS_BYTES = 64 << 10;

// 16 columns x 4 rows of K (64 packed bytes) -> the 4 rows as float vectors (sign-extended by shifts).
static inline void unpack_group(const int8_t* p, vf out[4]) {
  __m512i v = load512(p);
  out[0] = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)));
  out[1] = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)));
  out[2] = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)));
  out[3] = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)));
}

// One pass of G groups (4 G rows of W from row k, at g0) over `width` packed columns into the int32 accumulators
// ih / il of x's one row: x's 2 G broadcasts made once per pass, each group's 4 vectors taken into the accumulators
// as they are loaded; `next`: the next pass's rows prefetched into L2 too.
template <int G>
static inline void vnni_packed_rows(const QuantX& q, const int8_t* g0, int64_t N, int64_t k, int64_t width,
                                    int32_t* ih, int32_t* il, bool next) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i bh[G], bl[G];
  for (int g = 0; g < G; ++g) {
    bh[g] = _mm512_set1_epi32(load4(q.hi.data() + k + 4 * g));
    bl[g] = _mm512_set1_epi32(load4(q.lo.data() + k + 4 * g));
  }
  for (int64_t c = 0; c < width; c += 64) {
    if (next)
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < 4; ++i) __builtin_prefetch(g0 + ((g + G) * N + c) * 4 + 64 * i, 0, 2);
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(g0 + (g * N + c) * 4 + 64 * i + PACKED_PREFETCH_BYTES), _MM_HINT_T0);
    __m512i h[4], l[4];
    for (int i = 0; i < 4; ++i) { h[i] = load512(ih + c + 16 * i); l[i] = load512(il + c + 16 * i); }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) {
        __m512i t = _mm512_xor_si512(load512(g0 + (g * N + c) * 4 + 64 * i), flip);
        h[i] = _mm512_dpbusd_epi32(h[i], t, bh[g]);
        l[i] = _mm512_dpbusd_epi32(l[i], t, bl[g]);
      }
    for (int i = 0; i < 4; ++i) { _mm512_storeu_si512(ih + c + 16 * i, h[i]); _mm512_storeu_si512(il + c + 16 * i, l[i]); }
  }
}

// stream_kn_vnni's contract for packed weights at one row of x (VNNI_ROWS) (rows [k0, k1), k0 a multiple of QB;
// columns [n0, n1), multiples of 64).
static void stream_packed_vnni(const QuantX& q, const int8_t* w, const float* scale, float* out, int64_t K,
                               int64_t N, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  int64_t width = n1 - n0;
  auto [ih, il, fa] = vnni_acc(1, width, width);
  const bool next = 4 * PG * width <= PACKED_NEXT_PASS_BYTES;
  for (int64_t b = k0 / QB; b * QB < k1; ++b) {
    int64_t kb0 = std::max(k0, b * QB), kb1 = std::min(k1, (b + 1) * QB);
    std::memset(ih, 0, sizeof(int32_t) * 2 * width);
    int64_t k = kb0;
    for (; k + 4 * PG <= kb1; k += 4 * PG)
      vnni_packed_rows<PG>(q, w + (k / 4 * N + n0) * 4, N, k, width, ih, il, next);
    for (; k < kb1; k += 4) vnni_packed_rows<1>(q, w + (k / 4 * N + n0) * 4, N, k, width, ih, il, false);
    flush_block(q, b, 1, width, width, ih, il, fa);
  }
  for (int64_t j = 0; j < width; ++j) out[n0 + j] = scale ? fa[j] * scale[n0 + j] : fa[j];
}

// One pass of G groups (4 G rows of W, from row k) over `width` packed columns into the M x width accumulators.
template <int G>
static inline void stream_packed_rows(const float* x, const int8_t* g0, float* acc, int64_t M, int64_t K, int64_t N,
                                      int64_t k, int64_t width, bool prefetch) {
  for (int64_t j = 0; j < width; j += L) {
    vf a[4 * G];
    for (int g = 0; g < G; ++g) {
      unpack_group(g0 + (g * N + j) * 4, a + 4 * g);
      if (prefetch) __builtin_prefetch(g0 + ((g + G) * N + j) * 4, 0, 2);
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      vf even = xm[0] * a[0], odd = xm[1] * a[1];
      for (int i = 2; i < 4 * G; ++i) (i % 2 ? odd : even) += xm[i] * a[i];
      storev(acc + m * width + j, loadv(acc + m * width + j) + (even + odd));
    }
  }
}

// stream_kn's contract for packed weights, in float32 (more than VNNI_ROWS rows of x, or x with inf / NaN): 8 rows
// of W per pass, as stream_rows<8>.
static void stream_packed(const float* x, const int8_t* w, const float* scale, float* out, int64_t M, int64_t K,
                          int64_t N, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  int64_t width = n1 - n0;
  float acc[ACC] __attribute__((aligned(64)));
  std::memset(acc, 0, sizeof(float) * M * width);
  const bool prefetch = 8 * width <= PREFETCH_PASS_BYTES;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) stream_packed_rows<2>(x, w + (k / 4 * N + n0) * 4, acc, M, K, N, k, width, prefetch);
  for (; k < k1; k += 4) stream_packed_rows<1>(x, w + (k / 4 * N + n0) * 4, acc, M, K, N, k, width, false);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < width; ++j)
      out[m * N + n0 + j] = scale ? acc[m * width + j] * scale[n0 + j] : acc[m * width + j];
}

// A sliver of packed int8 W (K/4, N, 4) (prefill), a group of 4 rows at a time; N is a multiple of 64, so a
// ragged sliver is whole vectors.
static void fill_packed(const int8_t* w, int64_t N, float* b, int64_t k0, int64_t kc, int64_t col, int64_t width) {
  for (int64_t k = 0; k < kc; k += 4) {
    const int8_t* g = w + ((k0 + k) / 4 * N + col) * 4;
    for (int v = 0; v < GV; ++v) {
      vf a[4] = {};
      if (v * L < width) unpack_group(g + v * L * 4, a);
      for (int i = 0; i < 4; ++i) storev(b + (k + i) * GN + v * L, a[i]);
    }
  }
}
#else
struct QuantX {};  // x's quantization for VNNI: nothing to hold without it
#endif

// Blocks are claimed from one atomic counter by the caller and by helpers on XLA's pool; the caller waits only
// for blocks already claimed, so a helper that starts late (pool busy) finds nothing to do and never stalls it.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t blocks = 0;
  std::function<void(int64_t)> fn;
  void run() {
    for (int64_t b; (b = next.fetch_add(1)) < blocks;) {
      fn(b);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helpers linger: after its blocks a helper polls for the next call's work for `linger_ns()` before it goes back to
// XLA's pool. A decode step makes ~9 calls per layer, each a few dozen to a few hundred microseconds, with XLA's
// small ops between them; a helper that went back to the pool after every call was woken again 20-55 us after the
// next call began (a 2-core KVM guest: the idle vCPU halts), while the caller worked alone. The latest call's work
// is published in one slot (a shared_ptr: a helper holds what it works on alive); calls that overlap just get fewer
// helpers. VLLAMA_JAX_KERNEL_LINGER_US sets the time (0: helpers return at once).
static std::mutex g_slot_mu;
static std::shared_ptr<Work> g_slot;          // the latest call's work, while it runs
static std::atomic<uint64_t> g_posted{0};     // calls published so far
static std::atomic<int> g_lingering{0};       // helpers polling now

static int64_t linger_ns() {
  static const int64_t ns = [] {
    const char* v = std::getenv("VLLAMA_JAX_KERNEL_LINGER_US");
    return int64_t(v ? std::atof(v) * 1000 : 200 * 1000);
  }();
  return ns;
}

static void helper(std::shared_ptr<Work> first) {
  using clock = std::chrono::steady_clock;
  first->run();
  first.reset();
  const int64_t linger = linger_ns();
  if (linger <= 0) return;
  g_lingering.fetch_add(1);
  uint64_t seen = g_posted.load(std::memory_order_acquire);
  auto until = clock::now() + std::chrono::nanoseconds(linger);
  for (int spins = 0;; ++spins) {
    uint64_t posted = g_posted.load(std::memory_order_acquire);
    if (posted != seen) {
      seen = posted;
      std::shared_ptr<Work> w;
      {
        std::lock_guard<std::mutex> lock(g_slot_mu);
        w = g_slot;
      }
      if (w) w->run();
      until = clock::now() + std::chrono::nanoseconds(linger);
      continue;
    }
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
    if ((spins & 63) == 0 && clock::now() > until) break;
  }
  g_lingering.fetch_sub(1);
}

template <typename Fn>
static void run_blocks(ffi::ThreadPool& pool, int64_t blocks, Fn fn) {
  auto work = std::make_shared<Work>();
  work->blocks = blocks;
  work->fn = fn;
  int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), blocks) - 1);
  if (helpers > 0) {
    {
      std::lock_guard<std::mutex> lock(g_slot_mu);
      g_slot = work;
    }
    g_posted.fetch_add(1, std::memory_order_release);
    // lingering helpers take the work from the slot; the pool is asked only for the missing ones
    for (int64_t i = g_lingering.load(); i < helpers; ++i) pool.Schedule([work] { helper(work); });
  }
  work->run();
  while (work->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
  if (helpers > 0) {
    std::lock_guard<std::mutex> lock(g_slot_mu);
    if (g_slot == work) g_slot.reset();
  }
}

// The split of a decode step's product (M <= SMALL_M rows of x) over XLA's pool: blocks as wide as the accumulators
// allow (whole rows of W at batch 1: long contiguous reads, which the hardware prefetchers follow; 2048-column slices
// of rows 22 KB apart ran at half the copy bandwidth), and the rows split into ranges (multiples of `align` rows) so
// that every thread has one block; the ranges' partial sums are added after. One range per thread rather than two
// (A/B in one process, medians of 7 alternating rounds): SmolLM2-135M's decode step float32 batch 1 20.29 -> 19.87
// ms, batch 4 23.78 -> 23.14, batch 8 28.87 -> 27.96 (half the partial sums, added by one thread), int8 batch 1
// 6.49 -> 6.17; LLaMA-7B's int8 and bf16 shapes unchanged (32.6 vs 32.7, 32.5 vs 32.7 GB/s). fn(out, scale, n0, n1,
// k0, k1) streams one block into out (row stride N), times scale when it is given.
using StreamFn = std::function<void(float*, const float*, int64_t, int64_t, int64_t, int64_t)>;
struct Stream {
  StreamFn fn;
  const float* scale;
  float* y;
  int64_t M, K, N, width, col_blocks, row_blocks, rows;
  std::unique_ptr<float[]> part;  // the row ranges' partial sums (row_blocks > 1)
  int64_t blocks() const { return col_blocks * row_blocks; }
};

static Stream plan_stream(int64_t threads, int64_t M, int64_t K, int64_t N, int64_t align, const float* scale,
                          float* y, StreamFn fn) {
  Stream s{std::move(fn), scale, y, M, K, N, 0, 0, 0, 0, nullptr};
  threads = std::max<int64_t>(1, threads);
  s.width = std::min<int64_t>(N, std::max<int64_t>(64, ACC / M / 64 * 64));
  s.col_blocks = (N + s.width - 1) / s.width;
  s.row_blocks = std::min<int64_t>(std::max<int64_t>(1, (threads + s.col_blocks - 1) / s.col_blocks),
                                   std::max<int64_t>(1, K / 64));
  s.rows = (K + s.row_blocks - 1) / s.row_blocks;
  s.rows = (s.rows + align - 1) / align * align;
  s.row_blocks = (K + s.rows - 1) / s.rows;
  if (s.row_blocks > 1) s.part.reset(new float[s.row_blocks * M * N]);
  return s;
}

// The blocks of one or more products in one dispatch: with several (q, k and v; gate and up: the same x), the threads
// go from one weight's blocks to the next without meeting in between. SmolLM2-135M's 30 layers of them in a chain,
// A/B of two builds in one process (medians of 7): batch 1 11.3-11.7 -> 11.0-11.5 ms, batch 8 within noise; its
// whole batch-8 decode step 213.6 -> 223.5 tok/s (medians of 5 alternating runs).
static void run_streams(ffi::ThreadPool& pool, std::vector<Stream>& streams) {
  std::vector<int64_t> first(streams.size() + 1, 0);
  for (size_t i = 0; i < streams.size(); ++i) first[i + 1] = first[i] + streams[i].blocks();
  const Stream* sp = streams.data();
  const int64_t* fp = first.data();
  run_blocks(pool, first.back(), [=](int64_t b) {
    size_t i = 0;
    while (b >= fp[i + 1]) ++i;
    const Stream& s = sp[i];
    const int64_t r = (b - fp[i]) / s.col_blocks, n0 = (b - fp[i]) % s.col_blocks * s.width;
    const int64_t n1 = std::min(s.N, n0 + s.width);
    if (s.row_blocks == 1) return s.fn(s.y, s.scale, n0, n1, 0, s.K);
    s.fn(s.part.get() + r * s.M * s.N, nullptr, n0, n1, r * s.rows, std::min(s.K, (r + 1) * s.rows));
  });
  for (const Stream& s : streams) {
    if (s.row_blocks == 1) continue;
    // row by row, so that the additions run in vectors (in the same order as before)
    const int64_t size = s.M * s.N;
    for (int64_t m = 0; m < s.M; ++m) {
      float* __restrict__ y = s.y + m * s.N;
      const float* p0 = s.part.get() + m * s.N;
      for (int64_t n = 0; n < s.N; ++n) y[n] = p0[n];
      for (int64_t r = 1; r < s.row_blocks; ++r) {
        const float* __restrict__ pr = p0 + r * size;
        for (int64_t n = 0; n < s.N; ++n) y[n] += pr[n];
      }
      if (s.scale)
        for (int64_t n = 0; n < s.N; ++n) y[n] *= s.scale[n];
    }
  }
}

// A decode step's product by W (K, N) as stored (or int8 packed (K/4, N, 4) on VNNI builds): VNNI at one row of int8
// weights (x quantized into q, which the stream reads while it runs), float32 widening otherwise.
template <typename W>
static Stream decode_stream(int64_t threads, const float* x, const W* w, bool packed, const float* scale, float* y,
                            int64_t M, int64_t K, int64_t N, QuantX& q) {
  StreamFn fn;
  int64_t align = 4;
#ifdef VLLAMA_VNNI
  if constexpr (std::is_same_v<W, int8_t>) {
    const QuantX* qp = &q;
    if (packed && M == 1 && quantize_x(x, M, K, K, q)) {  // VNNI_ROWS: the packed pass is written for one row
      align = QB;
      fn = [=](float* out, const float* s, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
        stream_packed_vnni(*qp, w, s, out, K, N, n0, n1, k0, k1);
      };
    } else if (packed) {
      fn = [=](float* out, const float* s, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
        stream_packed(x, w, s, out, M, K, N, n0, n1, k0, k1);
      };
    } else if (M <= VNNI_ROWS && K >= 4 && N >= 64 && quantize_x(x, M, K, K / 4 * 4, q)) {
      align = QB;
      fn = [=](float* out, const float* s, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
        stream_kn_vnni(*qp, x, w, s, out, M, K, N, n0, n1, k0, k1);
      };
    }
  }
#endif
  if (!fn)
    fn = [=](float* out, const float* s, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
      stream_kn<W>(x, w, s, out, M, K, N, n0, n1, k0, k1);
    };
  return plan_stream(threads, M, K, N, align, scale, y, std::move(fn));
}

static void run_stream(ffi::ThreadPool& pool, Stream s) {
  std::vector<Stream> one;
  one.push_back(std::move(s));
  run_streams(pool, one);
}

// The prefill product over the pool: W's slivers shared out evenly into column blocks of at most ~GEMM_NC columns,
// as many blocks as a multiple of the threads (11 blocks of 384 columns over 2 threads left one idle for a twelfth
// of a 4096-column product: an int8 one of 24 rows ran 9% slower than the panels before).
template <typename Fill>
static void gemm(ffi::ThreadPool& pool, const float* x, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                 int64_t kalign, Fill fill) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads()), slivers = (N + GN - 1) / GN;
  int64_t blocks = (slivers * GN + GEMM_NC - 1) / GEMM_NC;
  blocks = std::min(slivers, (blocks + threads - 1) / threads * threads);
  run_blocks(pool, blocks, [=](int64_t b) {
    const int64_t n0 = b * slivers / blocks * GN, n1 = std::min(N, (b + 1) * slivers / blocks * GN);
    gemm_block(x, scale, y, M, K, N, n0, n1, kalign, fill);
  });
}
template <typename W>
static void dispatch(ffi::ThreadPool& pool, const float* x, const void* wv, const float* scale, float* y, int64_t M,
                     int64_t K, int64_t N, bool nk) {
  const W* w = static_cast<const W*>(wv);
#ifdef VLLAMA_VNNI
  if constexpr (std::is_same_v<W, int8_t>) {
    QuantX q;
    if (nk && K >= VNNI_TABLE_MIN_K && quantize_x(x, M, K, K / 64 * 64, q)) {
      const QuantX* qp = &q;
      run_blocks(pool, (N + NB - 1) / NB, [=](int64_t b) { block_nk_vnni(*qp, x, w, scale, y, M, K, N, b); });
      return;
    }
  }
#endif
  if (nk) {
    run_blocks(pool, (N + NB - 1) / NB, [=](int64_t b) { block_nk<W>(x, w, scale, y, M, K, N, b); });
  } else if (M <= SMALL_M) {
    QuantX q;
    run_stream(pool, decode_stream<W>(pool.num_threads(), x, w, false, scale, y, M, K, N, q));
  } else {
    gemm(pool, x, scale, y, M, K, N, 1, [=](float* b, int64_t k0, int64_t kc, int64_t col, int64_t width) {
      fill_kn<W>(w, N, b, k0, kc, col, width);
    });
  }
}

#ifdef VLLAMA_VNNI
// Packed int8 weights (K/4, N, 4): VNNI at one row of x, the float32 streaming path up to SMALL_M rows, the
// slivers of `gemm` above.
static void dispatch_packed(ffi::ThreadPool& pool, const float* x, const int8_t* w, const float* scale, float* y,
                            int64_t M, int64_t K, int64_t N) {
  if (M <= SMALL_M) {
    QuantX q;
    run_stream(pool, decode_stream<int8_t>(pool.num_threads(), x, w, true, scale, y, M, K, N, q));
  } else {
    gemm(pool, x, scale, y, M, K, N, 4, [=](float* b, int64_t k0, int64_t kc, int64_t col, int64_t width) {
      fill_packed(w, N, b, k0, kc, col, width);
    });
  }
}
#endif

// ---- Attention over a KV cache: scores, softmax and values in one call ------------------------------------------
// softmax(q k^T * scale + bias) v for every (row, query, head), q (B, Lq, H, D) f32 in its own layout (no
// transposition into KV-head-major order), k and v (B, Hkv, S, D) as the cache stores them, bias (Bb, Hb, Lq, S) f32
// (Bb in {1, B}, Hb in {1, H}) -> out (B, Lq, H, D) f32. Each (query, head) is one row: its scores go to a scratch
// row that stays in L1, so the three steps cost one pass over the keys and one over the values. XLA ran them as
// separate programs (SmolLM2-135M's 128-token prefill: q's transposition, the scores, the softmax's two reductions,
// the probabilities' division and the output's transposition, 24 ms of ~160 summed over the 30 layers; a decode step
// two kernel calls per layer with the softmax between them).
// Keys whose bias is -FLT_MAX or below (the causal and padding mask: finfo.min) are skipped at both ends of a row:
// their probabilities are exactly 0 beside any allowed key (exp underflows), so a causal prefill reads each row's
// allowed prefix only. A row with no allowed key takes every key, as the unfused softmax does.

// exp of each lane: Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial in r, times 2^n; within
// 2 ulp), 0 below the smallest normal result (probabilities of masked keys come out exactly 0); NaN stays NaN.
static inline vf exp_lanes(vf x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f, magic = 12582912.f;  // magic: 1.5 * 2^23
  vf c = x > hi ? vf{} + hi : x;
  c = c < lo ? vf{} + lo : c;
  vf n = (c * 1.44269504088896341f + magic) - magic;  // round to nearest
  vf r = c - n * 0.693359375f + n * 2.12194440e-4f;   // ln 2 in two parts
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &e, sizeof(vf));
  vf y = p * two_n;
  return x < lo ? vf{} : y;
}

// Whether any lane of a comparison's result is set; the largest lane; the sum of the lanes.
static inline bool any_lane(vi m) {
#if defined(__AVX512F__)
  __m512i x;
  std::memcpy(&x, &m, sizeof(x));
  return _mm512_test_epi32_mask(x, x) != 0;
#elif defined(__AVX2__)
  __m256i x;
  std::memcpy(&x, &m, sizeof(x));
  return !_mm256_testz_si256(x, x);
#else
  for (int i = 0; i < L; ++i)
    if (m[i]) return true;
  return false;
#endif
}
static inline float max_lanes(vf v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_max_ps(x);
#else
  float m = v[0];
  for (int i = 1; i < L; ++i) m = std::max(m, v[i]);
  return m;
#endif
}
static inline float sum_lanes(vf v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  return _mm512_reduce_add_ps(x);
#else
  float t = 0.f;
  for (int i = 0; i < L; ++i) t += v[i];
  return t;
#endif
}

// Lanes rounded to bfloat16 / float16 precision (kept as float32), to nearest even: the probabilities before a
// half-precision values' product (`probs.astype(v.dtype)`), and in upstream's arithmetic the scores
// (`layers.round_to`).
enum Rounding : int64_t { NO_ROUNDING = 0, BF16_ROUNDING = 1, F16_ROUNDING = 2 };
static inline vf round_bf16(vf p) {  // the high half of the float32, rounded (inf stays inf, a quiet NaN NaN)
  vi u;
  std::memcpy(&u, &p, sizeof(vf));
  u = (u + 0x7fff + ((u >> 16) & 1)) & int32_t(0xffff0000u);
  std::memcpy(&p, &u, sizeof(vf));
  return p;
}
static inline vf round_f16(vf p) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &p, sizeof(x));
  x = _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  std::memcpy(&p, &x, sizeof(x));
#elif defined(__F16C__) && defined(__AVX2__)
  __m256 x;
  std::memcpy(&x, &p, sizeof(x));
  x = _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  std::memcpy(&p, &x, sizeof(x));
#else
  for (int i = 0; i < L; ++i) {  // onto float16's grid by a magic sum; past its largest value, infinity
    const float a = std::fabs(p[i]);
    if (!(a > 0.f) || std::isinf(a)) continue;
    if (a >= 65520.f) {
      p[i] = std::copysign(std::numeric_limits<float>::infinity(), p[i]);
      continue;
    }
    int e;
    std::frexp(a, &e);                                                 // a in [2^(e-1), 2^e): 10 bits below
    const float magic = std::ldexp(1.5f, std::max(e - 1, -14) + 13);  // 1.5 * 2^23 ulps (subnormal: 2^-24)
    volatile float t = p[i] + magic;                                   // volatile: both roundings stay
    p[i] = t - magic;
  }
#endif
  return p;
}
static inline vf round_to(vf p, int64_t mode) {
  return mode == BF16_ROUNDING ? round_bf16(p) : mode == F16_ROUNDING ? round_f16(p) : p;
}
template <typename W>
constexpr Rounding rounding_of() {
  return std::is_same_v<W, uint16_t> ? BF16_ROUNDING : std::is_same_v<W, half_t> ? F16_ROUNDING : NO_ROUNDING;
}

// One value stored as float32, bfloat16 or float16, rounded to nearest even (bfloat16: a quiet NaN stays NaN).
static inline void store1(float* p, float f) { *p = f; }
static inline void store1(uint16_t* p, float f) {
  const uint32_t u = bit_cast_u32(f);
  *p = uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static inline void store1(half_t* p, float f) {
#if defined(__F16C__)
  p->bits = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  uint32_t u = bit_cast_u32(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  u &= 0x7fffffff;
  if (u > 0x7f800000) {
    p->bits = sign | 0x7e00;  // NaN
  } else if (u >= 0x477ff000) {
    p->bits = sign | 0x7c00;  // 65520 and above round to infinity
  } else if (u >= 0x38800000) {  // float16's normal range: round away the 13 low bits of the mantissa
    p->bits = sign | uint16_t((u + 0x0fff + ((u >> 13) & 1) - 0x38000000) >> 13);
  } else {  // subnormal: a multiple of 2^-24 (scaling by 2^24 is exact)
    float a;
    std::memcpy(&a, &u, 4);
    p->bits = sign | uint16_t(std::nearbyint(a * 16777216.f));
  }
#endif
}

// A vector stored as bfloat16 / float16 (rounded to nearest even) or float32.
static inline void store_as(float* p, vf v) { storev(p, v); }
static inline void store_as(uint16_t* p, vf v) { store_bf16(p, round_bf16(v)); }
static inline void store_as(half_t* p, vf v) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof(x));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && defined(__AVX2__)
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < L; ++i) store1(p + i, v[i]);
#endif
}

// RoPE in the rotate-half convention of one head row x (D floats, D even) -> out: the first half
// x[d] cos[d] - x[d + D/2] sin[d], the second x[d] cos[d] + x[d - D/2] sin[d] (`models.layers.apply_rope`; cos and
// sin come rounded to the rows' dtype). `mode` (`Rounding`): each product and the sum rounded to bfloat16 / float16,
// as XLA's CPU programs evaluate the rotation in those dtypes, op by op.
static inline void rope_row(const float* x, const float* c, const float* s, int64_t D, int64_t mode, float* out) {
  const int64_t h = D / 2;
  int64_t i = 0;
  for (; i + L <= h; i += L) {
    const vf x1 = loadv(x + i), x2 = loadv(x + h + i);
    const vf lo = round_to(x1 * loadv(c + i), mode) - round_to(x2 * loadv(s + i), mode);
    const vf hi = round_to(x2 * loadv(c + h + i), mode) + round_to(x1 * loadv(s + h + i), mode);
    storev(out + i, round_to(lo, mode));
    storev(out + h + i, round_to(hi, mode));
  }
  auto r = [mode](float f) { return round_to(vf{} + f, mode)[0]; };
  for (; i < h; ++i) {
    out[i] = r(r(x[i] * c[i]) - r(x[h + i] * s[i]));
    out[h + i] = r(r(x[h + i] * c[h + i]) + r(x[i] * s[h + i]));
  }
}

// The allowed keys of one bias row: [lo, hi) from the first to the last key whose bias is above -FLT_MAX, or every
// key when none is. Whole vectors are tested from each end (a causal row's masked tail is most of the row).
static inline void allowed_range(const float* bias, int64_t S, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = S;
  if (!bias) return;
  const float masked = -std::numeric_limits<float>::max();
  auto any_allowed = [&](int64_t at) { return any_lane(loadv(bias + at) > masked); };
  while (hi >= L && !any_allowed(hi - L)) hi -= L;
  while (hi > 0 && bias[hi - 1] <= masked) --hi;
  if (hi == 0) {  // every key masked
    hi = S;
    return;
  }
  while (lo + L <= hi && !any_allowed(lo)) lo += L;
  while (bias[lo] <= masked) ++lo;
}

// The largest head size taken (a row of q lives in registers; `kernels.ATTENTION_MAX_HEAD_DIM` on the Python side).
constexpr int64_t ATTEND_MAX_D = 256;

struct AttendArgs {
  const float* q;
  const void* k;
  const void* v;
  const float* bias;  // nullptr: none
  float* out;
  int64_t B, Lq, H, Hkv, S, D, Bb, Hb;
  float scale, inv_scale;  // inv_scale: 1 / scale as the caller rounds it (the rounded scores are divided by it)
  int64_t round_scores;  // `Rounding`: upstream's half-precision scores (rounded after the product and the scaling)
  const float* cos = nullptr;  // RoPE of q as its rows are loaded, (B, Lq, D) each; nullptr: q comes rotated
  const float* sin = nullptr;
  int64_t round_q = NO_ROUNDING;  // `Rounding`: the rotated q rounded to its dtype
  const float* bias_row(int64_t b, int64_t h, int64_t l) const {
    return bias ? bias + (((Bb > 1 ? b : 0) * Hb + (Hb > 1 ? h : 0)) * Lq + l) * S : nullptr;
  }
  // a product's sums (vector of L) -> scores: scaled, or in upstream's rounding (the caller adds the bias)
  vf scores(vf dot) const {
    return round_scores ? round_to(round_to(dot, round_scores) / inv_scale, round_scores) : dot * scale;
  }
};

// One row's softmax over its n scores s[0 .. n) (keys lo .. lo + n; s has room for a whole last vector) and the
// values' product into orow. Half-precision values take the probabilities rounded to their dtype; float32 values the
// unnormalised exponentials, the sums divided once at the end (D divisions per row instead of one per key).
template <typename W, int DV>
static void softmax_values(float* s, int64_t n, const W* v, int64_t D, float* orow) {
  constexpr int MAXV = ATTEND_MAX_D / L;
  const int64_t dv = DV ? DV : D / L, nv = (n + L - 1) / L;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i = n; i < nv * L; ++i) s[i] = ninf;  // the last vector's padding: exp gives 0
  vf mv = loadv(s);
  for (int64_t i = 1; i < nv; ++i) {
    vf x = loadv(s + i * L);
    mv = x > mv ? x : mv;
  }
  const float m = max_lanes(mv);
  vf sum = vf{};
  for (int64_t i = 0; i < nv; ++i) {
    vf e = exp_lanes(loadv(s + i * L) - m);
    storev(s + i * L, e);
    sum += e;
  }
  const float total = sum_lanes(sum);
  constexpr bool rounded = !std::is_same_v<W, float>;
  if constexpr (rounded)
    for (int64_t i = 0; i < nv; ++i) storev(s + i * L, round_to(loadv(s + i * L) / total, rounding_of<W>()));
  // two sets of accumulators (even and odd keys) keep the multiply-add chains short
  vf o0[MAXV], o1[MAXV];
  for (int64_t d = 0; d < dv; ++d) o0[d] = o1[d] = vf{};
  int64_t i = 0;
  for (; i + 2 <= n; i += 2, v += 2 * D) {
    const float p0 = s[i], p1 = s[i + 1];
    for (int64_t d = 0; d < dv; ++d) {
      o0[d] += p0 * loadv(v + d * L);
      o1[d] += p1 * loadv(v + D + d * L);
    }
  }
  if (i < n)
    for (int64_t d = 0; d < dv; ++d) o0[d] += s[i] * loadv(v + d * L);
  for (int64_t d = 0; d < dv; ++d) storev(orow + d * L, rounded ? o0[d] + o1[d] : (o0[d] + o1[d]) / total);
}

// Query rows [l0, l1) of row b and head h, each against its allowed keys, L keys at a time (one vector
// of L sums per `lane_sums`; the last vector's missing keys sum to 0). DV: vectors per head row (D / L); 0 reads it
// at run time.
template <typename W, int DV>
static void attend_rows(const AttendArgs& a, int64_t b, int64_t h, int64_t l0, int64_t l1) {
  constexpr int MAXV = ATTEND_MAX_D / L;
  const int64_t dv = DV ? DV : a.D / L, D = a.D, g = h / (a.H / a.Hkv);
  const W* k = static_cast<const W*>(a.k) + (b * a.Hkv + g) * a.S * D;
  const W* v = static_cast<const W*>(a.v) + (b * a.Hkv + g) * a.S * D;
  thread_local std::vector<float> scratch;
  if (int64_t(scratch.size()) < a.S + L) scratch.resize(a.S + L);
  float* s = scratch.data();
  for (int64_t l = l0; l < l1; ++l) {
    const float* qr = a.q + ((b * a.Lq + l) * a.H + h) * D;
    const float* br = a.bias_row(b, h, l);
    int64_t lo, hi;
    allowed_range(br, a.S, lo, hi);
    const int64_t n = hi - lo;
    vf qv[MAXV];
    if (a.cos) {
      alignas(64) float rotated[ATTEND_MAX_D];
      rope_row(qr, a.cos + (b * a.Lq + l) * D, a.sin + (b * a.Lq + l) * D, D, a.round_q, rotated);
      for (int64_t d = 0; d < dv; ++d) qv[d] = loadv(rotated + d * L);
    } else {
      for (int64_t d = 0; d < dv; ++d) qv[d] = loadv(qr + d * L);
    }
    for (int64_t j = 0; j < n; j += L) {
      const int64_t cnt = std::min<int64_t>(L, n - j);
      vf acc[L];
      for (int t = 0; t < L; ++t) {
        if (t >= cnt) {
          acc[t] = vf{};
          continue;
        }
        const W* row = k + (lo + j + t) * D;
        vf x = qv[0] * loadv(row);
        for (int64_t d = 1; d < dv; ++d) x += qv[d] * loadv(row + d * L);
        acc[t] = x;
      }
      vf sc = a.scores(lane_sums(acc));
      if (br && cnt == L) {
        sc += loadv(br + lo + j);
      } else if (br) {
        for (int t = 0; t < cnt; ++t) sc[t] += br[lo + j + t];
      }
      storev(s + j, sc);
    }
    softmax_values<W, DV>(s, n, v + lo * D, D, a.out + ((b * a.Lq + l) * a.H + h) * D);
  }
}

// Work items of (row, head, block of query rows), taken from XLA's pool in turn (a causal prefill's later blocks
// cost more). A/B of a version that first transposed each (row, KV head)'s keys into float32 panels of 32 keys and
// took the scores of 4 query rows x 32 keys as register tiles (no horizontal sums): no faster at SmolLM2-135M's or
// LLaMA-2-7B's prefill shapes (the rows' softmax, values and the transposition itself weigh as much), so one path.
constexpr int64_t ATTEND_ROWS = 16;
template <typename W, int DV>
static void attend_all(ffi::ThreadPool& pool, const AttendArgs& a) {
  const AttendArgs* ap = &a;
  const int64_t group = a.H / a.Hkv;
  if (a.Lq == 1 && group > 1 && a.B * a.Hkv >= 2 * std::max<int64_t>(1, pool.num_threads())) {
    // A decode step with enough (row, KV head) pairs to go round: one item per pair, its heads in turn, so that the
    // keys and values the first reads from memory are still in L2 for the others. SmolLM2-135M at batch 8, the 30
    // calls of a step: 4.7 -> 3.0 ms (~19 GB/s of cache; a software prefetch 16 or 32 slots ahead changed nothing).
    run_blocks(pool, a.B * a.Hkv, [=](int64_t i) {
      for (int64_t h = (i % ap->Hkv) * group, e = h + group; h < e; ++h) attend_rows<W, DV>(*ap, i / ap->Hkv, h, 0, 1);
    });
    return;
  }
  const int64_t blocks = (a.Lq + ATTEND_ROWS - 1) / ATTEND_ROWS;
  run_blocks(pool, a.B * a.H * blocks, [=](int64_t i) {
    const int64_t r = i % blocks, bh = i / blocks;
    attend_rows<W, DV>(*ap, bh / ap->H, bh % ap->H, r * ATTEND_ROWS, std::min(ap->Lq, (r + 1) * ATTEND_ROWS));
  });
}

template <typename W>
static void attend_dispatch(ffi::ThreadPool& pool, const AttendArgs& a) {
  switch (a.D / L) {
    case 4: return attend_all<W, 4>(pool, a);
    case 8: return attend_all<W, 8>(pool, a);
    default: return attend_all<W, 0>(pool, a);
  }
}

static ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                ffi::ResultBuffer<ffi::F32> out, float scale, float inv_scale, int64_t round_scores,
                                int64_t round_q) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attention: q, k and v must be 4-D");
  AttendArgs a{q.typed_data(), k.untyped_data(), v.untyped_data(), nullptr, out->typed_data(),
               qd[0], qd[1], qd[2], kd[1], kd[2], qd[3], 1, 1, scale, inv_scale, round_scores};
  for (size_t i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("attention: k and v differ in shape");
  if (k.element_type() != v.element_type()) return ffi::Error::InvalidArgument("attention: k and v differ in dtype");
  if (kd[0] != a.B || kd[3] != a.D || a.Hkv < 1 || a.H % a.Hkv)
    return ffi::Error::InvalidArgument("attention: q (B, Lq, H, D) and the cache (B, Hkv, S, D) do not match");
  if (a.D <= 0 || a.D % L || a.D > ATTEND_MAX_D)
    return ffi::Error::InvalidArgument("attention: head_dim must be a multiple of the lanes, at most 256");
  if (bias.element_count()) {
    if (bd.size() != 4 || (bd[0] != 1 && bd[0] != a.B) || (bd[1] != 1 && bd[1] != a.H) || bd[2] != a.Lq || bd[3] != a.S)
      return ffi::Error::InvalidArgument("attention: bias must be (B or 1, H or 1, Lq, S)");
    a.bias = bias.typed_data();
    a.Bb = bd[0];
    a.Hb = bd[1];
  }
  if (cos.element_count()) {
    auto cd = cos.dimensions(), sd = sin.dimensions();
    if (cd.size() != 3 || sd.size() != 3 || cd[0] != a.B || cd[1] != a.Lq || cd[2] != a.D || sd[0] != a.B ||
        sd[1] != a.Lq || sd[2] != a.D || a.D % 2)
      return ffi::Error::InvalidArgument("attention: cos and sin must be (B, Lq, D), D even");
    a.cos = cos.typed_data();
    a.sin = sin.typed_data();
    a.round_q = round_q;
  }
  if (a.S == 0) {
    std::memset(a.out, 0, sizeof(float) * a.B * a.Lq * a.H * a.D);
    return ffi::Error::Success();
  }
  switch (k.element_type()) {
    case ffi::DataType::F32: attend_dispatch<float>(pool, a); break;
    case ffi::DataType::BF16: attend_dispatch<uint16_t>(pool, a); break;
    case ffi::DataType::F16: attend_dispatch<half_t>(pool, a); break;
    default: return ffi::Error::InvalidArgument("attention: the cache must be f32, bf16 or f16");
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VllamaAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("inv_scale")
                                  .Attr<int64_t>("round_scores")
                                  .Attr<int64_t>("round_q"));

// x (M, K) f32; w (K, N) or (N, K) f32/bf16/f16/s8; scale (N,) f32 or (0,) for none; y (M, N) f32.
static ffi::Error WMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                              ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, bool nk) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() == 2 && wd.size() == 3 && w.element_type() == ffi::DataType::S8 && wd[2] == 4) {
    // int8 weights in the packed layout (K/4, N, 4)
#ifdef VLLAMA_VNNI
    int64_t M = xd[0], K = xd[1], N = wd[1];
    if (nk) return ffi::Error::InvalidArgument("wmatmul: packed int8 weights are (K, N) matrices, not tables");
    if (wd[0] * 4 != K) return ffi::Error::InvalidArgument("wmatmul: contraction sizes differ");
    if (N % 64) return ffi::Error::InvalidArgument("wmatmul: packed int8 weights need N % 64 == 0");
    const float* s = scale.element_count() ? scale.typed_data() : nullptr;
    if (s && int64_t(scale.element_count()) != N) return ffi::Error::InvalidArgument("wmatmul: scale must be (N,)");
    dispatch_packed(pool, x.typed_data(), static_cast<const int8_t*>(w.untyped_data()), s, y->typed_data(), M, K, N);
    return ffi::Error::Success();
#else
    return ffi::Error::InvalidArgument("wmatmul: packed int8 weights need a build with AVX-512 VNNI");
#endif
  }
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

// Several weights, one x, one dispatch (a decode step's q, k and v; gate and up): args w_0, scale_0, w_1, scale_1,
// ... ((K, N) f32/bf16/f16/s8, or packed int8 on VNNI builds; scale (N,) or (0,)), results y_i (M, N_i) f32; M <=
// SMALL_M. Each product as `VllamaWMatmul` computes it, their blocks streamed back to back (`run_streams`).
static ffi::Error WMatmulManyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                                  ffi::RemainingRets rets) {
  auto xd = x.dimensions();
  const size_t n = rets.size();
  if (xd.size() != 2 || args.size() != 2 * n)
    return ffi::Error::InvalidArgument("wmatmul_many: x must be 2-D, with a weight and a scale per result");
  const int64_t M = xd[0], K = xd[1];
  if (M > SMALL_M) return ffi::Error::InvalidArgument("wmatmul_many: a decode step's rows only (M <= 16)");
  std::vector<QuantX> quant(n);  // the streams read them while they run: never reallocated
  std::vector<Stream> streams;
  for (size_t i = 0; i < n; ++i) {
    auto w = args.get<ffi::AnyBuffer>(2 * i);
    auto sc = args.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !sc.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("wmatmul_many: weights and results must be arrays, scales float32");
    auto wd = w->dimensions();
    const bool packed = wd.size() == 3 && w->element_type() == ffi::DataType::S8 && wd[2] == 4;
    if (!packed && wd.size() != 2) return ffi::Error::InvalidArgument("wmatmul_many: weights must be (K, N)");
    const int64_t N = wd[1];
    if ((packed ? 4 * wd[0] : wd[0]) != K) return ffi::Error::InvalidArgument("wmatmul_many: contraction sizes differ");
    const float* s = sc->element_count() ? sc->typed_data() : nullptr;
    if (s && int64_t(sc->element_count()) != N) return ffi::Error::InvalidArgument("wmatmul_many: scale must be (N,)");
    auto yd = (*y)->dimensions();
    if (yd.size() != 2 || yd[0] != M || yd[1] != N)
      return ffi::Error::InvalidArgument("wmatmul_many: each result must be (M, N) of its weight");
    float* out = (*y)->typed_data();
    const void* wp = w->untyped_data();
    auto add = [&](auto type) {  // this weight's stream, read as its element type
      using W = decltype(type);
      streams.push_back(decode_stream(pool.num_threads(), x.typed_data(), static_cast<const W*>(wp), packed, s, out, M,
                                      K, N, quant[i]));
    };
    switch (w->element_type()) {
      case ffi::DataType::F32: add(float{}); break;
      case ffi::DataType::BF16: add(uint16_t{}); break;
      case ffi::DataType::F16: add(half_t{}); break;
      case ffi::DataType::S8:
#ifndef VLLAMA_VNNI
        if (packed) return ffi::Error::InvalidArgument("wmatmul_many: packed int8 weights need AVX-512 VNNI");
#endif
        add(int8_t{});
        break;
      default:
        return ffi::Error::InvalidArgument("wmatmul_many: weights must be f32, bf16, f16 or s8");
    }
  }
  run_streams(pool, streams);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VllamaWMatmulMany, WMatmulManyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

// The float lanes of one vector in this build (16 with AVX-512, 8 otherwise): the Python side picks, by width, the
// row counts at which float32 weights go through this kernel rather than XLA's dot (`models.layers`).
extern "C" int VllamaWMatmulLanes() { return L; }

// The CPU's vendor (1 Intel, 2 AMD, 0 other or not x86): XLA's own dot of a few rows is faster than this kernel's on
// some cores and slower on others at the same vector width (`models.layers.F32_KERNEL_ROWS`).
extern "C" int VllamaCpuVendor() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return 1;
  if (__builtin_cpu_is("amd")) return 2;
#endif
  return 0;
}

// Whether the CPU has AMX with bfloat16 tiles (this build is for the machine it runs on, -march=native): there XLA's
// own dot multiplies bf16 by bf16 in the tiles, several times this kernel's float32 multiply-adds once a product
// has a few dozen rows (`models.layers.BF16_XLA_MIN_ROWS`).
extern "C" int VllamaCpuAmxBf16() {
#ifdef __AMX_BF16__
  return 1;
#else
  return 0;
#endif
}

// Whether this build multiplies int8 weights in the packed layout (`kernels.pack_int8`): AVX-512 VNNI.
extern "C" int VllamaWMatmulPackedInt8() {
#ifdef VLLAMA_VNNI
  return 1;
#else
  return 0;
#endif
}

// int8 W (K, N) row-major -> the packed layout (K/4, N, 4) (`kernels.pack_int8`) for the groups of 4 rows [g0, g1),
// into memory the caller owns (`kernels.pack_int8_into`: the engine's packed weights go straight into huge pages,
// where XLA's transposition wrote a fresh 4 KiB-paged buffer that then had to be copied). Requires N % 16 == 0.
extern "C" void VllamaPackInt8(const int8_t* w, int8_t* out, int64_t N, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* r = w + 4 * g * N;
    int8_t* o = out + 4 * g * N;
#if defined(__SSE2__)
    for (int64_t n = 0; n < N; n += 16) {
      __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + n));
      __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + N + n));
      __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * N + n));
      __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 3 * N + n));
      __m128i lo01 = _mm_unpacklo_epi8(a0, a1), hi01 = _mm_unpackhi_epi8(a0, a1);  // columns 0-7, 8-15 of rows 0, 1
      __m128i lo23 = _mm_unpacklo_epi8(a2, a3), hi23 = _mm_unpackhi_epi8(a2, a3);
      __m128i* d = reinterpret_cast<__m128i*>(o + 4 * n);
      _mm_storeu_si128(d, _mm_unpacklo_epi16(lo01, lo23));      // columns 0-3, their 4 rows side by side
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(lo01, lo23));  // 4-7
      _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(hi01, hi23));  // 8-11
      _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(hi01, hi23));  // 12-15
    }
#else
    for (int64_t n = 0; n < N; ++n)
      for (int i = 0; i < 4; ++i) o[4 * n + i] = r[i * N + n];
#endif
  }
}

// ---- A decode step's greedy pick: each row's argmax, and the log-softmax of the logits at a token ---------------
// XLA's CPU argmax (a scalar variadic reduction) took 0.65 ms alone over SmolLM2-135M's (8, 49152) logits, 0.19 ms
// over one row. Its batch-8 float32 decode step, medians of 7 alternating rounds in one process: 30.10 -> 29.57 ms
// with these two passes (batch 1, float32 and int8, within noise).

// The first index of the largest value of x[0 .. V); a NaN counts as the largest (the first NaN), as in
// jnp.argmax. Lanes keep their first maximum, so ties across lanes go to the smallest index.
static int64_t row_argmax(const float* x, int64_t V) {
  int64_t best = 0, n = 0;
  bool nan = false;
  if (V >= L) {
    vi idx;
    for (int t = 0; t < L; ++t) idx[t] = t;
    vf bv = loadv(x);
    vi bi = idx, seen = bv != bv;
    for (n = L; n + L <= V; n += L) {
      const vf v = loadv(x + n);
      const vi gt = v > bv;
      bv = gt ? v : bv;
      bi = gt ? idx + int32_t(n) : bi;
      seen |= v != v;
    }
    nan = any_lane(seen);
    for (int t = 1; t < L; ++t)
      if (bv[t] > bv[0] || (bv[t] == bv[0] && bi[t] < bi[0])) {
        bv[0] = bv[t];
        bi[0] = bi[t];
      }
    best = bi[0];
  }
  for (; n < V; ++n) {
    if (x[n] != x[n]) nan = true;
    if (x[n] > x[best]) best = n;
  }
  if (nan)
    for (int64_t i = 0; i < V; ++i)
      if (x[i] != x[i]) return i;
  return best;
}

// log_softmax(x)[i] over x[0 .. V) as jax.nn.log_softmax computes it: (x[i] - max) - log(sum(exp(x - max))), NaN
// when the row holds a NaN or its largest value is infinite.
static float row_log_softmax_at(const float* x, int64_t V, int64_t i) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf mv = vf{} + ninf;
  bool nan = false;
  int64_t n = 0;
  for (; n + L <= V; n += L) {
    const vf v = loadv(x + n);
    nan |= any_lane(v != v);
    mv = v > mv ? v : mv;
  }
  float m = max_lanes(mv);
  for (int64_t t = n; t < V; ++t) {
    nan |= x[t] != x[t];
    m = x[t] > m ? x[t] : m;
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  vf sum = vf{};
  for (n = 0; n + L <= V; n += L) sum += exp_lanes(loadv(x + n) - m);
  if (n < V) {
    vf rest = vf{} + ninf;
    for (int64_t t = n; t < V; ++t) rest[t - n] = x[t];
    sum += exp_lanes(rest - m);
  }
  return (x[i] - m) - std::log(sum_lanes(sum));
}

// x (B, V) f32 -> (B,) s32: `row_argmax` of each row, rows over the pool.
static ffi::Error RowArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  auto d = x.dimensions();
  if (d.size() != 2 || d[1] == 0 || out->element_count() != size_t(d[0]))
    return ffi::Error::InvalidArgument("row_argmax: x must be (B, V > 0), the result (B,)");
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  const int64_t V = d[1];
  run_blocks(pool, d[0], [=](int64_t b) { op[b] = int32_t(row_argmax(xp + b * V, V)); });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VllamaRowArgmax, RowArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// x (B, V) f32, index (B,) s32 -> (B,) f32: `row_log_softmax_at` of each row at its index (clamped into the row).
static ffi::Error LogSoftmaxAtImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> index,
                                   ffi::ResultBuffer<ffi::F32> out) {
  auto d = x.dimensions();
  if (d.size() != 2 || d[1] == 0 || index.element_count() != size_t(d[0]) || out->element_count() != size_t(d[0]))
    return ffi::Error::InvalidArgument("log_softmax_at: x must be (B, V > 0), the index and the result (B,)");
  const float* xp = x.typed_data();
  const int32_t* ip = index.typed_data();
  float* op = out->typed_data();
  const int64_t V = d[1];
  run_blocks(pool, d[0], [=](int64_t b) {
    op[b] = row_log_softmax_at(xp + b * V, V, std::min<int64_t>(V - 1, std::max<int64_t>(0, ip[b])));
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VllamaLogSoftmaxAt, LogSoftmaxAtImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ---- int8 weights as bfloat16 for a prefill's dot in AMX tiles -------------------------------------------------
// W int8 (K, N), or packed (K/4, N, 4) (`kernels.pack_int8`), as bfloat16 (K, N): exact (every int8 is a bfloat16,
// its float32 bits' low half zero). On a CPU with AMX-BF16 a bf16-compute prefill multiplies these by XLA's dot in
// the tiles (4096 x 11008 at 128 rows: ~440 GFLOP/s against the kernel's ~230) and applies the scale after; XLA's
// own convert ran at ~1.4 G elements/s, longer than the dot it fed. Rows of K split over the pool.

// `after`: not read; the operand that orders the conversion after the product's input exists (XLA scheduled every
// conversion of a program first, all their outputs live at once).
static ffi::Error Int8AsBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> w, ffi::AnyBuffer /*after*/,
                                 ffi::ResultBuffer<ffi::BF16> out) {
  auto wd = w.dimensions();
  const bool packed = wd.size() == 3 && wd[2] == 4;
  if (wd.size() != 2 && !packed) return ffi::Error::InvalidArgument("int8_as_bf16: W must be (K, N) or (K/4, N, 4)");
  const int64_t K = packed ? 4 * wd[0] : wd[0], N = wd[1];
  const int8_t* src = w.typed_data();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out->untyped_data());
  const int64_t rows = packed ? K / 4 : K, per = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, N));
  run_blocks(pool, (rows + per - 1) / per, [=](int64_t blk) {
    int8_t col[L];
    for (int64_t r = blk * per, e = std::min(rows, r + per); r < e; ++r) {
      int64_t n = 0;
      if (!packed) {
        for (; n + L <= N; n += L) store_bf16(dst + r * N + n, loadv(src + r * N + n));
        for (; n < N; ++n) dst[r * N + n] = uint16_t(bit_cast_u32(float(src[r * N + n])) >> 16);
        continue;
      }
      const int8_t* p = src + r * N * 4;  // 4 rows of K, interleaved per column
#if defined(__AVX512F__)
      for (; n + 16 <= N; n += 16) {  // 16 columns x 4 rows: byte j of each 32-bit lane is row 4 r + j
        const __m512i x = _mm512_loadu_si512(p + n * 4);
        for (int j = 0; j < 4; ++j) {
          const __m512 f = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 24 - 8 * j), 24));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (4 * r + j) * N + n),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
        }
      }
#endif
      for (; n + L <= N; n += L)
        for (int j = 0; j < 4; ++j) {
          for (int t = 0; t < L; ++t) col[t] = p[(n + t) * 4 + j];
          store_bf16(dst + (4 * r + j) * N + n, loadv(col));
        }
      for (; n < N; ++n)
        for (int j = 0; j < 4; ++j) dst[(4 * r + j) * N + n] = uint16_t(bit_cast_u32(float(p[n * 4 + j])) >> 16);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VllamaInt8AsBf16, Int8AsBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

// With RoPE (`cos` and `sin` (B, L, Q), slots first): each row of Q values rotated on its way into the cache,
// rounded as XLA rounds the rotation in the cache's dtype (`rope_row`): a step's keys need no rotation of their own
// in XLA, whose CPU compiler recomputed cos and sin inside every rotation's fusion, per head.
template <typename T>
static void write_rotated(const T* src, T* dst, const int32_t* idx, const float* cos, const float* sin, int64_t B,
                          int64_t P, int64_t S, int64_t Ln, int64_t Q) {
  std::vector<float> x(Q), r(Q);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = std::min<int64_t>(std::max<int64_t>(idx[b], 0), S - Ln);
    for (int64_t l = 0; l < Ln; ++l)
      for (int64_t p = 0; p < P; ++p) {
        const T* row = src + ((b * Ln + l) * P + p) * Q;
        int64_t i = 0;
        for (; i + L <= Q; i += L) storev(x.data() + i, loadv(row + i));
        for (; i < Q; ++i) x[i] = load1(row + i);
        rope_row(x.data(), cos + (b * Ln + l) * Q, sin + (b * Ln + l) * Q, Q, rounding_of<T>(), r.data());
        T* d = dst + ((b * P + p) * S + start + l) * Q;  // r holds values of T: stored exactly
        for (i = 0; i + L <= Q; i += L) store_as(d + i, loadv(r.data() + i));
        for (; i < Q; ++i) store1(d + i, r[i]);
      }
  }
}

// The KV cache write of a step, in place: buf[b, p, start_b : start_b + L, :] = new[b, p, :, :] for every row b, with
// start_b = index[b] clamped to [0, S - L] as a dynamic-update-slice clamps it. buf is viewed as (B, P, S, Q) and new
// as (B, P, L, Q) (P: the dims between the batch and the slot axis, Q: those after it), or with `slots_first` as
// (B, L, P, Q) (a projection's (B, L, heads, head_dim) written into a (B, heads, S, head_dim) cache without a
// transposition first); any element width. The result aliases buf (`input_output_aliases`), so only the new slots
// are written: XLA's CPU compiler rewrote a 2-byte float cache whole in every step (a float32 round trip, or with
// its bits as uint16 a loop over every element), 60 caches of SmolLM2-135M at 1088 slots: 1.3-4.5 ms a step for 64
// slots written; and a float32 prefill's transposition and per-row updates ran at 3-4 GB/s (batch 8: 33 ms of a
// 920 ms prefill).
static ffi::Error WriteRowsImpl(ffi::AnyBuffer buf, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> index,
                                ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::Result<ffi::AnyBuffer> out,
                                int64_t axis, bool slots_first) {
  auto bd = buf.dimensions();
  auto rd = rows.dimensions();
  const int64_t r = bd.size();
  if (int64_t(rd.size()) != r || axis < 1 || axis >= r || buf.element_type() != rows.element_type())
    return ffi::Error::InvalidArgument("write_rows: buf and rows must have the same rank and dtype, axis in [1, rank)");
  int64_t B = bd[0], P = 1, Q = 1, S = bd[axis], Ln = slots_first ? rd[1] : rd[axis];
  for (int64_t i = 0, j = 0; i < r; ++i) {  // rows' dims other than the slots, in order, against buf's
    if (i == axis) continue;
    if (slots_first && j == 1) ++j;
    if (!slots_first && j == axis) ++j;
    if (bd[i] != rd[j++]) return ffi::Error::InvalidArgument("write_rows: buf and rows differ off the slot axis");
  }
  if (Ln > S) return ffi::Error::InvalidArgument("write_rows: more rows than slots");
  if (int64_t(index.element_count()) != B) return ffi::Error::InvalidArgument("write_rows: index must be (batch,)");
  for (int64_t i = 1; i < axis; ++i) P *= bd[i];
  for (int64_t i = axis + 1; i < r; ++i) Q *= bd[i];
  const int64_t es = int64_t(ffi::ByteWidth(buf.element_type()));
  char* dst = static_cast<char*>(out->untyped_data());
  const char* src = static_cast<const char*>(rows.untyped_data());
  if (dst != buf.untyped_data())  // XLA could not alias (the buffer is still needed): start from a copy
    std::memcpy(dst, buf.untyped_data(), size_t(B * P * S * Q * es));
  const int32_t* idx = index.typed_data();
  if (cos.element_count()) {
    auto cd = cos.dimensions(), sd = sin.dimensions();
    if (!slots_first || cd.size() != 3 || sd.size() != 3 || cd[0] != B || cd[1] != Ln || cd[2] != Q || sd[0] != B ||
        sd[1] != Ln || sd[2] != Q || Q % 2)
      return ffi::Error::InvalidArgument("write_rows: RoPE needs slots first and cos, sin (B, L, Q), Q even");
    const float *c = cos.typed_data(), *sn = sin.typed_data();
    switch (buf.element_type()) {
      case ffi::DataType::F32:
        write_rotated(reinterpret_cast<const float*>(src), reinterpret_cast<float*>(dst), idx, c, sn, B, P, S, Ln, Q);
        break;
      case ffi::DataType::BF16:
        write_rotated(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), idx, c, sn, B, P, S,
                      Ln, Q);
        break;
      case ffi::DataType::F16:
        write_rotated(reinterpret_cast<const half_t*>(src), reinterpret_cast<half_t*>(dst), idx, c, sn, B, P, S, Ln,
                      Q);
        break;
      default:
        return ffi::Error::InvalidArgument("write_rows: RoPE needs a float32, bfloat16 or float16 cache");
    }
    return ffi::Error::Success();
  }
  const size_t chunk = size_t(Q * es);
  for (int64_t b = 0; b < B; ++b) {
    int64_t start = std::min<int64_t>(std::max<int64_t>(idx[b], 0), S - Ln);
    for (int64_t p = 0; p < P; ++p) {
      char* d = dst + ((b * P + p) * S + start) * Q * es;
      if (!slots_first) {
        std::memcpy(d, src + (b * P + p) * Ln * Q * es, size_t(Ln) * chunk);
        continue;
      }
      for (int64_t l = 0; l < Ln; ++l) std::memcpy(d + l * chunk, src + ((b * Ln + l) * P + p) * chunk, chunk);
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VllamaWriteRows, WriteRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("axis")
                                  .Attr<bool>("slots_first"));
