// gate_epilogue and gate_epilogue_backward on CUDA.
//
// Forward:  y[:, c] = g[c] * act(a[c] * z[:, src[c]] + b[c]), zero where src[c] < 0 or g[c] == 0
//           (those vectors are stored without reading z).
//   NCHW (outer, C, inner):  a grid-stride walk over y's 16-byte vectors; each thread tracks its
//                            (row, channel, position) incrementally, so the loop has no divisions.
//   channels-last (rows, C): threads own a few consecutive channels (parameters in registers)
//                            and walk rows.
// Backward: with u = a z + b and m = act'(u), one pass over (dy, z) writes dz = dy g m a and
//           reduces dgate = sum dy act(u), dshift = sum dy g m, dscale = sum dy g m z.
//   NCHW:          grid (chunks, K): a block reduces a contiguous range of one z channel.
//   channels-last: threads own channels across rows; a shared-memory tree over the row threads.
//   Both write fp32 partials per (chunk, channel); a second kernel sums them in fp64 in a fixed
//   order (deterministic) and writes every output channel (zeros where no z channel feeds it).
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>

#include "../common.h"
#include "cuda_utils.cuh"

namespace nasprune::cuda {
namespace {

struct Params {  // fp32 per output channel, plus the source map (z channel or -1)
  const float *a, *b, *g;
  const int64_t* src;
};

// ------------------------------------------------------------------------------ forward

template <int VEC, bool Relu, typename T>
__device__ __forceinline__ void epilogue_store(T* __restrict__ y, bool live, const float (&x)[VEC],
                                               float a, float b, float g) {
  if (!live) {
    store_zero<VEC>(y);
    return;
  }
  float out[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float u = a * x[k] + b;
    if (Relu) u = u > 0.f ? u : 0.f;
    out[k] = g * u;
  }
  store_f<VEC>(y, out);
}

struct OCI {  // (row o, output channel c, vector i) of a y vector
  int64_t o, c, i;
};

template <typename T, int VEC, bool Relu>
__global__ void __launch_bounds__(kThreads)
    fwd_nchw_kernel(const T* __restrict__ z, T* __restrict__ y, int64_t outer, int64_t out_c,
                    int64_t K, int64_t inner, Params p) {
  const int64_t vpr = inner / VEC;
  const int64_t total = outer * out_c * vpr;  // y vectors
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= total) return;
  // Mixed-radix (o, c, i) digits of the stride, then of j.
  const int64_t sr = stride / vpr, si = stride - sr * vpr;
  const int64_t so = sr / out_c, sc = sr - so * out_c;
  OCI q;
  {
    const int64_t r = j / vpr;
    q.i = j - r * vpr;
    q.o = r / out_c;
    q.c = r - q.o * out_c;
  }
  auto advance = [&](OCI& x) {
    x.i += si;
    if (x.i >= vpr) {
      x.i -= vpr;
      ++x.c;
    }
    x.c += sc;  // x.c <= out_c before, sc < out_c: one carry at most
    if (x.c >= out_c) {
      x.c -= out_c;
      ++x.o;
    }
    x.o += so;
  };
  for (; j + stride < total; j += 2 * stride) {  // two vectors in flight per thread
    OCI q1 = q;
    advance(q1);
    const int64_t s0 = __ldg(p.src + q.c), s1 = __ldg(p.src + q1.c);
    const float g0 = __ldg(p.g + q.c), g1 = __ldg(p.g + q1.c);
    const bool live0 = s0 >= 0 && g0 != 0.f, live1 = s1 >= 0 && g1 != 0.f;
    float x0[VEC], x1[VEC];
    if (live0) load_f<VEC>(z + (q.o * K + s0) * inner + q.i * VEC, x0);
    if (live1) load_f<VEC>(z + (q1.o * K + s1) * inner + q1.i * VEC, x1);
    epilogue_store<VEC, Relu>(y + j * VEC, live0, x0, __ldg(p.a + q.c), __ldg(p.b + q.c), g0);
    epilogue_store<VEC, Relu>(y + (j + stride) * VEC, live1, x1, __ldg(p.a + q1.c),
                              __ldg(p.b + q1.c), g1);
    q = q1;
    advance(q);
  }
  if (j < total) {
    const int64_t s0 = __ldg(p.src + q.c);
    const float g0 = __ldg(p.g + q.c);
    const bool live0 = s0 >= 0 && g0 != 0.f;
    float x0[VEC];
    if (live0) load_f<VEC>(z + (q.o * K + s0) * inner + q.i * VEC, x0);
    epilogue_store<VEC, Relu>(y + j * VEC, live0, x0, __ldg(p.a + q.c), __ldg(p.b + q.c), g0);
  }
}

// blockDim = (TX, TY); thread (tx, ty) owns output channels [c0, c0 + VEC) and rows
// blockIdx.x * TY + ty + k * gridDim.x * TY. Without Gather, K == out_c and z is read as vectors;
// with Gather each live channel reads its scalar z[r, src[c]] (the row is in L1).
template <typename T, int VEC, bool Relu, bool Gather>
__global__ void __launch_bounds__(kThreads)
    fwd_cl_kernel(const T* __restrict__ z, T* __restrict__ y, int64_t rows, int64_t out_c,
                  int64_t K, int64_t tiles, Params p) {
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t rstride = static_cast<int64_t>(gridDim.x) * TY;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t c0 = (tile * TX + tx) * VEC;
    if (c0 >= out_c) continue;  // no barriers in this kernel
    float a[VEC], b[VEC], g[VEC];
    int64_t s[VEC];
    bool live[VEC], any = false;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = c0 + k;
      a[k] = p.a[c];
      b[k] = p.b[c];
      g[k] = p.g[c];
      s[k] = Gather ? p.src[c] : c;
      live[k] = s[k] >= 0 && g[k] != 0.f;
      any = any || live[k];
    }
    int64_t r = static_cast<int64_t>(blockIdx.x) * TY + ty;
    if (!any) {
      for (; r < rows; r += rstride) store_zero<VEC>(y + r * out_c + c0);
      continue;
    }
    auto load_row = [&](int64_t row, float(&x)[VEC]) {
      if (Gather) {
        const T* zr = z + row * K;
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[k] = live[k] ? static_cast<float>(zr[s[k]]) : 0.f;
      } else {
        load_f<VEC>(z + row * K + c0, x);
      }
    };
    auto store_row = [&](int64_t row, const float(&x)[VEC]) {
      float out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float u = a[k] * x[k] + b[k];
        if (Relu) u = u > 0.f ? u : 0.f;
        out[k] = live[k] ? g[k] * u : 0.f;
      }
      store_f<VEC>(y + row * out_c + c0, out);
    };
    for (; r + rstride < rows; r += 2 * rstride) {
      float x0[VEC], x1[VEC];
      load_row(r, x0);
      load_row(r + rstride, x1);
      store_row(r, x0);
      store_row(r + rstride, x1);
    }
    if (r < rows) {
      float x0[VEC];
      load_row(r, x0);
      store_row(r, x0);
    }
  }
}

