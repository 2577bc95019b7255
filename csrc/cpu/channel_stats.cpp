// channel_stats on the CPU: per-channel mean and biased variance in one pass over memory.
// Each cache-resident block is reduced twice (sum, then squared deviations from the block mean,
// the second sweep hitting cache) and blocks are merged with Chan's update, so the result stays
// accurate when |mean| >> std, where E[x^2] - E[x]^2 in fp32 would cancel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common.h"
#include "vec.h"

namespace nasprune::cpu {
namespace {

// Channels c0..c1 of an (outer, C, inner) tensor. A block is the same channel's runs of
// kBlock / inner consecutive rows (short rows: one merge per block, not per row), or a kBlock
// piece of one long row.
template <typename T>
NASPRUNE_SIMD void stats_channels(const T* z, const ChannelView& v, int64_t c0, int64_t c1,
                                  float* mean, float* var) {
  const int64_t L = v.inner, stride = v.channels * L;
  const int64_t rows = std::max<int64_t>(1, kBlock / L), piece = std::min(L, kBlock);
  for (int64_t c = c0; c < c1; ++c) {
    Welford w;
    for (int64_t o = 0; o < v.outer; o += rows) {
      const int64_t n = std::min(rows, v.outer - o);
      for (int64_t i = 0; i < L; i += piece) {
        const int64_t len = std::min(piece, L - i);
        double bmean;
        float bm2;
        block_moments(z + (o * v.channels + c) * L + i, stride, n, len, bmean, bm2);
        w.merge(n * len, bmean, bm2);
      }
    }
    mean[c] = w.mean;
    var[c] = w.m2 / w.n;
  }
}

template <typename T>
void stats_channels_first(const T* z, const ChannelView& v, float* mean, float* var) {
  at::parallel_for(0, v.channels, 1, [&](int64_t c0, int64_t c1) {
    stats_channels(z, v, c0, c1, mean, var);
  });
}

// The second sweep's terms: squared deviations from the block mean, and the deviations, which
// correct the rounding of that mean (as in block_moments).
inline void deviation(float x, float mu, float& q, float& r) {
  const float d = x - mu;
  q += d * d;
  r += d;
}

// Blocks b0..b1 of a channels-last tensor (`total` values, blocks of whole periods), each
// reduced twice, per period element, and merged into acc (C entries) per channel; Fixed: the
// period length as a constant (with_period_length), else 0.
template <typename T, int64_t Fixed>
NASPRUNE_SIMD void stats_periods(const T* z, const Period& per, int64_t total, int64_t b0,
                                 int64_t b1, Welford* acc) {
  const int64_t L = Fixed ? Fixed : per.length, C = per.channels, block = per.block();
  std::vector<float> s(L), q(L), r(L), mu(L), mean(C);
  std::vector<double> sc(C), qc(C), rc(C);
  float *sp = s.data(), *qp = q.data(), *rp = r.data();
  float* mp = mu.data();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t e0 = b * block, e1 = std::min(total, e0 + block);
    const double n = static_cast<double>((e1 - e0) / C);  // positions: one value per channel each
    std::fill(s.begin(), s.end(), 0.f);
    int64_t p = e0;
    for (; p + L <= e1; p += L) {
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) sp[j] += to_float(z[p + j]);
    }
    for (int64_t j = 0; p + j < e1; ++j) sp[j] += to_float(z[p + j]);
    std::fill(sc.begin(), sc.end(), 0.0);
    per.fold(sp, sc.data());
    for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<float>(sc[c] / n);
    per.spread(mean.data(), mu.data());
    std::fill(q.begin(), q.end(), 0.f);
    std::fill(r.begin(), r.end(), 0.f);
    for (p = e0; p + L <= e1; p += L) {
#pragma omp simd
      for (int64_t j = 0; j < L; ++j) deviation(to_float(z[p + j]), mp[j], qp[j], rp[j]);
    }
    for (int64_t j = 0; p + j < e1; ++j) deviation(to_float(z[p + j]), mp[j], qp[j], rp[j]);
    std::fill(qc.begin(), qc.end(), 0.0);
    std::fill(rc.begin(), rc.end(), 0.0);
    per.fold(qp, qc.data());
    per.fold(rp, rc.data());
    for (int64_t c = 0; c < C; ++c)
      acc[c].merge(n, static_cast<double>(mean[c]) + rc[c] / n, qc[c] - rc[c] * rc[c] / n);
  }
}

template <typename T>
void stats_channels_last(const T* z, const ChannelView& v, float* mean, float* var) {
  const int64_t C = v.channels, total = v.outer * C;
  const Period per(C);
  const int64_t blocks = (total + per.block() - 1) / per.block();
  const int threads = at::get_num_threads();
  std::vector<Welford> partial(static_cast<size_t>(threads) * C);
  with_period_length(per.length, [&](auto fixed) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      stats_periods<T, decltype(fixed)::value>(
          z, per, total, b0, b1, partial.data() + static_cast<int64_t>(at::get_thread_num()) * C);
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    Welford w;
    for (int t = 0; t < threads; ++t) w.merge(partial[static_cast<size_t>(t) * C + c]);
    mean[c] = w.mean;
    var[c] = w.m2 / w.n;
  }
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& z_in) {
  const ChannelView v = channel_view(z_in, "z");
  const at::Tensor z = in_layout(z_in, v);
  auto opts = z.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({v.channels}, opts), var = at::empty({v.channels}, opts);
  if (v.per_channel() == 0) {  // torch.var_mean of an empty set
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "channel_stats", [&] {
    const auto* zp = z.const_data_ptr<scalar_t>();
    if (v.channels_last)
      stats_channels_last(zp, v, mean.data_ptr<float>(), var.data_ptr<float>());
    else
      stats_channels_first(zp, v, mean.data_ptr<float>(), var.data_ptr<float>());
  });
  return {mean, var};
}

}  // namespace
}  // namespace nasprune::cpu

TORCH_LIBRARY_IMPL(nasprune, CPU, m) {
  m.impl("channel_stats", &nasprune::cpu::channel_stats_cpu);
}
