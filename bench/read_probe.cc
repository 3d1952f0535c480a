// The machine's memory read rate, for the decode benchmarks' bound: every core reads its share of a buffer the caches
// cannot hold with vector loads, in S interleaved streams (S contiguous sub-ranges read in lockstep) with or without
// software prefetch; the best rate over the variants and repeats. A jitted jnp.sum read 1.1-1.3x slower than this
// on the 2-core Intel Xeon host, and the 7B decode step itself streamed faster than the jitted sum.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

typedef int32_t v16i __attribute__((vector_size(64)));

template <int S>
static int32_t read_streams(const char* p, int64_t n, int64_t ahead) {
  const int64_t part = n / S / 64 * 64;
  v16i acc[S] = {};
  for (int64_t i = 0; i < part; i += 64)
    for (int s = 0; s < S; ++s) {
      if (ahead) __builtin_prefetch(p + s * part + i + ahead, 0, 3);
      v16i v;
      std::memcpy(&v, p + s * part + i, 64);
      acc[s] += v;
    }
  v16i t = acc[0];
  for (int s = 1; s < S; ++s) t += acc[s];
  int32_t r = 0;
  for (int i = 0; i < 16; ++i) r += t[i];
  return r;
}

template <int S>
static double timed(const char* buf, int64_t bytes, int threads, int64_t ahead, int repeats) {
  double best = 1e30;
  std::vector<int32_t> sink(threads);
  const int64_t share = bytes / threads / 64 * 64;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t)
      pool.emplace_back([&, t] { sink[t] = read_streams<S>(buf + t * share, share, ahead); });
    sink[0] = read_streams<S>(buf, share, ahead);
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return double(share) * threads / best;
}

// bytes/s: the best over 1, 4 and 8 streams per thread, without prefetch and 512 bytes ahead.
extern "C" double vllama_read_probe(int64_t bytes, int threads, int repeats) {
  threads = std::max(1, threads);
  char* buf = static_cast<char*>(std::aligned_alloc(1 << 21, (bytes + (1 << 21) - 1) / (1 << 21) * (1 << 21)));
  if (!buf) return 0.0;
  for (int64_t i = 0; i < bytes; i += 4096) buf[i] = char(i);  // touch every page before timing
  double best = 0.0;
  for (int64_t ahead : {int64_t(0), int64_t(512)}) {
    best = std::max(best, timed<1>(buf, bytes, threads, ahead, repeats));
    best = std::max(best, timed<4>(buf, bytes, threads, ahead, repeats));
    best = std::max(best, timed<8>(buf, bytes, threads, ahead, repeats));
  }
  std::free(buf);
  return best;
}
