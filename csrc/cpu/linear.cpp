// CPU implementation of the fused AdaLoRA linear layer.
//
// The two big GEMMs (y = x W^T, dx = g W) are ATen's and accumulate in place into a buffer that already holds
// the adapter term (addmm_ with beta = 1 costs the GEMM nothing). Everything of rank r runs in one
// at::parallel_for pass over blocks of 64 rows while the block's rows of x and g are in cache: forward
// t^T = Q drop(x)^T and y = b + t diag(lam) P^T; backward dt^T = P^T g^T, dx = drop'(dt diag(lam) Q),
// dP^T += (t diag(lam))^T g and dQ_raw += dt^T drop(x). In float32 these are the register-tiled kernels of
// rank_products.cpp; other dtypes use single-threaded ATen GEMMs on the same blocks, in the layouts
// oneDNN/MKL run fastest (an r-row result). The dropout mask of a block is built once from the seed and
// used while it is in cache; no mask is stored.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../dropout_hash.h"
#include "rank_products.h"

namespace adalora_kernels {
namespace {

// mask[i * cols + k] = keep(row0 + i, k): 32-bit integer work only, vectorised where AVX2/AVX-512 is present.
// col_key holds dropout_col_key(k) for every column, computed once per thread.
__attribute__((target_clones("avx512f", "avx2", "default"))) void keep_rows(uint8_t* mask, const uint32_t* col_key,
                                                                            int64_t rows, int64_t cols, int64_t row0,
                                                                            uint64_t seed, uint32_t threshold) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t key = dropout_row_key(seed, static_cast<uint64_t>(row0 + i));
    uint8_t* m = mask + i * cols;
    for (int64_t k = 0; k < cols; ++k) m[k] = dropout_keep_keyed(key, col_key[k], threshold);
  }
}

// out[i, k] = mask[i, k] ? src[i, k] * scale : 0 for a block of rows with unit column stride (out may be src),
// computed in opmath (float for 16-bit types).
template <typename scalar_t>
void apply_mask(scalar_t* out, int64_t out_stride, const scalar_t* src, int64_t src_stride, const uint8_t* mask,
                int64_t rows, int64_t cols, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scale);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* a = src + i * src_stride;
    const uint8_t* m = mask + i * cols;
    scalar_t* o = out + i * out_stride;
    for (int64_t k = 0; k < cols; ++k) {  // a select, not a branch, so it vectorises
      const acc_t v = static_cast<acc_t>(a[k]) * s;
      o[k] = static_cast<scalar_t>(m[k] ? v : acc_t(0));
    }
  }
}

// Rows per block of the parallel passes: at least two blocks per thread, at most 64 rows, the size at which
// the rank-r GEMMs below run fastest single-threaded while the block stays in cache. The dropout mask
// depends only on (seed, row, col), never on the blocking.
int64_t row_block(int64_t M) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(8, std::min<int64_t>(64, (M + 2 * threads - 1) / (2 * threads)));
}

// Calls fn(row0, rows, mask, scratch) in parallel over blocks of rows. The rank-r products run single-threaded
// inside (oneDNN/MKL thread such skinny products poorly). With dropout, mask holds the block's rows x K
// keep-mask, built once per block, and scratch is a rows x K float buffer of the thread (for float32 x);
// without, both are null.
template <typename Fn>
void for_each_block(const at::Tensor& x, int64_t seed, double dropout_p, Fn fn) {
  const int64_t M = x.size(0), K = x.size(1);
  const uint32_t threshold = dropout_threshold(dropout_p);
  const int64_t block = row_block(M), blocks = (M + block - 1) / block;
  const bool masked = dropout_p > 0.0, scratch_needed = masked && x.scalar_type() == at::kFloat;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit the caller's mode
    std::vector<uint8_t> mask(masked ? block * K : 0);
    std::vector<float> scratch(scratch_needed ? block * K : 0);
    std::vector<uint32_t> col_key(masked ? K : 0);
    for (int64_t k = 0; k < static_cast<int64_t>(col_key.size()); ++k) col_key[k] = dropout_col_key(k);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * block, rows = std::min(block, M - row0);
      if (masked) keep_rows(mask.data(), col_key.data(), rows, K, row0, static_cast<uint64_t>(seed), threshold);
      fn(row0, rows, masked ? mask.data() : nullptr, scratch_needed ? scratch.data() : nullptr);
    }
  });
}

