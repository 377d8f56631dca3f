// Every op's schema, in one place. Kernels register themselves per device in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta) kernels and autograd
// are registered from Python in mtl_kernels/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

// An importable extension module, so `import mtl_kernels._C` loads the
// library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mtl_kernels, m) {
  // Cross-stitch (Misra et al. 2016): ys[i] = sum_j alpha[i, j, c] * xs[j].
  m.def("cross_stitch(Tensor[] xs, Tensor alpha) -> Tensor[]");
  // Returns (grad_xs, grad_alpha) in one pass over grad_ys and xs.
  m.def("cross_stitch_backward(Tensor[] grad_ys, Tensor[] xs, Tensor alpha) -> (Tensor[], Tensor)");
}
