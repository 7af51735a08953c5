// The eager layer call of the csrc backend as one op, its autograd in C++: csrc_adalora_linear.
//
// A training step calls the adapted layer hundreds of times, and on small layers the Python around the kernels
// (an autograd.Function, the effective-lambda ops, the seed tensor) cost more than the kernels. This op does
// that work behind one dispatcher call, device-generic: forward and backward call csrc_linear_fwd/bwd, which
// dispatch to the CPU or CUDA implementation. lam_eff = (lam * scaling) * rank_mask and its gradient
// (g * rank_mask) * scaling round as the Python path (ordinary autograd through reference.effective_lam) does.
// Saved for backward: x, the parameters, lam_eff (r), t (M x r); the dropout mask is regenerated from the seed.
// Under create_graph=True the backward runs in differentiable ATen ops instead, so a second derivative is right.
// Traced calls (torch.compile, fake tensors) keep the Python custom ops, which have fake kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace adalora_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& P,
                                            const at::Tensor& lam_eff, const at::Tensor& Q, double p, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adalora_kernels::csrc_linear_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>();
  return op.call(x, weight, bias, P, lam_eff, Q, p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd(const at::Tensor& g, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& P,
                                                                    const at::Tensor& lam_eff, const at::Tensor& Q,
                                                                    const at::Tensor& t, double p, int64_t seed,
                                                                    bool need_dx, bool need_adapter) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adalora_kernels::csrc_linear_bwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, bool,
                                 bool)>();
  return op.call(g, x, weight, P, lam_eff, Q, t, p, seed, need_dx, need_adapter);
}

at::Tensor keep_mask(const at::Tensor& like, int64_t rows, int64_t cols, double p, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adalora_kernels::csrc_dropout_keep_mask", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, double, int64_t)>();
  return op.call(like, rows, cols, p, seed);
}

at::Tensor effective_lam(const at::Tensor& lam, const std::optional<at::Tensor>& rank_mask, double scaling) {
  at::Tensor out = lam * scaling;
  if (rank_mask.has_value() && rank_mask->defined()) out.mul_(*rank_mask);  // by 0 or 1, as the Python path
  return out;
}

// x (..., in) as a (rows, in) matrix; rows from the leading sizes, as in_features may be 0
at::Tensor rows_of(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return x.reshape({rows, x.size(-1)});
}

// y (rows, out) viewed with x's leading sizes
at::Tensor like_input(const at::Tensor& y, const at::Tensor& x) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape);
}

// The gradients (dx, dP, dlam_eff, dQ) in differentiable ATen ops, for a backward run with create_graph=True
// (gradient penalties, meta-learning): t recomputed from x and Q, and lam_eff from lam by the caller, so autograd
// can differentiate them again. csrc_linear_bwd's results carry no autograd history: a second derivative through
// them would be silently zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> differentiable_grads(const at::Tensor& g, const at::Tensor& x,
                                                                                const at::Tensor& weight,
                                                                                const at::Tensor& P,
                                                                                const at::Tensor& lam_eff,
                                                                                const at::Tensor& Q, double p,
                                                                                int64_t seed) {
  at::Tensor keep, xd = x;
  if (p > 0.0) {
    keep = keep_mask(x, x.size(0), x.size(1), p, seed).to(x.scalar_type()).mul_(1.0 / (1.0 - p));
    xd = x * keep;
  }
  const at::Tensor t = xd.mm(Q.t()), dt = g.mm(P);
  const at::Tensor u = dt * lam_eff, uQ = u.mm(Q);
  const at::Tensor dx = g.mm(weight) + (keep.defined() ? uQ * keep : uQ);
  return {dx, g.t().mm(t * lam_eff), (dt * t).sum(0), u.t().mm(xd)};
}

