// width_aggregate and width_aggregate_backward on CUDA (the same algorithm as the Triton kernels
// in kernels/width_aggregate.py; see there and csrc/width_aggregate.h for the geometry).
//
// Every kernel derives C_max and the candidate spans from `widths` on the device (clamped to
// [1, C]): nothing is synchronised with the host. Output channel o < C_max reads 2 MAXK slots
// t = 2 j + e (source lo_j(o) + e, used when j < K and e < len_j(o)):
//   u[:, o] = beta[o] + sum_t coef[t] z[:, src[t]],   y = act(u),   y[:, C_max:] = 0.
// Backward, du = dy act'(u):
//   out pass:  per output channel, recomputes u, stores du (relu only; identity uses dy) and writes
//              per-block fp32 partials of SD[o] = sum du and PT[t, o] = sum du z[:, src[t]];
//   in pass:   dz[:, i] = sum_j w_j scale[j, i] sum_{o in A_j(i)} du[:, o] / len_j(o);
//   finalise:  sums the partials in fp64 in a fixed order (deterministic), then per candidate
//              dshift = w R1, dscale = w R2 and dweights = sum_i scale R2 + shift R1, with
//              R1[j, i] = sum_{o in A_j(i)} SD[o] / len_j(o) and R2 likewise from PT.
// NCHW kernels move 16-byte vectors along positions when aligned; channels-last kernels give each
// thread one channel across rows. At most 8 candidates (MAXK = 2 or 8 instantiated).
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../width_aggregate.h"
#include "cuda_utils.cuh"

