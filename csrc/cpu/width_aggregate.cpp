// width_aggregate and width_aggregate_backward on the CPU.
//
// The candidates' BN affines, interpolation weights and mixing weights fold into one sparse
// channel map: output o < C_max reads at most 2K input channels ("terms"),
//   u[:, o] = beta[o] + sum_t coef[t] * z[:, src[t]],   y = act(u),   y[:, C_max:] = 0,
// with duplicate source channels merged. The tables are built once per call (the widths are
// host data here, so nothing is synchronised).
// Backward, with du = dy * act'(u) (recomputed from z), one sweep over (dy, z) gives
//   dz[:, i] = sum over the terms t reading i of coef[t] * du[:, out(t)]   (the transposed map),
//   SD[o] = sum du[:, o],   PT[t] = sum du[:, out(t)] * z[:, src[t]],
// and the per-candidate gradients follow from those per-channel sums alone:
//   dshift[j, i] = w_j sum_{o: i in S_j(o)} SD[o] / len_j(o),
//   dscale[j, i] = w_j sum_{o: i in S_j(o)} PT[t(j, o, i)] / len_j(o),
//   dweights[j]  = sum_{o, i in S_j(o)} (scale[j, i] PT[t(j, o, i)] + shift[j, i] SD[o]) / len_j(o).
// Work items are (sample, run of positions) for NCHW and blocks of positions for channels-last
// (transposed into channel-major fp32 scratch), so every inner loop is a contiguous, vectorised
// loop over positions.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../width_aggregate.h"
#include "vec.h"