// One accumulator per thread, zeroed on first use and summed at the end.
class PerThread {
 public:
  PerThread(at::IntArrayRef shape, const at::TensorOptions& options)
      : parts_(at::get_num_threads()), shape_(shape.vec()), options_(options) {}
  at::Tensor& local() {
    at::Tensor& acc = parts_[at::get_thread_num()];
    if (!acc.defined()) acc = at::zeros(shape_, options_);
    return acc;
  }
  at::Tensor sum() const {
    at::Tensor total = at::zeros(shape_, options_);
    for (const at::Tensor& acc : parts_)
      if (acc.defined()) total.add_(acc);
    return total;
  }

 private:
  std::vector<at::Tensor> parts_;
  std::vector<int64_t> shape_;
  at::TensorOptions options_;
};

// drop(x) over rows [row0, row0 + rows): x's own rows without dropout, a masked copy with it.
template <typename scalar_t>
at::Tensor dropped_rows(const at::Tensor& x, int64_t row0, int64_t rows, const uint8_t* mask, double scale) {
  const at::Tensor x_rows = x.narrow(0, row0, rows);
  if (mask == nullptr) return x_rows;
  const int64_t K = x.size(1);
  at::Tensor xd = at::empty({rows, K}, x.options());
  apply_mask(xd.data_ptr<scalar_t>(), K, x_rows.data_ptr<scalar_t>(), x.stride(0), mask, rows, K, scale);
  return xd;
}

// A contiguous copy of x when its columns are strided (the masked loops read rows with unit stride).
at::Tensor unit_column_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

double dropout_scale(double dropout_p) { return 1.0 / (1.0 - dropout_p); }

// t = drop(x) Q^T, computed as t^T blocks (r x rows), and per block y = b + t (P diag(lam))^T; then the base
// GEMM accumulates x W^T into y.
std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, const at::Tensor& P,
                                                  const at::Tensor& lam_eff, const at::Tensor& Q, double dropout_p,
                                                  int64_t seed) {
  check_inputs("csrc_linear_fwd", x_in, weight, P, lam_eff, Q, dropout_p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the autograd of this op lives one layer up
  const at::Tensor x = unit_column_stride(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lam_eff.size(0);
  if (R == 0) {
    return {bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t()), at::empty({M, 0}, x.options())};
  }
  const at::Tensor Q_c = Q.contiguous();
  const at::Tensor P_lam_T = (P * lam_eff).t().contiguous();  // r x out
  const c10::optional<at::Tensor> b = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : bias;
  at::Tensor tT = at::empty({R, M}, x.options());
  at::Tensor y = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_linear_fwd", [&] {
    const double scale = dropout_p > 0.0 ? dropout_scale(dropout_p) : 1.0;
    for_each_block(x, seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask, float* scratch) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        float* t_ptr = tT.data_ptr<float>() + row0;
        const float* x_ptr = x.data_ptr<float>() + row0 * x.stride(0);
        int64_t ld_x = x.stride(0);
        if (mask != nullptr) {
          apply_mask(scratch, K, x_ptr, ld_x, mask, rows, K, scale);
          x_ptr = scratch, ld_x = K;
        }
        rank_dot(t_ptr, M, x_ptr, ld_x, Q_c.data_ptr<float>(), K, rows, R, K);
        rank_update(y.data_ptr<float>() + row0 * N, N, {t_ptr, 1, M}, P_lam_T.data_ptr<float>(), N,
                    b.has_value() ? b->data_ptr<float>() : nullptr, rows, R, N);
      } else {
        at::Tensor tT_rows = tT.narrow(1, row0, rows);
        at::mm_out(tT_rows, Q_c, dropped_rows<scalar_t>(x, row0, rows, mask, scale).t());
        at::Tensor y_rows = y.narrow(0, row0, rows);
        if (b.has_value()) {
          at::addmm_out(y_rows, *b, tT_rows.t(), P_lam_T);
        } else {
          at::mm_out(y_rows, tT_rows.t(), P_lam_T);
        }
      }
    });
  });
  y.addmm_(x, weight.t());
  return {y, tT.t().contiguous()};
}

