// One HyperLSTM layer over a whole sequence on CPU tensors, forward and backward in C++ (a torch::autograd::Function
// whose backward runs without Python): the time loop that stn_kernels/reference_lstm.py runs in Python, with
//
// * the i2h products of all T steps as ONE GEMM before the loop (as torch's own CPU LSTM and cuDNN do), against the
//   packed [W_i; W_hi] ([8N, K]: the elementary and the hyper weight as one operand), so x·W_iᵀ and x·W_hiᵀ come out
//   of one call;
// * per step one GEMM h·[W_h; W_hh]ᵀ ([B, 8N]) and the gate arithmetic fused into two loops around torch's own
//   vectorised sigmoid and tanh (the Python loop issued ~20 ops per step, each a pass over [B, 4N]);
// * in the backward, per step one fused loop (the gate derivatives, D and D ⊙ s_h side by side, the λ sums) and one
//   GEMM [D, D ⊙ s_h]·[W_h; W_hh] for dh (packed: measured 10-20 % faster per step than two GEMMs at B=20, N=256); after the loop dW_h and dW_hh as ONE GEMM of [D, D ⊙ s_h]ᵀ against the
//   stacked h_{t-1}, and dx, dW_i and dW_hi as one GEMM each against [D, D ⊙ s_i].
//
// Gate order: the official STN's (f, i, o, g) for the hyper path (W_hyper, b_hyper, [V; C]) and inside the gate loops.
// ``torch_gate_order``: the elementary weights and biases come in torch.nn.LSTM's (i, f, g, o) (a converted nn.LSTM's
// own Parameters); their products then stay in that order and the gate loops read (and write D) at the permuted
// block, so no weight is reordered: dW comes out of its GEMM in torch's order too (only the [4N] biases are).
//
// pre_t = x_t·W_iᵀ + b_i + s_i ⊙ (x_t·W_hiᵀ) + t_i ⊙ b_hi + h_{t-1}·W_hᵀ + b_h + s_h ⊙ (h_{t-1}·W_hhᵀ) + t_h ⊙ b_hh,
// (s, t) = λ·[V; C]ᵀ per layer; f, i, o = σ(pre[0:3N]), g = tanh(pre[3N:4N]); c_t = f c_{t-1} + i g; h_t = o tanh(c_t).
// Not the reference's op order, so not its bits: tests/test_host_lstm.py bounds it against the reference in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "host.h"