// ------------------------------------------------------------------------------ backward

// One vector of (z, dy): accumulates (dgate, dshift, dscale) terms and stores dz.
template <int VEC, bool Relu, typename T>
__device__ __forceinline__ void backward_vec(const float (&zv)[VEC], const float (&dv)[VEC],
                                             float a, float b, float g, float (&acc)[3],
                                             T* __restrict__ dz) {
  float out[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float zi = zv[k], d = dv[k];
    const float u = a * zi + b;
    const bool on = !Relu || u > 0.f;
    const float du = on ? d * g : 0.f;
    acc[0] += on ? d * u : 0.f;
    acc[1] += du;
    acc[2] += du * zi;
    out[k] = du * a;
  }
  store_f<VEC>(dz, out);
}

// Partials: ws[(chunk * K + k) * 3 + {0, 1, 2}] = (dgate, dshift, dscale) sums of z channel k.
template <typename T, int VEC, bool Relu>
__global__ void __launch_bounds__(kThreads)
    bwd_nchw_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz,
                    int64_t outer, int64_t K, int64_t out_c, int64_t inner, int64_t chunk_len,
                    Params p, const int64_t* __restrict__ index, float* __restrict__ ws) {
  const int64_t vpr = inner / VEC, nvec = outer * vpr;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t end = min64(nvec, begin + chunk_len);
  const int64_t zrow = K * inner, dyrow = out_c * inner;
  const RowStep step(kThreads, vpr);
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    const int64_t c = index != nullptr ? index[k] : k;
    const float a = p.a[c], b = p.b[c], g = p.g[c];
    const T* zk = z + k * inner;
    T* dzk = dz + k * inner;
    const T* dyc = dy + c * inner;
    float acc[3] = {0.f, 0.f, 0.f};
    int64_t j = begin + threadIdx.x;
    RowPos q = step.at(j);
    for (; j + kThreads < end; j += 2 * kThreads) {  // four loads in flight per thread
      RowPos q1 = q;
      step.advance(q1);
      const int64_t zo0 = q.o * zrow + q.i * VEC, zo1 = q1.o * zrow + q1.i * VEC;
      float z0[VEC], d0[VEC], z1[VEC], d1[VEC];
      load_f<VEC>(zk + zo0, z0);
      load_f<VEC>(dyc + q.o * dyrow + q.i * VEC, d0);
      load_f<VEC>(zk + zo1, z1);
      load_f<VEC>(dyc + q1.o * dyrow + q1.i * VEC, d1);
      backward_vec<VEC, Relu>(z0, d0, a, b, g, acc, dzk + zo0);
      backward_vec<VEC, Relu>(z1, d1, a, b, g, acc, dzk + zo1);
      q = q1;
      step.advance(q);
    }
    if (j < end) {
      const int64_t zo0 = q.o * zrow + q.i * VEC;
      float z0[VEC], d0[VEC];
      load_f<VEC>(zk + zo0, z0);
      load_f<VEC>(dyc + q.o * dyrow + q.i * VEC, d0);
      backward_vec<VEC, Relu>(z0, d0, a, b, g, acc, dzk + zo0);
    }
    block_sum<3>(acc);
    if (threadIdx.x == 0) {
      float* w = ws + (static_cast<int64_t>(blockIdx.x) * K + k) * 3;
      w[0] = acc[0];
      w[1] = acc[1];
      w[2] = acc[2];
    }
  }
}