namespace nasprune::cuda {
namespace {

constexpr int kMaxCandidates = 8;

inline int64_t fill_blocks() {  // resident 256-thread blocks that fill the device
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
}

// ------------------------------------------------------------------------------ device helpers

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[N]) {
  const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<float>(x.v[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[N]) {
  Vec<T, N> x;
#pragma unroll
  for (int k = 0; k < N; ++k) x.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

struct WParams {
  const int64_t* widths;  // (K,)
  const float* weights;   // (K,)
  const float* scale;     // (K, C)
  const float* shift;     // (K, C)
  int K, C;
};

template <int MAXK>
struct Cands {  // clamped widths (1 beyond K) and C_max
  int c[MAXK];
  int cm;
};

template <int MAXK>
__device__ __forceinline__ Cands<MAXK> load_widths(const WParams& p) {
  Cands<MAXK> w;
  w.cm = 1;
#pragma unroll
  for (int j = 0; j < MAXK; ++j) {
    int64_t c = j < p.K ? __ldg(p.widths + j) : 1;
    c = c < 1 ? 1 : (c > p.C ? p.C : c);
    w.c[j] = static_cast<int>(c);
    w.cm = max(w.cm, w.c[j]);
  }
  return w;
}

template <int MAXK>
struct Slots {
  static constexpr int T = 2 * MAXK;
  int src[T];
  float coef[T];
  float beta;
  unsigned used;  // bit t: slot t reads z
};

// The slots of output channel o < C_max.
template <int MAXK>
__device__ __forceinline__ void output_slots(int o, const Cands<MAXK>& w, const WParams& p,
                                             Slots<MAXK>& s) {
  s.beta = 0.f;
  s.used = 0u;
#pragma unroll
  for (int j = 0; j < MAXK; ++j) {
    int lo, len;
    candidate_span<int>(o, w.c[j], w.cm, lo, len);
    const bool has = j < p.K;
    const float wl = has ? __ldg(p.weights + j) / static_cast<float>(len) : 0.f;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int t = 2 * j + e;
      const bool ok = has && e < len;
      s.src[t] = ok ? lo + e : 0;
      s.coef[t] = ok ? wl * __ldg(p.scale + j * p.C + lo + e) : 0.f;
      s.beta += ok ? wl * __ldg(p.shift + j * p.C + lo + e) : 0.f;
      s.used |= ok ? 1u << t : 0u;
    }
  }
}

// The outputs [alo, ahi) that input channel i feeds through candidate j, and its coefficient
// w_j scale[j, i] (an empty range where i >= c_j or j >= K).
template <int MAXK>
struct Adjoint {
  float coef[MAXK];
  int alo[MAXK], ahi[MAXK];
};

template <int MAXK>
__device__ __forceinline__ void input_adjoint(int i, const Cands<MAXK>& w, const WParams& p,
                                              Adjoint<MAXK>& a) {
#pragma unroll
  for (int j = 0; j < MAXK; ++j) {
    const int c = w.c[j];
    const bool valid = j < p.K && i < c;
    a.coef[j] = valid ? __ldg(p.weights + j) * __ldg(p.scale + j * p.C + i) : 0.f;
    a.alo[j] = i * w.cm / c;
    a.ahi[j] = valid ? min(((i + 1) * w.cm + c - 1) / c, w.cm) : a.alo[j];
  }
}

// Grid-stride walk of the channels-first element kernels, blockDim = (TX, TY): TY rows of the
// (N * C, inner) view at a time. Calls f(r, n, c) for each of this thread's rows r = n * C + c.
template <typename F>
__device__ __forceinline__ void for_each_row(int64_t rows, int C, F&& f) {
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t n = r / C;
    f(r, n, static_cast<int>(r - n * C));
  }
}

// ------------------------------------------------------------------------------ forward

// blockDim = (TX, TY): TX threads along a row's vectors, TY rows; rows = N * C.
template <typename T, int VEC, int MAXK, bool Relu>
__global__ void __launch_bounds__(kThreads)
    fwd_cf_kernel(const T* __restrict__ z, T* __restrict__ y, int64_t rows, int64_t inner,
                  WParams p) {
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int64_t vpr = inner / VEC;
  const int64_t vstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for_each_row(rows, p.C, [&](int64_t r, int64_t n, int o) {
    T* yr = y + r * inner;
    const int64_t v0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (o >= w.cm) {
      float zero[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) zero[k] = 0.f;
      for (int64_t v = v0; v < vpr; v += vstep) store_vec<VEC>(yr + v * VEC, zero);
      return;
    }
    Slots<MAXK> s;
    output_slots<MAXK>(o, w, p, s);
    const T* zn = z + n * p.C * inner;
    for (int64_t v = v0; v < vpr; v += vstep) {
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = s.beta;
#pragma unroll
      for (int t = 0; t < Slots<MAXK>::T; ++t) {
        if (s.used >> t & 1u) {
          float x[VEC];
          load_vec<VEC>(zn + s.src[t] * inner + v * VEC, x);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += s.coef[t] * x[k];
        }
      }
      if (Relu) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = acc[k] > 0.f ? acc[k] : 0.f;
      }
      store_vec<VEC>(yr + v * VEC, acc);
    }
  });
}

// blockDim = (TX, TY): TX threads own channels, TY walk rows (positions).
template <typename T, int MAXK, bool Relu>
__global__ void __launch_bounds__(kThreads)
    fwd_cl_kernel(const T* __restrict__ z, T* __restrict__ y, int64_t outer, WParams p) {
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int64_t qstep = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int o = blockIdx.y * blockDim.x + threadIdx.x; o < p.C; o += gridDim.y * blockDim.x) {
    const bool live = o < w.cm;
    Slots<MAXK> s;
    if (live) output_slots<MAXK>(o, w, p, s);
    for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; q < outer;
         q += qstep) {
      const T* zr = z + q * p.C;
      float acc = 0.f;
      if (live) {
        acc = s.beta;
#pragma unroll
        for (int t = 0; t < Slots<MAXK>::T; ++t)
          if (s.used >> t & 1u) acc += s.coef[t] * static_cast<float>(zr[s.src[t]]);
        if (Relu) acc = acc > 0.f ? acc : 0.f;
      }
      y[q * p.C + o] = static_cast<T>(acc);
    }
  }
}

// ------------------------------------------------------------------------------ backward

