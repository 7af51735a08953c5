// CPU implementation of the fused AdaLoRA linear layer.
//
// The two big GEMMs (y = x W^T, dx = g W) are ATen's and accumulate in place into a buffer that already holds
// the adapter term (addmm_ with beta = 1 costs the GEMM nothing). Everything of rank r runs in one
// at::parallel_for pass over blocks of 64 rows while the block's rows of x and g are in cache: forward
// t^T = Q drop(x)^T and y = b + t diag(lam) P^T; backward dt^T = P^T g^T, dx = drop'(dt diag(lam) Q),
// dP^T += (t diag(lam))^T g and dQ_raw += dt^T drop(x). For float32 and 16-bit inputs these are the
// register-tiled float32 kernels of rank_products.cpp (16-bit blocks converted to float32 in cache, sums kept
// in float32); float64 uses single-threaded ATen GEMMs on the same blocks, in the layouts oneDNN/MKL run
// fastest (an r-row result). The dropout mask of a block is built once from the seed and used while it is
// in cache; no mask is stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../dropout_philox.h"
#include "dropout_mask.h"
#include "rank_products.h"

namespace adalora_kernels {
namespace {

// out[i, k] = mask[i, k] ? src[i, k] * scale : 0 for a block of rows with unit column stride (out may be src);
// scalar_t is float or double.
template <typename scalar_t>
void apply_mask(scalar_t* out, int64_t out_stride, const scalar_t* src, int64_t src_stride, const uint8_t* mask,
                int64_t rows, int64_t cols, double scale) {
  const scalar_t s = static_cast<scalar_t>(scale);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* a = src + i * src_stride;
    const uint8_t* m = mask + i * cols;
    scalar_t* o = out + i * out_stride;
    for (int64_t k = 0; k < cols; ++k) {  // a select, not a branch, so it vectorises
      const scalar_t v = a[k] * s;
      o[k] = m[k] ? v : scalar_t(0);
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

// Calls fn(row0, rows, mask) in parallel over blocks of rows. The rank-r products run single-threaded inside
// (oneDNN/MKL thread such skinny products poorly). With dropout, mask holds the block's rows x K keep-mask,
// built once per block; without, it is null.
template <typename Fn>
void for_each_block(int64_t M, int64_t K, int64_t seed, double dropout_p, Fn fn) {
  const uint32_t threshold = dropout_threshold(dropout_p);
  const int64_t block = row_block(M), blocks = (M + block - 1) / block;
  const bool masked = dropout_p > 0.0;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads do not inherit the caller's mode
    std::vector<uint8_t> mask(masked ? block * K : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * block, rows = std::min(block, M - row0);
      if (masked) keep_rows(mask.data(), rows, K, row0, static_cast<uint64_t>(seed), threshold);
      fn(row0, rows, masked ? mask.data() : nullptr);
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
  at::Tensor sum() const {  // thread order, fixed; one part alone (one block: small inputs) is the sum itself
    std::vector<const at::Tensor*> used;
    for (const at::Tensor& acc : parts_)
      if (acc.defined()) used.push_back(&acc);
    if (used.size() == 1) return *used[0];
    at::Tensor total = at::zeros(shape_, options_);
    for (const at::Tensor* acc : used) total.add_(*acc);
    return total;
  }

 private:
  std::vector<at::Tensor> parts_;
  std::vector<int64_t> shape_;
  at::TensorOptions options_;
};

// A contiguous copy of x when its columns are strided (the block loops read rows with unit stride).
at::Tensor unit_column_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

double dropout_scale(double dropout_p) { return dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0; }

// ---- float32 and 16-bit inputs: the float32 kernels of rank_products.cpp, accumulating in float32

at::Tensor f32(const at::Tensor& a) { return a.to(at::kFloat).contiguous(); }

// Rows [row0, row0 + rows) of a (unit column stride) as float32, dropped out with mask when it is not null:
// a's own memory when a is float32 and nothing is dropped, else a float32 copy kept alive by holder.
struct FloatRows {
  const float* data;
  int64_t ld;
  at::Tensor holder;
};

FloatRows float_rows(const at::Tensor& a, int64_t row0, int64_t rows, const uint8_t* mask, double scale) {
  const at::Tensor a_rows = a.narrow(0, row0, rows);
  const int64_t K = a.size(1);
  if (a.scalar_type() != at::kFloat) {  // convert, then drop out in place
    at::Tensor copy = a_rows.to(at::kFloat);
    if (mask != nullptr) apply_mask(copy.data_ptr<float>(), K, copy.data_ptr<float>(), K, mask, rows, K, scale);
    return {copy.data_ptr<float>(), K, copy};
  }
  if (mask == nullptr) return {a_rows.data_ptr<float>(), a.stride(0), {}};
  at::Tensor copy = at::empty({rows, K}, a.options());
  apply_mask(copy.data_ptr<float>(), K, a_rows.data_ptr<float>(), a.stride(0), mask, rows, K, scale);
  return {copy.data_ptr<float>(), K, copy};
}

// Where a float32 kernel writes rows [row0, row0 + rows) of out: out itself when it is float32, else a float32
// buffer that store_rows then rounds into out.
float* rows_to_write(at::Tensor& out, int64_t row0, int64_t rows, at::Tensor& buffer) {
  if (out.scalar_type() == at::kFloat) return out.data_ptr<float>() + row0 * out.stride(0);
  buffer = at::empty({rows, out.size(1)}, out.options().dtype(at::kFloat));
  return buffer.data_ptr<float>();
}

void store_rows(at::Tensor& out, int64_t row0, int64_t rows, const at::Tensor& buffer) {
  if (buffer.defined()) out.narrow(0, row0, rows).copy_(buffer);
}

// t^T = Q drop(x)^T per block (float32, r x M) and y = b + t (P diag(lam))^T per block; returns t^T.
at::Tensor adapter_fwd_float(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& P,
                             const at::Tensor& lam_eff, const at::Tensor& Q, double dropout_p, int64_t seed,
                             at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = P.size(0), R = lam_eff.size(0);
  const at::Tensor Q_f = f32(Q), P_lam_T = f32((P * lam_eff).t());  // r x in, r x out
  const at::Tensor b = bias.has_value() ? f32(*bias) : at::Tensor();
  at::Tensor tT = at::empty({R, M}, x.options().dtype(at::kFloat));
  const double scale = dropout_scale(dropout_p);
  for_each_block(M, K, seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask) {
    float* t_ptr = tT.data_ptr<float>() + row0;
    const FloatRows xd = float_rows(x, row0, rows, mask, scale);
    rank_dot(t_ptr, M, xd.data, xd.ld, Q_f.data_ptr<float>(), K, rows, R, K);
    at::Tensor buffer;
    rank_update(rows_to_write(y, row0, rows, buffer), N, {t_ptr, 1, M}, P_lam_T.data_ptr<float>(), N,
                b.defined() ? b.data_ptr<float>() : nullptr, rows, R, N);
    store_rows(y, row0, rows, buffer);
  });
  return tT;
}

// dt^T = P^T g^T (float32, r x M), dx = drop'(dt diag(lam) Q) per block, and the float32 sums of
// dP^T = (t diag(lam))^T g and dQ_raw = dt^T drop(x).
void adapter_bwd_float(const at::Tensor& g, const at::Tensor& x, const at::Tensor& P, const at::Tensor& lam_eff,
                       const at::Tensor& Q, const at::Tensor& t, double dropout_p, int64_t seed, bool need_adapter,
                       at::Tensor& dtT, at::Tensor* dx, at::Tensor& dP_T, at::Tensor& dQ_raw) {
  const int64_t M = x.size(0), K = x.size(1), N = P.size(0), R = lam_eff.size(0);
  const auto opts = x.options().dtype(at::kFloat);
  const at::Tensor lam_f = lam_eff.to(at::kFloat);
  const at::Tensor P_T = f32(P.t()), t_lam = f32(t.to(at::kFloat) * lam_f);
  const at::Tensor lam_Q = f32(Q.to(at::kFloat) * lam_f.unsqueeze(1));
  dtT = at::empty({R, M}, opts);
  PerThread dP_parts(at::IntArrayRef{R, N}, opts), dQ_parts(at::IntArrayRef{R, K}, opts);
  const double scale = dropout_scale(dropout_p);
  for_each_block(M, K, seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask) {
    const FloatRows g_rows = float_rows(g, row0, rows, nullptr, 1.0);
    float* dt_ptr = dtT.data_ptr<float>() + row0;
    const Factor dt{dt_ptr, 1, M};
    rank_dot(dt_ptr, M, g_rows.data, g_rows.ld, P_T.data_ptr<float>(), N, rows, R, N);
    if (dx != nullptr) {  // dx rows = drop'(dt diag(lam) Q)
      at::Tensor buffer;
      float* dx_ptr = rows_to_write(*dx, row0, rows, buffer);
      rank_update(dx_ptr, K, dt, lam_Q.data_ptr<float>(), K, nullptr, rows, R, K);
      if (mask != nullptr) apply_mask(dx_ptr, K, dx_ptr, K, mask, rows, K, scale);
      store_rows(*dx, row0, rows, buffer);
    }
    if (need_adapter) {
      rank_outer(dP_parts.local().data_ptr<float>(), N, {t_lam.data_ptr<float>() + row0 * R, R, 1}, g_rows.data,
                 g_rows.ld, rows, R, N);
      const FloatRows xd = float_rows(x, row0, rows, mask, scale);
      rank_outer(dQ_parts.local().data_ptr<float>(), K, dt, xd.data, xd.ld, rows, R, K);
    }
  });
  if (need_adapter) dP_T = dP_parts.sum(), dQ_raw = dQ_parts.sum();
}

// ---- float64: the same blocks through single-threaded ATen GEMMs, in the layouts oneDNN/MKL run fastest

at::Tensor dropped_rows(const at::Tensor& x, int64_t row0, int64_t rows, const uint8_t* mask, double scale) {
  const at::Tensor x_rows = x.narrow(0, row0, rows);
  if (mask == nullptr) return x_rows;
  at::Tensor xd = at::empty(x_rows.sizes(), x.options());
  apply_mask(xd.data_ptr<double>(), x.size(1), x_rows.data_ptr<double>(), x.stride(0), mask, rows, x.size(1), scale);
  return xd;
}

at::Tensor adapter_fwd_double(const at::Tensor& x, const c10::optional<at::Tensor>& bias, const at::Tensor& P,
                              const at::Tensor& lam_eff, const at::Tensor& Q, double dropout_p, int64_t seed,
                              at::Tensor& y) {
  const at::Tensor P_lam_T = (P * lam_eff).t().contiguous();
  at::Tensor tT = at::empty({lam_eff.size(0), x.size(0)}, x.options());
  const double scale = dropout_scale(dropout_p);
  for_each_block(x.size(0), x.size(1), seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask) {
    at::Tensor tT_rows = tT.narrow(1, row0, rows), y_rows = y.narrow(0, row0, rows);
    at::mm_out(tT_rows, Q, dropped_rows(x, row0, rows, mask, scale).t());
    if (bias.has_value()) {
      at::addmm_out(y_rows, *bias, tT_rows.t(), P_lam_T);
    } else {
      at::mm_out(y_rows, tT_rows.t(), P_lam_T);
    }
  });
  return tT;
}

void adapter_bwd_double(const at::Tensor& g, const at::Tensor& x, const at::Tensor& P, const at::Tensor& lam_eff,
                        const at::Tensor& Q, const at::Tensor& t, double dropout_p, int64_t seed, bool need_adapter,
                        at::Tensor& dtT, at::Tensor* dx, at::Tensor& dP_T, at::Tensor& dQ_raw) {
  const int64_t M = x.size(0), K = x.size(1), N = P.size(0), R = lam_eff.size(0);
  const at::Tensor P_T = P.t().contiguous(), t_lam = t * lam_eff, lam_Q = Q * lam_eff.unsqueeze(1);
  dtT = at::empty({R, M}, x.options());
  PerThread dP_parts(at::IntArrayRef{R, N}, x.options()), dQ_parts(at::IntArrayRef{R, K}, x.options());
  const double scale = dropout_scale(dropout_p);
  for_each_block(M, K, seed, dropout_p, [&](int64_t row0, int64_t rows, const uint8_t* mask) {
    const at::Tensor g_rows = g.narrow(0, row0, rows);
    at::Tensor dtT_rows = dtT.narrow(1, row0, rows);
    at::mm_out(dtT_rows, P_T, g_rows.t());
    if (dx != nullptr) {
      at::Tensor dx_rows = dx->narrow(0, row0, rows);
      at::mm_out(dx_rows, dtT_rows.t(), lam_Q);
      double* d = dx_rows.data_ptr<double>();
      if (mask != nullptr) apply_mask(d, K, d, K, mask, rows, K, scale);
    }
    if (need_adapter) {
      dP_parts.local().addmm_(t_lam.narrow(0, row0, rows).t(), g_rows);
      dQ_parts.local().addmm_(dtT_rows, dropped_rows(x, row0, rows, mask, scale));
    }
  });
  if (need_adapter) dP_T = dP_parts.sum(), dQ_raw = dQ_parts.sum();
}

// 16-bit inputs without dropout skip the blocks: whole-matrix oneDNN GEMMs with native bf16/fp16 dot products
// beat converting blocks to float32 for the kernels there (about 1.2x against 1.32x nn.Linear fwd+bwd, bf16,
// 2048x1024x1024, on an AVX-512-BF16 CPU).
bool whole_matrix_16bit(const at::Tensor& x, double dropout_p) {
  return dropout_p == 0.0 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
}

// y = x W^T + b + t diag(lam) P^T with t = drop(x) Q^T: the adapter term and bias first, per block, then the
// base GEMM accumulates x W^T into y. Returns (y, t).
std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias, const at::Tensor& P,
                                                  const at::Tensor& lam_eff, const at::Tensor& Q, double dropout_p,
                                                  int64_t seed) {
  check_inputs("csrc_linear_fwd", x_in, weight, P, lam_eff, Q, dropout_p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the autograd of this op lives one layer up
  const at::Tensor x = unit_column_stride(x_in);
  const int64_t M = x.size(0), N = weight.size(0), R = lam_eff.size(0);
  if (R == 0) {
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    return {y, at::empty({M, 0}, x.options())};
  }
  if (whole_matrix_16bit(x, dropout_p)) {
    const at::Tensor t = at::mm(x, Q.t()), t_lam = t * lam_eff;
    at::Tensor y = bias.has_value() ? at::addmm(*bias, t_lam, P.t()) : at::mm(t_lam, P.t());
    return {y.addmm_(x, weight.t()), t};
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor tT = x.scalar_type() == at::kDouble
                            ? adapter_fwd_double(x, bias, P, lam_eff, Q, dropout_p, seed, y)
                            : adapter_fwd_float(x, bias, P, lam_eff, Q, dropout_p, seed, y);
  y.addmm_(x, weight.t());
  return {y, tT.t().to(x.scalar_type()).contiguous()};
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
  check_backward_inputs("csrc_linear_bwd", grad, x_in, weight, lam_eff, t);
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
  if (whole_matrix_16bit(x, dropout_p)) {
    const at::Tensor dt = at::mm(g, P), du = dt * lam_eff;
    if (need_dx) dx = at::mm(du, Q).addmm_(g, weight);
    if (need_adapter) {
      dP = at::mm(g.t(), t * lam_eff);
      dlam = (dt.to(at::kFloat) * t.to(at::kFloat)).sum(0).to(x.scalar_type());
      dQ = at::mm(du.t(), x);
    }
    return {dx, dP, dlam, dQ};
  }
  if (need_dx) dx = at::empty({M, K}, opts);
  at::Tensor dtT, dP_T, dQ_raw;  // in float32, or float64 for float64 inputs
  if (x.scalar_type() == at::kDouble) {
    adapter_bwd_double(g, x, P, lam_eff, Q, t, dropout_p, seed, need_adapter, dtT, need_dx ? &dx : nullptr, dP_T,
                       dQ_raw);
  } else {
    adapter_bwd_float(g, x, P, lam_eff, Q, t, dropout_p, seed, need_adapter, dtT, need_dx ? &dx : nullptr, dP_T,
                      dQ_raw);
  }
  if (need_dx) dx.addmm_(g, weight);
  if (need_adapter) {
    const at::Tensor lam = lam_eff.to(dtT.scalar_type());
    dP = dP_T.t().to(x.scalar_type()).contiguous();
    dlam = (dtT * t.t().to(dtT.scalar_type())).sum(1).to(x.scalar_type());
    dQ = dQ_raw.mul_(lam.unsqueeze(1)).to(x.scalar_type());
  }
  return {dx, dP, dlam, dQ};
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& like, int64_t rows, int64_t cols, double dropout_p, int64_t seed) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "csrc_dropout_keep_mask: rows and cols must be >= 0, got ", rows, ", ", cols);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "csrc_dropout_keep_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
  at::Tensor out = at::ones({rows, cols}, like.options().dtype(at::kBool));
  if (dropout_p == 0.0) return out;
  for_each_block(rows, cols, seed, dropout_p, [&](int64_t row0, int64_t n, const uint8_t* mask) {
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
