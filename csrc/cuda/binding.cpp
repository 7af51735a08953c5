// The torch side of the csrc backend's CUDA implementation: checks, every GEMM in cuBLAS through ATen (the big
// ones accumulating in place onto what the adapter wrote, beta = 1), and the launches of the streaming passes
// in this folder on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../dropout_philox.h"
#include "kernels.cuh"

namespace adalora_kernels {
namespace {

template <typename S>
struct CudaType {
  using type = S;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "adalora_kernels: CUDA launch of ", what, " failed: ", cudaGetErrorString(err));
}

template <typename S>
const typename CudaType<S>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<S>::type*>(t.data_ptr<S>());
}
template <typename S>
typename CudaType<S>::type* mptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<S>::type*>(t.data_ptr<S>());
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got ", x.device());
}

// drop(x) / (1 - p) as a contiguous copy of x (one streaming pass: x read once, the copy written once), for
// cuBLAS to read; the mask is regenerated from (seed, row, col) wherever it is needed, never stored
at::Tensor dropped(const at::Tensor& x, double dropout_p, int64_t seed) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xd = at::empty({M, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_dropout_scale", [&] {
    check_launch(cuda::dropout_scale(cptr<scalar_t>(x), x.stride(0), x.stride(1), mptr<scalar_t>(xd), M, K,
                                     static_cast<uint64_t>(seed), dropout_threshold(dropout_p),
                                     1.0 / (1.0 - dropout_p), c10::cuda::getCurrentCUDAStream()),
                 "dropout_scale");
  });
  return xd;
}

// The split route: every GEMM in cuBLAS, the dropout mask in one streaming pass. y0 = b + (t lam) P^T is
// written first and cuBLAS accumulates x W^T onto it in place (addmm_ with beta = 1), so y is written twice
// and read once, never copied.
std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& P,
                                                   const at::Tensor& lam_eff, const at::Tensor& Q, double dropout_p,
                                                   int64_t seed) {
  check_inputs("csrc_linear_fwd", x, weight, P, lam_eff, Q, dropout_p);
  check_cuda("csrc_linear_fwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor t = at::mm(dropout_p > 0.0 ? dropped(x, dropout_p, seed) : x, Q.t());
  const at::Tensor tl = t * lam_eff;
  at::Tensor y = bias.has_value() ? at::addmm(*bias, tl, P.t()) : at::mm(tl, P.t());
  y.addmm_(x, weight.t());
  return {y, t};
}

// dx: the adapter's share drop'(u Q) / (1 - p) (u = dt lam, dt = g P) written by masked_expand, then g W
// accumulated onto it in place by cuBLAS. dP, dQ by cuBLAS (dQ over a regenerated drop(x)); dlam summed in
// float (double for double).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
    const at::Tensor& lam_eff, const at::Tensor& Q, const at::Tensor& t, double dropout_p, int64_t seed,
    bool need_dx, bool need_adapter) {
  check_inputs("csrc_linear_bwd", x, weight, P, lam_eff, Q, dropout_p);
  check_backward_inputs("csrc_linear_bwd", grad, x, weight, lam_eff, t);
  check_cuda("csrc_linear_bwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), R = lam_eff.size(0);
  const at::Tensor dt = at::mm(grad, P).contiguous(), lamc = lam_eff.contiguous();
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor dx = empty;
  if (need_dx) {
    const at::Tensor Qc = Q.contiguous();
    dx = at::empty({M, K}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_linear_bwd", [&] {
      check_launch(cuda::masked_expand(cptr<scalar_t>(dt), cptr<scalar_t>(lamc), cptr<scalar_t>(Qc),
                                       mptr<scalar_t>(dx), M, K, static_cast<int>(R), static_cast<uint64_t>(seed),
                                       dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0, 1.0 / (1.0 - dropout_p),
                                       c10::cuda::getCurrentCUDAStream()),
                   "masked_expand");
    });
    dx.addmm_(grad, weight);
  }
  if (!need_adapter) return {dx, empty, empty, empty};
  const at::Tensor dQ = at::mm((dt * lamc).t(), dropout_p > 0.0 ? dropped(x, dropout_p, seed) : x);
  const at::Tensor dP = at::mm(grad.t(), t * lamc);
  const at::Tensor dlam = (dt.to(acc_type(x.scalar_type())) * t).sum(0);
  return {dx, dP, dlam.to(x.scalar_type()), dQ};
}