// Grid (P, C): block (chunk, o) walks a contiguous range of output channel o's vectors.
// part[(s * C + o) * P + chunk]: s = 0 is SD, s = 1 + t is PT of slot t.
template <typename T, int VEC, int MAXK, bool Relu>
__global__ void __launch_bounds__(kThreads)
    bwd_out_cf_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ du,
                      int64_t outer, int64_t inner, int64_t chunk, WParams p,
                      float* __restrict__ part, int64_t P) {
  constexpr int NS = 1 + 2 * MAXK;
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int o = blockIdx.y;
  if (o >= w.cm) return;  // the whole block: its partials are never read
  Slots<MAXK> s;
  output_slots<MAXK>(o, w, p, s);
  const int64_t vpr = inner / VEC, total = outer * vpr;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t v1 = v0 + chunk < total ? v0 + chunk : total;
  float acc[NS];
#pragma unroll
  for (int q = 0; q < NS; ++q) acc[q] = 0.f;
  for (int64_t jv = v0 + threadIdx.x; jv < v1; jv += kThreads) {
    const int64_t n = jv / vpr, v = jv - n * vpr;
    const int64_t zoff = n * p.C * inner + v * VEC;
    const int64_t off = zoff + static_cast<int64_t>(o) * inner;
    float d[VEC];
    load_vec<VEC>(dy + off, d);
    if (Relu) {
      float u[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) u[k] = s.beta;
#pragma unroll
      for (int t = 0; t < Slots<MAXK>::T; ++t) {
        if (s.used >> t & 1u) {
          float x[VEC];
          load_vec<VEC>(z + zoff + s.src[t] * inner, x);
#pragma unroll
          for (int k = 0; k < VEC; ++k) u[k] += s.coef[t] * x[k];
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) d[k] = u[k] > 0.f ? d[k] : 0.f;
      store_vec<VEC>(du + off, d);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[0] += d[k];
#pragma unroll
    for (int t = 0; t < Slots<MAXK>::T; ++t) {
      if (s.used >> t & 1u) {
        float x[VEC];
        load_vec<VEC>(z + zoff + s.src[t] * inner, x);  // an L1 hit under relu
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += d[k] * x[k];
        acc[1 + t] += sum;
      }
    }
  }
  block_sum<NS>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int q = 0; q < NS; ++q) part[(static_cast<int64_t>(q) * p.C + o) * P + blockIdx.x] = acc[q];
  }
}

// blockDim = (TX, TY), TY a power of two; grid (P, channel tiles): block (chunk, tile) walks rows
// [chunk * chunk_rows, ...) for channels tile * TX + [0, TX) and reduces over TY in shared memory.
template <typename T, int MAXK, bool Relu>
__global__ void __launch_bounds__(kThreads)
    bwd_out_cl_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ du,
                      int64_t outer, int64_t chunk_rows, WParams p, float* __restrict__ part,
                      int64_t P) {
  constexpr int NS = 1 + 2 * MAXK;
  __shared__ float sh[NS * kThreads];
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int o = blockIdx.y * TX + tx;
  const bool live = o < p.C && o < w.cm;
  Slots<MAXK> s;
  if (live) output_slots<MAXK>(o, w, p, s);
  float acc[NS];
#pragma unroll
  for (int q = 0; q < NS; ++q) acc[q] = 0.f;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < outer ? r0 + chunk_rows : outer;
  if (live) {
    for (int64_t q = r0 + ty; q < r1; q += TY) {
      const T* zr = z + q * p.C;
      float d = static_cast<float>(dy[q * p.C + o]);
      if (Relu) {
        float u = s.beta;
#pragma unroll
        for (int t = 0; t < Slots<MAXK>::T; ++t)
          if (s.used >> t & 1u) u += s.coef[t] * static_cast<float>(zr[s.src[t]]);
        d = u > 0.f ? d : 0.f;
        du[q * p.C + o] = static_cast<T>(d);
      }
      acc[0] += d;
#pragma unroll
      for (int t = 0; t < Slots<MAXK>::T; ++t)
        if (s.used >> t & 1u) acc[1 + t] += d * static_cast<float>(zr[s.src[t]]);
    }
  }
#pragma unroll
  for (int q = 0; q < NS; ++q) sh[(q * TY + ty) * TX + tx] = acc[q];
  __syncthreads();
  for (int st = TY / 2; st > 0; st >>= 1) {
    if (ty < st) {
#pragma unroll
      for (int q = 0; q < NS; ++q) sh[(q * TY + ty) * TX + tx] += sh[(q * TY + ty + st) * TX + tx];
    }
    __syncthreads();
  }
  if (ty == 0 && live) {
#pragma unroll
    for (int q = 0; q < NS; ++q)
      part[(static_cast<int64_t>(q) * p.C + o) * P + blockIdx.x] = sh[(q * TY) * TX + tx];
  }
}

