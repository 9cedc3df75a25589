// The one registration file: every llkern op's schema, declared once.
//
// Importing llkern._C runs these registrations; the per-device
// implementations live in bindings/*_cpu.cpp and bindings/*_cuda.cpp, C++ autograd
// (where Python's per-call cost matters) in bindings/*_autograd.cpp, and the fake (meta)
// and the remaining autograd registrations in llkern/ops/*.py.
#include <Python.h>
#include <torch/library.h>

#include "kernels/buffer_pool.h"

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

  // Fused auxiliary head: mean-pool (4-D features) -> linear -> cross-entropy. Returns the loss,
  // the number of correct predictions and, with with_grad, d loss / d rows (rows x C), d weight
  // and d bias, all formed in the forward (the loss is a leaf of the local graph). low_memory (bfloat16
  // on a GPU): bfloat16 logits and d weight summed over the row chunks in bfloat16.
  m.def(
      "aux_head_loss(Tensor features, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
      "float label_smoothing, str reduction, bool with_grad=False, bool low_memory=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // llkern's cache of large CPU buffers (see cpu/buffer_pool.cpp), like torch.cuda.empty_cache.
  m.def("cpu_buffer_cache_bytes() -> int", []() { return int64_t(llkern::buffer_pool_cached_bytes()); });
  m.def("empty_cpu_buffer_cache() -> ()", []() { llkern::buffer_pool_empty(); });
  // d features of 4-D features: grad_loss * grad_pooled / (H W), broadcast over H and W.
  m.def("aux_head_backward(Tensor grad_loss, Tensor grad_pooled, int[] sizes, bool channels_last, "
        "ScalarType dtype) -> Tensor");

  // Similarity-matrix losses, computed one block of rows at a time (the N x N matrix is never
  // held). Each returns the loss and, with with_grad, d loss / d inputs formed in the same
  // pass (float32, float64 for float64 inputs; empty tensors otherwise).
  m.def("info_nce(Tensor z1, Tensor z2, float temperature, bool symmetric, bool normalize, bool with_grad=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("supcon_loss(Tensor z, Tensor labels, float temperature, bool normalize, bool with_grad=False) "
        "-> (Tensor, Tensor)");
  // I(T; Y) in bits (Renyi order 2); sigma None: Silverman's rule; label_sigma None: indicator.
  m.def("renyi_mutual_information(Tensor t, Tensor labels, float? sigma, float? label_sigma, "
        "bool with_grad=False) -> (Tensor, Tensor)");

  // ReLU saving a 1-bit mask (8 elements per byte, in the memory order of y) instead of its output.
  m.def("relu_with_mask(Tensor x) -> (Tensor y, Tensor mask)");
  // grad_x = mask ? grad : 0; `stride` is y's stride (the mask's element order), which grad_x takes.
  m.def("relu_mask_backward(Tensor grad, Tensor mask, int[] stride) -> Tensor");

  // relu(BatchNorm(input)) from given statistics (mean, invstd: training, input's batch statistics, whose
  // gradient the backward includes; else the running ones, constants), and its backward recomputing BN's
  // output and the ReLU mask from input. The backward returns (grad_input, grad_weight, grad_bias), an
  // empty tensor for each not asked for (input_grad False, weight or bias None).
  m.def("batch_norm_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, bool training) "
        "-> Tensor");
  m.def("batch_norm_relu_backward(Tensor grad, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor invstd, bool training, bool input_grad=True) -> (Tensor, Tensor, Tensor)");

  // x converted to dtype in a CPU buffer from llkern's pool of large buffers (saved_tensors_in's stored
  // copies and their restored forms: the conversion runs at copy speed, fresh pages would cost more).
  m.def("cast_pooled(Tensor x, ScalarType dtype) -> Tensor");
}