at::Tensor dropout_keep_mask_cuda(const at::Tensor& like, int64_t rows, int64_t cols, double dropout_p,
                                  int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "csrc_dropout_keep_mask: rows and cols must be >= 0, got ", rows, ", ", cols);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "csrc_dropout_keep_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty({rows, cols}, like.options().dtype(at::kBool));
  check_launch(cuda::keep_mask(out.data_ptr<bool>(), rows, cols, static_cast<uint64_t>(seed),
                               dropout_threshold(dropout_p), c10::cuda::getCurrentCUDAStream()),
               "keep_mask");
  return out;
}

at::Tensor to_device_async(const std::vector<int64_t>& values, at::ScalarType dtype, const at::Device& device) {
  at::Tensor host = at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(dtype).pin_memory();
  return host.to(device, /*non_blocking=*/true);  // pinned: no host sync
}

at::Tensor sensitivity_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList ema_ipt,
                                   at::TensorList ema_unc, double beta1, double beta2) {
  const auto dtype = check_sensitivity_inputs(params, grads, ema_ipt, ema_unc, beta1, beta2);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "csrc_sensitivity_update: expected CUDA tensors, got ", device);
  std::vector<int64_t> table, tri_layer, tri_rank;
  for (size_t l = 0; l < params.size() / 3; ++l) {
    for (size_t j : {3 * l, 3 * l + 2, 3 * l + 1})  // table order: P, Q, lam
      for (const at::TensorList list : {params, grads, ema_ipt, ema_unc})
        table.push_back(reinterpret_cast<int64_t>(list[j].data_ptr()));
    table.insert(table.end(), {params[3 * l].size(0), params[3 * l + 2].size(1), params[3 * l + 1].size(0), 0});
    for (int64_t i = 0; i < params[3 * l + 1].size(0); ++i) tri_layer.push_back(static_cast<int64_t>(l)), tri_rank.push_back(i);
  }
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor scores = at::empty({static_cast<int64_t>(tri_layer.size())}, params[0].options());
  const at::Tensor table_d = to_device_async(table, at::kLong, device);
  const at::Tensor layer_d = to_device_async(tri_layer, at::kInt, device);
  const at::Tensor rank_d = to_device_async(tri_rank, at::kInt, device);
  const at::Tensor coef = at::tensor({beta1, 1.0 - beta1, beta2, 1.0 - beta2}, at::TensorOptions().dtype(at::kDouble))
                              .to(dtype)
                              .pin_memory()
                              .to(device, /*non_blocking=*/true);
  AT_DISPATCH_FLOATING_TYPES(dtype, "csrc_sensitivity_update", [&] {
    check_launch(cuda::sensitivity_update(table_d.data_ptr<int64_t>(), layer_d.data_ptr<int32_t>(),
                                          rank_d.data_ptr<int32_t>(), coef.data_ptr<scalar_t>(),
                                          scores.data_ptr<scalar_t>(), scores.numel(),
                                          c10::cuda::getCurrentCUDAStream()),
                 "sensitivity_update");
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(adalora_kernels, CUDA, m) {
  m.impl("csrc_linear_fwd", &linear_fwd_cuda);
  m.impl("csrc_linear_bwd", &linear_bwd_cuda);
  m.impl("csrc_dropout_keep_mask", &dropout_keep_mask_cuda);
  m.impl("csrc_sensitivity_update", &sensitivity_update_cuda);
}

}  // namespace adalora_kernels
