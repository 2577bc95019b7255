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

// Blocks b0..b1 of `rows` positions of a channels-last tensor, merged into acc (C entries);
// Fixed: C known at compile time (with_fixed_channels), else 0.
template <typename T, int64_t Fixed>
NASPRUNE_SIMD void stats_positions(const T* z, const ChannelView& v, int64_t rows, int64_t b0,
                                   int64_t b1, Welford* acc) {
  const int64_t C = Fixed ? Fixed : v.channels;
  std::vector<float> s(C), q(C), r(C);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t p0 = b * rows, len = std::min(rows, v.outer - p0);
    std::fill(s.begin(), s.end(), 0.f);
    std::fill(q.begin(), q.end(), 0.f);
    std::fill(r.begin(), r.end(), 0.f);
    for (int64_t p = p0; p < p0 + len; ++p) {
      const T* x = z + p * C;
      float* sp = s.data();
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) sp[c] += to_float(x[c]);
    }
    const float inv = 1.f / static_cast<float>(len);
    for (int64_t c = 0; c < C; ++c) s[c] *= inv;
    for (int64_t p = p0; p < p0 + len; ++p) {
      const T* x = z + p * C;
      const float* mp = s.data();
      float *qp = q.data(), *rp = r.data();
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float d = to_float(x[c]) - mp[c];
        qp[c] += d * d;
        rp[c] += d;  // corrects the rounding of the block mean, as in block_moments
      }
    }
    for (int64_t c = 0; c < C; ++c)
      acc[c].merge(len, static_cast<double>(s[c]) + static_cast<double>(r[c]) * inv,
                   q[c] - r[c] * r[c] * inv);
  }
}

template <typename T>
void stats_channels_last(const T* z, const ChannelView& v, float* mean, float* var) {
  const int64_t C = v.channels;
  const int64_t rows = std::max<int64_t>(1, kBlock / C);  // positions per block
  const int64_t blocks = (v.outer + rows - 1) / rows;
  const int threads = at::get_num_threads();
  std::vector<Welford> partial(static_cast<size_t>(threads) * C);
  with_fixed_channels(C, [&](auto fixed) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      stats_positions<T, decltype(fixed)::value>(
          z, v, rows, b0, b1, partial.data() + static_cast<int64_t>(at::get_thread_num()) * C);
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
