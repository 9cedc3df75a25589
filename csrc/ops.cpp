// The one registration file: every llkern op's schema, declared once.
//
// Importing llkern._C runs these registrations; the per-device
// implementations live in bindings/*_cpu.cpp and bindings/*_cuda.cpp, and the
// fake (meta) and autograd registrations in llkern/ops/*.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty Python module: importing it loads this library and its registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(llkern, m) {
  // Transport penalty (TRGL): scale * sum((y - x)^2), scale = 1 / (2 tau denom). With
  // with_grad, the second output is d loss / d y from the same pass (else an empty tensor).
  m.def("transport_penalty(Tensor y, Tensor? x, float tau, str reduction, bool with_grad=False) -> (Tensor, Tensor)");
  m.def("transport_penalty_backward(Tensor grad, Tensor y, Tensor? x, float tau, str reduction) -> Tensor");
}
