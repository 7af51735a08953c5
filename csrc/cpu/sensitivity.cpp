// CPU implementation of the rank allocator's device work: PEFT's sensitivity EMAs of every (P, lam, Q) in
// place and the triplet scores, in one parallel pass (one task per triplet: row i of Q, column i of P,
// lam_i). Each product and sum is rounded on its own (built with -ffp-contract=off) as PEFT's separate
// ops are, so the EMAs match PEFT's bit for bit; the means are summed in a different order than torch's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace adalora_kernels {
namespace {

template <typename scalar_t>
struct Ema {
  scalar_t b1, c1, b2, c2;

  // one element: update Ibar and Ubar in place, return Ibar * Ubar
  scalar_t step(scalar_t p, scalar_t g, scalar_t& ipt_avg, scalar_t& unc_avg) const {
    const scalar_t ipt = std::abs(p * g);
    const scalar_t a = b1 * ipt_avg;
    const scalar_t b = c1 * ipt;
    ipt_avg = a + b;
    const scalar_t dev = std::abs(ipt - ipt_avg);
    const scalar_t c = b2 * unc_avg;
    const scalar_t d = c2 * dev;
    unc_avg = c + d;
    return ipt_avg * unc_avg;
  }
};

at::Tensor sensitivity_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList ema_ipt,
                                  at::TensorList ema_unc, double beta1, double beta2) {
  const size_t n = params.size();
  TORCH_CHECK(n % 3 == 0 && grads.size() == n && ema_ipt.size() == n && ema_unc.size() == n,
              "csrc_sensitivity_update: expected (P, lam, Q) triples of params, grads and both EMAs, got ", n, ", ",
              grads.size(), ", ", ema_ipt.size(), ", ", ema_unc.size(), " tensors");
  TORCH_CHECK(beta1 > 0 && beta1 < 1 && beta2 > 0 && beta2 < 1,
              "csrc_sensitivity_update: beta1 and beta2 must be in (0, 1), got ", beta1, ", ", beta2);
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "csrc_sensitivity_update: adapter parameters must be float32 or float64, got ", dtype);
  std::vector<int64_t> layer_of, rank_of;
  for (size_t l = 0; l < n / 3; ++l) {
    const at::Tensor &P = params[3 * l], &lam = params[3 * l + 1], &Q = params[3 * l + 2];
    TORCH_CHECK(P.dim() == 2 && lam.dim() == 1 && Q.dim() == 2 && P.size(1) == lam.size(0) &&
                    Q.size(0) == lam.size(0),
                "csrc_sensitivity_update: layer ", l, " must hold P (out, r), lam (r,), Q (r, in); got ", P.sizes(),
                ", ", lam.sizes(), ", ", Q.sizes());
    for (size_t j = 3 * l; j < 3 * l + 3; ++j) {
      for (const at::Tensor* t : {&params[j], &grads[j], &ema_ipt[j], &ema_unc[j]}) {
        TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu() && t->is_contiguous() &&
                        t->sizes() == params[j].sizes(),
                    "csrc_sensitivity_update: layer ", l, ": every tensor must be a contiguous CPU ", dtype,
                    " tensor shaped like its parameter ", params[j].sizes(), ", got ", t->scalar_type(), " ",
                    t->sizes(), " on ", t->device());
      }
    }
    for (int64_t i = 0; i < lam.size(0); ++i) layer_of.push_back(static_cast<int64_t>(l)), rank_of.push_back(i);
  }
  at::Tensor scores = at::empty({static_cast<int64_t>(layer_of.size())}, params[0].options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "csrc_sensitivity_update", [&] {
    // the coefficients rounded from double to the tensors' dtype, as torch does with Python scalars
    const Ema<scalar_t> ema{static_cast<scalar_t>(beta1), static_cast<scalar_t>(1.0 - beta1),
                            static_cast<scalar_t>(beta2), static_cast<scalar_t>(1.0 - beta2)};
    scalar_t* out = scores.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(layer_of.size()), 16, [&](int64_t begin, int64_t end) {
      for (int64_t tri = begin; tri < end; ++tri) {
        const size_t l = static_cast<size_t>(layer_of[tri]) * 3;
        const int64_t i = rank_of[tri], r = params[l + 1].size(0);
        const int64_t out_f = params[l].size(0), in_f = params[l + 2].size(1);
        auto ptr = [&](at::TensorList list, size_t j) { return list[j].data_ptr<scalar_t>(); };
        scalar_t q_sum = 0, p_sum = 0;
        for (int64_t k = 0; k < in_f; ++k) {  // row i of Q
          const int64_t e = i * in_f + k;
          q_sum += ema.step(ptr(params, l + 2)[e], ptr(grads, l + 2)[e], ptr(ema_ipt, l + 2)[e],
                            ptr(ema_unc, l + 2)[e]);
        }
        for (int64_t o = 0; o < out_f; ++o) {  // column i of P
          const int64_t e = o * r + i;
          p_sum += ema.step(ptr(params, l)[e], ptr(grads, l)[e], ptr(ema_ipt, l)[e], ptr(ema_unc, l)[e]);
        }
        const scalar_t s_lam =
            ema.step(ptr(params, l + 1)[i], ptr(grads, l + 1)[i], ptr(ema_ipt, l + 1)[i], ptr(ema_unc, l + 1)[i]);
        out[tri] = s_lam + (q_sum / static_cast<scalar_t>(in_f) + p_sum / static_cast<scalar_t>(out_f));
      }
    });
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(adalora_kernels, CPU, m) { m.impl("csrc_sensitivity_update", &sensitivity_update_cpu); }

}  // namespace adalora_kernels
