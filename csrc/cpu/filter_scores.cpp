// filter_scores on the CPU: one score per row (filter) of every weight tensor, in one parallel
// loop over all the filters of all the tensors.
//
// Filters differ in length by two orders of magnitude within a network (64 to 4608 elements in
// ResNet-50, the long ones in the late layers), so the loop is split by elements, not by rows:
// chunk p takes the rows that start within its equal share of all the elements. Each row is
// reduced by one thread in fp32 blocks with several independent partial sums (one running sum
// would serialise on the add latency and fall short of memory bandwidth), blocks summed in fp64.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "vec.h"

namespace nasprune::cpu {
namespace {

constexpr int kLanes = 32;  // partial sums per row: 2 AVX-512, 4 AVX2 or 8 SSE registers

template <ScoreKind K, typename T>
inline float block_sum(const T* w, const T* g, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const float x = to_float(w[i + j]);
      if constexpr (K == ScoreKind::L1) acc[j] += std::abs(x);
      else if constexpr (K == ScoreKind::L2) acc[j] += x * x;
      else acc[j] += x * to_float(g[i + j]);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const float x = to_float(w[i]);
    if constexpr (K == ScoreKind::L1) acc[j] += std::abs(x);
    else if constexpr (K == ScoreKind::L2) acc[j] += x * x;
    else acc[j] += x * to_float(g[i]);
  }
  for (int s = kLanes / 2; s > 0; s /= 2)  // pairwise
    for (int j = 0; j < s; ++j) acc[j] += acc[j + s];
  return acc[0];
}

template <ScoreKind K, typename T>
inline float row_score(const T* w, const T* g, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; i += kBlock)
    total += block_sum<K>(w + i, K == ScoreKind::Taylor ? g + i : g, std::min(kBlock, n - i));
  if constexpr (K == ScoreKind::L2) return static_cast<float>(std::sqrt(total));
  else if constexpr (K == ScoreKind::Taylor) return static_cast<float>(std::abs(total));
  else return static_cast<float>(total);
}

// Rows r0..r1 (global indices, in tensor order) of the segments.
template <ScoreKind K, typename T>
NASPRUNE_SIMD void score_range(const ScoreSegment* seg, const T* const* wp, const T* const* gp,
                               int64_t r0, int64_t r1, float* out) {
  int64_t t = 0;
  while (seg[t].first + seg[t].rows <= r0) ++t;
  for (int64_t r = r0; r < r1; ++r) {
    while (r >= seg[t].first + seg[t].rows) ++t;
    const int64_t len = seg[t].row_len, off = (r - seg[t].first) * len;
    out[r] = row_score<K>(wp[t] + off, gp[t] ? gp[t] + off : nullptr, len);
  }
}

template <ScoreKind K, typename T>
void score_rows(const ScoreTable& table, float* out) {
  const auto& seg = table.segments;
  const int64_t T_ = static_cast<int64_t>(seg.size());
  // work[t]: elements before tensor t, a row counting row_len + 1 so that empty rows count too.
  std::vector<int64_t> work(T_ + 1, 0);
  std::vector<const T*> wp(T_), gp(T_);
  for (int64_t t = 0; t < T_; ++t) {
    work[t + 1] = work[t] + seg[t].rows * (seg[t].row_len + 1);
    wp[t] = seg[t].w.template const_data_ptr<T>();
    gp[t] = seg[t].g.defined() ? seg[t].g.template const_data_ptr<T>() : nullptr;
  }
  const int64_t total = work[T_];
  // The first row (global index) that starts at or after work position x.
  auto first_row_at = [&](int64_t x) -> int64_t {
    if (x >= total) return table.total_rows;
    const int64_t t = std::upper_bound(work.begin(), work.end(), x) - work.begin() - 1;
    const int64_t unit = seg[t].row_len + 1;
    return seg[t].first + (x - work[t] + unit - 1) / unit;
  };
  const int64_t chunks = std::clamp<int64_t>(total / (1 << 16), 1, 16 * at::get_num_threads());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t r0 = first_row_at(total * c0 / chunks), r1 = first_row_at(total * c1 / chunks);
    if (r0 >= r1) return;
    score_range<K, T>(seg.data(), wp.data(), gp.data(), r0, r1, out);
  });
}

at::Tensor filter_scores_cpu(at::TensorList weights, at::TensorList grads, c10::string_view kind) {
  const ScoreTable table = score_table(weights, grads, kind);
  at::Tensor out = at::empty({table.total_rows}, weights[0].options().dtype(at::kFloat));
  if (table.total_rows == 0) return out;
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.dtype, "filter_scores", [&] {
    switch (table.kind) {
      case ScoreKind::L1: score_rows<ScoreKind::L1, scalar_t>(table, op); break;
      case ScoreKind::L2: score_rows<ScoreKind::L2, scalar_t>(table, op); break;
      case ScoreKind::Taylor: score_rows<ScoreKind::Taylor, scalar_t>(table, op); break;
    }
  });
  return out;
}

}  // namespace
}  // namespace nasprune::cpu

TORCH_LIBRARY_IMPL(nasprune, CPU, m) {
  m.impl("filter_scores", &nasprune::cpu::filter_scores_cpu);
}
