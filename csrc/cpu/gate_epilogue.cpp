// gate_epilogue and gate_epilogue_backward on the CPU.
//
// Forward:  y[:, c] = g[c] * act(a[c] * z[:, src[c]] + b[c]), zero where src[c] < 0 or g[c] == 0
//           (those channels are written without reading z).
// Backward: with u = a z + b and m = act'(u), one sweep over (dy, z) gives
//           dz = dy g m a,  dgate = sum dy act(u),  dshift = sum dy g m,  dscale = sum dy g m z.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "vec.h"

namespace nasprune::cpu {
namespace {

struct Params {  // fp32 per output channel, plus the source map
  const float *a, *b, *g;
  const int64_t* src;
};

// Rows r0..r1 of the (outer, out_c) output rows of L positions.
template <typename T, bool Relu>
NASPRUNE_SIMD void forward_rows(const T* z, T* y, const ChannelView& zv, int64_t out_c,
                                const Params& p, int64_t r0, int64_t r1) {
  const int64_t L = zv.inner;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r / out_c, c = r % out_c, s = p.src[c];
    T* yr = y + r * L;
    const float g = p.g[c];
    if (s < 0 || g == 0.f) {
      std::fill(yr, yr + L, T(0));
      continue;
    }
    const T* zr = z + (o * zv.channels + s) * L;
    const float a = p.a[c], b = p.b[c];
#pragma omp simd
    for (int64_t i = 0; i < L; ++i) {
      float u = a * to_float(zr[i]) + b;
      if (Relu) u = u > 0.f ? u : 0.f;
      yr[i] = static_cast<T>(g * u);
    }
  }
}

// Channels last, identity map: one output value from z's, the constants of its channel.
template <typename T, bool Relu>
inline T forward_value(float zi, float a, float b, float g) {
  float u = a * zi + b;
  if (Relu) u = u > 0.f ? u : 0.f;
  return g == 0.f ? T(0) : static_cast<T>(g * u);
}

// Channels last, identity map: the values [e0, e1) (whole periods from e0), the constants
// spread over a period (a, b, g); Fixed: the period length as a constant, else 0.
template <typename T, bool Relu, int64_t Fixed>
NASPRUNE_SIMD void forward_periods(const T* z, T* y, int64_t length, const float* a,
                                   const float* b, const float* g, int64_t e0, int64_t e1) {
  const int64_t L = Fixed ? Fixed : length;
  int64_t p = e0;
  for (; p + L <= e1; p += L) {
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) y[p + j] = forward_value<T, Relu>(to_float(z[p + j]), a[j], b[j], g[j]);
  }
  for (int64_t j = 0; p + j < e1; ++j) y[p + j] = forward_value<T, Relu>(to_float(z[p + j]), a[j], b[j], g[j]);
}

// Channels last through a source map: positions q0..q1, output channel c from z channel src[c].
template <typename T, bool Relu>
NASPRUNE_SIMD void forward_positions(const T* z, T* y, const ChannelView& zv, int64_t out_c,
                                     const Params& p, int64_t q0, int64_t q1) {
  const int64_t K = zv.channels;
  for (int64_t q = q0; q < q1; ++q) {
    const T* zr = z + q * K;
    T* yr = y + q * out_c;
    for (int64_t c = 0; c < out_c; ++c) {
      const int64_t s = p.src[c];
      float u = s < 0 ? 0.f : p.a[c] * to_float(zr[s]) + p.b[c];
      if (Relu) u = u > 0.f ? u : 0.f;
      yr[c] = s < 0 || p.g[c] == 0.f ? T(0) : static_cast<T>(p.g[c] * u);
    }
  }
}

template <typename T, bool Relu>
void forward_channels_first(const T* z, T* y, const ChannelView& zv, int64_t out_c,
                            const Params& p) {
  at::parallel_for(0, zv.outer * out_c, 16, [&](int64_t r0, int64_t r1) {
    forward_rows<T, Relu>(z, y, zv, out_c, p, r0, r1);
  });
}

