// CUDA kernels of the extension's private ops, registered against the schemas that
// stn_kernels/ops/hyper_linear.py defines (torch.library):
//
//   stn_kernels::_cuda_hyper_linear_epilogue(Tensor? acc, Tensor z, Tensor hparams, Tensor weight_scale,
//       Tensor? bias, Tensor? hyper_bias, Tensor? bias_scale) -> Tensor
//   stn_kernels::_cuda_hyper_linear_backward_reduce(Tensor grad_out, Tensor? z_hyper, Tensor hparams,
//       Tensor weight_scale, Tensor? hyper_bias, Tensor? bias_scale, bool grad_scaled, bool need_hparams,
//       bool need_weight_scale, bool need_bias_scale, bool need_bias, bool need_hyper_bias,
//       bool deterministic) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)
//
// Only light headers (no torch/extension.h, no ATen/ATen.h): this file takes ~10 s to compile.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "hyper_linear_kernels.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return STN_FLOAT32;
    case at::kHalf: return STN_FLOAT16;
    case at::kBFloat16: return STN_BFLOAT16;
    default: TORCH_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
}

// [rows, cols] with unit stride along the last dim (the kernels take a row stride only).
at::Tensor matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ",
              cols, "], got ", t.sizes());
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

at::Tensor vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, ": expected shape [", n, "], got ", t.sizes());
  return t.contiguous();
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mut_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
int64_t row_stride(const at::Tensor& t) { return t.defined() ? t.stride(0) : 0; }

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "stn_kernels: ", what, " failed: ", stn_hl_error_string(code));
}

