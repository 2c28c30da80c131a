// HyperLinear's eager call on CPU tensors, issued from C++: the same ATen ops, in the same order, as the
// reference (stn_kernels/reference.py: hyper_linear_stacked_forward / hyper_linear_stacked_backward), so the
// results are those of the reference path; what changes is the host time around them. At the STN shapes every
// op costs ~1 µs of arithmetic and ~1-2 µs of Python around it; a forward is 6 ops, a backward 14 (measured:
// ours/published 0.61-0.68 through here against 0.75-0.80 through the Python Function, --host-overhead).
#include <ATen/Dispatch.h>

#include "host.h"

namespace stn_kernels_host {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Forward {
  Tensor out, z_hyper, s, t, st;  // st: the [M, 2N] buffer whose halves s and t are
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
  return {out, z_hyper, scales[0], scales[1], st};
}


// At a tiny problem (M·N·K ≤ kTinyWork multiply-adds) the arithmetic costs less than the dispatch of the six ATen ops
// above (each ~1-3 µs of dispatcher, allocation and GEMM setup): the same formula in plain loops over contiguous
// float32 / float64 tensors, three allocations and no dispatch. Not the reference's bits (its GEMMs are MKL's).
constexpr int64_t kTinyWork = 32768;

bool tiny(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
          const Tensor& bias, const Tensor& hyper_bias, const Tensor& hparam_weight) {
  if (x.dim() != 2 || x.size(0) * weight.size(0) * weight.size(1) > kTinyWork) return false;
  const auto type = x.scalar_type();
  if (type != at::kFloat && type != at::kDouble) return false;
  for (const Tensor* t : {&x, &hparams, &weight, &hyper_weight, &hparam_weight})
    if (!t->is_contiguous() || t->scalar_type() != type) return false;
  for (const Tensor* t : {&bias, &hyper_bias})  // (undefined: absent)
    if (t->defined() && (!t->is_contiguous() || t->scalar_type() != type)) return false;
  return true;
}

template <typename T>
void tiny_forward_loops(const T* x, const T* lam, const T* w, const T* wh, const T* b, const T* hb, const T* hw,
                        T* out, T* z, T* st, int64_t M, int64_t K, int64_t N, int64_t H) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < 2 * N; ++j) {
      T acc = 0;
      for (int64_t h = 0; h < H; ++h) acc += lam[m * H + h] * hw[j * H + h];
      st[m * 2 * N + j] = acc;
    }
    for (int64_t n = 0; n < N; ++n) {
      T e = 0, y = 0;
      for (int64_t k = 0; k < K; ++k) {
        e += x[m * K + k] * w[n * K + k];
        y += x[m * K + k] * wh[n * K + k];
      }
      z[m * N + n] = y;
      T o = e + st[m * 2 * N + n] * y;
      if (b) o += b[n];
      if (hb) o += st[m * 2 * N + N + n] * hb[n];
      out[m * N + n] = o;
    }
  }
}

Forward tiny_forward(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                     const c10::optional<Tensor>& bias, const c10::optional<Tensor>& hyper_bias,
                     const Tensor& hparam_weight) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), H = hparams.size(1);
  Tensor out = at::empty({M, N}, x.options()), z = at::empty({M, N}, x.options());
  Tensor st = at::empty({M, 2 * N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_linear_tiny", [&] {
    tiny_forward_loops<scalar_t>(x.data_ptr<scalar_t>(), hparams.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                 hyper_weight.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                 hyper_bias.has_value() ? hyper_bias->data_ptr<scalar_t>() : nullptr,
                                 hparam_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                 st.data_ptr<scalar_t>(), M, K, N, H);
  });
  return {out, z, st.narrow(1, 0, N), st.narrow(1, N, N), st};
}

// The output alone (no autograd): s and t formed per element, one allocation.
template <typename T>
void tiny_output_loops(const T* x, const T* lam, const T* w, const T* wh, const T* b, const T* hb, const T* hw, T* out,
                       int64_t M, int64_t K, int64_t N, int64_t H) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      T e = 0, y = 0, s = 0, t = 0;
      for (int64_t k = 0; k < K; ++k) {
        e += x[m * K + k] * w[n * K + k];
        y += x[m * K + k] * wh[n * K + k];
      }
      for (int64_t h = 0; h < H; ++h) {
        s += lam[m * H + h] * hw[n * H + h];
        t += lam[m * H + h] * hw[(N + n) * H + h];
      }
      T o = e + s * y;
      if (b) o += b[n];
      if (hb) o += t * hb[n];
      out[m * N + n] = o;
    }
}