namespace stn_kernels_host {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

constexpr int kInputs = 14;  // x, h0, c0, λ, then (W, W_hyper, b, b_hyper, [V; C]) of i2h and of h2h

// nn.LSTM's gate blocks (i, f, g, o) in ours (f, i, o, g), or back: the same permutation both ways.
Tensor swap_gate_blocks(const Tensor& t) {
  auto blocks = t.chunk(4, 0);
  return at::cat({blocks[1], blocks[0], blocks[3], blocks[2]}, 0);
}

Tensor ours(const Tensor& t, bool torch_order) {
  if (!t.defined()) return t;
  return torch_order ? swap_gate_blocks(t) : t;
}

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// What the forward keeps for the backward besides the inputs.
struct Saved {
  Tensor proj;    // [T·B, 8N] (4N without λ): x·[W_i; W_hi]ᵀ, its second half z_i
  Tensor hidden;  // [T, B, 8N] (4N): h_{t-1}·[W_h; W_hh]ᵀ, its second half z_h
  Tensor acts;    // [T, B, 4N]: f, i, o, g
  Tensor cells;   // [T, B, N]: c_t
  Tensor tanh_c;  // [T, B, N]: tanh(c_t)
  Tensor scales_i, scales_h;  // [B, 8N]: (s, t) of each linear, λ·[V; C]ᵀ (undefined without λ)
};

struct Packed {
  Tensor w_i;        // [8N, K] ([W_i; W_hi], elementary in its own order) or W_i itself without λ
  Tensor w_h_t;      // [N, 8N] ([W_h; W_hh]ᵀ, contiguous: the per-step GEMM's fastest layout) or W_hᵀ
  Tensor w_h;        // [8N, N] ([W_h; W_hh], for dh in the backward) or W_h itself
  Tensor beta;       // [B, 4N] (or [1, 4N]), ours: b_i + b_h + t_i ⊙ b_hi + t_h ⊙ b_hh, or undefined
  int64_t block[4];  // the block of our gate g among the elementary products (torch order: f, i, o, g at 1, 0, 3, 2)
};

Packed pack(const Tensor* in, bool hyper, bool torch_order, const Saved& s) {
  Packed p;
  const int64_t g = in[10].size(0), n = in[10].size(1);
  p.w_i = hyper ? at::cat({in[4], in[5]}, 0) : in[4];
  p.w_h = hyper ? at::cat({in[9], in[10]}, 0) : in[9];
  p.w_h_t = at::empty({n, hyper ? 2 * g : g}, in[9].options());
  p.w_h_t.narrow(1, 0, g).copy_(in[9].t());
  if (hyper) p.w_h_t.narrow(1, g, g).copy_(in[10].t());
  Tensor beta;
  for (int k : {6, 11}) {
    if (!in[k].defined()) continue;
    const Tensor b = torch_order ? swap_gate_blocks(in[k]) : in[k];
    beta = beta.defined() ? beta + b : b;
  }
  if (hyper) {
    const Tensor* scales[2] = {&s.scales_i, &s.scales_h};
    for (int which = 0; which < 2; ++which) {
      const Tensor& hyper_bias = in[which ? 12 : 7];
      if (!hyper_bias.defined()) continue;
      const Tensor term = scales[which]->narrow(1, g, g) * hyper_bias;
      beta = beta.defined() ? beta + term : term;
    }
  }
  p.beta = beta.defined() ? beta.reshape({-1, g}).contiguous() : beta;
  const int64_t torch_blocks[4] = {1, 0, 3, 2};
  for (int k = 0; k < 4; ++k) p.block[k] = torch_order ? torch_blocks[k] : k;
  return p;
}

// The gate loops' pieces, as functions whose restrict parameters let the compiler vectorise each loop (restrict on
// local pointers inside the lambdas below it does not take into account).
template <typename T>
STN_HOST_VECTOR_CLONES void set_sum(T* __restrict out, const T* __restrict a, const T* __restrict b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = a[j] + b[j];
}

template <typename T>
STN_HOST_VECTOR_CLONES void add_two_products(T* __restrict out, const T* __restrict a, const T* __restrict b, const T* __restrict c,
                      const T* __restrict d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += a[j] * b[j] + c[j] * d[j];
}

template <typename T>
STN_HOST_VECTOR_CLONES void add(T* __restrict out, const T* __restrict a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += a[j];
}

template <typename T>
STN_HOST_VECTOR_CLONES void add_product(T* __restrict out, const T* __restrict a, const T* __restrict b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += a[j] * b[j];
}

template <typename T>
STN_HOST_VECTOR_CLONES void set_product(T* __restrict out, const T* __restrict a, const T* __restrict b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = a[j] * b[j];
}

// c_t = f ⊙ c_{t-1} + i ⊙ g
template <typename T>
STN_HOST_VECTOR_CLONES void cell_update(T* __restrict c_next, const T* __restrict f, const T* __restrict c, const T* __restrict i,
                 const T* __restrict g, int64_t n) {
  for (int64_t j = 0; j < n; ++j) c_next[j] = f[j] * c[j] + i[j] * g[j];
}

// One example's gate derivatives at one step: D of f, i, o, g (each to its block of d), and dc for the step before.
template <typename T>
STN_HOST_VECTOR_CLONES void gate_grads(const T* __restrict f, const T* __restrict i, const T* __restrict o, const T* __restrict g,
                const T* __restrict tc, const T* __restrict c_prev, const T* __restrict grad_out,
                const T* __restrict dh, T* __restrict dc, T* __restrict df, T* __restrict di, T* __restrict d_o,
                T* __restrict dg, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T dh_t = grad_out[j] + dh[j];
    const T dct = dc[j] + dh_t * o[j] * (T(1) - tc[j] * tc[j]);
    df[j] = dct * c_prev[j] * f[j] * (T(1) - f[j]);
    di[j] = dct * g[j] * i[j] * (T(1) - i[j]);
    d_o[j] = dh_t * tc[j] * o[j] * (T(1) - o[j]);
    dg[j] = dct * i[j] * (T(1) - g[j] * g[j]);
    dc[j] = dct * f[j];
  }
}

