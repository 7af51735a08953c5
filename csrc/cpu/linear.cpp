// CPU implementation of the fused AdaLoRA linear layer. ATen GEMMs handle the large products and accumulate
// in place (addmm_ with beta = 1, so no M x out temporaries). at::parallel_for over 64-row blocks handles
// the dropout-masked parts: the shrink, the adapter term of dx, and dQ. Their mask is regenerated from the
// seed, never stored; each block's mask is built once in a small uint8 buffer and used while it is in cache.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "../dropout_hash.h"

namespace adalora_kernels {
namespace {

constexpr int64_t kRowBlock = 64;

// mask[i * cols + k] = keep(row0 + i, k): 32-bit integer work only, vectorised where AVX2 is present.
__attribute__((target_clones("avx2", "default"))) void keep_rows(uint8_t* mask, int64_t rows, int64_t cols,
                                                                 int64_t row0, uint64_t seed, uint32_t threshold) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t key = dropout_row_key(seed, static_cast<uint64_t>(row0 + i));
    uint8_t* m = mask + i * cols;
    for (int64_t k = 0; k < cols; ++k) m[k] = dropout_keep(key, static_cast<uint32_t>(k), threshold);
  }
}

// out (row-major block) = or += mask * src * scale, computed in opmath (float for 16-bit types)
template <typename scalar_t>
void apply_mask(scalar_t* out, const scalar_t* src, int64_t src_row_stride, int64_t src_col_stride,
                const uint8_t* mask, int64_t rows, int64_t cols, double scale, bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scale);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* src_row = src + i * src_row_stride;
    const uint8_t* m = mask + i * cols;
    scalar_t* o = out + i * cols;
    for (int64_t k = 0; k < cols; ++k) {
      const acc_t v = m[k] ? static_cast<acc_t>(src_row[k * src_col_stride]) * s : acc_t(0);
      o[k] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(o[k]) + v : v);
    }
  }
}

// For each block of rows: build the mask, then call fn(row0, rows, mask) in parallel over blocks.
template <typename Fn>
void for_each_masked_block(int64_t M, int64_t K, int64_t seed, double dropout_p, Fn fn) {
  const uint32_t threshold = dropout_threshold(dropout_p);
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit the caller's mode
    std::vector<uint8_t> mask(kRowBlock * K);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * kRowBlock, rows = std::min(kRowBlock, M - row0);
      keep_rows(mask.data(), rows, K, row0, static_cast<uint64_t>(seed), threshold);
      fn(row0, rows, mask.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, const at::Tensor& P,
                                                  const at::Tensor& lam_eff, const at::Tensor& Q, double dropout_p,
                                                  int64_t seed) {
  check_inputs("csrc_linear_fwd", x, weight, P, lam_eff, Q, dropout_p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the autograd of this op lives one layer up
  const int64_t M = x.size(0), K = x.size(1), R = lam_eff.size(0);
  at::Tensor t = at::empty({M, R}, x.options());
  if (dropout_p == 0.0 || R == 0) {
    at::mm_out(t, x, Q.t());
  } else {
    const double scale = 1.0 / (1.0 - dropout_p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_linear_fwd", [&] {
      for_each_masked_block(M, K, seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask) {
        at::Tensor xd = at::empty({rows, K}, x.options());
        apply_mask(xd.data_ptr<scalar_t>(), x.data_ptr<scalar_t>() + row0 * x.stride(0), x.stride(0), x.stride(1),
                   mask, rows, K, scale, false);
        at::Tensor t_rows = t.narrow(0, row0, rows);
        at::mm_out(t_rows, xd, Q.t());
      });
    });
  }
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (R > 0) y.addmm_(t * lam_eff, P.t());
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& P,
    const at::Tensor& lam_eff, const at::Tensor& Q, const at::Tensor& t, double dropout_p, int64_t seed,
    bool need_dx, bool need_adapter) {
  check_inputs("csrc_linear_bwd", x, weight, P, lam_eff, Q, dropout_p);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "csrc_linear_bwd: grad must be (", x.size(0), ", ", weight.size(0), "), got shape ", grad.sizes());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == lam_eff.size(0),
              "csrc_linear_bwd: t must be (", x.size(0), ", ", lam_eff.size(0), "), got shape ", t.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x.size(0), K = x.size(1), R = lam_eff.size(0);
  const at::Tensor dt = at::mm(grad, P);
  const at::Tensor u = dt * lam_eff;
  at::Tensor dx = need_dx ? at::mm(grad, weight) : at::empty({0}, x.options());
  at::Tensor dP = at::empty({0}, x.options()), dlam = at::empty({0}, x.options());
  at::Tensor dQ = at::empty({0}, x.options());
  if (need_adapter) {
    dP = at::mm(grad.t(), t * lam_eff);
    dlam = (dt * t).sum(0);
  }
  if (dropout_p == 0.0 || R == 0) {
    if (need_dx && R > 0) dx.addmm_(u, Q);
    if (need_adapter) dQ = at::mm(u.t(), x);
    return {dx, dP, dlam, dQ};
  }
  const double scale = 1.0 / (1.0 - dropout_p);
  std::vector<at::Tensor> partial_dQ(at::get_num_threads());  // one accumulator per thread, summed at the end
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_linear_bwd", [&] {
    for_each_masked_block(M, K, seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask) {
      const at::Tensor u_rows = u.narrow(0, row0, rows);
      if (need_dx) {  // dx rows += drop'(u Q)
        const at::Tensor a = at::mm(u_rows, Q);
        apply_mask(dx.data_ptr<scalar_t>() + row0 * K, a.data_ptr<scalar_t>(), K, 1, mask, rows, K, scale, true);
      }
      if (need_adapter) {  // dQ += u_rows^T drop(x_rows)
        at::Tensor xd = at::empty({rows, K}, x.options());
        apply_mask(xd.data_ptr<scalar_t>(), x.data_ptr<scalar_t>() + row0 * x.stride(0), x.stride(0), x.stride(1),
                   mask, rows, K, scale, false);
        at::Tensor& acc = partial_dQ[at::get_thread_num()];
        if (!acc.defined()) acc = at::zeros({R, K}, x.options());
        acc.addmm_(u_rows.t(), xd);
      }
    });
  });
  if (need_adapter) {
    dQ = at::zeros({R, K}, x.options());
    for (const at::Tensor& acc : partial_dQ)
      if (acc.defined()) dQ.add_(acc);
  }
  return {dx, dP, dlam, dQ};
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& like, int64_t rows, int64_t cols, double dropout_p, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "csrc_dropout_keep_mask: rows and cols must be >= 0, got ", rows, ", ", cols);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "csrc_dropout_keep_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
  at::Tensor out = at::empty({rows, cols}, like.options().dtype(at::kBool));
  for_each_masked_block(rows, cols, seed, dropout_p, [&](int64_t row0, int64_t n, const uint8_t* mask) {
    std::memcpy(out.data_ptr<bool>() + row0 * cols, mask, n * cols);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adalora_kernels, CPU, m) {
  m.impl("csrc_linear_fwd", &linear_fwd_cpu);
  m.impl("csrc_linear_bwd", &linear_bwd_cpu);
  m.impl("csrc_dropout_keep_mask", &dropout_keep_mask_cpu);
}

}  // namespace adalora_kernels