// inv_len[j * C + o] = 1 / len_j(o) for o < C_max (zero elsewhere).
template <int MAXK>
__global__ void __launch_bounds__(kThreads) inv_len_kernel(WParams p, float* __restrict__ inv) {
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int64_t total = static_cast<int64_t>(p.K) * p.C;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; x < total;
       x += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int j = static_cast<int>(x / p.C), o = static_cast<int>(x - static_cast<int64_t>(j) * p.C);
    int c = 1;
#pragma unroll
    for (int k = 0; k < MAXK; ++k) c = k == j ? w.c[k] : c;  // no local-memory indexing
    float v = 0.f;
    if (o < w.cm) {
      int lo, len;
      candidate_span<int>(o, c, w.cm, lo, len);
      v = 1.f / static_cast<float>(len);
    }
    inv[x] = v;
  }
}

// blockDim = (TX, TY): TX threads along a row's vectors, TY rows (N * C rows of dz).
template <typename T, int VEC, int MAXK>
__global__ void __launch_bounds__(kThreads)
    bwd_in_cf_kernel(const T* __restrict__ du, T* __restrict__ dz, int64_t rows, int64_t inner,
                     WParams p, const float* __restrict__ inv) {
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int64_t vpr = inner / VEC;
  const int64_t vstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for_each_row(rows, p.C, [&](int64_t r, int64_t n, int i) {
    Adjoint<MAXK> a;
    input_adjoint<MAXK>(i, w, p, a);
    const T* dun = du + n * p.C * inner;
    for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vpr;
         v += vstep) {
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
#pragma unroll
      for (int j = 0; j < MAXK; ++j) {
        for (int o = a.alo[j]; o < a.ahi[j]; ++o) {
          const float f = a.coef[j] * __ldg(inv + j * p.C + o);
          float x[VEC];
          load_vec<VEC>(dun + static_cast<int64_t>(o) * inner + v * VEC, x);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += f * x[k];
        }
      }
      store_vec<VEC>(dz + r * inner + v * VEC, acc);
    }
  });
}

// blockDim = (TX, TY): TX threads own input channels, TY walk rows (positions).
template <typename T, int MAXK>
__global__ void __launch_bounds__(kThreads)
    bwd_in_cl_kernel(const T* __restrict__ du, T* __restrict__ dz, int64_t outer, WParams p,
                     const float* __restrict__ inv) {
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int64_t qstep = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < p.C; i += gridDim.y * blockDim.x) {
    Adjoint<MAXK> a;
    input_adjoint<MAXK>(i, w, p, a);
    for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; q < outer;
         q += qstep) {
      const T* dr = du + q * p.C;
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < MAXK; ++j)
        for (int o = a.alo[j]; o < a.ahi[j]; ++o)
          acc += a.coef[j] * __ldg(inv + j * p.C + o) * static_cast<float>(dr[o]);
      dz[q * p.C + i] = static_cast<T>(acc);
    }
  }
}

// tot[s * C + o] = sum over the P partials of (s, o), in fp64 and a fixed order; zero for
// o >= C_max.
template <int MAXK>
__global__ void __launch_bounds__(kThreads)
    bwd_sum_kernel(const float* __restrict__ part, int64_t P, WParams p, float* __restrict__ tot) {
  constexpr int NS = 1 + 2 * MAXK;
  const Cands<MAXK> w = load_widths<MAXK>(p);
  for (int o = blockIdx.x; o < p.C; o += gridDim.x) {  // uniform per block: barriers are safe
    double acc[NS];
#pragma unroll
    for (int q = 0; q < NS; ++q) acc[q] = 0.0;
    if (o < w.cm) {
      for (int64_t x = threadIdx.x; x < P; x += kThreads) {
#pragma unroll
        for (int q = 0; q < NS; ++q) acc[q] += part[(static_cast<int64_t>(q) * p.C + o) * P + x];
      }
    }
    block_sum<NS>(acc);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int q = 0; q < NS; ++q) tot[q * p.C + o] = static_cast<float>(acc[q]);
    }
  }
}