// blockDim = (TX, TY); thread (tx, ty) owns z channels [k0, k0 + VEC) and rows r0 + ty,
// r0 + ty + TY, ... of its chunk. Without Gather, out_c == K and dy is read as vectors; with
// Gather, dy[r, index[k]] as scalars. Dynamic shared memory: 3 * TY * TX * VEC floats.
template <typename T, int VEC, bool Relu, bool Gather>
__global__ void __launch_bounds__(kThreads, Gather ? 2 : 3)  // 3 blocks/SM: <= 85 registers
    bwd_cl_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz,
                  int64_t rows, int64_t K, int64_t out_c, int64_t tiles, int64_t rows_per_chunk,
                  Params p, const int64_t* __restrict__ index, float* __restrict__ ws) {
  extern __shared__ float smem[];  // [3][TY][TX * VEC]
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int TXV = TX * VEC;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int64_t r1 = min64(rows, r0 + rows_per_chunk);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t k0 = (tile * TX + tx) * VEC;
    const bool active = k0 < K;
    float sg[VEC], sb[VEC], sa[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sg[k] = sb[k] = sa[k] = 0.f;
    if (active) {
      float a[VEC], b[VEC], g[VEC];
      int oc[VEC];  // output channels (< 2^31, checked on the host)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        oc[k] = static_cast<int>(Gather ? index[k0 + k] : k0 + k);
        a[k] = p.a[oc[k]];
        b[k] = p.b[oc[k]];
        g[k] = p.g[oc[k]];
      }
      auto load_dy = [&](int64_t row, float(&d)[VEC]) {
        if (Gather) {
          const T* dr = dy + row * out_c;
#pragma unroll
          for (int k = 0; k < VEC; ++k) d[k] = static_cast<float>(dr[oc[k]]);
        } else {
          load_f<VEC>(dy + row * out_c + k0, d);
        }
      };
      auto apply = [&](int64_t row, const float(&zv)[VEC], const float(&dv)[VEC]) {
        float out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float zi = zv[k], d = dv[k];
          const float u = a[k] * zi + b[k];
          const bool on = !Relu || u > 0.f;
          const float du = on ? d * g[k] : 0.f;
          sg[k] += on ? d * u : 0.f;
          sb[k] += du;
          sa[k] += du * zi;
          out[k] = du * a[k];
        }
        store_f<VEC>(dz + row * K + k0, out);
      };
      int64_t r = r0 + ty;
      // Two rows in flight without Gather; with it the VEC scalar dy loads already overlap
      // (and a second row would spill).
      for (; !Gather && r + TY < r1; r += 2 * TY) {
        float z0[VEC], d0[VEC], z1[VEC], d1[VEC];
        load_f<VEC>(z + r * K + k0, z0);
        load_dy(r, d0);
        load_f<VEC>(z + (r + TY) * K + k0, z1);
        load_dy(r + TY, d1);
        apply(r, z0, d0);
        apply(r + TY, z1, d1);
      }
      for (; r < r1; r += TY) {
        float z0[VEC], d0[VEC];
        load_f<VEC>(z + r * K + k0, z0);
        load_dy(r, d0);
        apply(r, z0, d0);
      }
    }
    float* s0 = smem;
    float* s1 = smem + TY * TXV;
    float* s2 = smem + 2 * TY * TXV;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int x = ty * TXV + tx * VEC + k;
      s0[x] = sg[k];
      s1[x] = sb[k];
      s2[x] = sa[k];
    }
    __syncthreads();
    for (int st = TY / 2; st > 0; st >>= 1) {
      if (ty < st) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int x = ty * TXV + tx * VEC + k, xo = x + st * TXV;
          s0[x] += s0[xo];
          s1[x] += s1[xo];
          s2[x] += s2[xo];
        }
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int x = tx * VEC + k;
        float* w = ws + (static_cast<int64_t>(blockIdx.x) * K + k0 + k) * 3;
        w[0] = s0[x];
        w[1] = s1[x];
        w[2] = s2[x];
      }
    }
    __syncthreads();  // the next tile reuses the shared memory
  }
}

