// The Python module stn_kernels._host: the modules' eager calls on CPU tensors issued from C++ (the reference's
// ATen ops, in its order; autograd Functions whose backward runs without Python). Optional: built by
// `pip install` where a C++ compiler is found (setup.py), loaded on first use by stn_kernels/backends/host.py,
// which falls back to the Python path when it is missing or was built for another torch.
#include "host.h"

#ifndef TORCH_VERSION_STRING
#define TORCH_VERSION_STRING "unknown"
#endif

// Read from the file by the loader before it is imported (as csrc/module.cpp's marker for stn_kernels._C).
extern "C" __attribute__((visibility("default"), used)) const char stn_kernels_host_build_marker[] =
    "STN_KERNELS_BUILT_FOR_TORCH=" TORCH_VERSION_STRING ";";

PYBIND11_MODULE(_host, m) {
  m.doc() = "Compiled host paths of stn_kernels' modules (CPU tensors): see csrc/host/module.cpp.";
  m.attr("TORCH_VERSION") = TORCH_VERSION_STRING;
  m.def("hyper_linear", &stn_kernels_host::hyper_linear,
        "HyperLinear on CPU tensors: x [M, K], hparams [M, H] or None, weight, hyper_weight [N, K], bias, "
        "hyper_bias [N] or None, hparam_weight [2N, H]; inputs checked by the caller.");
  m.def("hyper_embedding_by_example", &stn_kernels_host::hyper_embedding_by_example,
        "stn_kernels.reference.hyper_embedding_by_example, op for op.");
  m.def("hyper_conv2d", &stn_kernels_host::hyper_conv2d,
        "HyperConv2d, groups 1 (csrc/host/conv.cpp): x [B, C, H, W] contiguous, hparams [B, H], weight, hyper_weight, "
        "bias, hyper_bias or None, hparam_weight [2C, H], stride, padding, dilation; inputs checked by the caller.");
  m.def("hyper_linear_seq", &stn_kernels_host::hyper_linear_seq,
        "HyperLinear over a sequence (csrc/host/hyper_linear_seq.cpp): x [..., B, ..., K] with hparams [B, H] along "
        "batch_dim, weight, hyper_weight [N, K], bias, hyper_bias [N] or None, weight_scale V [N, H], bias_scale C "
        "[N, H] or None; inputs checked by the caller.");
  m.def("hyper_lstm_layer", &stn_kernels_host::hyper_lstm_layer,
        "One HyperLSTM layer over a sequence (csrc/host/lstm.cpp): x [T, B, K], h0, c0 [B, N], hparams [B, H] or "
        "None, i2h and h2h as (weight, hyper_weight, bias, hyper_bias, hparam_weight [8N, H]), torch_gate_order "
        "(the elementary weights in nn.LSTM's gate order); returns (out [T, B, N], h_T, c_T).");
  m.def("per_example_dropout_forward", &stn_kernels_host::per_example_dropout_forward,
        "stn_kernels.reference_dropout.per_example_dropout_forward, bit for bit, in one pass: x contiguous, rates "
        "float32 [B], scales [B] in the compute dtype, seed_offset int64 [2] on the CPU.");
  m.def("hyper_lstm_cell_step", &stn_kernels_host::hyper_lstm_cell_step,
        "stn_kernels.reference_lstm.hyper_lstm_cell_step, op for op: (h, c); i2h and h2h as 5 arguments each.");
}
