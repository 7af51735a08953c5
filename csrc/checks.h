// Input checks shared by the CPU and CUDA implementations of the fused linear ops.
#pragma once
#include <ATen/ATen.h>

#include <unordered_map>

namespace adalora_kernels {

inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
                  const at::Tensor& lam, const at::Tensor& Q, double dropout_p) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be (out_features, ", x.size(1),
              ") to match x, got shape ", weight.sizes());
  TORCH_CHECK(lam.dim() == 1, op, ": lam_eff must be 1-D (r,), got shape ", lam.sizes());
  const int64_t r = lam.size(0);
  TORCH_CHECK(P.dim() == 2 && P.size(0) == weight.size(0) && P.size(1) == r, op, ": P must be (", weight.size(0),
              ", ", r, "), got shape ", P.sizes());
  TORCH_CHECK(Q.dim() == 2 && Q.size(0) == r && Q.size(1) == x.size(1), op, ": Q must be (", r, ", ", x.size(1),
              "), got shape ", Q.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  for (const at::Tensor* t : {&weight, &P, &lam, &Q}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": every input must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type(), "; convert the inputs first");
    TORCH_CHECK(t->device() == x.device(), op, ": every input must be on x's device ", x.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// grad (M x out) and the saved t (M x r) of the backward ops: shape, dtype and device, before any kernel reads them
inline void check_backward_inputs(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& lam, const at::Tensor& t) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0), op, ": grad must be (",
              x.size(0), ", ", weight.size(0), "), got shape ", grad.sizes());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == lam.size(0), op, ": t must be (", x.size(0), ", ",
              lam.size(0), ") as the forward saved it, got shape ", t.sizes());
  for (const at::Tensor* v : {&grad, &t}) {
    TORCH_CHECK(v->scalar_type() == x.scalar_type() && v->device() == x.device(), op,
                ": grad and t must have x's dtype ", x.scalar_type(), " and device ", x.device(), ", got ",
                v->scalar_type(), " on ", v->device());
  }
}

// The (P, lam, Q) triples of params, grads and both EMAs of csrc_sensitivity_update: one dtype (float32 or
// float64), one device, contiguous, each shaped like its parameter. Returns the dtype.
inline at::ScalarType check_sensitivity_inputs(at::TensorList params, at::TensorList grads, at::TensorList ema_ipt,
                                               at::TensorList ema_unc, double beta1, double beta2) {
  const size_t n = params.size();
  TORCH_CHECK(n % 3 == 0 && n > 0 && grads.size() == n && ema_ipt.size() == n && ema_unc.size() == n,
              "csrc_sensitivity_update: expected (P, lam, Q) triples of params, grads and both EMAs, got ", n, ", ",
              grads.size(), ", ", ema_ipt.size(), ", ", ema_unc.size(), " tensors");
  TORCH_CHECK(beta1 > 0 && beta1 < 1 && beta2 > 0 && beta2 < 1,
              "csrc_sensitivity_update: beta1 and beta2 must be in (0, 1), got ", beta1, ", ", beta2);
  const auto dtype = params[0].scalar_type();
  const at::Device device = params[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "csrc_sensitivity_update: adapter parameters must be float32 or float64, got ", dtype);
  std::unordered_map<const void*, size_t> owner;  // EMAs are updated in place, layers concurrently on CUDA
  for (size_t i = 0; i < n; ++i) {
    if (params[i].numel() == 0) continue;
    const auto [it, fresh] = owner.emplace(params[i].data_ptr(), i / 3);
    TORCH_CHECK(fresh, "csrc_sensitivity_update: layers ", it->second, " and ", i / 3,
                " share an adapter tensor; each layer needs its own P, lam and Q");
  }
  for (size_t l = 0; l < n / 3; ++l) {
    const at::Tensor &P = params[3 * l], &lam = params[3 * l + 1], &Q = params[3 * l + 2];
    TORCH_CHECK(P.dim() == 2 && lam.dim() == 1 && Q.dim() == 2 && P.size(1) == lam.size(0) &&
                    Q.size(0) == lam.size(0),
                "csrc_sensitivity_update: layer ", l, " must hold P (out, r), lam (r,), Q (r, in); got ", P.sizes(),
                ", ", lam.sizes(), ", ", Q.sizes());
    for (size_t j = 3 * l; j < 3 * l + 3; ++j) {
      for (const at::Tensor* t : {&params[j], &grads[j], &ema_ipt[j], &ema_unc[j]}) {
        TORCH_CHECK(t->scalar_type() == dtype && t->device() == device && t->is_contiguous() &&
                        t->sizes() == params[j].sizes(),
                    "csrc_sensitivity_update: layer ", l, ": every tensor must be a contiguous ", dtype,
                    " tensor on ", device, " shaped like its parameter ", params[j].sizes(), ", got ",
                    t->scalar_type(), " ", t->sizes(), " on ", t->device());
      }
    }
  }
  return dtype;
}

}  // namespace adalora_kernels
