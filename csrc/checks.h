// Input checks shared by the CPU and CUDA implementations of the fused linear ops.
#pragma once
#include <ATen/ATen.h>

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

}  // namespace adalora_kernels
