// Argument checks and the memory-layout view shared by the CPU and CUDA kernels.
//
// Every op sees its (N, C, *) activations as (outer, C, inner): NCHW-contiguous tensors have
// outer = N and inner = H * W; channels_last tensors (and NCHW ones with inner == 1) have
// outer = N * H * W and inner = 1, so the channel index varies fastest.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace nasprune {

struct ChannelView {
  int64_t outer = 0, channels = 0, inner = 0;
  bool channels_last = false;  // true: element (o, c) sits at o * channels + c
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  int64_t per_channel() const { return outer * inner; }
};

inline ChannelView channel_view(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.dim() >= 2, name, " must have shape (N, C, ...), got ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && z.scalar_type() != at::kDouble,
              name, " must be float32, float16 or bfloat16, got ", z.scalar_type());
  ChannelView v;
  v.channels = z.size(1);
  const int64_t n = z.size(0);
  int64_t inner = 1;  // from the shape, not numel / (n * C): correct when n or C is 0
  for (int64_t d = 2; d < z.dim(); ++d) inner *= z.size(d);
  const bool cl = z.dim() == 4 && !z.is_contiguous() &&
                  z.is_contiguous(at::MemoryFormat::ChannelsLast);
  v.format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  v.channels_last = cl || inner == 1;
  v.outer = v.channels_last ? n * inner : n;
  v.inner = v.channels_last ? 1 : inner;
  return v;
}

// The tensor in the layout channel_view chose for `like` (a no-op when already there).
inline at::Tensor in_layout(const at::Tensor& t, const ChannelView& v) {
  return t.contiguous(v.format);
}

inline void check_act(const std::string& act) {
  TORCH_CHECK(act == "identity" || act == "relu",
              "act must be \"identity\" or \"relu\", got \"", act, "\"");
}

inline bool is_relu(const std::string& act) {
  check_act(act);
  return act == "relu";
}

// Checks one per-channel parameter and returns it as a contiguous fp32 vector.
inline at::Tensor channel_param(const at::Tensor& p, const char* name, int64_t channels,
                                const at::Tensor& z) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == channels, name, " must have shape (", channels,
              ",) to match the output channels, got ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), name, " must be a floating tensor, got ",
              p.scalar_type());
  TORCH_CHECK(p.device() == z.device(), name, " is on ", p.device(), " but z is on ",
              z.device());
  return p.to(at::kFloat).contiguous();
}

// Per output channel: the z channel that feeds it, or -1 (an all-zero output channel).
// Without out_index this is the identity map and z has as many channels as the gate.
inline at::Tensor source_channels(const c10::optional<at::Tensor>& out_index,
                                  int64_t out_channels, const at::Tensor& z) {
  const int64_t k = z.size(1);
  if (!out_index.has_value()) {
    TORCH_CHECK(k == out_channels, "z has ", k, " channels but gate has ", out_channels,
                " (pass out_index to scatter fewer channels)");
    return at::arange(out_channels, z.options().dtype(at::kLong));
  }
  const at::Tensor& idx = *out_index;
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == k && idx.scalar_type() == at::kLong,
              "out_index must be an int64 vector of length ", k, " (z's channels), got ",
              idx.scalar_type(), " of shape ", idx.sizes());
  TORCH_CHECK(idx.device() == z.device(), "out_index is on ", idx.device(), " but z is on ",
              z.device());
  // The value checks read the index on the host: free on the CPU, a synchronisation per call
  // on a GPU (which would also break CUDA graphs), so there the caller vouches for the index
  // (GatedConvBNAct2d builds it from its own mask).
  const bool check = !z.is_cuda();
  if (check && k > 0) {
    const auto lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < out_channels, "out_index values must lie in [0, ",
                out_channels, "), got range [", lo, ", ", hi, "]");
  }
  auto src = at::full({out_channels}, -1, z.options().dtype(at::kLong));
  src.index_put_({idx}, at::arange(k, z.options().dtype(at::kLong)));
  TORCH_CHECK(!check || src.ge(0).sum().item<int64_t>() == k, "out_index values must be distinct");
  return src;
}

// The optional batch statistics (mean, invstd) of gate_epilogue(_backward), both or neither, as
// contiguous fp32 vectors of the output width.
inline c10::optional<std::pair<at::Tensor, at::Tensor>> batch_stats(
    const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& invstd,
    int64_t out_channels, const at::Tensor& z) {
  TORCH_CHECK(mean.has_value() == invstd.has_value(),
              "mean and invstd must be given together (batch statistics of z) or not at all");
  if (!mean.has_value()) return c10::nullopt;
  return std::make_pair(channel_param(*mean, "mean", out_channels, z),
                        channel_param(*invstd, "invstd", out_channels, z));
}

// Shape of the full-width output: z's shape with out_channels in dimension 1.
inline std::vector<int64_t> output_shape(const at::Tensor& z, int64_t out_channels) {
  auto shape = z.sizes().vec();
  shape[1] = out_channels;
  return shape;
}

// Checked and prepared arguments of gate_epilogue(_backward), shared by every backend.
struct Prepared {
  ChannelView zv;
  at::Tensor z, a, b, g, src;  // z in its layout; fp32 scale, shift, gate; the source map
  int64_t out_c;
  bool relu;
};