namespace nasprune::cpu {
namespace {

// fp32 scratch elements per work item (channels x positions): fits in L2 with room to spare.
constexpr int64_t kScratch = 16384;
constexpr int64_t kMaxRun = 1024;  // positions per NCHW work item

struct Tables {
  int64_t C = 0, K = 0, cmax = 0;
  std::vector<int64_t> start, src;   // terms of output o: [start[o], start[o + 1])
  std::vector<float> coef, beta;
  std::vector<int64_t> tstart, tout;  // terms reading input i: [tstart[i], tstart[i + 1])
  std::vector<float> tcoef;
  std::vector<int64_t> slot;  // term of channel lo + e of S_j(o): slot[(j * cmax + o) * 2 + e]
  int64_t terms() const { return static_cast<int64_t>(src.size()); }
};

Tables build_tables(const WidthArgs& A) {
  Tables tb;
  tb.C = A.C;
  tb.K = A.K;
  const int64_t* widths = A.widths.const_data_ptr<int64_t>();
  const float* w = A.weights.const_data_ptr<float>();
  const float* a = A.scale.const_data_ptr<float>();
  const float* b = A.shift.const_data_ptr<float>();
  for (int64_t j = 0; j < A.K; ++j) {
    TORCH_CHECK(widths[j] >= 1 && widths[j] <= A.C, "widths must lie in [1, ", A.C,
                "] (z's channels), got widths[", j, "] = ", widths[j]);
    tb.cmax = std::max(tb.cmax, widths[j]);
  }
  const int64_t cmax = tb.cmax;
  tb.start.assign(cmax + 1, 0);
  tb.beta.assign(cmax, 0.f);
  tb.slot.assign(A.K * cmax * 2, -1);
  std::vector<double> coef;
  for (int64_t o = 0; o < cmax; ++o) {
    tb.start[o] = tb.terms();
    double beta = 0;
    for (int64_t j = 0; j < A.K; ++j) {
      int64_t lo, len;
      candidate_span<int64_t>(o, widths[j], cmax, lo, len);
      const double wl = static_cast<double>(w[j]) / len;
      for (int64_t e = 0; e < len; ++e) {
        const int64_t i = lo + e;
        int64_t t = tb.start[o];
        while (t < tb.terms() && tb.src[t] != i) ++t;
        if (t == tb.terms()) {
          tb.src.push_back(i);
          coef.push_back(0.0);
        }
        coef[t] += wl * a[j * A.C + i];
        beta += wl * b[j * A.C + i];
        tb.slot[(j * cmax + o) * 2 + e] = t;
      }
    }
    tb.beta[o] = static_cast<float>(beta);
  }
  tb.start[cmax] = tb.terms();
  tb.coef.assign(coef.begin(), coef.end());
  // The transposed map, grouped by input channel.
  tb.tstart.assign(A.C + 1, 0);
  for (int64_t t = 0; t < tb.terms(); ++t) ++tb.tstart[tb.src[t] + 1];
  for (int64_t i = 0; i < A.C; ++i) tb.tstart[i + 1] += tb.tstart[i];
  tb.tout.resize(tb.terms());
  tb.tcoef.resize(tb.terms());
  std::vector<int64_t> fill(tb.tstart.begin(), tb.tstart.end() - 1);
  for (int64_t o = 0; o < cmax; ++o) {
    for (int64_t t = tb.start[o]; t < tb.start[o + 1]; ++t) {
      const int64_t at = fill[tb.src[t]]++;
      tb.tout[at] = o;
      tb.tcoef[at] = tb.coef[t];
    }
  }
  return tb;
}

// ------------------------------------------------------------------------------ row kernels
// Rows are channels: row c of z starts at z + c * zs and holds L positions. One call is one
// work item (every channel of a run of positions), so these are the multi-versioned functions.

// u[:, o] = beta[o] + sum over the terms of o of coef[t] * z[:, src[t]], into out (L values).
template <typename T>
inline void pre_activation(const T* z, int64_t zs, int64_t L, const Tables& tb, int64_t o,
                           float* out) {
  const float beta = tb.beta[o];
#pragma omp simd
  for (int64_t s = 0; s < L; ++s) out[s] = beta;
  for (int64_t t = tb.start[o]; t < tb.start[o + 1]; ++t) {
    const T* zr = z + tb.src[t] * zs;
    const float c = tb.coef[t];
#pragma omp simd
    for (int64_t s = 0; s < L; ++s) out[s] += c * to_float(zr[s]);
  }
}

template <typename T, typename TY, bool Relu>
NASPRUNE_SIMD void forward_rows(const T* z, int64_t zs, TY* y, int64_t ys, int64_t L, const Tables& tb,
                  float* acc) {
  for (int64_t o = 0; o < tb.C; ++o) {
    TY* yr = y + o * ys;
    if (o >= tb.cmax) {
      std::fill(yr, yr + L, TY(0));
      continue;
    }
    pre_activation(z, zs, L, tb, o, acc);
#pragma omp simd
    for (int64_t s = 0; s < L; ++s) {
      const float v = acc[s];
      yr[s] = static_cast<TY>(Relu ? (v > 0.f ? v : 0.f) : v);
    }
  }
}

// du (cmax rows of L) and the sums SD, PT of one item, then dz from du.
template <typename T, typename TD, typename TZ, bool Relu>
NASPRUNE_SIMD void backward_rows(const T* z, int64_t zs, const TD* dy, int64_t ds, TZ* dz, int64_t dzs,
                   int64_t L, const Tables& tb, float* du, float* acc, double* sd, double* pt) {
  for (int64_t o = 0; o < tb.cmax; ++o) {
    float* d = du + o * L;
    const TD* dyr = dy + o * ds;
    if (Relu) {
      pre_activation(z, zs, L, tb, o, d);
#pragma omp simd
      for (int64_t s = 0; s < L; ++s) {
        const float on = d[s] > 0.f ? 1.f : 0.f;  // a select, not a branch: vectorises
        d[s] = on * to_float(dyr[s]);
      }
    } else {
#pragma omp simd
      for (int64_t s = 0; s < L; ++s) d[s] = to_float(dyr[s]);
    }
    float tot = 0.f;
#pragma omp simd reduction(+ : tot)
    for (int64_t s = 0; s < L; ++s) tot += d[s];
    sd[o] += tot;
    for (int64_t t = tb.start[o]; t < tb.start[o + 1]; ++t) {
      const T* zr = z + tb.src[t] * zs;
      float p = 0.f;
#pragma omp simd reduction(+ : p)
      for (int64_t s = 0; s < L; ++s) p += d[s] * to_float(zr[s]);
      pt[t] += p;
    }
  }
  for (int64_t i = 0; i < tb.C; ++i) {
    TZ* out = dz + i * dzs;
    const int64_t t0 = tb.tstart[i], t1 = tb.tstart[i + 1];
    if (t0 == t1) {
      std::fill(out, out + L, TZ(0));
      continue;
    }
    {
      const float* d = du + tb.tout[t0] * L;
      const float c = tb.tcoef[t0];
#pragma omp simd
      for (int64_t s = 0; s < L; ++s) acc[s] = c * d[s];
    }
    for (int64_t t = t0 + 1; t < t1; ++t) {
      const float* d = du + tb.tout[t] * L;
      const float c = tb.tcoef[t];
#pragma omp simd
      for (int64_t s = 0; s < L; ++s) acc[s] += c * d[s];
    }
#pragma omp simd
    for (int64_t s = 0; s < L; ++s) out[s] = static_cast<TZ>(acc[s]);
  }
}

// (rows, C) row-major -> (C, rows) fp32, and back.
template <typename T>
NASPRUNE_SIMD void to_channel_major(const T* x, int64_t rows, int64_t C, float* out) {
  for (int64_t q = 0; q < rows; ++q) {
    const T* xr = x + q * C;
    for (int64_t c = 0; c < C; ++c) out[c * rows + q] = to_float(xr[c]);
  }
}

template <typename T>
NASPRUNE_SIMD void from_channel_major(const float* x, int64_t rows, int64_t C, T* out) {
  for (int64_t q = 0; q < rows; ++q) {
    T* orow = out + q * C;
    for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<T>(x[c * rows + q]);
  }
}

// ------------------------------------------------------------------------------ work split

struct Split {
  int64_t run;    // positions per item
  int64_t items;  // NCHW: outer * runs per row; channels-last: blocks of `run` positions
  int64_t runs_per_row;
};

Split split(const ChannelView& v, int64_t channels) {
  Split sp;
  if (v.channels_last) {
    sp.run = std::clamp<int64_t>(kScratch / std::max<int64_t>(channels, 1), 1, 256);
    sp.runs_per_row = 1;
    sp.items = (v.outer + sp.run - 1) / sp.run;
  } else {
    sp.run = std::min(v.inner, std::clamp<int64_t>(kScratch / std::max<int64_t>(channels, 1), 16,
                                                   kMaxRun));
    sp.runs_per_row = (v.inner + sp.run - 1) / sp.run;
    sp.items = v.outer * sp.runs_per_row;
  }
  return sp;
}

template <typename T, bool Relu>
void forward_impl(const T* z, T* y, const ChannelView& v, const Tables& tb) {
  const int64_t C = tb.C;
  const Split sp = split(v, C);
  at::parallel_for(0, sp.items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> acc(sp.run);
    std::vector<float> zt, yt;
    if (v.channels_last) {
      zt.resize(C * sp.run);
      yt.resize(C * sp.run);
    }
    for (int64_t it = i0; it < i1; ++it) {
      if (v.channels_last) {
        const int64_t q0 = it * sp.run, rows = std::min(sp.run, v.outer - q0);
        to_channel_major(z + q0 * C, rows, C, zt.data());
        forward_rows<float, float, Relu>(zt.data(), rows, yt.data(), rows, rows, tb, acc.data());
        from_channel_major(yt.data(), rows, C, y + q0 * C);
      } else {
        const int64_t n = it / sp.runs_per_row, s0 = (it % sp.runs_per_row) * sp.run;
        const int64_t L = std::min(sp.run, v.inner - s0);
        const int64_t off = n * C * v.inner + s0;
        forward_rows<T, T, Relu>(z + off, v.inner, y + off, v.inner, L, tb, acc.data());
      }
    }
  });
}

template <typename T, bool Relu>
void backward_impl(const T* dy, const T* z, T* dz, const ChannelView& v, const Tables& tb,
                   std::vector<double>& SD, std::vector<double>& PT) {
  const int64_t C = tb.C, cmax = tb.cmax, nt = tb.terms();
  const Split sp = split(v, C);
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * (cmax + nt), 0.0);
  at::parallel_for(0, sp.items, 1, [&](int64_t i0, int64_t i1) {
    double* sd = partial.data() + static_cast<int64_t>(at::get_thread_num()) * (cmax + nt);
    double* pt = sd + cmax;
    std::vector<float> du(cmax * sp.run), acc(sp.run);
    std::vector<float> zt, dyt, dzt;
    if (v.channels_last) {
      zt.resize(C * sp.run);
      dyt.resize(C * sp.run);
      dzt.resize(C * sp.run);
    }
    for (int64_t it = i0; it < i1; ++it) {
      if (v.channels_last) {
        const int64_t q0 = it * sp.run, rows = std::min(sp.run, v.outer - q0);
        to_channel_major(z + q0 * C, rows, C, zt.data());
        to_channel_major(dy + q0 * C, rows, C, dyt.data());
        backward_rows<float, float, float, Relu>(zt.data(), rows, dyt.data(), rows, dzt.data(),
                                                 rows, rows, tb, du.data(), acc.data(), sd, pt);
        from_channel_major(dzt.data(), rows, C, dz + q0 * C);
      } else {
        const int64_t n = it / sp.runs_per_row, s0 = (it % sp.runs_per_row) * sp.run;
        const int64_t L = std::min(sp.run, v.inner - s0);
        const int64_t off = n * C * v.inner + s0;
        backward_rows<T, T, T, Relu>(z + off, v.inner, dy + off, v.inner, dz + off, v.inner, L,
                                     tb, du.data(), acc.data(), sd, pt);
      }
    }
  });
  SD.assign(cmax, 0.0);
  PT.assign(nt, 0.0);
  for (int t = 0; t < threads; ++t) {
    const double* p = partial.data() + static_cast<int64_t>(t) * (cmax + nt);
    for (int64_t o = 0; o < cmax; ++o) SD[o] += p[o];
    for (int64_t k = 0; k < nt; ++k) PT[k] += p[cmax + k];
  }
}