// One block per candidate j: dscale[j], dshift[j] (zero beyond c_j) and dweights[j] in fp32.
template <int MAXK>
__global__ void __launch_bounds__(kThreads)
    bwd_param_kernel(const float* __restrict__ tot, WParams p, float* __restrict__ dscale,
                     float* __restrict__ dshift, float* __restrict__ dweights) {
  const Cands<MAXK> w = load_widths<MAXK>(p);
  const int j = blockIdx.x;
  int c = 1;
#pragma unroll
  for (int k = 0; k < MAXK; ++k) c = k == j ? w.c[k] : c;
  const float wj = p.weights[j];
  double dw[1] = {0.0};
  for (int i = threadIdx.x; i < p.C; i += kThreads) {
    float r1 = 0.f, r2 = 0.f;
    if (i < c) {
      const int alo = i * w.cm / c, ahi = min(((i + 1) * w.cm + c - 1) / c, w.cm);
      for (int o = alo; o < ahi; ++o) {
        int lo, len;
        candidate_span<int>(o, c, w.cm, lo, len);
        const float f = 1.f / static_cast<float>(len);
        r1 += f * tot[o];
        r2 += f * tot[(1 + 2 * j + (i - lo)) * p.C + o];
      }
      dw[0] += static_cast<double>(p.scale[j * p.C + i]) * r2 +
               static_cast<double>(p.shift[j * p.C + i]) * r1;
    }
    dshift[j * p.C + i] = wj * r1;
    dscale[j * p.C + i] = wj * r2;
  }
  block_sum<1>(dw);
  if (threadIdx.x == 0) dweights[j] = static_cast<float>(dw[0]);
}

// ------------------------------------------------------------------------------ host side

void check_cuda(const at::Tensor& z) {
  TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor here, got one on ", z.device());
}

WParams params_of(const WidthArgs& A) {
  return {A.widths.const_data_ptr<int64_t>(), A.weights.const_data_ptr<float>(),
          A.scale.const_data_ptr<float>(), A.shift.const_data_ptr<float>(),
          static_cast<int>(A.K), static_cast<int>(A.C)};
}

// Calls f with std::integral_constant<int, MAXK>, the smallest instantiated MAXK >= K.
template <typename F>
void dispatch_candidates(int64_t K, F&& f) {
  TORCH_CHECK(K <= kMaxCandidates, "the CUDA width_aggregate kernels take at most ",
              kMaxCandidates, " candidates, got ", K, " (the Triton backend takes any number)");
  if (K <= 2)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, kMaxCandidates>{});
}

// Elements per vector access of the channels-first kernels: 16 bytes, 8 with up to 8 candidates
// (each thread holds a vector per slot in flight; 16 bytes there would spill).
template <typename T, int MAXK>
constexpr int cf_vec_width() {
  return static_cast<int>((MAXK > 2 ? 8 : 16) / sizeof(T));
}

template <typename T>
bool aligned(const T* p, int vec) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec) == 0;
}

// Launch shape of the channels-first element kernels: TX threads along a row's vectors.
struct RowLaunch {
  dim3 grid, block;
};

RowLaunch row_launch(int64_t rows, int64_t vpr) {
  const int tx = static_cast<int>(std::min<int64_t>(kThreads, next_pow2(std::max<int64_t>(vpr, 1))));
  const int ty = kThreads / tx;
  const int64_t gx = std::min<int64_t>(ceil_div(vpr, tx), 65535);
  const int64_t gy = std::min<int64_t>(ceil_div(rows, ty), 65535);
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(tx, ty)};
}

// Channels-last element kernels: TX threads own channels, TY rows.
RowLaunch channel_launch(int64_t outer, int64_t C) {
  const TileShape t = tile_shape(C, 1);
  const int64_t gy = std::min<int64_t>(t.tiles, 65535);
  const int64_t gx = std::max<int64_t>(1, std::min(ceil_div(outer, t.ty), ceil_div(fill_blocks() * 4, gy)));
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(t.tx, t.ty)};
}