// Forward of the whole sequence into s (and out).
template <typename scalar_t>
void run_forward(const Tensor* in, bool hyper, const Packed& p, Saved& s, Tensor& out) {
  const Tensor& x = in[0];
  const int64_t T = x.size(0), B = x.size(1), K = x.size(2), N = in[10].size(1), G = 4 * N, W = hyper ? 2 * G : G;
  s.proj = at::mm(x.reshape({T * B, K}), p.w_i.t());
  s.hidden = at::empty({T, B, W}, x.options());
  s.acts = at::empty({T, B, G}, x.options());
  s.cells = at::empty({T, B, N}, x.options());
  s.tanh_c = at::empty({T, B, N}, x.options());
  out = at::empty({T, B, N}, x.options());
  Tensor h = in[1], c = in[2];
  const scalar_t* proj = s.proj.data_ptr<scalar_t>();
  const scalar_t* si = hyper ? s.scales_i.data_ptr<scalar_t>() : nullptr;
  const scalar_t* sh = hyper ? s.scales_h.data_ptr<scalar_t>() : nullptr;
  const scalar_t* beta = p.beta.defined() ? p.beta.data_ptr<scalar_t>() : nullptr;
  const int64_t beta_rows = p.beta.defined() ? p.beta.size(0) : 0;
  for (int64_t t = 0; t < T; ++t) {
    Tensor q = s.hidden[t];
    at::mm_out(q, h, p.w_h_t);
    Tensor a = s.acts[t];
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* xp = proj + t * B * W;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t gate = 0; gate < 4; ++gate) {
          const int64_t e = p.block[gate] * N, o = gate * N;
          const scalar_t* xr = xp + b * W;
          const scalar_t* qr = qp + b * W;
          scalar_t* ar = ap + b * G + o;
          set_sum(ar, xr + e, qr + e, N);
          if (hyper) add_two_products(ar, si + b * 2 * G + o, xr + G + o, sh + b * 2 * G + o, qr + G + o, N);
          if (beta) add(ar, beta + (beta_rows > 1 ? b : 0) * G + o, N);
        }
      }
    });
    a.narrow(1, 0, 3 * N).sigmoid_();  // torch's vectorised kernels for the transcendental part
    a.narrow(1, 3 * N, N).tanh_();
    Tensor c_next = s.cells[t], tc = s.tanh_c[t], h_next = out[t];
    const scalar_t* cp = c.data_ptr<scalar_t>();
    scalar_t* cn = c_next.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* ar = ap + b * G;
      cell_update(cn + b * N, ar, cp + b * N, ar + N, ar + 3 * N, N);
    }
    at::tanh_out(tc, c_next);
    at::mul_out(h_next, a.narrow(1, 2 * N, N), tc);
    h = h_next;
    c = c_next;
  }
}

