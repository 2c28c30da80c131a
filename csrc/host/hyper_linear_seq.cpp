// HyperLinear over a sequence on CPU tensors: x [..., B, ..., K] with λ [B, H] per example along one dim (dim 0 of a
// batch-first [B, T, K], dim 1 of a time-major [T, B, K]), forward and backward in C++ (a torch::autograd::Function).
//
// The Python path repeats λ's rows over the sequence and runs the 2-D op on T·B rows: λ·[V; C]ᵀ and its gradients as
// GEMMs with an inner dim of H (a few) over T·B rows, and ~8 elementwise passes over the [T·B, N] output in the
// backward (g ⊙ s, g ⊙ t, g ⊙ z, their sums, a cat). Here the scales are formed once per example ([B, N]), and
//   forward:  out = x·Wᵀ, z = x·W_hᵀ (two GEMMs), then ONE pass out += s_b ⊙ z + β_b, β_b = b + t_b ⊙ b_h;
//   backward: ONE pass over g (g ⊙ s_b written; Σ g ⊙ z and Σ g per example accumulated), then dx = g·W + (g ⊙ s)·W_h,
//             dW = gᵀx, dW_h = (g ⊙ s)ᵀx (four GEMMs), and dλ, dV, dC, db, db_h from the [B, N] sums.
// The weights are not packed into one [2N, K] operand: that needs a copy of both weights per call, which costs more
// than the call it saves at these shapes (the weights are as large as or larger than the activations).
// Not the reference's op order, so not its bits: tests/test_host_hyper_linear_seq.py bounds it against the
// reference in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "host.h"

namespace stn_kernels_host {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

constexpr int kInputs = 8;  // x, λ, W, W_h, b, b_h, V, C

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// The rows of x as [A, B, C] around the batch dim: row r = (a·B + b)·C + c.
struct Layout {
  int64_t A, B, C, K, N;
};

Layout layout_of(const Tensor& x, int64_t batch_dim, int64_t n) {
  Layout l;
  l.A = 1;
  for (int64_t d = 0; d < batch_dim; ++d) l.A *= x.size(d);
  l.B = x.size(batch_dim);
  l.C = 1;
  for (int64_t d = batch_dim + 1; d < x.dim() - 1; ++d) l.C *= x.size(d);
  l.K = x.size(-1);
  l.N = n;
  return l;
}

template <typename T>
STN_HOST_VECTOR_CLONES void add_scaled_plus(T* __restrict out, const T* __restrict s, const T* __restrict z,
                                            const T* __restrict beta, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += s[j] * z[j] + beta[j];
}

template <typename T>
STN_HOST_VECTOR_CLONES void add_scaled(T* __restrict out, const T* __restrict s, const T* __restrict z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += s[j] * z[j];
}

// gs = g ⊙ s; ds += g ⊙ z; gsum += g
template <typename T>
STN_HOST_VECTOR_CLONES void grad_row(const T* __restrict g, const T* __restrict s, const T* __restrict z,
                                     T* __restrict gs, T* __restrict ds, T* __restrict gsum, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    gs[j] = g[j] * s[j];
    ds[j] += g[j] * z[j];
    gsum[j] += g[j];
  }
}

// Runs fn(row, example) over every row, in parallel over the examples (each example's rows on one thread, so that
// per-example sums need no locks).
template <typename Fn>
void for_rows(const Layout& l, const Fn& fn) {
  at::parallel_for(0, l.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t a = 0; a < l.A; ++a)
        for (int64_t c = 0; c < l.C; ++c) fn((a * l.B + b) * l.C + c, b);
  });
}

// The layer in differentiable ATen ops (for create_graph=True): the scales broadcast along the batch dim.
Tensor recorded(const variable_list& v, int64_t batch_dim) {
  const Tensor& x = v[0];
  std::vector<int64_t> shape(x.dim(), 1);
  shape[batch_dim] = x.size(batch_dim);
  shape.back() = v[2].size(0);
  Tensor out = at::matmul(x, v[2].t());
  if (v[4].defined()) out = out + v[4];
  out = out + at::mm(v[1], v[6].t()).view(shape) * at::matmul(x, v[3].t());
  if (v[5].defined() && v[7].defined()) out = out + at::mm(v[1], v[7].t()).view(shape) * v[5];
  return out;
}