template <typename T, int VEC, int MAXK>
void forward_cf(const T* zp, T* yp, const WidthArgs& A, const WParams& p, cudaStream_t stream) {
  const RowLaunch L = row_launch(A.zv.outer * A.C, A.zv.inner / VEC);
  if (A.relu)
    fwd_cf_kernel<T, VEC, MAXK, true><<<L.grid, L.block, 0, stream>>>(zp, yp, A.zv.outer * A.C,
                                                                       A.zv.inner, p);
  else
    fwd_cf_kernel<T, VEC, MAXK, false><<<L.grid, L.block, 0, stream>>>(zp, yp, A.zv.outer * A.C,
                                                                        A.zv.inner, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor width_aggregate_cuda(const at::Tensor& z_in, const at::Tensor& scale,
                                const at::Tensor& shift, const at::Tensor& widths,
                                const at::Tensor& weights, c10::string_view act) {
  check_cuda(z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const WidthArgs A = width_args(z_in, scale, shift, widths, weights, std::string(act));
  at::Tensor y = at::empty(A.z.sizes(), A.z.options().memory_format(A.zv.format));
  if (y.numel() == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const WParams p = params_of(A);
  NASPRUNE_DISPATCH_ACT_TYPES(A.z.scalar_type(), "width_aggregate_cuda", [&] {
    dispatch_candidates(A.K, [&](auto mk) {
      constexpr int MAXK = decltype(mk)::value;
      constexpr int V = cf_vec_width<scalar_t, MAXK>();
      const auto* zp = A.z.const_data_ptr<scalar_t>();
      auto* yp = y.data_ptr<scalar_t>();
      if (A.zv.channels_last) {
        const RowLaunch L = channel_launch(A.zv.outer, A.C);
        if (A.relu)
          fwd_cl_kernel<scalar_t, MAXK, true><<<L.grid, L.block, 0, stream>>>(zp, yp, A.zv.outer, p);
        else
          fwd_cl_kernel<scalar_t, MAXK, false><<<L.grid, L.block, 0, stream>>>(zp, yp, A.zv.outer, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (A.zv.inner % V == 0 && aligned(zp, V) && aligned(yp, V)) {
        forward_cf<scalar_t, V, MAXK>(zp, yp, A, p, stream);
      } else {
        forward_cf<scalar_t, 1, MAXK>(zp, yp, A, p, stream);
      }
    });
  });
  return y;
}

template <typename T, int VEC, int MAXK>
void backward_cf(const T* dyp, const T* zp, T* dup, T* dzp, const WidthArgs& A, const WParams& p,
                 const float* inv, at::Tensor& part, int64_t& P, cudaStream_t stream) {
  constexpr int NS = 1 + 2 * MAXK;
  const int64_t total = A.zv.outer * (A.zv.inner / VEC);
  P = std::max<int64_t>(1, std::min(ceil_div(fill_blocks(), A.C), ceil_div(total, 4 * kThreads)));
  const int64_t chunk = ceil_div(total, P);
  P = ceil_div(total, chunk);
  part = at::empty({NS, A.C, P}, A.z.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(A.C));
  float* pp = part.data_ptr<float>();
  if (A.relu)
    bwd_out_cf_kernel<T, VEC, MAXK, true><<<grid, kThreads, 0, stream>>>(
        dyp, zp, dup, A.zv.outer, A.zv.inner, chunk, p, pp, P);
  else
    bwd_out_cf_kernel<T, VEC, MAXK, false><<<grid, kThreads, 0, stream>>>(
        dyp, zp, dup, A.zv.outer, A.zv.inner, chunk, p, pp, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const RowLaunch L = row_launch(A.zv.outer * A.C, A.zv.inner / VEC);
  bwd_in_cf_kernel<T, VEC, MAXK><<<L.grid, L.block, 0, stream>>>(
      A.relu ? dup : dyp, dzp, A.zv.outer * A.C, A.zv.inner, p, inv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int MAXK>
void backward_cl(const T* dyp, const T* zp, T* dup, T* dzp, const WidthArgs& A, const WParams& p,
                 const float* inv, at::Tensor& part, int64_t& P, cudaStream_t stream) {
  constexpr int NS = 1 + 2 * MAXK;
  const TileShape t = tile_shape(A.C, 1);
  P = std::max<int64_t>(1, std::min(ceil_div(A.zv.outer, t.ty), ceil_div(fill_blocks(), t.tiles)));
  const int64_t chunk_rows = ceil_div(A.zv.outer, P);
  P = ceil_div(A.zv.outer, chunk_rows);
  part = at::empty({NS, A.C, P}, A.z.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(t.tiles)), block(t.tx, t.ty);
  float* pp = part.data_ptr<float>();
  if (A.relu)
    bwd_out_cl_kernel<T, MAXK, true><<<grid, block, 0, stream>>>(dyp, zp, dup, A.zv.outer,
                                                                 chunk_rows, p, pp, P);
  else
    bwd_out_cl_kernel<T, MAXK, false><<<grid, block, 0, stream>>>(dyp, zp, dup, A.zv.outer,
                                                                  chunk_rows, p, pp, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const RowLaunch L = channel_launch(A.zv.outer, A.C);
  bwd_in_cl_kernel<T, MAXK><<<L.grid, L.block, 0, stream>>>(A.relu ? dup : dyp, dzp, A.zv.outer,
                                                            p, inv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> width_aggregate_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& widths, const at::Tensor& weights,
    c10::string_view act) {
  check_cuda(z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const WidthArgs A = width_args(z_in, scale, shift, widths, weights, std::string(act));
  TORCH_CHECK(dy_in.sizes() == z_in.sizes(), "dy must have shape ", z_in.sizes(), ", got ",
              dy_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == z_in.scalar_type(), "dy has dtype ", dy_in.scalar_type(),
              " but z has ", z_in.scalar_type());
  TORCH_CHECK(dy_in.device() == z_in.device(), "dy is on ", dy_in.device(), " but z is on ",
              z_in.device());
  const at::Tensor dy = in_layout(dy_in, A.zv);
  at::Tensor dz = at::empty_like(A.z);
  const auto f32 = A.z.options().dtype(at::kFloat);
  at::Tensor dscale = at::empty({A.K, A.C}, f32), dshift = at::empty({A.K, A.C}, f32),
             dweights = at::empty({A.K}, f32);
  if (A.z.numel() == 0) {
    dscale.zero_();
    dshift.zero_();
    dweights.zero_();
  } else {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const WParams p = params_of(A);
    const at::Tensor du = A.relu ? at::empty_like(dy) : dy;
    at::Tensor inv = at::empty({A.K, A.C}, f32), part, tot;
    int64_t P = 0;
    NASPRUNE_DISPATCH_ACT_TYPES(A.z.scalar_type(), "width_aggregate_backward_cuda", [&] {
      dispatch_candidates(A.K, [&](auto mk) {
        constexpr int MAXK = decltype(mk)::value;
        constexpr int NS = 1 + 2 * MAXK;
        constexpr int V = cf_vec_width<scalar_t, MAXK>();
        const int64_t nkc = A.K * A.C;
        inv_len_kernel<MAXK><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(nkc, kThreads), 1024)),
                               kThreads, 0, stream>>>(p, inv.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const auto* dyp = dy.const_data_ptr<scalar_t>();
        const auto* zp = A.z.const_data_ptr<scalar_t>();
        auto* dup = const_cast<scalar_t*>(du.const_data_ptr<scalar_t>());  // written only if relu
        auto* dzp = dz.data_ptr<scalar_t>();
        const float* ip = inv.const_data_ptr<float>();
        if (A.zv.channels_last) {
          backward_cl<scalar_t, MAXK>(dyp, zp, dup, dzp, A, p, ip, part, P, stream);
        } else if (A.zv.inner % V == 0 && aligned(dyp, V) && aligned(zp, V) && aligned(dup, V) &&
                   aligned(dzp, V)) {
          backward_cf<scalar_t, V, MAXK>(dyp, zp, dup, dzp, A, p, ip, part, P, stream);
        } else {
          backward_cf<scalar_t, 1, MAXK>(dyp, zp, dup, dzp, A, p, ip, part, P, stream);
        }
        tot = at::empty({NS, A.C}, f32);
        bwd_sum_kernel<MAXK><<<static_cast<unsigned>(std::min<int64_t>(A.C, 65535)), kThreads, 0,
                               stream>>>(part.const_data_ptr<float>(), P, p, tot.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        bwd_param_kernel<MAXK><<<static_cast<unsigned>(A.K), kThreads, 0, stream>>>(
            tot.const_data_ptr<float>(), p, dscale.data_ptr<float>(), dshift.data_ptr<float>(),
            dweights.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {dz, dscale.to(scale.scalar_type()), dshift.to(shift.scalar_type()),
          dweights.to(weights.scalar_type())};
}

}  // namespace
}  // namespace nasprune::cuda

TORCH_LIBRARY_IMPL(nasprune, CUDA, m) {
  m.impl("width_aggregate", &nasprune::cuda::width_aggregate_cuda);
  m.impl("width_aggregate_backward", &nasprune::cuda::width_aggregate_backward_cuda);
}