inline Prepared prepare(const at::Tensor& z_in, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& gate, const std::string& act,
                        const c10::optional<at::Tensor>& out_index) {
  Prepared P;
  P.zv = channel_view(z_in, "z");
  P.z = in_layout(z_in, P.zv);
  P.out_c = gate.dim() == 1 ? gate.size(0) : -1;
  P.g = channel_param(gate, "gate", P.out_c, z_in);
  P.a = channel_param(scale, "scale", P.out_c, z_in);
  P.b = channel_param(shift, "shift", P.out_c, z_in);
  P.src = source_channels(out_index, P.out_c, z_in);
  P.relu = is_relu(act);
  return P;
}

inline void check_gradient(const at::Tensor& dy, const at::Tensor& z, const Prepared& P) {
  const auto expected = output_shape(P.z, P.out_c);
  TORCH_CHECK(dy.sizes().vec() == expected, "dy must have shape ", at::IntArrayRef(expected),
              ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == z.scalar_type(), "dy has dtype ", dy.scalar_type(),
              " but z has ", z.scalar_type());
  TORCH_CHECK(dy.device() == z.device(), "dy is on ", dy.device(), " but z is on ", z.device());
}

}  // namespace nasprune

// ---------------------------------------------------------------------------------------------
// filter_scores: the table of row segments shared by the CPU and CUDA kernels.

namespace nasprune {

enum class ScoreKind { L1, L2, Taylor };

inline ScoreKind score_kind(c10::string_view kind) {
  if (kind == "l1") return ScoreKind::L1;
  if (kind == "l2") return ScoreKind::L2;
  if (kind == "taylor") return ScoreKind::Taylor;
  TORCH_CHECK(false, "kind must be \"l1\", \"l2\" or \"taylor\", got \"", std::string(kind), "\"");
}

// One weight tensor seen as (rows, row_len): row r is the row_len elements at data + r * row_len.
// A score sums over a row, so the element order inside a row is free: any dense tensor whose
// dim 0 is outermost (contiguous, channels_last conv weights) is read in place, and a gradient
// is read in place when it has the weight's strides. Anything else is made contiguous first.
struct ScoreSegment {
  at::Tensor w, g;  // g is undefined unless the kind is taylor
  int64_t rows = 0, row_len = 0;
  int64_t first = 0;  // output index of row 0
};

struct ScoreTable {
  std::vector<ScoreSegment> segments;
  int64_t total_rows = 0;
  ScoreKind kind = ScoreKind::L1;
  at::ScalarType dtype = at::kFloat;
};

inline bool rows_dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel());
}

inline ScoreTable score_table(at::TensorList weights, at::TensorList grads, c10::string_view kind) {
  ScoreTable table;
  table.kind = score_kind(kind);
  const bool taylor = table.kind == ScoreKind::Taylor;
  TORCH_CHECK(!weights.empty(), "weights must hold at least one tensor");
  if (taylor) {
    TORCH_CHECK(grads.size() == weights.size(), "kind \"taylor\" needs one gradient per weight: got ",
                grads.size(), " grads for ", weights.size(), " weights");
  } else {
    TORCH_CHECK(grads.empty(), "grads must be empty unless kind is \"taylor\", got ", grads.size(),
                " tensors");
  }
  const at::Tensor& w0 = weights[0];
  table.dtype = w0.scalar_type();
  for (size_t t = 0; t < weights.size(); ++t) {
    const at::Tensor& w = weights[t];
    TORCH_CHECK(w.defined() && w.dim() >= 1, "weights[", t, "] must have at least one dimension");
    TORCH_CHECK(w.scalar_type() == table.dtype, "weights[", t, "] has dtype ", w.scalar_type(),
                " but weights[0] has ", table.dtype);
    TORCH_CHECK(w.device() == w0.device(), "weights[", t, "] is on ", w.device(),
                " but weights[0] is on ", w0.device());
    ScoreSegment s;
    s.rows = w.size(0);
    s.row_len = s.rows == 0 ? 0 : w.numel() / s.rows;
    s.first = table.total_rows;
    table.total_rows += s.rows;
    if (taylor) {
      const at::Tensor& g = grads[t];
      TORCH_CHECK(g.defined() && g.sizes() == w.sizes(), "grads[", t, "] must have the shape of ",
                  "weights[", t, "], ", w.sizes(), ", got ",
                  g.defined() ? g.sizes() : at::IntArrayRef());
      TORCH_CHECK(g.scalar_type() == w.scalar_type(), "grads[", t, "] has dtype ", g.scalar_type(),
                  " but weights[", t, "] has ", w.scalar_type());
      TORCH_CHECK(g.device() == w.device(), "grads[", t, "] is on ", g.device(), " but weights[", t,
                  "] is on ", w.device());
      const bool in_place = rows_dense(w) && g.strides() == w.strides();
      s.w = in_place ? w : w.contiguous();
      s.g = in_place ? g : g.contiguous();
    } else {
      s.w = rows_dense(w) ? w : w.contiguous();
    }
    table.segments.push_back(std::move(s));
  }
  TORCH_CHECK(at::isFloatingType(table.dtype) && table.dtype != at::kDouble,
              "weights must be float32, float16 or bfloat16, got ", table.dtype);
  return table;
}

}  // namespace nasprune