template <typename T, bool Relu>
void forward_channels_last(const T* z, T* y, const ChannelView& zv, int64_t out_c,
                           const Params& p, bool identity_map) {
  if (!identity_map) {
    at::parallel_for(0, zv.outer, 64, [&](int64_t q0, int64_t q1) {
      forward_positions<T, Relu>(z, y, zv, out_c, p, q0, q1);
    });
    return;
  }
  const Period per(out_c);
  const std::vector<float> a = per.spread(p.a), b = per.spread(p.b), g = per.spread(p.g);
  const int64_t total = zv.outer * out_c, block = per.block();
  with_period_length(per.length, [&](auto fixed) {
    at::parallel_for(0, (total + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      forward_periods<T, Relu, decltype(fixed)::value>(z, y, per.length, a.data(), b.data(), g.data(),
                                                       b0 * block, std::min(total, b1 * block));
    });
  });
}

// Per z channel: the fp32 constants of its output channel. dz = a du + alpha + beta z, where
// alpha = beta = 0 unless the backward also differentiates through batch statistics.
struct Coef {
  float a, b, g, alpha = 0.f, beta = 0.f;
};

// One sweep over a contiguous run of one channel: with Reduce, the sums of dy act(u), du and
// du z; with Write, the dz values.
template <typename T, bool Relu, bool Reduce, bool Write>
inline void backward_run(const T* dy, const T* z, T* dz, int64_t L, const Coef& k, double* sums) {
  float tg = 0.f, tb = 0.f, ta = 0.f;
#pragma omp simd reduction(+ : tg, tb, ta)
  for (int64_t i = 0; i < L; ++i) {
    const float zi = to_float(z[i]), d = to_float(dy[i]);
    const float u = k.a * zi + k.b;
    const float on = !Relu || u > 0.f ? 1.f : 0.f;  // a multiply, not a branch: vectorises
    const float du = d * k.g * on;
    if (Reduce) {
      tg += d * u * on;
      tb += du;
      ta += du * zi;
    }
    if (Write) dz[i] = static_cast<T>(du * k.a + k.alpha + k.beta * zi);
  }
  if (Reduce) sums[0] += tg, sums[1] += tb, sums[2] += ta;
}

// Batch-norm correction: with scale = weight * invstd and shift = bias - mean * scale computed
// from z's own statistics over M values per channel, the gradient through mean and invstd adds
// alpha + beta z to dz (the standard two-pass batch-norm backward).
inline void bn_correction(Coef& k, double dscale, double dshift, double mean, double invstd,
                          double count) {
  const double dweight_hat = invstd * (dscale - mean * dshift);  // sum du * xhat
  const double beta = -k.a * invstd * dweight_hat / count;
  k.beta = static_cast<float>(beta);
  k.alpha = static_cast<float>(-k.a * dshift / count - beta * mean);
}

struct BatchStats {
  const float *mean = nullptr, *invstd = nullptr;
  bool on() const { return mean != nullptr; }
};

// One sweep over every row of z channel k (output channel c).
template <typename T, bool Relu, bool Reduce, bool Write>
inline void backward_sweep(const T* dy, const T* z, T* dz, const ChannelView& zv, int64_t out_c,
                           int64_t k, int64_t c, const Coef& coef, double* sums) {
  const int64_t L = zv.inner, K = zv.channels;
  for (int64_t o = 0; o < zv.outer; ++o) {
    const int64_t zoff = (o * K + k) * L;
    backward_run<T, Relu, Reduce, Write>(dy + (o * out_c + c) * L, z + zoff, dz + zoff, L, coef,
                                         sums);
  }
}

// z channels k0..k1: the sums, and dz (in a second sweep when it needs the sums: batch stats).
template <typename T, bool Relu>
NASPRUNE_SIMD void backward_channels(const T* dy, const T* z, T* dz, const ChannelView& zv,
                                     int64_t out_c, const Params& p, const int64_t* index,
                                     const BatchStats& bs, float* da, float* db, float* dg,
                                     int64_t k0, int64_t k1) {
  const double count = static_cast<double>(zv.outer) * zv.inner;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t c = index ? index[k] : k;
    Coef coef{p.a[c], p.b[c], p.g[c]};
    double sums[3] = {0, 0, 0};  // dgate, dshift, dscale
    if (bs.on()) {  // reduce, then write with the correction (the second sweep hits cache)
      backward_sweep<T, Relu, true, false>(dy, z, dz, zv, out_c, k, c, coef, sums);
      bn_correction(coef, sums[2], sums[1], bs.mean[c], bs.invstd[c], count);
      backward_sweep<T, Relu, false, true>(dy, z, dz, zv, out_c, k, c, coef, sums);
    } else {
      backward_sweep<T, Relu, true, true>(dy, z, dz, zv, out_c, k, c, coef, sums);
    }
    dg[c] = sums[0], db[c] = sums[1], da[c] = sums[2];
  }
}

