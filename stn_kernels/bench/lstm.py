"""The HyperLSTM stack in the benchmark (``python -m stn_kernels.bench --layer lstm``).

The published STN language model's recurrent stack (PTB: B=40, T=70, 2 layers of 650
units, H=7), forward (``fwd``), backward alone (``bwd``) and both (``fwd+bwd``), gradients
w.r.t. the input, λ and every parameter. Providers (:data:`PROVIDERS`):

* ``published``: the official ``HyperLSTMCell`` loop written from the published formulas:
  per step and layer two HyperLinear evaluations (i2h on x_t, h2h on h_{t-1}), each
  recomputing its λ scales ``F.linear(λ, M)``, then the gates (f, i, o sigmoid, g tanh).
* ``published+compile``: the same function under ``torch.compile`` (the loop is unrolled).
* ``stn:reference`` / ``stn:triton``: :func:`stn_kernels.hyper_lstm_layer` per layer
  under ``use_backend(name)`` (one fused i2h GEMM over T·B rows, one recurrence op).

No ``floor``: nothing plays the part of a single GEMM here. No DropConnect (p = 0, as at
evaluation): random masks would make the providers' results incomparable. h0 and c0 are random
and get no gradient.

Shapes (:class:`LSTMShape`): ``lstm-ptb`` (the default), ``lstm-tiny`` (smoke tests) or
``B,T,K,N,L,H``. The report's rows show B, H, K and N of layer 0, with T and L in the case name.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from stn_kernels import hyper_lstm_layer

from . import harness
from .harness import Case, Impl, ProviderSpec, Shape, grads_by_name

Tensor = torch.Tensor


class LSTMShape(NamedTuple):
    name: str
    B: int  # batch
    T: int  # time steps
    K: int  # input features of layer 0
    N: int  # hidden units per layer
    L: int  # layers
    H: int  # hyperparameters

    @property
    def row(self) -> Shape:
        """The report's Shape: B, H, K and N of layer 0; T and L in the name."""
        return Shape(f"{self.name}-T{self.T}-L{self.L}", self.B, self.H, self.K, self.N)


SHAPES = {
    "lstm-ptb": LSTMShape("lstm-ptb", 40, 70, 650, 650, 2, 7),
    "lstm-tiny": LSTMShape("lstm-tiny", 3, 4, 6, 5, 2, 2),  # smoke tests
}
SHAPE_FORMAT = "B,T,K,N,L,H"
LAYER_PARAMS = ("elem_weight", "hnet_weight", "elem_bias", "hnet_bias", "hnet_tensor_to_scalars")


def parse_shape(spec) -> LSTMShape:
    """An LSTMShape from a name in SHAPES, an LSTMShape, or "B,T,K,N,L,H"."""
    if isinstance(spec, LSTMShape):
        return spec
    if isinstance(spec, str) and spec in SHAPES:
        return SHAPES[spec]
    try:
        b, t, k, n, layers, h = (int(p) for p in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ValueError(f"lstm shape: expected one of {sorted(SHAPES)} or '{SHAPE_FORMAT}' (six positive ints), "
                         f"got {spec!r}") from None
    if min(b, t, k, n, layers, h) < 1:
        raise ValueError(f"lstm shape: expected six positive ints {SHAPE_FORMAT}, got {spec!r}")
    return LSTMShape(f"lstm-{b}x{t}x{k}x{n}x{layers}x{h}", b, t, k, n, layers, h)


def param_names(layers: int) -> Tuple[str, ...]:
    """The parameter leaves of a stack: per layer, i2h then h2h, each in :data:`LAYER_PARAMS` order."""
    return tuple(f"{i}.{m}.{p}" for i in range(layers) for m in ("i2h", "h2h") for p in LAYER_PARAMS)


def grad_names(shape: LSTMShape) -> Tuple[str, ...]:
    """The leaves gradients are taken for: x, hparams and every parameter."""
    return ("x", "hparams") + param_names(shape.L)


def make_case(shape="lstm-ptb", dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    """Random data (O(1) activations, published-like weight scales) for an LSTM shape.

    ``tensors``: x [T, B, K], hparams [B, H], h0/c0 [L, B, N] (no grad), and per layer the
    published parameters ``{l}.i2h.*`` / ``{l}.h2h.*`` (all requiring grad).
    """
    shape = parse_shape(shape)
    dtype = harness.as_dtype(dtype)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0, grad=True):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype).requires_grad_(grad)

    B, T, K, N, L, H = shape.B, shape.T, shape.K, shape.N, shape.L, shape.H
    t = {"x": rand(T, B, K), "hparams": rand(B, H), "h0": rand(L, B, N, scale=0.5, grad=False),
         "c0": rand(L, B, N, scale=0.5, grad=False)}
    for layer in range(L):
        for m, fan_in in (("i2h", K if layer == 0 else N), ("h2h", N)):
            p = f"{layer}.{m}."
            t[p + "elem_weight"] = rand(4 * N, fan_in, scale=fan_in ** -0.5)
            t[p + "hnet_weight"] = rand(4 * N, fan_in, scale=fan_in ** -0.5)
            t[p + "elem_bias"] = rand(4 * N, scale=0.1)
            t[p + "hnet_bias"] = rand(4 * N, scale=0.1)
            t[p + "hnet_tensor_to_scalars"] = rand(8 * N, H, scale=0.1 * H ** -0.5)
    return Case(LAYER, shape.row, dtype, device, t, spec=shape)


