// The sempairs operators. Kernels: csrc/cpu (NT-Xent on CPU), csrc/vicreg.cpp (VICReg, CPU and
// CUDA), csrc/cuda (NT-Xent on CUDA, module common._C_cuda). Autograd and fake (meta)
// implementations are registered from Python in common/losses.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sempairs, m) {
  m.set_python_module("common.losses");
  // Returns the loss and each row's log-sum-exp over the other 2N - 1 views (kept for backward).
  m.def("nt_xent(Tensor z1, Tensor z2, float temperature) -> (Tensor, Tensor)");
  m.def("nt_xent_backward(Tensor grad, Tensor z1, Tensor z2, Tensor lse, float temperature)"
        " -> (Tensor, Tensor)");
  // Returns the loss, both views' Gram matrices (N x N when N < D, else D x D) and variances.
  m.def("vicreg(Tensor x, Tensor y, float sim_coeff, float std_coeff, float cov_coeff)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("vicreg_backward(Tensor grad, Tensor x, Tensor y, Tensor grams, Tensor variances,"
        " float sim_coeff, float std_coeff, float cov_coeff) -> (Tensor, Tensor)");
}

// A Python module with nothing in it: importing common._C loads the library and its registrations.
extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