template <typename T, bool Relu>
void backward_channels_first(const T* dy, const T* z, T* dz, const ChannelView& zv,
                             int64_t out_c, const Params& p, const int64_t* index,
                             const BatchStats& bs, float* da, float* db, float* dg) {
  at::parallel_for(0, zv.channels, 1, [&](int64_t k0, int64_t k1) {
    backward_channels<T, Relu>(dy, z, dz, zv, out_c, p, index, bs, da, db, dg, k0, k1);
  });
}

// Channels last: the per-channel constants as one array each, so a loop over contiguous
// channels loads them as vectors (per z channel, or spread over a period).
struct CoefColumns {
  std::vector<float> a, b, g, alpha, beta;
  explicit CoefColumns(int64_t K) : a(K), b(K), g(K), alpha(K, 0.f), beta(K, 0.f) {}
  CoefColumns spread(const Period& per) const {
    CoefColumns out(0);
    out.a = per.spread(a.data()), out.b = per.spread(b.data()), out.g = per.spread(g.data());
    out.alpha = per.spread(alpha.data()), out.beta = per.spread(beta.data());
    return out;
  }
};

// One element of the channels-last backward: the sums into (pg, pb, pa)[j], dz written; the
// constants of its channel at j of (a, b, g, alpha, beta).
template <typename T, bool Relu, bool Reduce, bool Write>
inline void backward_element(float zi, float d, T* dz, const float* const* k, int64_t j,
                             float* pg, float* pb, float* pa) {
  const float a = k[0][j], u = a * zi + k[1][j];
  const float on = !Relu || u > 0.f ? 1.f : 0.f;
  const float du = d * k[2][j] * on;
  if (Reduce) {
    pg[j] += d * u * on;
    pb[j] += du;
    pa[j] += du * zi;
  }
  if (Write) *dz = static_cast<T>(du * a + k[3][j] + k[4][j] * zi);
}

// Not indexed: blocks b0..b1 of whole periods (dy and z alike), the constants spread over a
// period; per thread, sums per period element folded into acc (dgate, dshift, dscale: K each)
// once per block. Fixed: the period length as a constant, else 0.
template <typename T, bool Relu, bool Reduce, bool Write, int64_t Fixed>
NASPRUNE_SIMD void sweep_periods(const T* dy, const T* z, T* dz, const Period& per, int64_t total,
                                 const CoefColumns& k, int64_t b0, int64_t b1, double* acc) {
  const int64_t L = Fixed ? Fixed : per.length, block = per.block(), K = per.channels;
  const float* const cols[5] = {k.a.data(), k.b.data(), k.g.data(), k.alpha.data(), k.beta.data()};
  std::vector<float> tg(L), tb(L), ta(L);
  float *pg = tg.data(), *pb = tb.data(), *pa = ta.data();
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t e0 = blk * block, e1 = std::min(total, e0 + block);
    if (Reduce) {
      std::fill(tg.begin(), tg.end(), 0.f);
      std::fill(tb.begin(), tb.end(), 0.f);
      std::fill(ta.begin(), ta.end(), 0.f);
    }
    int64_t p = e0;
    for (; p + L <= e1; p += L) {
#pragma omp simd
      for (int64_t j = 0; j < L; ++j)
        backward_element<T, Relu, Reduce, Write>(to_float(z[p + j]), to_float(dy[p + j]), dz + p + j,
                                                 cols, j, pg, pb, pa);
    }
    for (int64_t j = 0; p + j < e1; ++j)
      backward_element<T, Relu, Reduce, Write>(to_float(z[p + j]), to_float(dy[p + j]), dz + p + j,
                                               cols, j, pg, pb, pa);
    if (Reduce) {
      per.fold(pg, acc);
      per.fold(pb, acc + K);
      per.fold(pa, acc + 2 * K);
    }
  }
}

