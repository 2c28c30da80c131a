// The compiled host paths of the modules (stn_kernels._host): see module.cpp.
#pragma once
#include <torch/extension.h>

namespace stn_kernels_host {

using torch::Tensor;

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

Tensor per_example_dropout_forward(const Tensor& x, const Tensor& rates, const Tensor& scales,
                                   const Tensor& seed_offset, int64_t unit_size);

}  // namespace stn_kernels_host
