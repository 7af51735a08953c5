// CPU implementation of the rank allocator's device work: PEFT's sensitivity EMAs of every (P, lam, Q) in
// place and the triplet scores, in one parallel pass (one task per layer: Q, P and lam in memory order).
// Each product and sum is rounded on its own (built with -ffp-contract=off) as PEFT's separate ops are,
// so the EMAs match PEFT's bit for bit; the means are summed in a different order than torch's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <array>
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
  const auto dtype = check_sensitivity_inputs(params, grads, ema_ipt, ema_unc, beta1, beta2);
  TORCH_CHECK(params[0].device().is_cpu(), "csrc_sensitivity_update: expected CPU tensors, got ", params[0].device());
  std::vector<int64_t> first;  // index of each layer's first triplet in the scores
  int64_t total = 0;
  for (size_t l = 0; l < params.size() / 3; ++l) first.push_back(total), total += params[3 * l + 1].size(0);
  at::Tensor scores = at::empty({total}, params[0].options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "csrc_sensitivity_update", [&] {
    // the coefficients rounded from double to the tensors' dtype, as torch does with Python scalars
    const Ema<scalar_t> ema{static_cast<scalar_t>(beta1), static_cast<scalar_t>(1.0 - beta1),
                            static_cast<scalar_t>(beta2), static_cast<scalar_t>(1.0 - beta2)};
    scalar_t* out = scores.data_ptr<scalar_t>();
    // one task per layer, walking every tensor in memory order (P row by row, not column by column)
    at::parallel_for(0, static_cast<int64_t>(first.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> q_sum, p_sum;
      for (int64_t layer = begin; layer < end; ++layer) {
        const size_t l = static_cast<size_t>(layer) * 3;
        const int64_t r = params[l + 1].size(0), out_f = params[l].size(0), in_f = params[l + 2].size(1);
        // the four arrays (param, grad, Ibar, Ubar) of tensor j of this layer, fetched once
        auto arrays = [&](size_t j) {
          return std::array<scalar_t*, 4>{params[j].data_ptr<scalar_t>(), grads[j].data_ptr<scalar_t>(),
                                          ema_ipt[j].data_ptr<scalar_t>(), ema_unc[j].data_ptr<scalar_t>()};
        };
        const auto P = arrays(l), lam = arrays(l + 1), Q = arrays(l + 2);
        q_sum.assign(r, scalar_t(0));
        p_sum.assign(r, scalar_t(0));
        for (int64_t i = 0; i < r; ++i)  // rows of Q
          for (int64_t k = 0; k < in_f; ++k) {
            const int64_t e = i * in_f + k;
            q_sum[i] += ema.step(Q[0][e], Q[1][e], Q[2][e], Q[3][e]);
          }
        for (int64_t o = 0; o < out_f; ++o)  // rows of P: column i accumulates in the same order as before
          for (int64_t i = 0; i < r; ++i) {
            const int64_t e = o * r + i;
            p_sum[i] += ema.step(P[0][e], P[1][e], P[2][e], P[3][e]);
          }
        for (int64_t i = 0; i < r; ++i) {
          const scalar_t s_lam = ema.step(lam[0][i], lam[1][i], lam[2][i], lam[3][i]);
          out[first[layer] + i] =
              s_lam + (q_sum[i] / static_cast<scalar_t>(in_f) + p_sum[i] / static_cast<scalar_t>(out_f));
        }
      }
    });
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(adalora_kernels, CPU, m) { m.impl("csrc_sensitivity_update", &sensitivity_update_cpu); }

}  // namespace adalora_kernels
