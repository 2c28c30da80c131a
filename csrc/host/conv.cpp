// HyperConv2d on contiguous (NCHW) CPU tensors with groups = 1, forward and backward in C++ (a
// torch::autograd::Function):
//   forward:  one convolution against the packed [W; W_hyper] (2·C_out output channels: the conv's fixed cost once;
//             the weights are small, so packing them per call costs little), then ONE pass per output plane,
//             out[b, c] = conv_W[b, c] + s[b, c]·conv_Wh[b, c] + β[b, c], β = b + t ⊙ b_hyper;
//   backward: ONE pass per plane writing [g, s ⊙ g] (the packed conv's output gradient) and the per-plane sums Σ g ⊙ z
//             and Σ g, then one convolution_backward of the packed conv (dx, d[W; W_hyper]), and dλ, d[V; C], db, db_h
//             from the [B, C] sums.
// The Python path (stn_kernels/reference.py: hyper_conv2d_stacked_forward, differentiated by torch) makes ~8 passes
// over [B, 2·C_out, H, W] tensors in the backward (the zero fill and copy of each slice's gradient, their sum, g ⊙ s,
// g ⊙ z): at a resnet's shapes on the CPU those passes cost as much as a third of the convolution's backward.
// Not the reference's op order, so not its bits: tests/test_host_conv.py bounds it against the reference in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "host.h"

namespace stn_kernels_host {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

constexpr int kInputs = 7;  // x, λ, W, W_h, b, b_h, [V; C]

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// out = y + s·z + beta over one plane
template <typename T>
STN_HOST_VECTOR_CLONES void combine_plane(T* __restrict out, const T* __restrict y, const T* __restrict z, T s, T beta,
                                          int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = y[j] + s * z[j] + beta;
}

// gy = g, gz = s·g over one plane; returns (Σ g·z, Σ g) in lanes of 16 so that the sums vectorise.
template <typename T>
STN_HOST_VECTOR_CLONES void grad_plane(const T* __restrict g, const T* __restrict z, T s, T* __restrict gy,
                                       T* __restrict gz, int64_t n, T* gz_sum, T* g_sum) {
  constexpr int L = 16;
  T acc_z[L] = {}, acc_g[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int k = 0; k < L; ++k) {
      const T v = g[j + k];
      gy[j + k] = v;
      gz[j + k] = s * v;
      acc_z[k] += v * z[j + k];
      acc_g[k] += v;
    }
  T sz = 0, sg = 0;
  for (; j < n; ++j) {
    gy[j] = g[j];
    gz[j] = s * g[j];
    sz += g[j] * z[j];
    sg += g[j];
  }
  for (int k = 0; k < L; ++k) {
    sz += acc_z[k];
    sg += acc_g[k];
  }
  *gz_sum = sz;
  *g_sum = sg;
}

struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
};

Tensor convolve(const Tensor& x, const Tensor& w, const Tensor& bias, const Geometry& geo) {
  return at::convolution(x, w, bias.defined() ? c10::optional<Tensor>(bias) : c10::nullopt, geo.stride, geo.padding,
                         geo.dilation, false, {0, 0}, 1);
}

// The layer in differentiable ATen ops (for create_graph=True).
Tensor recorded(const variable_list& v, const Geometry& geo) {
  const int64_t c = v[2].size(0);
  auto st = at::mm(v[1], v[6].t());
  Tensor out = convolve(v[0], v[2], v[4], geo);
  out = out + st.narrow(1, 0, c).view({-1, c, 1, 1}) * convolve(v[0], v[3], Tensor(), geo);
  if (v[5].defined()) out = out + (st.narrow(1, c, c) * v[5]).view({-1, c, 1, 1});
  return out;
}

