// The modules' fast paths that are plain torch ops (torch's own autograd differentiates them), issued from C++:
// stn_kernels.reference.hyper_embedding_by_example and stn_kernels.reference_lstm.hyper_lstm_cell_step, op for op
// (the same ATen calls in the same order, so the same numbers and the same autograd graph), without the ~1 µs of
// Python around each op. Inputs are checked by the caller (every float tensor in one dtype).
#include "host.h"

namespace stn_kernels_host {
namespace {

// a + b ⊙ c as stn_kernels.reference.add_product: a product and a sum when autograd records (addcmul's backward
// forms two products more), one addcmul otherwise.
Tensor add_product(const Tensor& a, const Tensor& b, const Tensor& c) {
  return at::GradMode::is_enabled() ? a + b * c : at::addcmul(a, b, c);
}

// One HyperLinear of the cell, as the reference step writes it: x·Wᵀ + b, plus s ⊙ (x·W_hᵀ) + t ⊙ b_h with λ.
Tensor cell_linear(const Tensor& x, const c10::optional<Tensor>& hparams, const Tensor& weight,
                   const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
                   const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight) {
  auto pre = at::linear(x, weight, bias);
  if (!hparams.has_value()) return pre;
  auto scales = at::linear(*hparams, hparam_weight).chunk(2, 1);
  pre = add_product(pre, scales[0], at::linear(x, hyper_weight));
  return hyper_bias.has_value() ? add_product(pre, scales[1], *hyper_bias) : pre;
}

}  // namespace

Tensor hyper_embedding_by_example(const Tensor& indices, const c10::optional<Tensor>& hparams, const Tensor& weight,
                                  const Tensor& hyper_weight, const Tensor& weight_scale, int64_t batch_dim) {
  auto out = at::embedding(weight, indices);
  if (!hparams.has_value()) return out;
  auto s = at::linear(*hparams, weight_scale);
  const int64_t trailing = indices.dim() - 1 - batch_dim;  // index dims after the batch dim: s broadcasts over them
  if (trailing > 0) {
    std::vector<int64_t> shape(trailing + 2, 1);
    shape.front() = s.size(0);
    shape.back() = s.size(1);
    s = s.view(shape);
  }
  return add_product(out, s, at::embedding(hyper_weight, indices));
}

std::tuple<Tensor, Tensor> hyper_lstm_cell_step(
    const Tensor& x, const Tensor& h, const Tensor& c, const c10::optional<Tensor>& hparams,
    const Tensor& weight, const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight, const Tensor& h_weight,
    const Tensor& h_hyper_weight, const c10::optional<Tensor>& h_bias, const c10::optional<Tensor>& h_hyper_bias,
    const Tensor& h_hparam_weight) {
  auto pre = cell_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight);
  auto h_pre = cell_linear(h, hparams, h_weight, h_hyper_weight, h_bias, h_hyper_bias, h_hparam_weight);
  const int64_t n = c.size(-1);
  auto gates = (pre + h_pre).split_with_sizes({3 * n, n}, 1);
  auto fio = at::sigmoid(gates[0]).chunk(3, 1);
  auto c_next = add_product(fio[0] * c, fio[1], at::tanh(gates[1]));
  return {fio[2] * at::tanh(c_next), c_next};
}

}  // namespace stn_kernels_host