// One block per output channel c sums the partials of its z channel src[c] in fp64 (fixed order)
// and writes dgate, dshift, dscale; zeros where src[c] < 0.
__global__ void __launch_bounds__(kThreads)
    bwd_finalize_kernel(const float* __restrict__ ws, int64_t parts, int64_t K, int64_t out_c,
                        const int64_t* __restrict__ src, float* __restrict__ da,
                        float* __restrict__ db, float* __restrict__ dg) {
  for (int64_t c = blockIdx.x; c < out_c; c += gridDim.x) {
    const int64_t k = src[c];
    double s[3] = {0.0, 0.0, 0.0};
    if (k >= 0) {
      for (int64_t p = threadIdx.x; p < parts; p += kThreads) {
        const float* w = ws + (p * K + k) * 3;
        s[0] += w[0];
        s[1] += w[1];
        s[2] += w[2];
      }
    }
    block_sum<3>(s);
    if (threadIdx.x == 0) {
      dg[c] = static_cast<float>(s[0]);
      db[c] = static_cast<float>(s[1]);
      da[c] = static_cast<float>(s[2]);
    }
  }
}

// ------------------------------------------------------------------------------ host side

Params params_of(const Prepared& P) {
  return {P.a.const_data_ptr<float>(), P.b.const_data_ptr<float>(), P.g.const_data_ptr<float>(),
          P.src.const_data_ptr<int64_t>()};
}

void check_cuda(const at::Tensor& z) {
  TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor here, got one on ", z.device());
}

// Work split of a per-channel reduction over nvec vectors into chunks of chunk_len vectors.
struct Chunks {
  int64_t count, len;
};

// One wave: chunks * channels <= resident blocks, each block at least ~4 vectors per thread.
Chunks split_channel(int64_t nvec, int64_t channels, int64_t resident) {
  int64_t chunks = std::min(resident / channels, ceil_div(nvec, 4 * kThreads));
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t len = ceil_div(nvec, chunks);
  return {ceil_div(nvec, len), len};
}

