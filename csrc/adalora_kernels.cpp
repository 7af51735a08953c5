// Schemas of the csrc backend (TORCH_LIBRARY holds them; CPU and CUDA implementations live beside this)
// and the Python module that loading the extension needs.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(adalora_kernels, m) {
  // y = x W^T + b + (drop(x) Q^T * lam_eff) P^T; returns (y, t = drop(x) Q^T)
  m.def("csrc_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor P, Tensor lam_eff, Tensor Q, float dropout_p, "
        "int seed) -> (Tensor, Tensor)");
  // (dx, dP, dlam_raw, dQ); a gradient that was not asked for comes back empty
  m.def("csrc_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor P, Tensor lam_eff, Tensor Q, Tensor t, "
        "float dropout_p, int seed, bool need_dx, bool need_adapter) -> (Tensor, Tensor, Tensor, Tensor)");
  // the eager layer call in one op: lam_eff = scaling * lam * rank_mask, the two ops above, and their autograd
  // (csrc/autograd.cpp); seed < 0 draws one from torch's default generator
  m.def("csrc_adalora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor P, Tensor lam, Tensor Q, "
        "Tensor? rank_mask, float scaling, float dropout_p, int seed) -> Tensor");
  // the keep-mask the two ops above apply, for tests
  m.def("csrc_dropout_keep_mask(Tensor like, int rows, int cols, float dropout_p, int seed) -> Tensor");
  // PEFT's sensitivity EMAs of every (P, lam, Q), updated in place; returns the triplet scores
  m.def("csrc_sensitivity_update(Tensor[] params, Tensor[] grads, Tensor(a!)[] ema_ipt, Tensor(b!)[] ema_unc, "
        "float beta1, float beta2) -> Tensor");
}