Tensor tiny_output(const Tensor& x, const Tensor& hparams, const Tensor& weight, const Tensor& hyper_weight,
                   const c10::optional<Tensor>& bias, const c10::optional<Tensor>& hyper_bias,
                   const Tensor& hparam_weight) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), H = hparams.size(1);
  Tensor out = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_linear_tiny", [&] {
    tiny_output_loops<scalar_t>(x.data_ptr<scalar_t>(), hparams.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                hyper_weight.data_ptr<scalar_t>(), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                hyper_bias.has_value() ? hyper_bias->data_ptr<scalar_t>() : nullptr,
                                hparam_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, K, N, H);
  });
  return out;
}

template <typename T>
void tiny_backward_loops(const T* g, const T* x, const T* lam, const T* w, const T* wh, const T* hb, const T* hw,
                         const T* z, const T* st, T* dx, T* dlam, T* dw, T* dwh, T* db, T* dhb, T* dhw, int64_t M,
                         int64_t K, int64_t N, int64_t H) {
  // st rows: [s, t] of 2N (the forward's buffer); d[s, t] rows formed one at a time.
  std::vector<T> gs(N), dsc(2 * N);
  for (int64_t m = 0; m < M; ++m) {
    const T* gr = g + m * N;
    for (int64_t n = 0; n < N; ++n) {
      gs[n] = gr[n] * st[m * 2 * N + n];
      dsc[n] = gr[n] * z[m * N + n];
      dsc[N + n] = hb ? gr[n] * hb[n] : T(0);
      if (db) db[n] += gr[n];
      if (dhb) dhb[n] += gr[n] * st[m * 2 * N + N + n];
    }
    if (dx)
      for (int64_t k = 0; k < K; ++k) {
        T acc = 0;
        for (int64_t n = 0; n < N; ++n) acc += gr[n] * w[n * K + k] + gs[n] * wh[n * K + k];
        dx[m * K + k] = acc;
      }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        if (dw) dw[n * K + k] += gr[n] * x[m * K + k];
        if (dwh) dwh[n * K + k] += gs[n] * x[m * K + k];
      }
    for (int64_t h = 0; h < H; ++h) {
      if (dlam) {
        T acc = 0;
        for (int64_t j = 0; j < 2 * N; ++j) acc += dsc[j] * hw[j * H + h];
        dlam[m * H + h] = acc;
      }
      if (dhw)
        for (int64_t j = 0; j < 2 * N; ++j) dhw[j * H + h] += dsc[j] * lam[m * H + h];
    }
  }
}

variable_list tiny_backward(const Tensor& g, const Tensor& x, const Tensor& hparams, const Tensor& weight,
                            const Tensor& hyper_weight, const Tensor& bias, const Tensor& hyper_bias,
                            const Tensor& hparam_weight, const Tensor& z, const Tensor& st,
                            const std::vector<bool>& need) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), H = hparams.size(1);
  variable_list grads(7);
  auto zeros = [&](std::initializer_list<int64_t> shape) { return at::zeros(shape, x.options()); };
  if (need[0]) grads[0] = at::empty({M, K}, x.options());
  if (need[1]) grads[1] = at::empty({M, H}, x.options());
  if (need[2]) grads[2] = zeros({N, K});
  if (need[3]) grads[3] = zeros({N, K});
  if (need[4] && bias.defined()) grads[4] = zeros({N});
  if (need[5] && hyper_bias.defined()) grads[5] = zeros({N});
  if (need[6]) grads[6] = zeros({2 * N, H});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_linear_tiny_backward", [&] {
    auto ptr = [](const Tensor& v) { return v.defined() ? v.data_ptr<scalar_t>() : nullptr; };
    tiny_backward_loops<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), hparams.data_ptr<scalar_t>(),
                                  weight.data_ptr<scalar_t>(), hyper_weight.data_ptr<scalar_t>(), ptr(hyper_bias),
                                  hparam_weight.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), st.data_ptr<scalar_t>(),
                                  ptr(grads[0]), ptr(grads[1]), ptr(grads[2]), ptr(grads[3]), ptr(grads[4]),
                                  ptr(grads[5]), ptr(grads[6]), M, K, N, H);
  });
  return grads;
}

// The elementwise products of the backward in one pass (any strides of g, s, t, z; contiguous results).
struct Products {
  Tensor g_s, g_t, d_scales;  // [M, N], [M, N], [M, 2N] = [g ⊙ z, g ⊙ b_h (0 without b_h)]
};

