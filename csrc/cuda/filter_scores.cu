// filter_scores on CUDA: one score per row (filter) of every weight tensor, all tensors in one
// launch (one per kMaxTensors tensors; 96 covers every torchvision CNN but the deepest ResNets).
//
// The table of tensors (addresses, row lengths, first output rows) travels as a kernel argument,
// as in PyTorch's multi_tensor_apply: no host-to-device copy precedes the launch, and it can be
// captured in a CUDA graph. One warp reduces one row: a scalar head up to the row's first 16-byte
// boundary, 16-byte vector loads, a scalar tail, fp32 partial sums per lane and a shuffle tree;
// lane 0 writes the score. The order of operations per row is fixed, so scores are deterministic.
#include <torch/library.h>

#include <cmath>

#include "../common.h"
#include "cuda_utils.cuh"

namespace nasprune::cuda {
namespace {

constexpr int kMaxTensors = 96;  // the argument block stays under the portable 4 KB

struct ScoreArgs {
  const void* w[kMaxTensors];
  const void* g[kMaxTensors];        // gradients (taylor), else null
  int64_t row_len[kMaxTensors];
  int64_t first[kMaxTensors + 1];    // output index of each tensor's row 0; first[count]: the end
  int count;
};
static_assert(sizeof(ScoreArgs) <= 4096, "kernel arguments must fit in 4 KB");

template <ScoreKind K>
__device__ __forceinline__ float term(float x, float y) {
  if constexpr (K == ScoreKind::L1) return fabsf(x);
  else if constexpr (K == ScoreKind::L2) return x * x;
  else return x * y;
}

template <ScoreKind K, typename T>
__global__ void __launch_bounds__(kThreads)
    filter_scores_kernel(const __grid_constant__ ScoreArgs a, float* __restrict__ out) {
  constexpr int V = vec_width<T>();
  constexpr bool kGrad = K == ScoreKind::Taylor;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = a.first[0] + static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= a.first[a.count]) return;  // a whole warp leaves, so the shuffles below stay full
  int lo = 0, hi = a.count;  // the tensor of the row: the last t with first[t] <= row
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (a.first[mid] <= row) lo = mid;
    else hi = mid;
  }
  const int64_t n = a.row_len[lo], off = (row - a.first[lo]) * n;
  const T* __restrict__ w = static_cast<const T*>(a.w[lo]) + off;
  const T* __restrict__ g = kGrad ? static_cast<const T*>(a.g[lo]) + off : w;
  const uintptr_t wa = reinterpret_cast<uintptr_t>(w), ga = reinterpret_cast<uintptr_t>(g);
  // Vector loads need w (and g, at the same offset) on a 16-byte boundary after the head.
  const bool vec = wa % sizeof(T) == 0 && (ga - wa) % 16 == 0;
  const int64_t head = vec ? min64(n, (V - static_cast<int64_t>((wa / sizeof(T)) % V)) % V) : n;
  float acc = 0.f;
  for (int64_t i = lane; i < head; i += 32)
    acc += term<K>(static_cast<float>(w[i]), kGrad ? static_cast<float>(g[i]) : 0.f);
  const int64_t nvec = (n - head) / V;
  const T* wv = w + head;
  const T* gv = g + head;
#pragma unroll 4
  for (int64_t j = lane; j < nvec; j += 32) {
    float x[V], y[V];
    load_f<V>(wv + j * V, x);
    if constexpr (kGrad) load_f<V>(gv + j * V, y);
#pragma unroll
    for (int k = 0; k < V; ++k) acc += term<K>(x[k], kGrad ? y[k] : 0.f);
  }
  for (int64_t i = head + nvec * V + lane; i < n; i += 32)
    acc += term<K>(static_cast<float>(w[i]), kGrad ? static_cast<float>(g[i]) : 0.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    if constexpr (K == ScoreKind::L2) acc = sqrtf(acc);
    else if constexpr (K == ScoreKind::Taylor) acc = fabsf(acc);
    out[row] = acc;
  }
}

template <ScoreKind K, typename T>
void launch(const ScoreTable& table, float* out, cudaStream_t stream) {
  ScoreArgs a;
  a.count = 0;
  auto flush = [&] {
    const int64_t rows = a.count ? a.first[a.count] - a.first[0] : 0;
    if (rows > 0) {
      filter_scores_kernel<K, T><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0,
                                   stream>>>(a, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    a.count = 0;
  };
  for (const ScoreSegment& s : table.segments) {
    if (s.rows == 0) continue;
    if (a.count == kMaxTensors) flush();
    a.w[a.count] = s.w.const_data_ptr();
    a.g[a.count] = s.g.defined() ? s.g.const_data_ptr() : nullptr;
    a.row_len[a.count] = s.row_len;
    a.first[a.count] = s.first;
    a.first[++a.count] = s.first + s.rows;
  }
  flush();
}

at::Tensor filter_scores_cuda(at::TensorList weights, at::TensorList grads, c10::string_view kind) {
  const ScoreTable table = score_table(weights, grads, kind);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::Tensor out = at::empty({table.total_rows}, weights[0].options().dtype(at::kFloat));
  if (table.total_rows == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* op = out.data_ptr<float>();
  NASPRUNE_DISPATCH_ACT_TYPES(table.dtype, "filter_scores_cuda", [&] {
    switch (table.kind) {
      case ScoreKind::L1: launch<ScoreKind::L1, scalar_t>(table, op, stream); break;
      case ScoreKind::L2: launch<ScoreKind::L2, scalar_t>(table, op, stream); break;
      case ScoreKind::Taylor: launch<ScoreKind::Taylor, scalar_t>(table, op, stream); break;
    }
  });
  return out;
}

}  // namespace
}  // namespace nasprune::cuda

TORCH_LIBRARY_IMPL(nasprune, CUDA, m) {
  m.impl("filter_scores", &nasprune::cuda::filter_scores_cuda);
}