def _args(tensors, shape: LSTMShape) -> Tuple[Tensor, ...]:
    """The arguments of the forwards below: x, hparams, h0, c0, then the parameters."""
    return tuple(tensors[n] for n in ("x", "hparams", "h0", "c0") + param_names(shape.L))


# ----------------------------------------------------------------------------- formulations

def published_hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
    """Official LSTM HyperLinear: x·W_eᵀ + b_e + s_w ⊙ (x·W_hᵀ) + s_b ⊙ b_h, s = λ·Mᵀ formed every call."""
    n = weight.shape[0]
    s = F.linear(hparams, hparam_weight)
    return F.linear(x, weight, bias) + s[:, :n] * F.linear(x, hyper_weight) + s[:, n:] * hyper_bias


def published_forward(x, hparams, h0, c0, *params):
    """The official HyperLSTMCell loop over time, layer after layer; returns the last layer's output.

    params: per layer, i2h then h2h, each (W_e, W_h, b_e, b_h, M) (see :data:`LAYER_PARAMS`).
    """
    out = x
    for layer in range(len(params) // 10):
        i2h = params[10 * layer:10 * layer + 5]
        h2h = params[10 * layer + 5:10 * layer + 10]
        h, c = h0[layer], c0[layer]
        n = h.shape[1]
        hs = []
        for t in range(out.shape[0]):
            pre = published_hyper_linear(out[t], hparams, *i2h) + published_hyper_linear(h, hparams, *h2h)
            gates = torch.sigmoid(pre[:, :3 * n])
            f, i, o = gates[:, :n], gates[:, n:2 * n], gates[:, 2 * n:]
            c = f * c + i * torch.tanh(pre[:, 3 * n:])
            h = o * torch.tanh(c)
            hs.append(h)
        out = torch.stack(hs)
    return out


def stn_forward(x, hparams, h0, c0, *params):
    """stn_kernels.hyper_lstm_layer per layer over the same leaves (M split into V and C views)."""
    out = x
    for layer in range(len(params) // 10):
        tuples = []
        for p in (params[10 * layer:10 * layer + 5], params[10 * layer + 5:10 * layer + 10]):
            w, wh, b, hb, m = p
            g = w.shape[0]
            tuples.append((w, wh, b, hb, m[:g], m[g:]))
        out, _ = hyper_lstm_layer(out, hparams, tuples[0], tuples[1], (h0[layer], c0[layer]))
    return out


def ground_truth(case: Case, t32):
    """The published loop on the float32 leaves; gradients checked for x, λ and every parameter."""
    return published_forward(*_args(t32, case.spec)), grad_names(case.spec)


# ----------------------------------------------------------------------------- providers

def _inputs(case: Case) -> Tuple[Tensor, ...]:
    return case.leaves(*grad_names(case.spec))


def _build_published(case, opts):
    args = _args(case.tensors, case.spec)
    return Impl("published", lambda: published_forward(*args), _inputs(case), grads_by_name(grad_names(case.spec)))


def _build_compiled(case, opts):
    return harness.compiled_impl("published+compile", published_forward, _args(case.tensors, case.spec),
                                 grads_by_name(grad_names(case.spec)), case, opts, inputs=_inputs(case))


def _build_stn(backend):
    def build(case, opts):
        args = _args(case.tensors, case.spec)
        return Impl(f"stn:{backend}", lambda: stn_forward(*args), _inputs(case), grads_by_name(grad_names(case.spec)),
                    scope=harness.backend_scope(backend))

    return build


PROVIDERS = {p.name: p for p in (
    ProviderSpec("published", _build_published, "official HyperLSTMCell loop (λ scales every step), eager",
                 cpu_default=True, gpu_default=True),
    ProviderSpec("published+compile", _build_compiled, "published loop under torch.compile (unrolled)",
                 gpu_default=True),
    ProviderSpec("stn:reference", _build_stn("reference"), "stn_kernels.hyper_lstm_layer, backend 'reference'",
                 cpu_default=True, gpu_default=True, backend="reference"),
    ProviderSpec("stn:triton", _build_stn("triton"), "stn_kernels.hyper_lstm_layer, backend 'triton'",
                 gpu_default=True, backend="triton"),
)}

LAYER = harness.Layer(
    name="lstm", op="HyperLSTM", shapes=SHAPES, cpu_shapes=("lstm-ptb",), gpu_shapes=("lstm-ptb",),
    parse_shape=parse_shape, make_case=make_case, providers=PROVIDERS, shape_format=SHAPE_FORMAT,
    probe_shape="lstm-tiny", ground_truth=ground_truth)