// Backward through time: the 14 input gradients (and one for torch_gate_order), undefined where not needed.
template <typename scalar_t>
variable_list run_backward(const Tensor* in, bool hyper, bool torch_order, const Packed& p, const Saved& s,
                           const Tensor& out, Tensor grad_out, Tensor grad_h, Tensor grad_c,
                           const std::vector<bool>& need) {
  const Tensor& x = in[0];
  const int64_t T = x.size(0), B = x.size(1), K = x.size(2), N = in[10].size(1), G = 4 * N, W = hyper ? 2 * G : G;
  auto opts = x.options();
  Tensor dbuf = at::empty({T, B, W}, opts);  // per step: D (elementary order), D ⊙ s_h (ours)
  Tensor ds = at::zeros({2, B, G}, opts);    // Σ_t D ⊙ z_i, Σ_t D ⊙ z_h (λ side), ours
  Tensor dsum = at::zeros({B, G}, opts);     // Σ_t D (biases, t), ours
  Tensor dh = grad_h.defined() ? grad_h.clone() : at::zeros({B, N}, opts);
  Tensor dc = grad_c.defined() ? grad_c.clone() : at::zeros({B, N}, opts);
  if (!grad_out.defined()) grad_out = at::zeros({T, B, N}, opts);  // (no branch in the loop below)
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  const scalar_t* acts = s.acts.data_ptr<scalar_t>();
  const scalar_t* cells = s.cells.data_ptr<scalar_t>();
  const scalar_t* tanh_c = s.tanh_c.data_ptr<scalar_t>();
  const scalar_t* c0 = in[2].data_ptr<scalar_t>();
  const scalar_t* proj = s.proj.data_ptr<scalar_t>();
  const scalar_t* hid = s.hidden.data_ptr<scalar_t>();
  const scalar_t* sh = hyper ? s.scales_h.data_ptr<scalar_t>() : nullptr;
  scalar_t* dsp = ds.data_ptr<scalar_t>();
  scalar_t* dsump = dsum.data_ptr<scalar_t>();
  scalar_t* dbp = dbuf.data_ptr<scalar_t>();
  scalar_t* dhp = dh.data_ptr<scalar_t>();
  scalar_t* dcp = dc.data_ptr<scalar_t>();
  const int64_t ef = p.block[0] * N, ei = p.block[1] * N, eo = p.block[2] * N, eg = p.block[3] * N;
  for (int64_t t = T - 1; t >= 0; --t) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row = t * B + b;
        const scalar_t* a = acts + row * G;
        scalar_t* d = dbp + row * W;
        gate_grads(a, a + N, a + 2 * N, a + 3 * N, tanh_c + row * N, t ? cells + (row - B) * N : c0 + b * N,
                   go + row * N, dhp + b * N, dcp + b * N, d + ef, d + ei, d + eo, d + eg, N);
        for (int64_t gate = 0; gate < 4; ++gate) {
          const int64_t o = gate * N;
          const scalar_t* de = d + p.block[gate] * N;  // this gate's D
          add(dsump + b * G + o, de, N);
          if (!hyper) continue;
          add_product(dsp + b * G + o, de, proj + row * W + G + o, N);       // Σ D ⊙ z_i
          add_product(dsp + (B + b) * G + o, de, hid + row * W + G + o, N);  // Σ D ⊙ z_h
          set_product(d + G + o, de, sh + b * 2 * G + o, N);                 // D ⊙ s_h
        }
      }
    });
    if (t > 0 || need[1]) at::mm_out(dh, dbuf[t], p.w_h);  // dh_{t-1} = [D, D ⊙ s_h]·[W_h; W_hh]
  }
  variable_list grads(kInputs + 1);
  if (need[1]) grads[1] = dh;
  if (need[2]) grads[2] = dc;
  auto split = [&](const Tensor& packed, int first) {  // [8N, ·] → (elementary, hyper), each in its own order
    if (need[first]) grads[first] = packed.narrow(0, 0, G);
    if (hyper && need[first + 1]) grads[first + 1] = packed.narrow(0, G, G);
  };
  Tensor flat = dbuf.view({T * B, W});
  if (need[9] || need[10]) {
    Tensor h_prev = at::cat({in[1].unsqueeze(0), out.narrow(0, 0, T - 1)}, 0).view({T * B, N});
    split(at::mm(flat.t(), h_prev), 9);
  }
  if (hyper && (need[0] || need[4] || need[5])) {  // the second half: D ⊙ s_i for i2h
    const scalar_t* si = s.scales_i.data_ptr<scalar_t>();
    for (int64_t row = 0; row < T * B; ++row)
      for (int64_t gate = 0; gate < 4; ++gate)
        set_product(dbp + row * W + G + gate * N, dbp + row * W + p.block[gate] * N, si + (row % B) * 2 * G + gate * N,
                    N);
  }
  if (need[0]) grads[0] = at::mm(flat, p.w_i).view({T, B, K});
  if (need[4] || need[5]) split(at::mm(flat.t(), x.reshape({T * B, K})), 4);
  Tensor db = dsum.sum(0);
  for (int k : {6, 11})
    if (need[k]) grads[k] = torch_order ? swap_gate_blocks(db) : db;
  if (hyper) {
    const Tensor lam = in[3];
    Tensor d_lam;
    for (int which = 0; which < 2; ++which) {
      const Tensor& hyper_bias = in[which ? 12 : 7];
      const Tensor& scales = which ? s.scales_h : s.scales_i;
      if (hyper_bias.defined() && need[which ? 12 : 7]) grads[which ? 12 : 7] = (dsum * scales.narrow(1, G, G)).sum(0);
      const int map = which ? 13 : 8;
      if (!need[3] && !need[map]) continue;
      Tensor dt = hyper_bias.defined() ? dsum * hyper_bias : at::zeros_like(dsum);
      Tensor d_scales = at::cat({ds[which], dt}, 1);  // [B, 8N]: d(s), d(t)
      if (need[map]) grads[map] = at::mm(d_scales.t(), lam);
      if (need[3]) d_lam = d_lam.defined() ? d_lam.addmm_(d_scales, in[map]) : at::mm(d_scales, in[map]);
    }
    if (need[3]) grads[3] = d_lam;
  }
  return grads;
}

