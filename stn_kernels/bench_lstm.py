"""HyperLSTM cases for the benchmark harness: ``python -m stn_kernels.bench_lstm``.

The published STN language model's recurrent stack (PTB: B=40, T=70, 2 layers of 650
units, H=7), forward (``fwd``), backward alone (``bwd``) and both (``fwd+bwd``), gradients
w.r.t. the input, λ and every parameter. Providers (:data:`LSTM_PROVIDERS`, the same
:class:`stn_kernels.bench.ProviderSpec` records as the linear harness):

* ``published``: the official ``HyperLSTMCell`` loop written from the published formulas:
  per step and layer two HyperLinear evaluations (i2h on x_t, h2h on h_{t-1}), each
  recomputing its λ scales ``F.linear(λ, M)``, then the gates (f, i, o sigmoid, g tanh).
* ``published+compile``: the same function under ``torch.compile`` (the loop is unrolled).
* ``stn:reference`` / ``stn:triton``: :func:`stn_kernels.lstm.hyper_lstm_layer` per layer
  under ``use_backend(name)`` (one fused i2h GEMM over T·B rows, one recurrence op).

No DropConnect (p = 0, as at evaluation): random masks would make the providers'
results incomparable. h0 and c0 are random and get no gradient.

Harness hook: :func:`lstm_benchmark_cases` returns cases that behave like
:class:`stn_kernels.bench.Case` (``shape``, ``dtype``, ``device``, ``tensors``, ``impls``,
``grad_out``, ``expected``, ``label``) plus ``providers`` (their registry);
:func:`run_case` has the signature of ``stn_kernels.bench._run_case`` and times them with
the harness's own ``_run_mode`` (interleaved rounds, checks against float32, peak memory).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import bench
from .backends import use_backend

Tensor = torch.Tensor


class LSTMShape(NamedTuple):
    name: str
    B: int  # batch
    T: int  # time steps
    K: int  # input features of layer 0
    N: int  # hidden units per layer
    L: int  # layers
    H: int  # hyperparameters


LSTM_SHAPES = {
    "lstm-ptb": LSTMShape("lstm-ptb", 40, 70, 650, 650, 2, 7),
    "lstm-tiny": LSTMShape("lstm-tiny", 3, 4, 6, 5, 2, 2),  # smoke tests
}
_LAYER_PARAMS = ("elem_weight", "hnet_weight", "elem_bias", "hnet_bias", "hnet_tensor_to_scalars")


def parse_lstm_shape(spec) -> LSTMShape:
    """An LSTMShape from a name in LSTM_SHAPES, an LSTMShape, or "B,T,K,N,L,H"."""
    if isinstance(spec, LSTMShape):
        return spec
    if isinstance(spec, str) and spec in LSTM_SHAPES:
        return LSTM_SHAPES[spec]
    try:
        b, t, k, n, layers, h = (int(p) for p in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ValueError(f"lstm shape: expected one of {sorted(LSTM_SHAPES)} or 'B,T,K,N,L,H' (six positive ints), "
                         f"got {spec!r}") from None
    if min(b, t, k, n, layers, h) < 1:
        raise ValueError(f"lstm shape: expected six positive ints B,T,K,N,L,H, got {spec!r}")
    return LSTMShape(f"lstm-{b}x{t}x{k}x{n}x{layers}x{h}", b, t, k, n, layers, h)


def _param_names(layers: int) -> Tuple[str, ...]:
    return tuple(f"{layer}.{m}.{p}" for layer in range(layers) for m in ("i2h", "h2h") for p in _LAYER_PARAMS)


# ----------------------------------------------------------------------------- formulations

def published_hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
    """Official LSTM HyperLinear: x·W_eᵀ + b_e + s_w ⊙ (x·W_hᵀ) + s_b ⊙ b_h, s = λ·Mᵀ formed every call."""
    n = weight.shape[0]
    s = F.linear(hparams, hparam_weight)
    return F.linear(x, weight, bias) + s[:, :n] * F.linear(x, hyper_weight) + s[:, n:] * hyper_bias


def published_lstm_forward(x, hparams, h0, c0, *params):
    """The official HyperLSTMCell loop over time, layer after layer; returns the last layer's output.

    params: per layer, i2h then h2h, each (W_e, W_h, b_e, b_h, M) (see :data:`_LAYER_PARAMS`).
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


