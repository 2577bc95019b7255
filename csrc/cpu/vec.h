// Helpers for the CPU kernels: fp32 views of fp16/bf16 data, a stable merge of partial
// (count, mean, M2) statistics, and the instruction-set dispatch. Inner loops are plain loops
// marked `omp simd`, which the compiler vectorises for every input dtype.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

// NASPRUNE_SIMD marks the per-chunk work function of each parallel loop. GCC compiles it three
// times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA, F16C) and the x86-64 baseline (SSE2),
// with everything it inlines, and the loader picks the best version the CPU supports (function
// multi-versioning through an ifunc; ATen dispatches its own kernels the same way). One indirect
// call per chunk. The baseline alone is what a plain -O3 build gives: 2 to 50 times slower here.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define NASPRUNE_SIMD \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NASPRUNE_SIMD
#endif

namespace nasprune::cpu {

// Elements per cache-resident block: large enough to amortise loop overhead, small enough that
// a second sweep over the block hits L1/L2 instead of memory.
constexpr int64_t kBlock = 2048;

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Chan et al.'s pairwise update: merges a block's (n, mean, m2) into a running total.
struct Welford {
  double n = 0, mean = 0, m2 = 0;
  void merge(double bn, double bmean, double bm2) {
    if (bn == 0) return;
    const double total = n + bn, delta = bmean - mean;
    mean += delta * bn / total;
    m2 += bm2 + delta * delta * n * bn / total;
    n = total;
  }
  void merge(const Welford& o) { merge(o.n, o.mean, o.m2); }
};

// Lane accumulators: a sweep adds element i of a run into lane i % kLanes, so a short run (a
// small feature map: 8x8 is 64 values) costs no horizontal sum of its own, and a block of many
// runs is summed across lanes once. The lanes are a local array, which the compiler keeps in
// vector registers.
constexpr int64_t kLanes = 16;

// f(i, j) for element i of a run of `len`, j = its lane; whole vectors of lanes, then the tail.
template <typename F>
inline void for_lanes(int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) f(i + j, j);
  }
  for (int64_t j = 0; i + j < len; ++j) f(i + j, j);
}

inline float lane_sum(const float* lanes) {
  float total = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// Mean and M2 of a block of `rows` runs of `len` values, run r at x + r * stride, in two sweeps
// (the second from cache). The second also sums the deviations, which corrects the fp32 rounding
// of the first sweep's mean (the corrected two-pass algorithm), so block means are exact enough
// for Chan's merge.
template <typename T>
inline void block_moments(const T* x, int64_t stride, int64_t rows, int64_t len, double& mean,
                          float& m2) {
  float s[kLanes] = {}, q[kLanes] = {}, r[kLanes] = {};
  for (int64_t k = 0; k < rows; ++k) {
    const T* run = x + k * stride;
    for_lanes(len, [&](int64_t i, int64_t j) { s[j] += to_float(run[i]); });
  }
  const float n = static_cast<float>(rows * len), mu = lane_sum(s) / n;
  for (int64_t k = 0; k < rows; ++k) {
    const T* run = x + k * stride;
    for_lanes(len, [&](int64_t i, int64_t j) {
      const float d = to_float(run[i]) - mu;
      q[j] += d * d;
      r[j] += d;
    });
  }
  const float dev = lane_sum(r);
  mean = static_cast<double>(mu) + static_cast<double>(dev) / n;  // fp32 would round it to ulp(mu)
  m2 = lane_sum(q) - dev * dev / n;
}

// Channels-last data is one flat run in which element e holds channel e % C. A period is the
// fewest whole positions whose elements fill whole vectors of kLanes, doubled up to at least
// kPeriodMin elements: per-channel values spread over one period line up with every period, so
// a loop over a period's elements vectorises with no remainder and no per-position set-up,
// whatever C is. (A loop over the C channels of each position, the kernels before, ran 2 to 4
// times slower per element at C = 11, the widths a slimmed network has, than at C = 16.)
constexpr int64_t kPeriodMin = 64;

// Elements per block of a channels-last sweep: a block's per-channel results are folded (and,
// for channel_stats, merged) once, and a second sweep over it hits cache (L2).
constexpr int64_t kPeriodBlock = 16384;

struct Period {
  int64_t channels, positions, length;
  explicit Period(int64_t c) : channels(c), positions(kLanes / std::gcd(c, kLanes)) {
    while (c > 0 && positions * c < kPeriodMin) positions *= 2;
    length = positions * c;
  }
  // Elements in a block of whole periods, about kPeriodBlock (at least one period).
  int64_t block() const {
    return std::max<int64_t>(1, kPeriodBlock / std::max<int64_t>(length, 1)) * length;
  }
  // values[c] spread over one period: out[e] = values[e % C].
  std::vector<float> spread(const float* values) const {
    std::vector<float> out(length);
    spread(values, out.data());
    return out;
  }
  void spread(const float* values, float* out) const {
    for (int64_t e = 0, c = 0; e < length; ++e, c = c + 1 == channels ? 0 : c + 1) out[e] = values[c];
  }
  // Per-element sums of one period added into per-channel totals.
  template <typename A>
  void fold(const float* sums, A* totals) const {
    for (int64_t e = 0, c = 0; e < length; ++e, c = c + 1 == channels ? 0 : c + 1) totals[c] += sums[e];
  }
};

// The common short periods (C = 8, 16, 32: 64 values; C = 24: 96) as compile-time constants, so
// the loop over a period unrolls into plain vector instructions, as the per-position loops of
// these widths were before; Fixed = 0 is the general loop. The sweeps run whole periods of the
// period's length, then the tail of the last block.
template <typename F>
inline void with_period_length(int64_t length, F&& f) {
  switch (length) {
    case 64: f(std::integral_constant<int64_t, 64>{}); break;
    case 96: f(std::integral_constant<int64_t, 96>{}); break;
    default: f(std::integral_constant<int64_t, 0>{}); break;
  }
}

}  // namespace nasprune::cpu
