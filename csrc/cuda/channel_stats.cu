// channel_stats on CUDA: per-channel mean and biased variance in one pass over memory.
//
// Stage 1 reads z once and writes fp32 Welford partials (count, mean, M2) per (chunk, channel):
//   NCHW (outer, C, inner):  grid (chunks, C); a block walks a contiguous range of one channel's
//                            rows with 16-byte loads; each vector's own (mean, M2) is merged into
//                            the thread's state, then the block merges its 256 states.
//   channels-last (rows, C): threads own a few channels and walk rows; a shared-memory tree over
//                            the block's row threads merges them.
// Stage 2 merges each channel's partials in fp64 in a fixed order (deterministic).
// Only differences of means are ever combined (Chan's update), so the result stays accurate when
// |mean| >> std.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common.h"
#include "cuda_utils.cuh"

namespace nasprune::cuda {
namespace {

// Largest count a stage-1 partial may hold, so that fp32 counts stay exact.
constexpr int64_t kMaxPartialCount = int64_t(1) << 22;

template <int VEC>
__device__ __forceinline__ void merge_vector(float& n, float& m, float& m2, const float (&x)[VEC]) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) s += x[k];
  const float mu = s * (1.f / VEC);
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float d = x[k] - mu;
    q += d * d;
  }
  welford_merge(n, m, m2, static_cast<float>(VEC), mu, q);
}

// Partials: ws[(chunk * C + c) * 3 + {0, 1, 2}] = (count, mean, M2).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    stats_nchw_kernel(const T* __restrict__ z, int64_t outer, int64_t C, int64_t inner,
                      int64_t chunk_len, float* __restrict__ ws) {
  const int64_t vpr = inner / VEC, nvec = outer * vpr;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t end = min64(nvec, begin + chunk_len);
  const int64_t row_stride = C * inner;
  const RowStep step(kThreads, vpr);
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const T* zc = z + c * inner;
    float n = 0.f, m = 0.f, m2 = 0.f;
    int64_t j = begin + threadIdx.x;
    RowPos p = step.at(j);
    for (; j + kThreads < end; j += 2 * kThreads) {  // two loads in flight per thread
      RowPos p1 = p;
      step.advance(p1);
      float x0[VEC], x1[VEC];
      load_f<VEC>(zc + p.o * row_stride + p.i * VEC, x0);
      load_f<VEC>(zc + p1.o * row_stride + p1.i * VEC, x1);
      merge_vector<VEC>(n, m, m2, x0);
      merge_vector<VEC>(n, m, m2, x1);
      p = p1;
      step.advance(p);
    }
    if (j < end) {
      float x0[VEC];
      load_f<VEC>(zc + p.o * row_stride + p.i * VEC, x0);
      merge_vector<VEC>(n, m, m2, x0);
    }
    block_welford(n, m, m2);
    if (threadIdx.x == 0) {
      float* w = ws + (static_cast<int64_t>(blockIdx.x) * C + c) * 3;
      w[0] = n;
      w[1] = m;
      w[2] = m2;
    }
  }
}

// blockDim = (TX, TY); thread (tx, ty) owns channels [c0, c0 + VEC) of its tile and rows
// r0 + ty, r0 + ty + TY, ... of its chunk. Dynamic shared memory: 2 * TY * TX * VEC + TY * TX floats.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    stats_cl_kernel(const T* __restrict__ z, int64_t rows, int64_t C, int64_t tiles,
                    int64_t rows_per_chunk, float* __restrict__ ws) {
  extern __shared__ float smem[];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int TXV = TX * VEC;
  float* sm_mean = smem;
  float* sm_m2 = smem + TY * TXV;
  float* sm_n = smem + 2 * TY * TXV;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int64_t r1 = min64(rows, r0 + rows_per_chunk);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t c0 = (tile * TX + tx) * VEC;
    const bool active = c0 < C;
    float n = 0.f, mean[VEC], m2[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) mean[k] = m2[k] = 0.f;
    auto update = [&](const float(&x)[VEC]) {  // Welford step; one division per row
      n += 1.f;
      const float inv = 1.f / n;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = x[k] - mean[k];
        mean[k] += d * inv;
        m2[k] += d * (x[k] - mean[k]);
      }
    };
    if (active) {
      const T* zc = z + c0;
      int64_t r = r0 + ty;
      for (; r + TY < r1; r += 2 * TY) {
        float x0[VEC], x1[VEC];
        load_f<VEC>(zc + r * C, x0);
        load_f<VEC>(zc + (r + TY) * C, x1);
        update(x0);
        update(x1);
      }
      if (r < r1) {
        float x0[VEC];
        load_f<VEC>(zc + r * C, x0);
        update(x0);
      }
    }
    // Tree over ty: slot (ty, tx) belongs to thread (tx, ty).
    sm_n[ty * TX + tx] = n;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sm_mean[ty * TXV + tx * VEC + k] = mean[k];
      sm_m2[ty * TXV + tx * VEC + k] = m2[k];
    }
    __syncthreads();
    for (int s = TY / 2; s > 0; s >>= 1) {
      if (ty < s) {
        const int o = ty + s;
        const float nb = sm_n[o * TX + tx];
        if (nb > 0.f) {
          const float total = n + nb, w = nb / total;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float delta = sm_mean[o * TXV + tx * VEC + k] - mean[k];
            mean[k] += delta * w;
            m2[k] += sm_m2[o * TXV + tx * VEC + k] + delta * delta * n * w;
            sm_mean[ty * TXV + tx * VEC + k] = mean[k];
            sm_m2[ty * TXV + tx * VEC + k] = m2[k];
          }
          n = total;
          sm_n[ty * TX + tx] = n;
        }
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float* w = ws + (static_cast<int64_t>(blockIdx.x) * C + c0 + k) * 3;
        w[0] = n;
        w[1] = mean[k];
        w[2] = m2[k];
      }
    }
  }
}