class AdaLoRALinearFunction : public torch::autograd::Function<AdaLoRALinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& P, const at::Tensor& lam,
                            const at::Tensor& Q, const std::optional<at::Tensor>& rank_mask, double scaling,
                            double dropout_p, int64_t seed) {
    const at::Tensor lam_eff = effective_lam(lam, rank_mask, scaling);
    auto [y, t] = call_fwd(rows_of(x), weight, bias, P, lam_eff, Q, dropout_p, seed);
    const bool masked = rank_mask.has_value() && rank_mask->defined();
    ctx->save_for_backward({x, weight, P, lam_eff, Q, t, masked ? *rank_mask : at::Tensor(), lam});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return like_input(y, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &P = saved[2], &lam_eff = saved[3], &Q = saved[4],
                     &t = saved[5], &rank_mask = saved[6], &lam = saved[7];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensors that were passed: x, weight, [bias], P, lam, Q, [rank_mask]
    const size_t first_adapter = has_bias ? 3 : 2;
    const bool need_dx = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    const bool need_db = has_bias && ctx->needs_input_grad(2);
    const bool need_P = ctx->needs_input_grad(first_adapter), need_lam = ctx->needs_input_grad(first_adapter + 1);
    const bool need_Q = ctx->needs_input_grad(first_adapter + 2);
    const bool need_adapter = need_P || need_lam || need_Q;

    const at::Tensor g2 = grads[0].reshape({t.size(0), weight.size(0)});
    const at::Tensor x2 = rows_of(x);
    at::Tensor dx, dW, db, dP, dlam, dQ;
    if (need_dx || need_adapter) {
      const double p = ctx->saved_data["dropout_p"].toDouble();
      const int64_t seed = ctx->saved_data["seed"].toInt();
      // GradMode is on in a backward only under create_graph=True
      auto [dx2, dP_, dlam_eff, dQ_] =
          at::GradMode::is_enabled()
              ? differentiable_grads(g2, x2, weight, P, effective_lam(lam, rank_mask, scaling), Q, p, seed)
              : call_bwd(g2, x2, weight, P, lam_eff, Q, t, p, seed, need_dx, need_adapter);
      if (need_dx) dx = dx2.view(x.sizes());
      if (need_P) dP = dP_;
      if (need_Q) dQ = dQ_;
      if (need_lam) dlam = (rank_mask.defined() ? dlam_eff * rank_mask : dlam_eff) * scaling;
    }
    if (need_dw) dW = g2.t().mm(x2);  // a base weight the user chose to train: a plain GEMM
    if (need_db) db = g2.sum(0);
    // one entry per forward argument; those that are no tensor (or None) get an undefined one
    return {dx, dW, db, dP, dlam, dQ, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

int64_t resolved_seed(int64_t seed) {
  if (seed >= 0) return seed;
  // as torch.randint(0, 2**62, (), dtype=torch.int64) in Python: the same draw from the default generator
  return at::randint(0, int64_t{1} << 62, {}, at::TensorOptions().dtype(at::kLong)).item<int64_t>();
}

at::Tensor adalora_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& P, const at::Tensor& lam,
                                   const at::Tensor& Q, const std::optional<at::Tensor>& rank_mask, double scaling,
                                   double dropout_p, int64_t seed) {
  return AdaLoRALinearFunction::apply(x, weight, bias, P, lam, Q, rank_mask, scaling, dropout_p,
                                      resolved_seed(seed));
}

// below autograd (inference mode): the forward alone
at::Tensor adalora_linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& P, const at::Tensor& lam, const at::Tensor& Q,
                                  const std::optional<at::Tensor>& rank_mask, double scaling, double dropout_p,
                                  int64_t seed) {
  auto [y, t] = call_fwd(rows_of(x), weight, bias, P, effective_lam(lam, rank_mask, scaling), Q, dropout_p,
                         resolved_seed(seed));
  return like_input(y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(adalora_kernels, Autograd, m) { m.impl("csrc_adalora_linear", &adalora_linear_autograd); }

TORCH_LIBRARY_IMPL(adalora_kernels, CompositeExplicitAutograd, m) {
  m.impl("csrc_adalora_linear", &adalora_linear_forward);
}

}  // namespace adalora_kernels
