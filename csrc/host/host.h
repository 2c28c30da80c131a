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