at::Tensor epilogue(const std::optional<at::Tensor>& acc, const at::Tensor& z, const at::Tensor& hparams,
                    const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& hyper_bias, const std::optional<at::Tensor>& bias_scale) {
  TORCH_CHECK(z.dim() == 2, "z: expected a 2-D tensor, got shape ", z.sizes());
  TORCH_CHECK(z.is_cuda(), "z: expected a CUDA tensor, got device ", z.device());
  const int64_t M = z.size(0), N = z.size(1);
  TORCH_CHECK(hparams.dim() == 2, "hparams: expected a 2-D tensor, got shape ", hparams.sizes());
  const int64_t H = hparams.size(1);
  const c10::cuda::CUDAGuard guard(z.device());
  const int dt = dtype_code(z, "z");
  const int lt = dtype_code(hparams, "hparams");
  at::Tensor zz = matrix(z, "z", M, N);
  at::Tensor lam = matrix(hparams, "hparams", M, H);
  at::Tensor V = matrix(weight_scale, "weight_scale", N, H);
  check_device(hparams, z, "hparams");
  check_device(weight_scale, z, "weight_scale");
  TORCH_CHECK(weight_scale.scalar_type() == hparams.scalar_type(), "weight_scale: expected dtype ",
              hparams.scalar_type(), " (the dtype of hparams), got ", weight_scale.scalar_type());
  at::Tensor a, b, hb, C;
  if (acc.has_value() && acc->defined()) {
    a = matrix(*acc, "acc", M, N);
    check_device(a, z, "acc");
    TORCH_CHECK(a.scalar_type() == z.scalar_type(), "acc: expected dtype ", z.scalar_type(), ", got ", a.scalar_type());
  }
  if (bias.has_value() && bias->defined()) {
    b = vector(*bias, "bias", N);
    check_device(b, z, "bias");
    TORCH_CHECK(b.scalar_type() == z.scalar_type(), "bias: expected dtype ", z.scalar_type(), ", got ", b.scalar_type());
  }
  const bool has_hb = hyper_bias.has_value() && hyper_bias->defined();
  TORCH_CHECK(has_hb == (bias_scale.has_value() && bias_scale->defined()),
              "hyper_bias and bias_scale: expected both or neither");
  if (has_hb) {
    hb = vector(*hyper_bias, "hyper_bias", N);
    C = matrix(*bias_scale, "bias_scale", N, H);
    check_device(hb, z, "hyper_bias");
    check_device(C, z, "bias_scale");
    TORCH_CHECK(hb.scalar_type() == z.scalar_type(), "hyper_bias: expected dtype ", z.scalar_type(), ", got ",
                hb.scalar_type());
    TORCH_CHECK(C.scalar_type() == hparams.scalar_type(), "bias_scale: expected dtype ", hparams.scalar_type(),
                ", got ", C.scalar_type());
  }
  at::Tensor out = at::empty({M, N}, z.options());
  if (M == 0 || N == 0) return out;
  TORCH_CHECK(H > 0, "hparams: expected at least one hyperparameter, got shape ", hparams.sizes());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(stn_hl_epilogue(dt, lt, ptr(a), row_stride(a), ptr(zz), row_stride(zz), mut_ptr(out), out.stride(0),
                               ptr(lam), row_stride(lam), ptr(V), row_stride(V), ptr(C), row_stride(C), ptr(b),
                               ptr(hb), M, N, H, stream.stream()),
               "hyper_linear epilogue kernel");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_reduce(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& z_hyper, const at::Tensor& hparams,
    const at::Tensor& weight_scale, const std::optional<at::Tensor>& hyper_bias,
    const std::optional<at::Tensor>& bias_scale, bool grad_scaled, bool need_hparams, bool need_weight_scale,
    bool need_bias_scale, bool need_bias, bool need_hyper_bias, bool deterministic) {
  TORCH_CHECK(grad_out.dim() == 2, "grad_out: expected a 2-D tensor, got shape ", grad_out.sizes());
  TORCH_CHECK(grad_out.is_cuda(), "grad_out: expected a CUDA tensor, got device ", grad_out.device());
  const int64_t M = grad_out.size(0), N = grad_out.size(1);
  TORCH_CHECK(hparams.dim() == 2, "hparams: expected a 2-D tensor, got shape ", hparams.sizes());
  const int64_t H = hparams.size(1);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int dt = dtype_code(grad_out, "grad_out");
  const int lt = dtype_code(hparams, "hparams");
  at::Tensor g = matrix(grad_out, "grad_out", M, N);
  at::Tensor lam = matrix(hparams, "hparams", M, H);
  at::Tensor V = matrix(weight_scale, "weight_scale", N, H);
  check_device(hparams, grad_out, "hparams");
  check_device(weight_scale, grad_out, "weight_scale");
  TORCH_CHECK(weight_scale.scalar_type() == hparams.scalar_type(), "weight_scale: expected dtype ",
              hparams.scalar_type(), " (the dtype of hparams), got ", weight_scale.scalar_type());
  const bool has_hb = hyper_bias.has_value() && hyper_bias->defined() && bias_scale.has_value() &&
                      bias_scale->defined();
  at::Tensor hb, C, z;
  if (has_hb) {
    hb = vector(*hyper_bias, "hyper_bias", N);
    C = matrix(*bias_scale, "bias_scale", N, H);
    check_device(hb, grad_out, "hyper_bias");
    check_device(C, grad_out, "bias_scale");
    TORCH_CHECK(hb.scalar_type() == grad_out.scalar_type(), "hyper_bias: expected dtype ", grad_out.scalar_type(),
                ", got ", hb.scalar_type());
    TORCH_CHECK(C.scalar_type() == hparams.scalar_type(), "bias_scale: expected dtype ", hparams.scalar_type(),
                ", got ", C.scalar_type());
  }
  const bool need_dc = need_bias_scale && has_hb;
  const bool need_dbh = need_hyper_bias && has_hb;
  if (need_hparams || need_weight_scale) {
    TORCH_CHECK(z_hyper.has_value() && z_hyper->defined(), "z_hyper: needed for the hparams and weight_scale "
                "gradients");
    z = matrix(*z_hyper, "z_hyper", M, N);
    check_device(z, grad_out, "z_hyper");
    TORCH_CHECK(z.scalar_type() == grad_out.scalar_type(), "z_hyper: expected dtype ", grad_out.scalar_type(),
                ", got ", z.scalar_type());
  }
  const auto none = [&]() { return at::empty({0}, grad_out.options()); };
  at::Tensor gs = grad_scaled ? at::empty({M, N}, grad_out.options()) : none();
  at::Tensor dlam = need_hparams ? at::empty({M, H}, hparams.options()) : none();
  at::Tensor dv = need_weight_scale ? at::empty({N, H}, weight_scale.options()) : none();
  at::Tensor dc = need_dc ? at::empty({N, H}, C.options()) : none();
  at::Tensor dbe = need_bias ? at::empty({N}, grad_out.options()) : none();
  at::Tensor dbh = need_dbh ? at::empty({N}, hb.options()) : none();
  if (M == 0 || N == 0) {  // sums over no rows
    for (at::Tensor* t : {&dv, &dc, &dbe, &dbh}) t->zero_();
    return {gs, dlam, dv, dc, dbe, dbh};
  }
  TORCH_CHECK(H > 0, "hparams: expected at least one hyperparameter, got shape ", hparams.sizes());
  const auto use = [](const at::Tensor& t, bool need) { return need ? t : at::Tensor(); };
  const int64_t bytes = stn_hl_reduce_workspace_bytes(M, N, H, deterministic, need_hparams, need_weight_scale,
                                                      need_dc || need_dbh, need_bias);
  at::Tensor ws = at::empty({bytes > 0 ? bytes : 1}, grad_out.options().dtype(at::kByte));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(stn_hl_reduce(dt, lt, ptr(g), row_stride(g), ptr(z), row_stride(z), ptr(lam), row_stride(lam),
                             ptr(V), row_stride(V), ptr(C), row_stride(C), ptr(hb),
                             mut_ptr(use(gs, grad_scaled)), grad_scaled ? gs.stride(0) : 0,
                             mut_ptr(use(dlam, need_hparams)), mut_ptr(use(dv, need_weight_scale)),
                             mut_ptr(use(dc, need_dc)), mut_ptr(use(dbe, need_bias)), mut_ptr(use(dbh, need_dbh)),
                             M, N, H, deterministic ? 1 : 0, ws.data_ptr(), bytes, stream.stream()),
               "hyper_linear backward reduction kernels");
  return {gs, dlam, dv, dc, dbe, dbh};
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_kernels, CUDA, m) {
  m.impl("_cuda_hyper_linear_epilogue", &epilogue);
  m.impl("_cuda_hyper_linear_backward_reduce", &backward_reduce);
}
