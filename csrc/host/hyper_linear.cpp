// HyperLinear's eager call on CPU tensors, issued from C++: the same ATen ops, in the same order, as the
// reference (stn_kernels/reference.py: hyper_linear_stacked_forward / hyper_linear_stacked_backward), so the
// results are those of the reference path; what changes is the host time around them. At the STN shapes every
// op costs ~1 µs of arithmetic and ~1-2 µs of Python around it; a forward is 6 ops, a backward 14 (measured:
// ours/published 0.61-0.68 through here against 0.75-0.80 through the Python Function, --host-overhead).
#include "host.h"

namespace stn_kernels_host {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Forward {
  Tensor out, z_hyper, s, t;
};

// out = x·Wᵀ + b + s ⊙ (x·W_hᵀ) + t ⊙ b_h with (s, t) = λ·[V; C]ᵀ, as hyper_linear_stacked_forward.
Forward forward(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                const c10::optional<Tensor>& bias, const c10::optional<Tensor>& hyper_bias,
                const Tensor& hparam_weight) {
  auto st = at::linear(hparams, hparam_weight);
  auto scales = st.chunk(2, 1);
  auto out = at::linear(x, weight, bias);
  auto z_hyper = at::linear(x, hyper_weight);
  out.addcmul_(scales[0], z_hyper);
  if (hyper_bias.has_value()) out.addcmul_(scales[1], *hyper_bias);
  return {out, z_hyper, scales[0], scales[1]};
}

// The same output with autograd recording every op: for create_graph=True (double backward, Delta-STN's
// Jacobian-vector products), differentiated by torch as the Python path differentiates the reference.
Tensor recorded(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                const Tensor& bias, const Tensor& hyper_bias, const Tensor& hparam_weight) {
  auto scales = at::linear(hparams, hparam_weight).chunk(2, 1);
  auto out = at::linear(x, weight, bias.defined() ? c10::optional<Tensor>(bias) : c10::nullopt);
  out = out + scales[0] * at::linear(x, hyper_weight);
  return hyper_bias.defined() ? out + scales[1] * hyper_bias : out;
}

struct HyperLinearFunction : public torch::autograd::Function<HyperLinearFunction> {
  // bias and hyper_bias as optionals: an absent one is no input of the node (no edge, no gradient).
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& hparams, const Tensor& weight,
                        const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
                        const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight) {
    auto f = stn_kernels_host::forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight);
    ctx->save_for_backward({x, hparams, weight, hyper_weight, bias.value_or(Tensor()), hyper_bias.value_or(Tensor()),
                            hparam_weight});
    // Internal tensors nobody else holds: kept without the version checks of saved inputs.
    ctx->saved_data["z_hyper"] = f.z_hyper;
    ctx->saved_data["s"] = f.s;
    ctx->saved_data["t"] = f.t;
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &hparams = saved[1], &weight = saved[2], &hyper_weight = saved[3],
                 &bias = saved[4], &hyper_bias = saved[5], &hparam_weight = saved[6];
    const Tensor& g = grad_outputs[0];
    std::vector<bool> need(7);
    for (size_t i = 0, edge = 0; i < 7; ++i)  // the node's edges: the arguments that are tensors
      if (saved[i].defined()) need[i] = ctx->needs_input_grad(edge++);
    variable_list grads(7);
    if (at::GradMode::is_enabled()) {  // create_graph=True: gradients that are differentiable again
      // On aliases of the saved inputs, as stn_kernels.ops._support.double_backward: differentiating with
      // respect to the inputs themselves would also follow paths between them and count those twice.
      variable_list inputs(saved.begin(), saved.end()), wanted;
      for (size_t i = 0; i < 7; ++i)
        if (need[i]) wanted.push_back(inputs[i] = inputs[i].view_as(inputs[i]));
      auto out = recorded(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5], inputs[6]);
      auto found = torch::autograd::grad({out}, wanted, {g}, /*retain_graph=*/true, /*create_graph=*/true,
                                         /*allow_unused=*/true);
      for (size_t i = 0, k = 0; i < 7; ++i)
        if (need[i]) grads[i] = found[k++];
      return grads;
    }
    const Tensor s = ctx->saved_data["s"].toTensor(), t = ctx->saved_data["t"].toTensor();
    auto g_s = g * s;
    if (need[0]) grads[0] = at::mm(g, weight).addmm_(g_s, hyper_weight);
    if (need[2]) grads[2] = at::mm(g.t(), x);
    if (need[3]) grads[3] = at::mm(g_s.t(), x);
    if (need[4]) grads[4] = g.sum(0);
    if (need[5]) grads[5] = (g * t).sum(0);
    if (need[1] || need[6]) {  // dλ = [ds, dt]·[V; C], d[V; C] = [ds, dt]ᵀ·λ
      auto ds = g * ctx->saved_data["z_hyper"].toTensor();
      auto d_scales = at::cat({ds, hyper_bias.defined() ? g * hyper_bias : at::zeros_like(ds)}, 1);
      if (need[1]) grads[1] = at::mm(d_scales, hparam_weight);
      if (need[6]) grads[6] = at::mm(d_scales.t(), hparams);
    }
    return grads;
  }
};

}  // namespace

Tensor hyper_linear(const Tensor& x, const c10::optional<Tensor>& hparams, const Tensor& weight,
                    const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
                    const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight) {
  if (!hparams.has_value()) return at::linear(x, weight, bias);  // the elementary path: torch's own autograd
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || hparams->requires_grad() || weight.requires_grad() || hyper_weight.requires_grad() ||
       hparam_weight.requires_grad() || (bias.has_value() && bias->requires_grad()) ||
       (hyper_bias.has_value() && hyper_bias->requires_grad())))
    return HyperLinearFunction::apply(x, *hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight);
  return forward(x, *hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight).out;
}

}  // namespace stn_kernels_host