// The layer in differentiable ATen ops (autograd records them): for create_graph=True, as
// reference_lstm.hyper_lstm_recurrence (unrolled cells) is for the Python path.
variable_list recorded(const variable_list& v, bool torch_order) {
  const Tensor& x = v[0];
  const int64_t T = x.size(0), B = x.size(1), N = v[9].size(1), G = 4 * N;
  const bool hyper = v[3].defined();
  auto linear = [&](const Tensor& input, int first) {
    Tensor pre = at::matmul(input, ours(v[first], torch_order).t());
    if (v[first + 2].defined()) pre = pre + ours(v[first + 2], torch_order);
    if (!hyper) return pre;
    auto st = at::mm(v[3], v[first + 4].t());  // [B, 8N]
    pre = pre + st.narrow(1, 0, G) * at::matmul(input, v[first + 1].t());
    if (v[first + 3].defined()) pre = pre + st.narrow(1, G, G) * v[first + 3];
    return pre;
  };
  Tensor proj = linear(x, 4);  // [T, B, 4N]: λ's rows broadcast over T
  Tensor h = v[1], c = v[2];
  std::vector<Tensor> outs;
  for (int64_t t = 0; t < T; ++t) {
    auto gates = (proj[t] + linear(h, 9)).split_with_sizes({3 * N, N}, 1);
    auto fio = at::sigmoid(gates[0]).chunk(3, 1);
    c = fio[0] * c + fio[1] * at::tanh(gates[1]);
    h = fio[2] * at::tanh(c);
    outs.push_back(h);
  }
  (void)B;
  return {at::stack(outs), h, c};
}