template <typename T>
void product_loops(const Tensor& g, const Tensor& s, const Tensor& t, const Tensor& z, const Tensor& hyper_bias,
                   Products& p) {
  const int64_t M = g.size(0), N = g.size(1);
  const T* gp = g.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* tp = t.data_ptr<T>();
  const T* zp = z.data_ptr<T>();
  const T* hp = hyper_bias.defined() ? hyper_bias.data_ptr<T>() : nullptr;
  const int64_t hs = hyper_bias.defined() ? hyper_bias.stride(0) : 0;
  T* gs = p.g_s.defined() ? p.g_s.data_ptr<T>() : nullptr;
  T* gt = p.g_t.defined() ? p.g_t.data_ptr<T>() : nullptr;
  T* ds = p.d_scales.defined() ? p.d_scales.data_ptr<T>() : nullptr;
  const int64_t g0 = g.stride(0), g1 = g.stride(1), s0 = s.stride(0), s1 = s.stride(1), t0 = t.stride(0),
                t1 = t.stride(1), z0 = z.stride(0), z1 = z.stride(1);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const T gv = gp[m * g0 + n * g1];
        if (gs) gs[m * N + n] = gv * sp[m * s0 + n * s1];
        if (gt) gt[m * N + n] = gv * tp[m * t0 + n * t1];
        if (ds) {
          ds[m * 2 * N + n] = gv * zp[m * z0 + n * z1];
          ds[m * 2 * N + N + n] = hp ? gv * hp[n * hs] : T(0);
        }
      }
  });
}

Products products(const Tensor& g, const Tensor& s, const Tensor& t, const Tensor& z, const Tensor& hyper_bias,
                  bool want_g_s, bool want_g_t, bool want_scales) {
  const int64_t M = g.size(0), N = g.size(1);
  Products p;
  if (want_g_s) p.g_s = at::empty({M, N}, g.options());
  if (want_g_t && hyper_bias.defined()) p.g_t = at::empty({M, N}, g.options());
  if (want_scales) p.d_scales = at::empty({M, 2 * N}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "hyper_linear_backward_products",
                             [&] { product_loops<scalar_t>(g, s, t, z, hyper_bias, p); });
  return p;
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
    const bool small = tiny(x, hparams, weight, hyper_weight, bias.value_or(Tensor()), hyper_bias.value_or(Tensor()),
                            hparam_weight);
    auto f = small ? tiny_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight)
                   : stn_kernels_host::forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight);
    // z and [s, t] (internal tensors nobody else holds) saved with the inputs: no string-keyed map per call.
    ctx->save_for_backward({x, hparams, weight, hyper_weight, bias.value_or(Tensor()), hyper_bias.value_or(Tensor()),
                            hparam_weight, f.z_hyper, f.st});
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &hparams = saved[1], &weight = saved[2], &hyper_weight = saved[3],
                 &bias = saved[4], &hyper_bias = saved[5], &hparam_weight = saved[6];
    const Tensor& g = grad_outputs[0];
    const std::vector<bool> need = inputs_needing_grad(ctx, saved, 7);  // the 7 arguments (not z, [s, t])
    variable_list grads(7);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      recorded_backward(saved, need, grad_outputs, [](const variable_list& v) {
        return variable_list{recorded(v[0], v[1], v[2], v[3], v[4], v[5], v[6])};
      }, grads);
      return grads;
    }
    const Tensor& z_hyper = saved[7];
    const int64_t n = weight.size(0);
    const Tensor s = saved[8].narrow(1, 0, n), t = saved[8].narrow(1, n, n);
    if (tiny(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight))  // as the forward decided
      return tiny_backward(g.contiguous(), x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, z_hyper,
                           saved[8], need);
    // g ⊙ s, g ⊙ t, and [g ⊙ z, g ⊙ b_h] (the cat's layout) in one pass over g: the same products as the reference's
    // separate ops (each one multiply, so the same bits), written where the reference's GEMMs and sums read them.
    const bool scales_wanted = need[1] || need[6];
    auto p = products(g, s, t, z_hyper, hyper_bias, need[0] || need[3], need[5], scales_wanted);
    if (need[0]) grads[0] = at::mm(g, weight).addmm_(p.g_s, hyper_weight);
    if (need[2]) grads[2] = at::mm(g.t(), x);
    if (need[3]) grads[3] = at::mm(p.g_s.t(), x);
    if (need[4]) grads[4] = g.sum(0);
    if (need[5]) grads[5] = p.g_t.sum(0);
    if (scales_wanted) {  // dλ = [ds, dt]·[V; C], d[V; C] = [ds, dt]ᵀ·λ
      if (need[1]) grads[1] = at::mm(p.d_scales, hparam_weight);
      if (need[6]) grads[6] = at::mm(p.d_scales.t(), hparams);
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
  if (tiny(x, *hparams, weight, hyper_weight, bias.value_or(Tensor()), hyper_bias.value_or(Tensor()), hparam_weight))
    return tiny_output(x, *hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight);
  return forward(x, *hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight).out;
}

}  // namespace stn_kernels_host