def stn_lstm_forward(x, hparams, h0, c0, *params):
    """stn_kernels.lstm.hyper_lstm_layer per layer over the same leaves (M split into V and C views)."""
    from .functional import hyper_lstm_layer

    out = x
    for layer in range(len(params) // 10):
        tuples = []
        for p in (params[10 * layer:10 * layer + 5], params[10 * layer + 5:10 * layer + 10]):
            w, wh, b, hb, m = p
            g = w.shape[0]
            tuples.append((w, wh, b, hb, m[:g], m[g:]))
        out, _ = hyper_lstm_layer(out, hparams, tuples[0], tuples[1], (h0[layer], c0[layer]))
    return out


# ----------------------------------------------------------------------------- cases

@dataclass
class LSTMCase:
    """Random leaves for one LSTM shape: x [T, B, K], hparams [B, H], h0/c0 [L, B, N] (no grad), and
    per layer the published parameters ``{l}.i2h.*`` / ``{l}.h2h.*`` (all requiring grad)."""

    lstm: LSTMShape
    dtype: torch.dtype
    device: torch.device
    tensors: Dict[str, Tensor]
    impls: Dict[str, bench._Impl] = field(default_factory=dict)
    _grad_outs: Dict[tuple, Tensor] = field(default_factory=dict)
    _expected: Optional[Tuple[Tensor, Dict[str, Tensor]]] = None

    @property
    def providers(self) -> Dict[str, bench.ProviderSpec]:
        return LSTM_PROVIDERS

    @property
    def shape(self) -> bench.Shape:
        """For the harness's rows: B, H, K and N of layer 0; T and L in the name."""
        s = self.lstm
        return bench.Shape(f"{s.name}-T{s.T}-L{s.L}", s.B, s.H, s.K, s.N)

    @property
    def label(self) -> str:
        return f"{self.shape.name}/{bench.dtype_name(self.dtype)}"

    @property
    def grad_names(self) -> Tuple[str, ...]:
        return ("x", "hparams") + _param_names(self.lstm.L)

    def args(self) -> Tuple[Tensor, ...]:
        t = self.tensors
        return (t["x"], t["hparams"], t["h0"], t["c0"]) + tuple(t[n] for n in _param_names(self.lstm.L))

    def grad_out(self, shape) -> Tensor:
        return bench.Case.grad_out(self, shape)

    def expected(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Output and gradients of the published loop in float32 (computed once)."""
        if self._expected is None:
            t32 = {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in self.tensors.items()}
            args = (t32["x"], t32["hparams"], t32["h0"], t32["c0"]) + tuple(t32[n] for n in _param_names(self.lstm.L))
            with torch.enable_grad():
                out = published_lstm_forward(*args)
                grads = torch.autograd.grad(out, [t32[n] for n in self.grad_names], self.grad_out(out.shape).float())
            self._expected = (out.detach(), dict(zip(self.grad_names, grads)))
        return self._expected


def make_lstm_case(shape="lstm-ptb", dtype=torch.float32, device="cpu", seed: int = 0) -> LSTMCase:
    """Random data (O(1) activations, published-like weight scales) for an LSTM shape."""
    shape = parse_lstm_shape(shape)
    if isinstance(dtype, str):
        dtype = bench._DTYPES[dtype]
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
    return LSTMCase(shape, dtype, device, t)


def lstm_benchmark_cases(shapes: Sequence = ("lstm-ptb",), dtype=torch.float32, device="cpu") -> List[LSTMCase]:
    """The LSTM cases for one dtype and device (default: the PTB shape)."""
    return [make_lstm_case(s, dtype, device) for s in shapes]


# ----------------------------------------------------------------------------- providers

def _canonical(case: LSTMCase):
    return lambda grads: dict(zip(case.grad_names, grads))


def _inputs(case: LSTMCase) -> Tuple[Tensor, ...]:
    return tuple(case.tensors[n] for n in case.grad_names)


def _build_published(case, opts):
    args = case.args()
    return bench._Impl("published", lambda: published_lstm_forward(*args), _inputs(case), _canonical(case))


def _build_compiled(case, opts):
    return bench.compiled_impl("published+compile", published_lstm_forward, case.args(), _canonical(case), case, opts,
                               inputs=_inputs(case))


def _build_stn(backend):
    def build(case, opts):
        args = case.args()
        return bench._Impl(f"stn:{backend}", lambda: stn_lstm_forward(*args), _inputs(case), _canonical(case),
                           scope=lambda: use_backend(backend))

    return build


LSTM_PROVIDERS: Dict[str, bench.ProviderSpec] = {p.name: p for p in (
    bench.ProviderSpec("published", _build_published, "official HyperLSTMCell loop (λ scales every step), eager",
                       cpu_default=True, gpu_default=True),
    bench.ProviderSpec("published+compile", _build_compiled, "published loop under torch.compile (unrolled)",
                       gpu_default=True),
    bench.ProviderSpec("stn:reference", _build_stn("reference"), "stn_kernels.lstm, backend 'reference'",
                       cpu_default=True, gpu_default=True, backend="reference"),
    bench.ProviderSpec("stn:triton", _build_stn("triton"), "stn_kernels.lstm, backend 'triton'",
                       gpu_default=True, backend="triton"),
)}


def provider_unavailable(name: str, device, dtype=torch.float32) -> Optional[str]:
    spec = LSTM_PROVIDERS[name]
    device = torch.device(device)
    if device.type not in spec.devices:
        return f"runs on {', '.join(spec.devices)} only"
    if spec.backend is not None:
        return bench.backend_unavailable(spec.backend, device, dtype)
    return None


def provider_fn(provider: str, case: LSTMCase, mode: str, compile_mode: str = "default"):
    """A callable running ``provider`` on ``case`` in ``mode`` (as :func:`stn_kernels.bench.provider_fn`)."""
    if mode not in bench.MODES:
        raise ValueError(f"mode: expected one of {bench.MODES}, got {mode!r}")
    impl = bench.build_impl(provider, case, bench._Options(compile_mode))  # LSTM_PROVIDERS via case.providers
    with impl.scope():
        fn = bench._mode_closure(impl, mode)
    if impl.scope is contextlib.nullcontext:
        return fn

    def scoped():
        with impl.scope():
            return fn()

    return scoped


def run_case(case: LSTMCase, providers: List[str], modes: List[str], cfg, opts, report, deadline: Optional[float],
             compile_state: dict) -> bool:
    """``stn_kernels.bench._run_case`` for an LSTM case: providers outside LSTM_PROVIDERS are ignored."""
    return bench._run_case(case, [p for p in providers if p in LSTM_PROVIDERS], modes, cfg, opts, report, deadline,
                           compile_state, unavailable=lambda p, c: provider_unavailable(p, c.device, c.dtype))


def main(argv=None) -> List[bench.Row]:
    ap = argparse.ArgumentParser(prog="python -m stn_kernels.bench_lstm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="run on CUDA")
    ap.add_argument("--shapes", default="lstm-ptb", help=f"comma list of {', '.join(LSTM_SHAPES)}")
    ap.add_argument("--shape", action="append", default=[], metavar="B,T,K,N,L,H", help="a custom shape (repeatable)")
    ap.add_argument("--dtypes", default=None, help="comma list (default float32; bfloat16,float16,float32 with --gpu)")
    ap.add_argument("--modes", default=None, help="comma list of fwd, bwd, fwd+bwd (default fwd,fwd+bwd)")
    ap.add_argument("--providers", default=None, help=f"comma list of {', '.join(LSTM_PROVIDERS)}")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default max-autotune on GPU)")
    ap.add_argument("--out", default=None, help="write results.csv and results.md into this folder")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("stn_kernels.bench_lstm: --gpu needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if args.gpu else torch.device("cpu")
    gpu = device.type == "cuda"
    shapes = [parse_lstm_shape(s) for s in args.shapes.split(",") if s.strip()] + [parse_lstm_shape(s)
                                                                                   for s in args.shape]
    dtypes = [bench._DTYPES[d] for d in (args.dtypes.split(",") if args.dtypes else
                                         (["bfloat16", "float16", "float32"] if gpu else ["float32"]))]
    modes = args.modes.split(",") if args.modes else ["fwd", "fwd+bwd"]
    providers = (args.providers.split(",") if args.providers else
                 [p.name for p in LSTM_PROVIDERS.values() if (p.gpu_default if gpu else p.cpu_default)])
    if "published" not in providers:
        providers.insert(0, "published")
    cfg = bench._QUICK if args.quick else bench._FULL
    opts = bench._Options(compile_mode=args.compile_mode or ("max-autotune" if gpu else "default"))
    report = bench._Report(args.out, ["stn_kernels benchmark: HyperLSTM"] + bench.machine_info(device))
    compile_state = {"spent": 0.0, "budget": None}
    try:
        for dtype in dtypes:
            for case in lstm_benchmark_cases(shapes, dtype, device):
                run_case(case, providers, modes, cfg, opts, report, None, compile_state)
    finally:
        report.close()
        for n in report.notes:
            print(f"- {n}")
    return report.rows


if __name__ == "__main__":
    main()
