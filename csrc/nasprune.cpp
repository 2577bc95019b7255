// The one place where every nasprune op's schema is defined. Kernels register per dispatch key
// in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp; autograd and fake kernels live in nasprune/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" PyObject* PyInit__C(void) {  // lets `import nasprune._C` load the library
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(nasprune, m) {
  // Per-channel mean and biased variance of (N, C, *) in fp32: one pass, numerically stable.
  m.def("channel_stats(Tensor z) -> (Tensor mean, Tensor var)");
  // y[:, c] = gate[c] * act(scale[c] * z[:, c] + shift[c]); act is "identity" or "relu".
  // With out_index (K distinct channel indices), z holds only K channels: z[:, k] feeds output
  // channel out_index[k] and every other output channel is zero. mean and invstd (both or
  // neither) declare scale and shift to be batch norm of z's own batch statistics,
  // scale = weight * invstd, shift = bias - mean * scale: the forward ignores them, the
  // backward then differentiates through those statistics too.
  m.def(
      "gate_epilogue(Tensor z, Tensor scale, Tensor shift, Tensor gate, str act, "
      "Tensor? out_index=None, Tensor? mean=None, Tensor? invstd=None) -> Tensor");
  // dz and the per-channel dscale, dshift, dgate of gate_epilogue: one pass over (dy, z), or
  // with batch statistics a reduction pass and a dz pass (dz then includes the gradient through
  // mean and invstd; dscale and dshift stay the partial sums, for the weight and bias).
  m.def(
      "gate_epilogue_backward(Tensor dy, Tensor z, Tensor scale, Tensor shift, Tensor gate, "
      "str act, Tensor? out_index=None, Tensor? mean=None, Tensor? invstd=None) "
      "-> (Tensor dz, Tensor dscale, Tensor dshift, Tensor dgate)");
  // TAS width aggregation over K sampled candidate widths c_j = widths[j] (int64, on z's device)
  // of z (N, C, *): y = act(sum_j weights[j] * CWI(scale[j, :c_j] * z[:, :c_j] + shift[j, :c_j],
  // C_max)) on channels [0, C_max), C_max = max_j c_j, and y = 0 on [C_max, C). CWI is adaptive
  // average pooling along channels; scale and shift are (K, C), zero beyond each width.
  m.def(
      "width_aggregate(Tensor z, Tensor scale, Tensor shift, Tensor widths, Tensor weights, "
      "str act) -> Tensor");
  // One pass over (dy, z) for dz and the per-channel dscale, dshift (K, C) and dweights (K,).
  m.def(
      "width_aggregate_backward(Tensor dy, Tensor z, Tensor scale, Tensor shift, Tensor widths, "
      "Tensor weights, str act) -> (Tensor dz, Tensor dscale, Tensor dshift, Tensor dweights)");
  // One score per filter (row along dim 0) of every weight tensor, concatenated in fp32: kind "l1"
  // (sum |w|), "l2" (sqrt sum w^2) or "taylor" (|sum w * grad|, grads matching weights; for the
  // other kinds grads is empty). A segmented reduction over all the tensors in one launch.
  m.def("filter_scores(Tensor[] weights, Tensor[] grads, str kind) -> Tensor");
}