// One block per channel merges its `parts` partials in fp64.
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const float* __restrict__ ws, int64_t parts, int64_t C,
                          float* __restrict__ mean, float* __restrict__ var) {
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    double n = 0, m = 0, m2 = 0;
    for (int64_t p = threadIdx.x; p < parts; p += kThreads) {
      const float* w = ws + (p * C + c) * 3;
      welford_merge<double>(n, m, m2, w[0], w[1], w[2]);
    }
    block_welford(n, m, m2);
    if (threadIdx.x == 0) {
      mean[c] = static_cast<float>(m);
      var[c] = static_cast<float>(m2 / n);
    }
  }
}

template <typename T, int VEC>
int64_t stats_nchw(const T* zp, const ChannelView& v, at::Tensor& ws, const at::TensorOptions& f32,
                   cudaStream_t stream) {
  const int64_t C = v.channels, nvec = v.outer * (v.inner / VEC);
  // One wave: chunks * C <= resident blocks, each block at least ~4 vectors per thread.
  const int64_t resident = resident_blocks<stats_nchw_kernel<T, VEC>>();
  int64_t chunks = std::min(resident / C, ceil_div(nvec, 4 * kThreads));
  chunks = std::max({chunks, ceil_div(nvec * VEC, kMaxPartialCount), int64_t(1)});
  const int64_t chunk_len = ceil_div(nvec, chunks);
  chunks = ceil_div(nvec, chunk_len);
  ws = at::empty({chunks * C * 3}, f32);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(C, 65535)));
  stats_nchw_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(zp, v.outer, C, v.inner, chunk_len,
                                                           ws.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return chunks;
}

template <typename T, int VEC>
int64_t stats_cl(const T* zp, const ChannelView& v, at::Tensor& ws, const at::TensorOptions& f32,
                 cudaStream_t stream) {
  const int64_t C = v.channels, rows = v.outer;
  const TileShape t = tile_shape(C, VEC);
  const int64_t tiles_y = std::min<int64_t>(t.tiles, 65535);
  const size_t smem = sizeof(float) * (2 * t.ty * t.tx * VEC + t.ty * t.tx);  // same for every tx
  const int64_t resident = resident_blocks<stats_cl_kernel<T, VEC>>(smem);
  int64_t chunks = std::min(ceil_div(rows, t.ty), resident / tiles_y);
  chunks = std::max({chunks, ceil_div(rows, kMaxPartialCount), int64_t(1)});
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  chunks = ceil_div(rows, rows_per_chunk);
  ws = at::empty({chunks * C * 3}, f32);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(tiles_y));
  const dim3 block(t.tx, t.ty);
  stats_cl_kernel<T, VEC><<<grid, block, smem, stream>>>(zp, rows, C, t.tiles, rows_per_chunk,
                                                         ws.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return chunks;
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& z_in) {
  const ChannelView v = channel_view(z_in, "z");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = in_layout(z_in, v);
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({v.channels}, f32), var = at::empty({v.channels}, f32);
  if (v.per_channel() == 0) {  // torch.var_mean of an empty set
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t C = v.channels;
  at::Tensor ws;
  int64_t parts = 0;
  NASPRUNE_DISPATCH_ACT_TYPES(z.scalar_type(), "channel_stats_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    const auto* zp = z.const_data_ptr<scalar_t>();
    if (v.channels_last) {
      if (aligned16(zp) && C % V == 0)
        parts = stats_cl<scalar_t, V>(zp, v, ws, f32, stream);
      else
        parts = stats_cl<scalar_t, 1>(zp, v, ws, f32, stream);
    } else {
      if (aligned16(zp) && v.inner % V == 0)
        parts = stats_nchw<scalar_t, V>(zp, v, ws, f32, stream);
      else
        parts = stats_nchw<scalar_t, 1>(zp, v, ws, f32, stream);
    }
  });
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(C, 65535));
  stats_finalize_kernel<<<grid, kThreads, 0, stream>>>(ws.const_data_ptr<float>(), parts, C,
                                                       mean.data_ptr<float>(),
                                                       var.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

}  // namespace
}  // namespace nasprune::cuda

TORCH_LIBRARY_IMPL(nasprune, CUDA, m) {
  m.impl("channel_stats", &nasprune::cuda::channel_stats_cuda);
}
