// The torch side of the csrc backend's CUDA implementation: checks, cuBLAS GEMMs through ATen (accumulating
// into the same outputs), and the launches of the kernels in this folder on the current stream.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../dropout_hash.h"
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

void check_cuda(const char* op, const at::Tensor& x, int64_t r) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got ", x.device());
  TORCH_CHECK(r <= 128, op, ": the CUDA kernels support r <= 128, got r = ", r);
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& P,
                                                   const at::Tensor& lam_eff, const at::Tensor& Q, double dropout_p,
                                                   int64_t seed) {
  check_inputs("csrc_linear_fwd", x, weight, P, lam_eff, Q, dropout_p);
  check_cuda("csrc_linear_fwd", x, lam_eff.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), R = lam_eff.size(0);
  const uint32_t threshold = dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0;
  const at::Tensor Qc = Q.contiguous();
  at::Tensor t = at::empty({M, R}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_linear_fwd", [&] {
    check_launch(cuda::shrink_dropout(cptr<scalar_t>(x), x.stride(0), x.stride(1), cptr<scalar_t>(Qc), mptr<scalar_t>(t),
                                      M, K, static_cast<int>(R), static_cast<uint64_t>(seed), threshold,
                                      1.0 / (1.0 - dropout_p), c10::cuda::getCurrentCUDAStream()),
                 "shrink_dropout");
  });
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (R > 0) y.addmm_(t * lam_eff, P.t());
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
    const at::Tensor& lam_eff, const at::Tensor& Q, const at::Tensor& t, double dropout_p, int64_t seed,
    bool need_dx, bool need_adapter) {
  check_inputs("csrc_linear_bwd", x, weight, P, lam_eff, Q, dropout_p);
  check_backward_inputs("csrc_linear_bwd", grad, x, weight, lam_eff, t);
  check_cuda("csrc_linear_bwd", x, lam_eff.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), R = lam_eff.size(0);
  const uint32_t threshold = dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0;
  const double scale = 1.0 / (1.0 - dropout_p);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor dt = at::mm(grad, P).contiguous(), lamc = lam_eff.contiguous();
  const at::Tensor Qc = Q.contiguous();
  at::Tensor u = at::empty({M, R}, acc);
  at::Tensor dx = need_dx ? at::mm(grad, weight) : at::empty({0}, x.options());
  at::Tensor dq_part = need_adapter ? at::empty({cuda::dq_splits(M), R, K}, acc) : at::empty({0}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_linear_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    check_launch(cuda::scale_by_lam(cptr<scalar_t>(dt), cptr<scalar_t>(lamc), u.data_ptr<A>(), M, static_cast<int>(R),
                                    stream),
                 "scale_by_lam");
    if (need_dx)
      check_launch(cuda::masked_adapter_dx(mptr<scalar_t>(dx), static_cast<const A*>(u.data_ptr<A>()),
                                           cptr<scalar_t>(Qc), M, K, static_cast<int>(R),
                                           static_cast<uint64_t>(seed), threshold, scale, stream),
                   "masked_adapter_dx");
    if (need_adapter)
      check_launch(cuda::dq_partials(cptr<scalar_t>(x), x.stride(0), x.stride(1),
                                     static_cast<const A*>(u.data_ptr<A>()), dq_part.data_ptr<A>(), M, K,
                                     static_cast<int>(R), static_cast<uint64_t>(seed), threshold, stream),
                   "dq_partials");
  });
  if (!need_adapter) return {dx, at::empty({0}, x.options()), at::empty({0}, x.options()), at::empty({0}, x.options())};
  // every reduction over rows in a fixed order (ATen sums, cuBLAS GEMMs): no atomics, reproducible bit for bit
  const at::Tensor dP = at::mm(grad.t(), t * lam_eff);
  const at::Tensor dlam = (dt.to(acc.dtype()) * t.to(acc.dtype())).sum(0);
  const at::Tensor dQ_acc = dq_part.sum(0);
  const at::Tensor dQ = (dropout_p > 0.0 ? dQ_acc * scale : dQ_acc).to(x.scalar_type());
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