// ------------------------------------------------------------------------------ entry points

at::Tensor width_aggregate_cpu(const at::Tensor& z_in, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& widths,
                               const at::Tensor& weights, c10::string_view act) {
  const WidthArgs A = width_args(z_in, scale, shift, widths, weights, std::string(act));
  const Tables tb = build_tables(A);
  at::Tensor y = at::empty(A.z.sizes(), A.z.options().memory_format(A.zv.format));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.z.scalar_type(), "width_aggregate", [&] {
    const auto* zp = A.z.const_data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    if (A.relu)
      forward_impl<scalar_t, true>(zp, yp, A.zv, tb);
    else
      forward_impl<scalar_t, false>(zp, yp, A.zv, tb);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> width_aggregate_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& widths, const at::Tensor& weights,
    c10::string_view act) {
  const WidthArgs A = width_args(z_in, scale, shift, widths, weights, std::string(act));
  TORCH_CHECK(dy_in.sizes() == z_in.sizes(), "dy must have shape ", z_in.sizes(), ", got ",
              dy_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == z_in.scalar_type(), "dy has dtype ", dy_in.scalar_type(),
              " but z has ", z_in.scalar_type());
  const Tables tb = build_tables(A);
  const at::Tensor dy = in_layout(dy_in, A.zv);
  at::Tensor dz = at::empty_like(A.z);
  std::vector<double> SD(tb.cmax, 0.0), PT(tb.terms(), 0.0);
  if (A.z.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.z.scalar_type(),
                                    "width_aggregate_backward", [&] {
      const auto* dyp = dy.const_data_ptr<scalar_t>();
      const auto* zp = A.z.const_data_ptr<scalar_t>();
      auto* dzp = dz.data_ptr<scalar_t>();
      if (A.relu)
        backward_impl<scalar_t, true>(dyp, zp, dzp, A.zv, tb, SD, PT);
      else
        backward_impl<scalar_t, false>(dyp, zp, dzp, A.zv, tb, SD, PT);
    });
  }
  // Per-candidate gradients from the per-channel sums (O(K C) work).
  const int64_t K = A.K, C = A.C, cmax = tb.cmax;
  const int64_t* wd = A.widths.const_data_ptr<int64_t>();
  const float* w = A.weights.const_data_ptr<float>();
  const float* a = A.scale.const_data_ptr<float>();
  const float* b = A.shift.const_data_ptr<float>();
  std::vector<double> dscale(K * C, 0.0), dshift(K * C, 0.0), dweights(K, 0.0);
  for (int64_t j = 0; j < K; ++j) {
    for (int64_t o = 0; o < cmax; ++o) {
      int64_t lo, len;
      candidate_span<int64_t>(o, wd[j], cmax, lo, len);
      for (int64_t e = 0; e < len; ++e) {
        const int64_t i = lo + e;
        const double v1 = SD[o] / len, v2 = PT[tb.slot[(j * cmax + o) * 2 + e]] / len;
        dshift[j * C + i] += w[j] * v1;
        dscale[j * C + i] += w[j] * v2;
        dweights[j] += a[j * C + i] * v2 + b[j * C + i] * v1;
      }
    }
  }
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto out = [&](std::vector<double>& v, std::initializer_list<int64_t> shape, const at::Tensor& like) {
    return at::from_blob(v.data(), shape, f64).to(like.scalar_type(), false, /*copy=*/true);
  };
  return {dz, out(dscale, {K, C}, scale), out(dshift, {K, C}, shift),
          out(dweights, {K}, weights)};
}

}  // namespace
}  // namespace nasprune::cpu

TORCH_LIBRARY_IMPL(nasprune, CPU, m) {
  m.impl("width_aggregate", &nasprune::cpu::width_aggregate_cpu);
  m.impl("width_aggregate_backward", &nasprune::cpu::width_aggregate_backward_cpu);
}
