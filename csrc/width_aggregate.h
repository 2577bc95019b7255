// Argument checks and candidate geometry of width_aggregate, shared by the CPU and CUDA kernels.
//
// Candidate j (width c_j, 1 <= c_j <= C) feeds output channel o < C_max = max_j c_j from its
// channels S_j(o) = [lo, lo + len) with lo = floor(o c_j / C_max), len = ceil((o + 1) c_j / C_max)
// - lo, each with weight 1 / len (adaptive average pooling along channels). c_j <= C_max, so len
// is 1 or 2 and S_j(o) lies in [0, o]. Conversely input channel i < c_j feeds the contiguous range
// of outputs A_j(i) = [floor(i C_max / c_j), ceil((i + 1) C_max / c_j)).
#pragma once
#include <string>

#include "common.h"

#ifdef __CUDACC__
#define NASPRUNE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NASPRUNE_HOST_DEVICE inline
#endif

namespace nasprune {

struct WidthArgs {
  ChannelView zv;
  at::Tensor z;                // in the layout zv chose
  at::Tensor scale, shift;     // fp32 (K, C), contiguous
  at::Tensor widths;           // int64 (K,), contiguous
  at::Tensor weights;          // fp32 (K,), contiguous
  int64_t K = 0, C = 0;
  bool relu = false;
};

inline WidthArgs width_args(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& widths, const at::Tensor& weights,
                            const std::string& act) {
  WidthArgs A;
  A.zv = channel_view(z, "z");
  A.z = in_layout(z, A.zv);
  A.C = z.size(1);
  TORCH_CHECK(widths.dim() == 1 && widths.size(0) >= 1 && widths.scalar_type() == at::kLong,
              "widths must be a non-empty int64 vector (one width per candidate), got ",
              widths.scalar_type(), " of shape ", widths.sizes());
  A.K = widths.size(0);
  auto check_param = [&](const at::Tensor& p, const char* name) {
    TORCH_CHECK(p.dim() == 2 && p.size(0) == A.K && p.size(1) == A.C, name, " must have shape (",
                A.K, ", ", A.C, ") (candidates, z's channels), got ", p.sizes());
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), name, " must be a floating tensor, got ",
                p.scalar_type());
    TORCH_CHECK(p.device() == z.device(), name, " is on ", p.device(), " but z is on ",
                z.device());
  };
  check_param(scale, "scale");
  check_param(shift, "shift");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == A.K, "weights must have shape (", A.K,
              ",) (one per candidate), got ", weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), "weights must be a floating tensor, got ",
              weights.scalar_type());
  TORCH_CHECK(widths.device() == z.device() && weights.device() == z.device(),
              "widths and weights must be on z's device ", z.device(), ", got ", widths.device(),
              " and ", weights.device());
  TORCH_CHECK(A.C <= 46340, "width_aggregate supports at most 46340 channels, got ", A.C);
  A.scale = scale.to(at::kFloat).contiguous();
  A.shift = shift.to(at::kFloat).contiguous();
  A.weights = weights.to(at::kFloat).contiguous();
  A.widths = widths.contiguous();
  A.relu = is_relu(act);
  return A;
}

// First input channel of S_j(o) and its length (1 or 2); c <= cmax, o < cmax.
template <typename I>
NASPRUNE_HOST_DEVICE void candidate_span(I o, I c, I cmax, I& lo, I& len) {
  lo = o * c / cmax;
  len = ((o + 1) * c + cmax - 1) / cmax - lo;
}

}  // namespace nasprune