// dt = g P, dlam = sum_rows(dt * t), dP = g^T t diag(lam), dQ = diag(lam) dt^T drop(x) and
// dx = g W + drop'(dt diag(lam) Q). One parallel pass over blocks of rows does every rank-r product while the
// block's rows of g and x are in cache, with the block's dropout mask built once for dQ and dx; dx's adapter
// term goes straight into dx and the base GEMM accumulates into it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& P,
    const at::Tensor& lam_eff, const at::Tensor& Q, const at::Tensor& t, double dropout_p, int64_t seed,
    bool need_dx, bool need_adapter) {
  check_inputs("csrc_linear_bwd", x_in, weight, P, lam_eff, Q, dropout_p);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x_in.size(0) && grad.size(1) == weight.size(0),
              "csrc_linear_bwd: grad must be (", x_in.size(0), ", ", weight.size(0), "), got shape ", grad.sizes());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x_in.size(0) && t.size(1) == lam_eff.size(0),
              "csrc_linear_bwd: t must be (", x_in.size(0), ", ", lam_eff.size(0), "), got shape ", t.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = unit_column_stride(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = lam_eff.size(0);
  const auto opts = x.options();
  at::Tensor dx = at::empty({0}, opts), dP = at::empty({0}, opts), dlam = at::empty({0}, opts);
  at::Tensor dQ = at::empty({0}, opts);
  if (R == 0) {
    if (need_dx) dx = at::mm(grad, weight);
    if (need_adapter) dP = at::zeros({N, 0}, opts), dlam = at::zeros({0}, opts), dQ = at::zeros({0, K}, opts);
    return {dx, dP, dlam, dQ};
  }
  const at::Tensor g = unit_column_stride(grad);
  const at::Tensor P_T = P.t().contiguous();              // r x out
  const at::Tensor t_lam = (t * lam_eff).contiguous();    // M x r
  const at::Tensor lam_Q = (Q * lam_eff.unsqueeze(1)).contiguous();  // r x in
  const at::Tensor dtT = at::empty({R, M}, opts);
  if (need_dx) dx = at::empty({M, K}, opts);
  PerThread dP_T(at::IntArrayRef{R, N}, opts), dQ_raw(at::IntArrayRef{R, K}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_linear_bwd", [&] {
    const double scale = dropout_p > 0.0 ? dropout_scale(dropout_p) : 1.0;
    for_each_block(x, seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask, float* scratch) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        const float* g_ptr = g.data_ptr<float>() + row0 * g.stride(0);
        float* dt_ptr = dtT.data_ptr<float>() + row0;
        const Factor dt_rows{dt_ptr, 1, M};
        rank_dot(dt_ptr, M, g_ptr, g.stride(0), P_T.data_ptr<float>(), N, rows, R, N);
        if (need_dx) {  // dx rows = drop'(dt diag(lam) Q)
          float* dx_ptr = dx.data_ptr<float>() + row0 * K;
          rank_update(dx_ptr, K, dt_rows, lam_Q.data_ptr<float>(), K, nullptr, rows, R, K);
          if (mask != nullptr) apply_mask(dx_ptr, K, dx_ptr, K, mask, rows, K, scale);
        }
        if (need_adapter) {
          rank_outer(dP_T.local().data_ptr<float>(), N, {t_lam.data_ptr<float>() + row0 * R, R, 1}, g_ptr,
                     g.stride(0), rows, R, N);
          const float* x_ptr = x.data_ptr<float>() + row0 * x.stride(0);
          int64_t ld_x = x.stride(0);
          if (mask != nullptr) {
            apply_mask(scratch, K, x_ptr, ld_x, mask, rows, K, scale);
            x_ptr = scratch, ld_x = K;
          }
          rank_outer(dQ_raw.local().data_ptr<float>(), K, dt_rows, x_ptr, ld_x, rows, R, K);
        }
      } else {
        const at::Tensor g_rows = g.narrow(0, row0, rows);
        at::Tensor dtT_rows = dtT.narrow(1, row0, rows);
        at::mm_out(dtT_rows, P_T, g_rows.t());
        if (need_dx) {
          at::Tensor dx_rows = dx.narrow(0, row0, rows);
          at::mm_out(dx_rows, dtT_rows.t(), lam_Q);
          if (mask != nullptr) {
            scalar_t* d = dx_rows.data_ptr<scalar_t>();
            apply_mask(d, K, d, K, mask, rows, K, scale);
          }
        }
        if (need_adapter) {
          dP_T.local().addmm_(t_lam.narrow(0, row0, rows).t(), g_rows);
          dQ_raw.local().addmm_(dtT_rows, dropped_rows<scalar_t>(x, row0, rows, mask, scale));
        }
      }
    });
  });
  if (need_dx) dx.addmm_(g, weight);
  if (need_adapter) {
    dP = dP_T.sum().t().contiguous();
    dlam = (dtT * t.t()).sum(1);
    dQ = dQ_raw.sum().mul_(lam_eff.unsqueeze(1));
  }
  return {dx, dP, dlam, dQ};
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& like, int64_t rows, int64_t cols, double dropout_p, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "csrc_dropout_keep_mask: rows and cols must be >= 0, got ", rows, ", ", cols);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "csrc_dropout_keep_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
  at::Tensor out = at::ones({rows, cols}, like.options().dtype(at::kBool));
  if (dropout_p == 0.0) return out;
  for_each_block(out, seed, dropout_p, [&](int64_t row0, int64_t n, const uint8_t* mask, float*) {
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