struct HyperConv2dFunction : public torch::autograd::Function<HyperConv2dFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& hparams, const Tensor& weight,
                        const Tensor& hyper_weight, const OptTensor& bias, const OptTensor& hyper_bias,
                        const Tensor& hparam_weight, std::vector<int64_t> stride, std::vector<int64_t> padding,
                        std::vector<int64_t> dilation) {
    const Geometry geo{stride, padding, dilation};
    const int64_t B = x.size(0), C = weight.size(0);
    Tensor packed = at::cat({weight, hyper_weight}, 0);
    Tensor both = convolve(x, packed, Tensor(), geo).contiguous();  // [B, 2C, Ho, Wo]
    Tensor st = at::mm(hparams, hparam_weight.t()).contiguous();      // [B, 2C]: s, t
    Tensor beta;                                                      // [B, C]
    if (hyper_bias.has_value()) beta = st.narrow(1, C, C) * *hyper_bias;
    if (bias.has_value()) beta = beta.defined() ? beta + *bias : bias->expand({B, C});
    beta = beta.defined() ? beta.contiguous() : at::zeros({B, C}, x.options());
    const int64_t plane = both.size(2) * both.size(3);
    Tensor out = at::empty({B, C, both.size(2), both.size(3)}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_conv2d", [&] {
      const scalar_t* bp = both.data_ptr<scalar_t>();
      const scalar_t* sp = st.data_ptr<scalar_t>();
      const scalar_t* betap = beta.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / C, c = p % C;
          combine_plane(op + p * plane, bp + (b * 2 * C + c) * plane, bp + (b * 2 * C + C + c) * plane,
                        sp[b * 2 * C + c], betap[p], plane);
        }
      });
    });
    ctx->save_for_backward({x, hparams, weight, hyper_weight, opt(bias), opt(hyper_bias), hparam_weight});
    ctx->saved_data["both"] = both;
    ctx->saved_data["packed"] = packed;
    ctx->saved_data["st"] = st;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const Geometry geo{ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                       ctx->saved_data["dilation"].toIntVector()};
    const std::vector<bool> need = inputs_needing_grad(ctx, saved, kInputs);
    variable_list grads(kInputs + 3);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      recorded_backward(saved, need, grad_outputs,
                        [&](const variable_list& v) { return variable_list{recorded(v, geo)}; }, grads);
      return grads;
    }
    const Tensor &x = saved[0], &lam = saved[1], &hyper_bias = saved[5], &hparam_weight = saved[6];
    const Tensor both = ctx->saved_data["both"].toTensor(), st = ctx->saved_data["st"].toTensor();
    const int64_t B = both.size(0), C = both.size(1) / 2, plane = both.size(2) * both.size(3);
    Tensor g = grad_outputs[0].contiguous();
    Tensor g_both = at::empty_like(both);
    Tensor sums = at::empty({2, B, C}, g.options());  // Σ g ⊙ z, Σ g per plane
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_conv2d_backward", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* bp = both.data_ptr<scalar_t>();
      const scalar_t* sp = st.data_ptr<scalar_t>();
      scalar_t* gbp = g_both.data_ptr<scalar_t>();
      scalar_t* sums_p = sums.data_ptr<scalar_t>();
      at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / C, c = p % C;
          grad_plane(gp + p * plane, bp + (b * 2 * C + C + c) * plane, sp[b * 2 * C + c],
                     gbp + (b * 2 * C + c) * plane, gbp + (b * 2 * C + C + c) * plane, plane, sums_p + p,
                     sums_p + B * C + p);
        }
      });
    });
    if (need[0] || need[2] || need[3]) {
      auto found = at::convolution_backward(g_both, x, ctx->saved_data["packed"].toTensor(), c10::nullopt, geo.stride,
                                            geo.padding, geo.dilation, false, {0, 0}, 1,
                                            {need[0], need[2] || need[3], false});
      if (need[0]) grads[0] = std::get<0>(found);
      if (need[2]) grads[2] = std::get<1>(found).narrow(0, 0, C);
      if (need[3]) grads[3] = std::get<1>(found).narrow(0, C, C);
    }
    const Tensor ds = sums[0], gsum = sums[1];
    if (need[4]) grads[4] = gsum.sum(0);
    if (need[5] && hyper_bias.defined()) grads[5] = (gsum * st.narrow(1, C, C)).sum(0);
    if (need[1] || need[6]) {
      Tensor d_scales = at::cat({ds, hyper_bias.defined() ? gsum * hyper_bias : at::zeros_like(ds)}, 1);
      if (need[1]) grads[1] = at::mm(d_scales, hparam_weight);
      if (need[6]) grads[6] = at::mm(d_scales.t(), lam);
    }
    return grads;
  }
};

}  // namespace

Tensor hyper_conv2d(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                    const c10::optional<Tensor>& bias, const c10::optional<Tensor>& hyper_bias,
                    const Tensor& hparam_weight, std::vector<int64_t> stride, std::vector<int64_t> padding,
                    std::vector<int64_t> dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && hparams.dim() == 2 && hparams.size(0) == x.size(0),
              "hyper_conv2d: x [B, C, H, W] contiguous with hparams [B, H]");
  return HyperConv2dFunction::apply(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, stride,
                                    padding, dilation);
}

}  // namespace stn_kernels_host
