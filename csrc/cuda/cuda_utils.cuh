// Device helpers shared by the CUDA kernels: dtype dispatch, 16-byte vector loads and stores,
// Welford (count, mean, M2) merges and deterministic block reductions.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

// The three activation dtypes the ops accept (channel_view rejects the rest).
#define NASPRUNE_DISPATCH_ACT_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace nasprune::cuda {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarps = kThreads / 32;

// Elements of T in one 16-byte access.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks of Kernel (256 threads, `smem` bytes of dynamic shared memory, fixed per kernel) that
// are resident on the current device at once: grids sized to this run in one full wave.
// Cached per kernel and device; a host-side query, no synchronisation.
template <auto Kernel>
int64_t resident_blocks(size_t smem = 0) {
  static std::atomic<int> cache[64];
  const int dev = c10::cuda::current_device();
  int per_sm = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, smem));
    per_sm = std::max(per_sm, 1);
    if (dev < 64) cache[dev].store(per_sm, std::memory_order_relaxed);
  }
  return static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The plain type of a Pack's size, so that every access is one ld/st.global.v4 (a struct copy
// can be split into scalar stores by the compiler).
template <int Bytes> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = uint32_t; };
template <> struct RawOf<2> { using type = uint16_t; };

// N consecutive elements at p (p aligned to N * sizeof(T)) as fp32.
template <int N, typename T>
__device__ __forceinline__ void load_f(const T* __restrict__ p, float (&out)[N]) {
  using Raw = typename RawOf<sizeof(Pack<T, N>)>::type;
  const Raw raw = *reinterpret_cast<const Raw*>(p);
  Pack<T, N> pk;
  __builtin_memcpy(&pk, &raw, sizeof(Raw));
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<float>(pk.v[k]);
}

// Explicit PTX stores: nvcc otherwise sometimes splits a 16-byte store into 4-byte pieces.
// No "memory" clobber: no kernel reads back what it stores, and loads may move across them.
__device__ __forceinline__ void store_raw(void* p, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w));
}
__device__ __forceinline__ void store_raw(void* p, uint2 v) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y));
}
__device__ __forceinline__ void store_raw(void* p, uint32_t v) {
  asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(v));
}
__device__ __forceinline__ void store_raw(void* p, uint16_t v) {
  asm volatile("st.global.u16 [%0], %1;" ::"l"(p), "h"(v));
}

template <int N, typename T>
__device__ __forceinline__ void store_f(T* __restrict__ p, const float (&in)[N]) {
  using Raw = typename RawOf<sizeof(Pack<T, N>)>::type;
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = static_cast<T>(in[k]);
  Raw raw;
  __builtin_memcpy(&raw, &pk, sizeof(Raw));
  store_raw(p, raw);
}

template <int N, typename T>
__device__ __forceinline__ void store_zero(T* __restrict__ p) {
  float zero[N];
#pragma unroll
  for (int k = 0; k < N; ++k) zero[k] = 0.f;
  store_f<N>(p, zero);
}

// Chan et al.'s merge of (nb, mb, m2b) into (n, m, m2). Stable when |mean| >> std: only
// differences of means enter, never E[x^2] - E[x]^2.
template <typename A>
__device__ __forceinline__ void welford_merge(A& n, A& m, A& m2, A nb, A mb, A m2b) {
  if (nb == A(0)) return;
  const A total = n + nb;
  const A w = nb / total;
  const A delta = mb - m;
  m += delta * w;
  m2 += m2b + delta * delta * n * w;
  n = total;
}

// Welford over a block of 256 threads: the merged (n, m, m2) lands in thread 0. Deterministic
// (fixed merge tree). Ends with a barrier, so it can be called again in a loop.
template <typename A>
__device__ __forceinline__ void block_welford(A& n, A& m, A& m2) {
  __shared__ A sh[3][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const A nb = __shfl_down_sync(0xffffffffu, n, off);
    const A mb = __shfl_down_sync(0xffffffffu, m, off);
    const A m2b = __shfl_down_sync(0xffffffffu, m2, off);
    welford_merge(n, m, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    sh[0][warp] = n;
    sh[1][warp] = m;
    sh[2][warp] = m2;
  }
  __syncthreads();
  if (warp == 0) {
    n = lane < kWarps ? sh[0][lane] : A(0);
    m = lane < kWarps ? sh[1][lane] : A(0);
    m2 = lane < kWarps ? sh[2][lane] : A(0);
#pragma unroll
    for (int off = kWarps / 2; off > 0; off >>= 1) {
      const A nb = __shfl_down_sync(0xffffffffu, n, off);
      const A mb = __shfl_down_sync(0xffffffffu, m, off);
      const A m2b = __shfl_down_sync(0xffffffffu, m2, off);
      welford_merge(n, m, m2, nb, mb, m2b);
    }
  }
  __syncthreads();
}

// Sums of N values over a block of 256 threads into thread 0; deterministic; ends with a barrier.
template <int N, typename A>
__device__ __forceinline__ void block_sum(A (&v)[N]) {
  __shared__ A sh[N][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < N; ++q) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < N; ++q) sh[q][warp] = v[q];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < N; ++q) {
      v[q] = lane < kWarps ? sh[q][lane] : A(0);
#pragma unroll
      for (int off = kWarps / 2; off > 0; off >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], off);
    }
  }
  __syncthreads();
}

// Position (row o, vector i) in one channel's (outer, vpr) grid of vectors, advanced by a fixed
// step without divisions in the loop.
struct RowPos {
  int64_t o, i;
};

struct RowStep {
  int64_t d_o, d_i, vpr;  // step = d_o * vpr + d_i, 0 <= d_i < vpr
  __device__ __forceinline__ RowStep(int64_t step, int64_t vpr_) : d_o(step / vpr_), d_i(step % vpr_), vpr(vpr_) {}
  __device__ __forceinline__ RowPos at(int64_t j) const { return {j / vpr, j % vpr}; }
  __device__ __forceinline__ void advance(RowPos& p) const {
    p.i += d_i;
    p.o += d_o;
    if (p.i >= vpr) {
      p.i -= vpr;
      ++p.o;
    }
  }
};

// Channel-tiled launch for (rows, C) row-major data: each thread owns `vec` consecutive channels,
// TX threads span a tile of channels and TY = 256 / TX threads walk rows.
struct TileShape {
  int tx, ty;
  int64_t tiles;  // channel tiles of tx * vec channels
};

inline TileShape tile_shape(int64_t channels, int vec) {
  const int64_t groups = ceil_div(channels, vec);
  const int tx = static_cast<int>(std::min<int64_t>(32, next_pow2(groups)));
  return {tx, kThreads / tx, ceil_div(groups, tx)};
}

}  // namespace nasprune::cuda
