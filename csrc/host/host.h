// The compiled host paths of the modules (stn_kernels._host): see module.cpp.
#pragma once
#include <torch/extension.h>

// Elementwise loops compiled twice, for AVX2 and for the baseline, the one for the machine picked at load time (GCC's
// function multi-versioning (ifuncs) on x86-64 Linux with glibc; elsewhere the baseline only).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define STN_HOST_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define STN_HOST_VECTOR_CLONES
#endif

namespace stn_kernels_host {

using torch::Tensor;

// Which of a node's first n saved inputs want a gradient. The node's edges are its arguments that are tensors (an
// absent optional is no edge), so needs_input_grad counts those only.
inline std::vector<bool> inputs_needing_grad(torch::autograd::AutogradContext* ctx,
                                             const torch::autograd::variable_list& saved, size_t n) {
  std::vector<bool> need(n);
  for (size_t i = 0, edge = 0; i < n; ++i)
    if (saved[i].defined()) need[i] = ctx->needs_input_grad(edge++);
  return need;
}

// A backward under create_graph=True (double backward, Delta-STN's response): `recorded` runs the layer again in
// differentiable ATen ops, on aliases of the saved inputs (as stn_kernels.ops._support.double_backward:
// differentiating with respect to the inputs themselves would also follow paths between them and count those
// twice), and grads[i] gets the gradient of each input in `need`. Outputs without a gradient are left out.
template <class Recorded>
void recorded_backward(const torch::autograd::variable_list& saved, const std::vector<bool>& need,
                       const torch::autograd::variable_list& grad_outputs, Recorded recorded,
                       torch::autograd::variable_list& grads) {
  torch::autograd::variable_list inputs(saved.begin(), saved.begin() + need.size()), wanted, used, used_grads;
  for (size_t i = 0; i < need.size(); ++i)
    if (need[i]) wanted.push_back(inputs[i] = inputs[i].view_as(inputs[i]));
  const torch::autograd::variable_list outs = recorded(inputs);
  for (size_t k = 0; k < outs.size(); ++k)
    if (grad_outputs[k].defined()) {
      used.push_back(outs[k]);
      used_grads.push_back(grad_outputs[k]);
    }
  auto found = torch::autograd::grad(used, wanted, used_grads, /*retain_graph=*/true, /*create_graph=*/true,
                                     /*allow_unused=*/true);
  for (size_t i = 0, k = 0; i < need.size(); ++i)
    if (need[i]) grads[i] = found[k++];
}

Tensor hyper_linear(const Tensor& x, const c10::optional<Tensor>& hparams, const Tensor& weight,
                    const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
                    const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight);

Tensor hyper_embedding_by_example(const Tensor& indices, const c10::optional<Tensor>& hparams, const Tensor& weight,
                                  const Tensor& hyper_weight, const Tensor& weight_scale, int64_t batch_dim);

std::tuple<Tensor, Tensor> hyper_lstm_cell_step(
    const Tensor& x, const Tensor& h, const Tensor& c, const c10::optional<Tensor>& hparams,
    const Tensor& weight, const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight, const Tensor& h_weight,
    const Tensor& h_hyper_weight, const c10::optional<Tensor>& h_bias, const c10::optional<Tensor>& h_hyper_bias,
    const Tensor& h_hparam_weight);

Tensor hyper_conv2d(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                    const c10::optional<Tensor>& bias, const c10::optional<Tensor>& hyper_bias,
                    const Tensor& hparam_weight, std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation);

Tensor hyper_linear_seq(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& hyper_bias,
                        const Tensor& weight_scale, const c10::optional<Tensor>& bias_scale, int64_t batch_dim);

std::tuple<Tensor, Tensor, Tensor> hyper_lstm_layer(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const c10::optional<Tensor>& hparams,
    const c10::optional<Tensor>& weight, const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight, const c10::optional<Tensor>& h_weight,
    const Tensor& h_hyper_weight, const c10::optional<Tensor>& h_bias, const c10::optional<Tensor>& h_hyper_bias,
    const Tensor& h_hparam_weight, bool torch_gate_order);

Tensor per_example_dropout_forward(const Tensor& x, const Tensor& rates, const Tensor& scales,
                                   const Tensor& seed_offset, int64_t unit_size);

}  // namespace stn_kernels_host