struct HyperLinearSeqFunction : public torch::autograd::Function<HyperLinearSeqFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& hparams, const Tensor& weight,
                        const Tensor& hyper_weight, const OptTensor& bias, const OptTensor& hyper_bias,
                        const Tensor& weight_scale, const OptTensor& bias_scale, int64_t batch_dim) {
    const Layout l = layout_of(x, batch_dim, weight.size(0));
    const int64_t M = l.A * l.B * l.C;
    Tensor x2 = x.reshape({M, l.K});
    Tensor out = at::mm(x2, weight.t());
    Tensor z = at::mm(x2, hyper_weight.t());
    Tensor s = at::mm(hparams, weight_scale.t()).contiguous();  // [B, N]
    Tensor t = hyper_bias.has_value() && bias_scale.has_value() ? at::mm(hparams, bias_scale->t()) : Tensor();
    Tensor beta;  // [B, N]: b + t ⊙ b_h
    if (t.defined()) beta = t * *hyper_bias;
    if (bias.has_value()) beta = beta.defined() ? beta + *bias : bias->expand({l.B, l.N});
    if (beta.defined()) beta = beta.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_linear_seq", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      const scalar_t* zp = z.data_ptr<scalar_t>();
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* bp = beta.defined() ? beta.data_ptr<scalar_t>() : nullptr;
      for_rows(l, [&](int64_t r, int64_t b) {
        if (bp)
          add_scaled_plus(op + r * l.N, sp + b * l.N, zp + r * l.N, bp + b * l.N, l.N);
        else
          add_scaled(op + r * l.N, sp + b * l.N, zp + r * l.N, l.N);
      });
    });
    ctx->save_for_backward({x, hparams, weight, hyper_weight, opt(bias), opt(hyper_bias), weight_scale,
                            opt(bias_scale)});
    ctx->saved_data["z"] = z;
    ctx->saved_data["s"] = s;
    if (t.defined()) ctx->saved_data["t"] = t;
    ctx->saved_data["batch_dim"] = batch_dim;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = l.N;
    return out.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const int64_t batch_dim = ctx->saved_data["batch_dim"].toInt();
    const std::vector<bool> need = inputs_needing_grad(ctx, saved, kInputs);
    variable_list grads(kInputs + 1);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      recorded_backward(saved, need, grad_outputs,
                        [&](const variable_list& v) { return variable_list{recorded(v, batch_dim)}; }, grads);
      return grads;
    }
    const Tensor &x = saved[0], &lam = saved[1], &weight = saved[2], &hyper_weight = saved[3],
                 &hyper_bias = saved[5], &weight_scale = saved[6], &bias_scale = saved[7];
    const Layout l = layout_of(x, batch_dim, weight.size(0));
    const int64_t M = l.A * l.B * l.C;
    Tensor g = grad_outputs[0].reshape({M, l.N}).contiguous();
    Tensor x2 = x.reshape({M, l.K});
    const Tensor z = ctx->saved_data["z"].toTensor(), s = ctx->saved_data["s"].toTensor();
    Tensor gs = at::empty_like(g), ds = at::zeros({l.B, l.N}, g.options()), gsum = at::zeros({l.B, l.N}, g.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_linear_seq_backward", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* sp = s.data_ptr<scalar_t>();
      const scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* gsp = gs.data_ptr<scalar_t>();
      scalar_t* dsp = ds.data_ptr<scalar_t>();
      scalar_t* sump = gsum.data_ptr<scalar_t>();
      for_rows(l, [&](int64_t r, int64_t b) {
        grad_row(gp + r * l.N, sp + b * l.N, zp + r * l.N, gsp + r * l.N, dsp + b * l.N, sump + b * l.N, l.N);
      });
    });
    if (need[0]) grads[0] = at::mm(g, weight).addmm_(gs, hyper_weight).view(x.sizes());
    if (need[2]) grads[2] = at::mm(g.t(), x2);
    if (need[3]) grads[3] = at::mm(gs.t(), x2);
    if (need[4]) grads[4] = gsum.sum(0);
    const bool has_t = ctx->saved_data.count("t") > 0;
    Tensor dt = has_t ? gsum * hyper_bias : Tensor();  // d(t_b) = Σ g ⊙ b_h
    if (need[5] && has_t) grads[5] = (gsum * ctx->saved_data["t"].toTensor()).sum(0);
    if (need[6]) grads[6] = at::mm(ds.t(), lam);
    if (need[7] && has_t) grads[7] = at::mm(dt.t(), lam);
    if (need[1]) {
      grads[1] = at::mm(ds, weight_scale);
      if (has_t) grads[1].addmm_(dt, bias_scale);
    }
    return grads;
  }
};

}  // namespace

Tensor hyper_linear_seq(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& hyper_bias,
                        const Tensor& weight_scale, const c10::optional<Tensor>& bias_scale, int64_t batch_dim) {
  TORCH_CHECK(x.dim() >= 2 && batch_dim >= 0 && batch_dim < x.dim() - 1 && hparams.dim() == 2 &&
                  hparams.size(0) == x.size(batch_dim),
              "hyper_linear_seq: x [..., B, ..., K] with hparams [B, H] along batch_dim");
  return HyperLinearSeqFunction::apply(x.contiguous(), hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                       bias_scale, batch_dim);
}

}  // namespace stn_kernels_host