// Indexed (dy holds out_c channels, z channel k feeds index[k]): positions in blocks b0..b1 of
// `rows`, each thread summing per channel into acc (dgate, dshift, dscale: K each).
template <typename T, bool Relu, bool Reduce, bool Write>
NASPRUNE_SIMD void sweep_indexed(const T* dy, const T* z, T* dz, const ChannelView& zv,
                                 int64_t out_c, const CoefColumns& k, const int64_t* index,
                                 int64_t rows, int64_t b0, int64_t b1, double* acc) {
  const int64_t K = zv.channels;
  const float* const cols[5] = {k.a.data(), k.b.data(), k.g.data(), k.alpha.data(), k.beta.data()};
  std::vector<float> tg(K), tb(K), ta(K);
  float *pg = tg.data(), *pb = tb.data(), *pa = ta.data();
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t q0 = blk * rows, q1 = std::min(zv.outer, q0 + rows);
    std::fill(tg.begin(), tg.end(), 0.f);
    std::fill(tb.begin(), tb.end(), 0.f);
    std::fill(ta.begin(), ta.end(), 0.f);
    for (int64_t q = q0; q < q1; ++q) {
      const T* zr = z + q * K;
      T* dzr = dz + q * K;
      const T* dyr = dy + q * out_c;
      for (int64_t j = 0; j < K; ++j)
        backward_element<T, Relu, Reduce, Write>(to_float(zr[j]), to_float(dyr[index[j]]), dzr + j,
                                                 cols, j, pg, pb, pa);
    }
    if (Reduce)
      for (int64_t j = 0; j < K; ++j) acc[j] += tg[j], acc[K + j] += tb[j], acc[2 * K + j] += ta[j];
  }
}

template <typename T, bool Relu, bool Reduce, bool Write>
void sweep_channels_last(const T* dy, const T* z, T* dz, const ChannelView& zv, int64_t out_c,
                         const CoefColumns& coef, const int64_t* index,
                         std::vector<double>& partial) {
  const int64_t K = zv.channels;
  const auto acc = [&]() { return partial.data() + static_cast<int64_t>(at::get_thread_num()) * 3 * K; };
  if (index) {
    const int64_t rows = std::max<int64_t>(1, kBlock / K);
    at::parallel_for(0, (zv.outer + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
      sweep_indexed<T, Relu, Reduce, Write>(dy, z, dz, zv, out_c, coef, index, rows, b0, b1, acc());
    });
    return;
  }
  const Period per(K);
  const CoefColumns spread = coef.spread(per);
  const int64_t total = zv.outer * K, block = per.block();
  with_period_length(per.length, [&](auto fixed) {
    at::parallel_for(0, (total + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      sweep_periods<T, Relu, Reduce, Write, decltype(fixed)::value>(dy, z, dz, per, total, spread, b0,
                                                                    b1, acc());
    });
  });
}

template <typename T, bool Relu>
void backward_channels_last(const T* dy, const T* z, T* dz, const ChannelView& zv,
                            int64_t out_c, const Params& p, const int64_t* index,
                            const BatchStats& bs, float* da, float* db, float* dg) {
  const int64_t K = zv.channels;
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * 3 * K, 0.0);  // [thread][3][K]
  CoefColumns coef(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t c = index ? index[k] : k;
    coef.a[k] = p.a[c], coef.b[k] = p.b[c], coef.g[k] = p.g[c];
  }
  if (bs.on())
    sweep_channels_last<T, Relu, true, false>(dy, z, dz, zv, out_c, coef, index, partial);
  else
    sweep_channels_last<T, Relu, true, true>(dy, z, dz, zv, out_c, coef, index, partial);
  for (int64_t k = 0; k < K; ++k) {
    double sums[3] = {0, 0, 0};
    for (int t = 0; t < threads; ++t)
      for (int j = 0; j < 3; ++j) sums[j] += partial[(static_cast<size_t>(t) * 3 + j) * K + k];
    const int64_t c = index ? index[k] : k;
    dg[c] = sums[0], db[c] = sums[1], da[c] = sums[2];
    if (bs.on()) {
      Coef one{coef.a[k], coef.b[k], coef.g[k]};
      bn_correction(one, sums[2], sums[1], bs.mean[c], bs.invstd[c], static_cast<double>(zv.outer));
      coef.alpha[k] = one.alpha, coef.beta[k] = one.beta;
    }
  }
  if (bs.on())
    sweep_channels_last<T, Relu, false, true>(dy, z, dz, zv, out_c, coef, index, partial);
}

