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
  // channel out_index[k] and every other output channel is zero.
  m.def(
      "gate_epilogue(Tensor z, Tensor scale, Tensor shift, Tensor gate, str act, "
      "Tensor? out_index=None) -> Tensor");
  // One pass over (dy, z): dz and the per-channel dscale, dshift, dgate of gate_epilogue.
  m.def(
      "gate_epilogue_backward(Tensor dy, Tensor z, Tensor scale, Tensor shift, Tensor gate, "
      "str act, Tensor? out_index=None) -> (Tensor dz, Tensor dscale, Tensor dshift, Tensor dgate)");
  // One score per filter (row along dim 0) of every weight tensor, concatenated in fp32: kind "l1"
  // (sum |w|), "l2" (sqrt sum w^2) or "taylor" (|sum w * grad|, grads matching weights; for the
  // other kinds grads is empty). A segmented reduction over all the tensors in one launch.
  m.def("filter_scores(Tensor[] weights, Tensor[] grads, str kind) -> Tensor");
}