Chunks split_rows(int64_t rows, int64_t row_threads, int64_t tiles_y, int64_t resident) {
  int64_t chunks = std::min(ceil_div(rows, row_threads), resident / tiles_y);
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t len = ceil_div(rows, chunks);
  return {ceil_div(rows, len), len};
}

template <typename T, int VEC, bool Relu>
void launch_fwd_nchw(const T* zp, T* yp, const Prepared& P, cudaStream_t stream) {
  const int64_t total = P.zv.outer * P.out_c * (P.zv.inner / VEC);
  const int64_t blocks =
      std::min(ceil_div(total, kThreads), resident_blocks<fwd_nchw_kernel<T, VEC, Relu>>());
  fwd_nchw_kernel<T, VEC, Relu><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      zp, yp, P.zv.outer, P.out_c, P.zv.channels, P.zv.inner, params_of(P));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, bool Relu, bool Gather>
void launch_fwd_cl(const T* zp, T* yp, const Prepared& P, cudaStream_t stream) {
  const TileShape t = tile_shape(P.out_c, VEC);
  const int64_t tiles_y = std::min<int64_t>(t.tiles, 65535);
  const int64_t resident = resident_blocks<fwd_cl_kernel<T, VEC, Relu, Gather>>();
  const int64_t bx = std::max<int64_t>(1, std::min(ceil_div(P.zv.outer, t.ty), resident / tiles_y));
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(tiles_y)), block(t.tx, t.ty);
  fwd_cl_kernel<T, VEC, Relu, Gather><<<grid, block, 0, stream>>>(
      zp, yp, P.zv.outer, P.out_c, P.zv.channels, t.tiles, params_of(P));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void forward_cl(const T* zp, T* yp, const Prepared& P, bool gather, cudaStream_t stream) {
  if (P.relu) {
    if (gather) launch_fwd_cl<T, VEC, true, true>(zp, yp, P, stream);
    else launch_fwd_cl<T, VEC, true, false>(zp, yp, P, stream);
  } else {
    if (gather) launch_fwd_cl<T, VEC, false, true>(zp, yp, P, stream);
    else launch_fwd_cl<T, VEC, false, false>(zp, yp, P, stream);
  }
}

template <typename T, int VEC>
void forward_nchw(const T* zp, T* yp, const Prepared& P, cudaStream_t stream) {
  if (P.relu) launch_fwd_nchw<T, VEC, true>(zp, yp, P, stream);
  else launch_fwd_nchw<T, VEC, false>(zp, yp, P, stream);
}

at::Tensor gate_epilogue_cuda(const at::Tensor& z_in, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& gate,
                              c10::string_view act, const c10::optional<at::Tensor>& out_index,
                              const c10::optional<at::Tensor>& mean,
                              const c10::optional<at::Tensor>& invstd) {
  check_cuda(z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Prepared P = prepare(z_in, scale, shift, gate, std::string(act), out_index);
  batch_stats(mean, invstd, P.out_c, z_in);  // only checked: they matter to the backward
  at::Tensor y = at::empty(output_shape(P.z, P.out_c), P.z.options().memory_format(P.zv.format));
  if (y.numel() == 0) return y;
  if (P.zv.channels == 0) {  // an empty out_index: every output channel is zero
    y.zero_();
    return y;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool gather = out_index.has_value();
  NASPRUNE_DISPATCH_ACT_TYPES(P.z.scalar_type(), "gate_epilogue_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    const auto* zp = P.z.const_data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    if (P.zv.channels_last) {
      const bool vec = aligned16(yp) && P.out_c % V == 0 &&
                       (gather || (aligned16(zp) && P.zv.channels % V == 0));
      if (vec) forward_cl<scalar_t, V>(zp, yp, P, gather, stream);
      else forward_cl<scalar_t, 1>(zp, yp, P, gather, stream);
    } else {
      const bool vec = aligned16(yp) && aligned16(zp) && P.zv.inner % V == 0;
      if (vec) forward_nchw<scalar_t, V>(zp, yp, P, stream);
      else forward_nchw<scalar_t, 1>(zp, yp, P, stream);
    }
  });
  return y;
}