at::Tensor gate_epilogue_cpu(const at::Tensor& z_in, const at::Tensor& scale,
                             const at::Tensor& shift, const at::Tensor& gate,
                             c10::string_view act, const c10::optional<at::Tensor>& out_index,
                             const c10::optional<at::Tensor>& mean,
                             const c10::optional<at::Tensor>& invstd) {
  const Prepared P = prepare(z_in, scale, shift, gate, std::string(act), out_index);
  batch_stats(mean, invstd, P.out_c, z_in);  // only checked: they matter to the backward
  at::Tensor y = at::empty(output_shape(P.z, P.out_c), P.z.options().memory_format(P.zv.format));
  if (y.numel() == 0) return y;
  const Params p{P.a.const_data_ptr<float>(), P.b.const_data_ptr<float>(),
                 P.g.const_data_ptr<float>(), P.src.const_data_ptr<int64_t>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.z.scalar_type(), "gate_epilogue", [&] {
    const auto* zp = P.z.const_data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    if (P.zv.channels_last) {
      if (P.relu)
        forward_channels_last<scalar_t, true>(zp, yp, P.zv, P.out_c, p, !out_index.has_value());
      else
        forward_channels_last<scalar_t, false>(zp, yp, P.zv, P.out_c, p, !out_index.has_value());
    } else {
      if (P.relu)
        forward_channels_first<scalar_t, true>(zp, yp, P.zv, P.out_c, p);
      else
        forward_channels_first<scalar_t, false>(zp, yp, P.zv, P.out_c, p);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_epilogue_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& gate, c10::string_view act,
    const c10::optional<at::Tensor>& out_index, const c10::optional<at::Tensor>& mean,
    const c10::optional<at::Tensor>& invstd) {
  const Prepared P = prepare(z_in, scale, shift, gate, std::string(act), out_index);
  const auto stats = batch_stats(mean, invstd, P.out_c, z_in);
  check_gradient(dy_in, z_in, P);
  const at::Tensor dy = in_layout(dy_in, P.zv);
  at::Tensor dz = at::empty_like(P.z);
  auto f32 = P.z.options().dtype(at::kFloat);
  at::Tensor da = at::zeros({P.out_c}, f32), db = at::zeros({P.out_c}, f32),
             dg = at::zeros({P.out_c}, f32);
  if (P.z.numel() > 0) {
    const Params p{P.a.const_data_ptr<float>(), P.b.const_data_ptr<float>(),
                   P.g.const_data_ptr<float>(), P.src.const_data_ptr<int64_t>()};
    const at::Tensor index = out_index.has_value() ? out_index->contiguous() : at::Tensor();
    const int64_t* ip = out_index.has_value() ? index.const_data_ptr<int64_t>() : nullptr;
    BatchStats bs;
    if (stats.has_value()) bs = {stats->first.const_data_ptr<float>(), stats->second.const_data_ptr<float>()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.z.scalar_type(),
                                    "gate_epilogue_backward", [&] {
      const auto* dyp = dy.const_data_ptr<scalar_t>();
      const auto* zp = P.z.const_data_ptr<scalar_t>();
      auto* dzp = dz.data_ptr<scalar_t>();
      float *dap = da.data_ptr<float>(), *dbp = db.data_ptr<float>(), *dgp = dg.data_ptr<float>();
      if (P.zv.channels_last) {
        if (P.relu)
          backward_channels_last<scalar_t, true>(dyp, zp, dzp, P.zv, P.out_c, p, ip, bs, dap, dbp, dgp);
        else
          backward_channels_last<scalar_t, false>(dyp, zp, dzp, P.zv, P.out_c, p, ip, bs, dap, dbp, dgp);
      } else {
        if (P.relu)
          backward_channels_first<scalar_t, true>(dyp, zp, dzp, P.zv, P.out_c, p, ip, bs, dap, dbp, dgp);
        else
          backward_channels_first<scalar_t, false>(dyp, zp, dzp, P.zv, P.out_c, p, ip, bs, dap, dbp, dgp);
      }
    });
  }
  return {dz, da.to(scale.scalar_type()), db.to(shift.scalar_type()), dg.to(gate.scalar_type())};
}

}  // namespace
}  // namespace nasprune::cpu

TORCH_LIBRARY_IMPL(nasprune, CPU, m) {
  m.impl("gate_epilogue", &nasprune::cpu::gate_epilogue_cpu);
  m.impl("gate_epilogue_backward", &nasprune::cpu::gate_epilogue_backward_cpu);
}