struct HyperLSTMLayerFunction : public torch::autograd::Function<HyperLSTMLayerFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const Tensor& c0,
                               const OptTensor& hparams, const OptTensor& w_i, const Tensor& hw_i,
                               const OptTensor& b_i, const OptTensor& hb_i, const Tensor& map_i, const OptTensor& w_h,
                               const Tensor& hw_h, const OptTensor& b_h, const OptTensor& hb_h, const Tensor& map_h,
                               bool torch_order) {
    Tensor in[kInputs] = {x, h0, c0, opt(hparams), opt(w_i), hw_i, opt(b_i), opt(hb_i), map_i,
                          opt(w_h), hw_h, opt(b_h), opt(hb_h), map_h};
    const bool hyper = in[3].defined();
    Saved s;
    if (hyper) {
      s.scales_i = at::mm(in[3], map_i.t()).contiguous();
      s.scales_h = at::mm(in[3], map_h.t()).contiguous();
    }
    Packed p = pack(in, hyper, torch_order, s);
    Tensor out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hyper_lstm_layer", [&] { run_forward<scalar_t>(in, hyper, p, s, out); });
    const int64_t T = x.size(0);
    Tensor h_T = out[T - 1].clone(), c_T = s.cells[T - 1].clone();
    std::vector<Tensor> save(in, in + kInputs);
    save.push_back(out);
    ctx->save_for_backward(save);
    ctx->saved_data["torch_order"] = torch_order;
    ctx->saved_data["proj"] = s.proj;
    ctx->saved_data["hidden"] = s.hidden;
    ctx->saved_data["acts"] = s.acts;
    ctx->saved_data["cells"] = s.cells;
    ctx->saved_data["tanh_c"] = s.tanh_c;
    ctx->saved_data["w_i"] = p.w_i;
    ctx->saved_data["w_h"] = p.w_h;
    if (hyper) {
      ctx->saved_data["scales_i"] = s.scales_i;
      ctx->saved_data["scales_h"] = s.scales_h;
    }
    return {out, h_T, c_T};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const bool torch_order = ctx->saved_data["torch_order"].toBool();
    const std::vector<bool> need = inputs_needing_grad(ctx, saved, kInputs);
    variable_list grads(kInputs + 1);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      recorded_backward(saved, need, grad_outputs, [&](const variable_list& v) { return recorded(v, torch_order); },
                        grads);
      return grads;
    }
    Tensor in[kInputs];
    for (int i = 0; i < kInputs; ++i) in[i] = saved[i];
    const bool hyper = in[3].defined();
    Saved s;
    s.proj = ctx->saved_data["proj"].toTensor();
    s.hidden = ctx->saved_data["hidden"].toTensor();
    s.acts = ctx->saved_data["acts"].toTensor();
    s.cells = ctx->saved_data["cells"].toTensor();
    s.tanh_c = ctx->saved_data["tanh_c"].toTensor();
    if (hyper) {
      s.scales_i = ctx->saved_data["scales_i"].toTensor();
      s.scales_h = ctx->saved_data["scales_h"].toTensor();
    }
    Packed p;
    p.w_i = ctx->saved_data["w_i"].toTensor();
    p.w_h = ctx->saved_data["w_h"].toTensor();
    const int64_t torch_blocks[4] = {1, 0, 3, 2};
    for (int k = 0; k < 4; ++k) p.block[k] = torch_order ? torch_blocks[k] : k;
    auto contiguous = [](const Tensor& t) { return t.defined() ? t.contiguous() : t; };
    AT_DISPATCH_FLOATING_TYPES(in[0].scalar_type(), "hyper_lstm_layer_backward", [&] {
      grads = run_backward<scalar_t>(in, hyper, torch_order, p, s, saved[kInputs], contiguous(grad_outputs[0]),
                                     contiguous(grad_outputs[1]), contiguous(grad_outputs[2]), need);
    });
    return grads;
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> hyper_lstm_layer(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const c10::optional<Tensor>& hparams,
    const c10::optional<Tensor>& weight, const Tensor& hyper_weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& hyper_bias, const Tensor& hparam_weight, const c10::optional<Tensor>& h_weight,
    const Tensor& h_hyper_weight, const c10::optional<Tensor>& h_bias, const c10::optional<Tensor>& h_hyper_bias,
    const Tensor& h_hparam_weight, bool torch_gate_order) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) > 0 && x.size(1) > 0 && weight.has_value() && h_weight.has_value(),
              "hyper_lstm_layer: x [T, B, K] with T, B > 0 and the elementary weights");
  Tensor xc = x.contiguous(), h = h0.contiguous(), c = c0.contiguous();
  auto outs = HyperLSTMLayerFunction::apply(xc, h, c, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight,
                                            h_weight, h_hyper_weight, h_bias, h_hyper_bias, h_hparam_weight,
                                            torch_gate_order);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace stn_kernels_host