struct BackwardArgs {
  const Prepared& P;
  const int64_t* index;  // out_index (per z channel) or nullptr
  cudaStream_t stream;
  at::TensorOptions f32;
};

template <typename T, int VEC, bool Relu>
at::Tensor launch_bwd_nchw(const T* dyp, const T* zp, T* dzp, const BackwardArgs& A,
                           int64_t& parts) {
  const Prepared& P = A.P;
  const int64_t K = P.zv.channels;
  const Chunks ch = split_channel(P.zv.outer * (P.zv.inner / VEC), K,
                                  resident_blocks<bwd_nchw_kernel<T, VEC, Relu>>());
  at::Tensor ws = at::empty({ch.count * K * 3}, A.f32);
  const dim3 grid(static_cast<unsigned>(ch.count), static_cast<unsigned>(std::min<int64_t>(K, 65535)));
  bwd_nchw_kernel<T, VEC, Relu><<<grid, kThreads, 0, A.stream>>>(
      dyp, zp, dzp, P.zv.outer, K, P.out_c, P.zv.inner, ch.len, params_of(P), A.index,
      ws.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  parts = ch.count;
  return ws;
}

template <typename T, int VEC, bool Relu, bool Gather>
at::Tensor launch_bwd_cl(const T* dyp, const T* zp, T* dzp, const BackwardArgs& A,
                         int64_t& parts) {
  const Prepared& P = A.P;
  const int64_t K = P.zv.channels;
  const TileShape t = tile_shape(K, VEC);
  const int64_t tiles_y = std::min<int64_t>(t.tiles, 65535);
  const size_t smem = sizeof(float) * 3 * t.ty * t.tx * VEC;  // same for every tx
  const Chunks ch =
      split_rows(P.zv.outer, t.ty, tiles_y, resident_blocks<bwd_cl_kernel<T, VEC, Relu, Gather>>(smem));
  at::Tensor ws = at::empty({ch.count * K * 3}, A.f32);
  const dim3 grid(static_cast<unsigned>(ch.count), static_cast<unsigned>(tiles_y)),
      block(t.tx, t.ty);
  bwd_cl_kernel<T, VEC, Relu, Gather><<<grid, block, smem, A.stream>>>(
      dyp, zp, dzp, P.zv.outer, K, P.out_c, t.tiles, ch.len, params_of(P), A.index,
      ws.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  parts = ch.count;
  return ws;
}

template <typename T, int VEC>
at::Tensor backward_cl(const T* dyp, const T* zp, T* dzp, const BackwardArgs& A, int64_t& parts) {
  const bool gather = A.index != nullptr;
  if (A.P.relu)
    return gather ? launch_bwd_cl<T, VEC, true, true>(dyp, zp, dzp, A, parts)
                  : launch_bwd_cl<T, VEC, true, false>(dyp, zp, dzp, A, parts);
  return gather ? launch_bwd_cl<T, VEC, false, true>(dyp, zp, dzp, A, parts)
                : launch_bwd_cl<T, VEC, false, false>(dyp, zp, dzp, A, parts);
}

template <typename T, int VEC>
at::Tensor backward_nchw(const T* dyp, const T* zp, T* dzp, const BackwardArgs& A,
                         int64_t& parts) {
  return A.P.relu ? launch_bwd_nchw<T, VEC, true>(dyp, zp, dzp, A, parts)
                  : launch_bwd_nchw<T, VEC, false>(dyp, zp, dzp, A, parts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_epilogue_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& gate, c10::string_view act,
    const c10::optional<at::Tensor>& out_index, const c10::optional<at::Tensor>& mean,
    const c10::optional<at::Tensor>& invstd) {
  check_cuda(z_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Prepared P = prepare(z_in, scale, shift, gate, std::string(act), out_index);
  const auto stats = batch_stats(mean, invstd, P.out_c, z_in);
  TORCH_CHECK(P.out_c <= std::numeric_limits<int>::max(), "at most 2^31 - 1 channels, got ",
              P.out_c);
  check_gradient(dy_in, z_in, P);
  const at::Tensor dy = in_layout(dy_in, P.zv);
  at::Tensor dz = at::empty_like(P.z);
  const auto f32 = P.z.options().dtype(at::kFloat);
  at::Tensor da = at::empty({P.out_c}, f32), db = at::empty({P.out_c}, f32),
             dg = at::empty({P.out_c}, f32);
  if (P.out_c > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t K = P.zv.channels;
    at::Tensor ws;
    int64_t parts = 0;
    const at::Tensor index = out_index.has_value() ? out_index->contiguous() : at::Tensor();
    const BackwardArgs A{P, out_index.has_value() ? index.const_data_ptr<int64_t>() : nullptr,
                         stream, f32};
    if (P.z.numel() > 0) {
      NASPRUNE_DISPATCH_ACT_TYPES(P.z.scalar_type(), "gate_epilogue_backward_cuda", [&] {
        constexpr int V = vec_width<scalar_t>();
        const auto* dyp = dy.const_data_ptr<scalar_t>();
        const auto* zp = P.z.const_data_ptr<scalar_t>();
        auto* dzp = dz.data_ptr<scalar_t>();
        const bool gather = A.index != nullptr;
        if (P.zv.channels_last) {
          const bool vec = aligned16(zp) && aligned16(dzp) && K % V == 0 &&
                           (gather || (aligned16(dyp) && P.out_c % V == 0));
          ws = vec ? backward_cl<scalar_t, V>(dyp, zp, dzp, A, parts)
                   : backward_cl<scalar_t, 1>(dyp, zp, dzp, A, parts);
        } else {
          const bool vec = aligned16(zp) && aligned16(dzp) && aligned16(dyp) && P.zv.inner % V == 0;
          ws = vec ? backward_nchw<scalar_t, V>(dyp, zp, dzp, A, parts)
                   : backward_nchw<scalar_t, 1>(dyp, zp, dzp, A, parts);
        }
      });
    }
    // parts == 0 (z empty): every channel's sums are zero. src < 0 channels get zeros too.
    const float* wsp = parts > 0 ? ws.const_data_ptr<float>() : nullptr;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(P.out_c, 65535));
    bwd_finalize_kernel<<<grid, kThreads, 0, stream>>>(
        wsp, parts, K, P.out_c, P.src.const_data_ptr<int64_t>(), da.data_ptr<float>(),
        db.data_ptr<float>(), dg.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (stats.has_value() && P.z.numel() > 0) {
    // Gradient through the batch statistics: dz += alpha[c] + beta[c] * z (see the CPU kernel's
    // bn_correction). Done here with ATen ops, one extra pass over (dz, z); folding it into a
    // second sweep of the kernel above (as the CPU and Triton kernels do) is still to come.
    const double count = static_cast<double>(P.zv.outer) * P.zv.inner;
    const at::Tensor& m = stats->first;
    const at::Tensor& istd = stats->second;
    const at::Tensor dweight_hat = istd * (da - m * db);
    const at::Tensor beta = -P.a * istd * dweight_hat / count;
    at::Tensor alpha = -P.a * db / count - beta * m;
    at::Tensor beta_k = beta, alpha_k = alpha;
    if (out_index.has_value()) {
      alpha_k = alpha.index_select(0, *out_index);
      beta_k = beta.index_select(0, *out_index);
    }
    std::vector<int64_t> shape(P.z.dim(), 1);
    shape[1] = P.zv.channels;
    dz = (dz.to(at::kFloat) + alpha_k.view(shape) + beta_k.view(shape) * P.z.to(at::kFloat))
             .to(P.z.scalar_type())
             .contiguous(P.zv.format);
  }
  return {dz, da.to(scale.scalar_type()), db.to(shift.scalar_type()), dg.to(gate.scalar_type())};
}

}  // namespace
}  // namespace nasprune::cuda

TORCH_LIBRARY_IMPL(nasprune, CUDA, m) {
  m.impl("gate_epilogue", &nasprune::cuda::gate_epilogue_cuda);
  m.impl("gate_epilogue_backward", &nasprune::cuda::gate_epilogue_backward_cuda);
}
