"""Half-precision layers with a float32 λ, the recommended STN setup: ``.to(torch.bfloat16)`` / ``.half()`` on a
layer or a converted model, then a forward with λ in float32.

The rule (docs/layers.md, "dtypes"): the λ side (λ·Vᵀ, λ·Cᵀ and their gradients) runs in the wider of λ's and
``hparam_weight``'s dtypes; a half ``hparam_weight`` is used in float32 with a float32 λ, its gradient returning in
its own dtype. Each output and gradient (every parameter's, the input's, dλ) is compared with the float64 math on
the same (rounded) data, within a bound from PyTorch's own error at that dtype: 4 × the largest relative error of
the matching plain torch.nn layer (or the unconverted model) on the same data, in the same dtype, and at least the
dtype's unit roundoff. Every path: the modules' fast path, the full path, the compiled host path's cache after
``.to()``, and autocast."""

import copy

import pytest
import torch
from torch import nn

import stn_kernels
from stn_kernels import HyperConv2d, HyperEmbedding, HyperLinear, HyperLSTM, HyperLSTMCell, functional
from stn_kernels.backends import host

from _naive import rel_err

F64 = torch.float64
H = 3
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FACTOR = 4


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating parameter O(1) (``hparam_weight`` too: a convert()ed one starts at zero, and the hyper path
    must weigh in the comparison), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.5)
    return module


def _flat(out) -> torch.Tensor:
    """A layer's output (a tensor or the LSTMs' (out, (h, c))) as one flat tensor."""
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    return torch.cat([_flat(t) for t in out])


def _run(module: nn.Module, call, args: dict) -> dict:
    """{'out': output, 'd<arg>': ..., 'd<parameter>': ...}: ``call(module, **leaves)`` backpropagated with a fixed
    output gradient; float arguments become leaves, integer ones (indices) stay as they are."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None and v.is_floating_point() else v)
              for k, v in args.items()}
    for p in module.parameters():
        p.grad = None
    out = _flat(call(module, **leaves))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    out.backward(g.to(out.dtype))
    found = {"out": out.detach()}
    found.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None and v.is_floating_point()})
    found.update({f"d{name}": p.grad for name, p in module.named_parameters()})
    return found


def _errors(module: nn.Module, call, args: dict) -> dict:
    """Relative error of each output and gradient of ``module`` (in its dtype) against the float64 math of a copy
    on the same values (the parameters and arguments as they are, upcast)."""
    reference = copy.deepcopy(module).to(F64)
    want = _run(reference, call, {k: (v.to(F64) if v is not None and v.is_floating_point() else v)
                                   for k, v in args.items()})
    got = _run(module, call, args)
    assert got.keys() == want.keys()
    for name, value in got.items():
        assert value is not None and want[name] is not None, f"{name}: no gradient"
    return {name: rel_err(got[name], want[name]) for name in got}


def _bound(plain_errors: dict, dtype) -> float:
    return FACTOR * max(max(plain_errors.values()), UNIT_ROUNDOFF[dtype])


def _assert_within(errors: dict, plain_errors: dict, dtype) -> None:
    bound = _bound(plain_errors, dtype)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= bound, (f"{worst}: relative error {errors[worst]:.3g} > {bound:.3g} ({FACTOR} × PyTorch's "
                                    f"own error at {dtype}: {max(plain_errors.values()):.3g}); all: {errors}")


def _assert_grad_dtypes(module: nn.Module, lam_grad_dtype, got_lam) -> None:
    """Each parameter's gradient in the parameter's dtype; dλ in λ's."""
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, (name, None if p.grad is None else p.grad.dtype)
    if got_lam is not None:
        assert got_lam.dtype == lam_grad_dtype


@pytest.fixture
def full_path_calls(monkeypatch):
    """The names of the public functions the modules called (their full path; the fast path calls none)."""
    calls = []
    for name in ("hyper_linear", "hyper_conv2d", "hyper_embedding", "hyper_lstm_layer"):
        def spy(*args, _original=getattr(functional, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(functional, name, spy)
    return calls


# ----------------------------------------------------------------------------- the layers

def _data(*shape, seed=2):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _lam(*shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)


def _tokens(*shape, high=50):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(4))


def _lstm_call(module, input, hparams):
    return module(input, None, hparams)


class OpsLSTM(nn.LSTM):
    """nn.LSTM's parameters and formula in plain torch ops, one op per term: PyTorch's own error for an LSTM
    computed op by op, as ours is (nn.LSTM's fused CPU kernel rounds its gates less often)."""

    def forward(self, input):
        n = self.hidden_size
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(self, f"{name}_l{layer}")
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            h = c = input.new_zeros(input.shape[1], n)
            outs = []
            for x in input:
                i, f, g, o = (nn.functional.linear(x, w_ih, b_ih) + nn.functional.linear(h, w_hh, b_hh)).chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            input = torch.stack(outs)
        return input


def _plain_lstm(*args):
    """The plain comparators of an LSTM: nn.LSTM and the same in torch ops (the larger error counts)."""
    return [(nn.LSTM(*args), lambda m, input: m(input)), (OpsLSTM(*args), lambda m, input: m(input))]


def _plain(make, call=lambda m, input: m(input)):
    return lambda: [(make(), call)]


# name: (our layer, the plain torch layers [(module, call)], our call, args, λ, full path expected)
LAYERS = {
    "linear-fast": (lambda: HyperLinear(37, 23, num_hparams=H), _plain(lambda: nn.Linear(37, 23)),
                    lambda m, input, hparams: m(input, hparams), {"input": _data(16, 37)}, _lam(16, H), False),
    "linear-full": (lambda: HyperLinear(37, 23, num_hparams=H), _plain(lambda: nn.Linear(37, 23)),
                    lambda m, input, hparams: m(input, hparams), {"input": _data(8, 2, 37)}, _lam(H), True),
    "conv-fast": (lambda: HyperConv2d(3, 8, 3, padding=1, num_hparams=H), _plain(lambda: nn.Conv2d(3, 8, 3, padding=1)),
                  lambda m, input, hparams: m(input, hparams), {"input": _data(8, 3, 9, 7)}, _lam(8, H), False),
    "conv-full": (lambda: HyperConv2d(3, 8, 3, padding=1, num_hparams=H), _plain(lambda: nn.Conv2d(3, 8, 3, padding=1)),
                  lambda m, input, hparams: m(input, hparams), {"input": _data(8, 3, 9, 7)}, _lam(H), True),
    "embedding-fast": (lambda: HyperEmbedding(50, 16, num_hparams=H), _plain(lambda: nn.Embedding(50, 16)),
                       lambda m, input, hparams: m(input, hparams), {"input": _tokens(8, 7)}, _lam(8, H), False),
    "embedding-full": (lambda: HyperEmbedding(50, 16, padding_idx=0, num_hparams=H),
                       _plain(lambda: nn.Embedding(50, 16, padding_idx=0)),
                       lambda m, input, hparams: m(input, hparams), {"input": _tokens(8, 7)}, _lam(8, H), True),
    "lstm-cell-fast": (lambda: HyperLSTMCell(6, 8, num_hparams=H), lambda: _plain_lstm(6, 8),
                       _lstm_call, {"input": _data(1, 16, 6)}, _lam(16, H), False),
    "lstm-cell-full": (lambda: HyperLSTMCell(6, 8, num_hparams=H), lambda: _plain_lstm(6, 8),
                       _lstm_call, {"input": _data(4, 16, 6)}, _lam(16, H), True),
    "lstm": (lambda: HyperLSTM(6, 8, 2, num_hparams=H), lambda: _plain_lstm(6, 8, 2),
             _lstm_call, {"input": _data(4, 8, 6)}, _lam(8, H), True),
}


def _plain_errors(name: str, dtype) -> dict:
    """The errors of the plain torch layers for ``name`` on the same data in ``dtype``, each key its largest."""
    _, make_plain, _, args, _, _ = LAYERS[name]
    found = {}
    for plain, call in make_plain():
        torch.manual_seed(0)
        plain = _randomized(plain.to(F64)).to(dtype)
        errors = _errors(plain, call, {k: v.to(dtype) if v.is_floating_point() else v for k, v in args.items()})
        for key, value in errors.items():
            found[key] = max(value, found.get(key, 0.0))
    return found


def _layer(name: str, dtype, convert) -> tuple:
    """(our layer in ``dtype`` via ``convert`` from float64, the call, the args in ``dtype``, λ)."""
    make, _, call, args, lam, _ = LAYERS[name]
    torch.manual_seed(0)
    layer = convert(_randomized(make().to(F64)))
    return layer, call, {k: v.to(dtype) if v.is_floating_point() else v for k, v in args.items()}, lam


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("how", ["to", "half"])
def test_half_layer_with_float32_hparams(name, dtype, how, full_path_calls):
    """.to(dtype) (or .half() / .bfloat16()) on the layer, λ float32: outputs and every gradient within PyTorch's
    own error at that dtype, each gradient in its tensor's dtype (dλ float32, d hparam_weight half), on the path
    the call is meant to take."""
    convert = (lambda m: m.to(dtype)) if how == "to" else (lambda m: m.half() if dtype == torch.float16 else
                                                          m.bfloat16())
    layer, call, args, lam = _layer(name, dtype, convert)
    assert all(p.dtype == dtype for p in layer.parameters())
    errors = _errors(layer, call, {**args, "hparams": lam})
    _assert_grad_dtypes(layer, torch.float32, None)
    assert bool(full_path_calls) == LAYERS[name][5], full_path_calls
    _assert_within(errors, _plain_errors(name, dtype), dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["linear-fast", "linear-full", "conv-fast", "embedding-fast", "lstm-cell-fast",
                                  "lstm"])
def test_half_hparams_with_half_layer_still_works(name, dtype):
    """λ in the layer's half dtype: all in that dtype, as before."""
    layer, call, args, lam = _layer(name, dtype, lambda m: m.to(dtype))
    errors = _errors(layer, call, {**args, "hparams": lam.to(dtype)})
    _assert_grad_dtypes(layer, dtype, None)
    _assert_within(errors, _plain_errors(name, dtype), dtype)


@pytest.mark.parametrize("name", ["linear-fast", "conv-full", "embedding-fast", "lstm-cell-fast", "lstm"])
def test_half_hparams_with_float32_hparam_weight(name):
    """The reverse: a bf16 layer whose hparam_weight was kept in float32, λ in bf16: the λ side runs in float32
    (the wider), the output stays bf16."""
    dtype = torch.bfloat16

    def convert(m):
        m.to(dtype)
        for module in m.modules():
            if "hparam_weight" in module._parameters:
                module.hparam_weight.data = module.hparam_weight.data.float()
        return m

    layer, call, args, lam = _layer(name, dtype, convert)
    out = _flat(call(layer, **args, hparams=lam.to(dtype)))
    assert out.dtype == dtype
    errors = _errors(layer, call, {**args, "hparams": lam.to(dtype)})
    for module_name, p in layer.named_parameters():
        assert p.grad.dtype == (torch.float32 if module_name.endswith("hparam_weight") else dtype), module_name
    _assert_within(errors, _plain_errors(name, dtype), dtype)


@pytest.mark.parametrize("name", ["linear-fast", "conv-fast", "lstm-cell-fast", "lstm"])
def test_half_layer_under_autocast(name):
    """A bf16 layer under CPU autocast to bf16 with a float32 λ (the full path, which casts the λ side to
    float32): the same results."""
    dtype = torch.bfloat16
    layer, call, args, lam = _layer(name, dtype, lambda m: m.to(dtype))

    def autocast_call(m, **kwargs):
        with torch.autocast("cpu", dtype=dtype, enabled=next(m.parameters()).dtype == dtype):
            return call(m, **kwargs)

    errors = _errors(layer, autocast_call, {**args, "hparams": lam})
    _assert_grad_dtypes(layer, torch.float32, None)
    _assert_within(errors, _plain_errors(name, dtype), dtype)


@pytest.mark.parametrize("name", ["conv-fast", "lstm"])
def test_half_layer_compiled(name):
    """torch.compile(fullgraph=True) of a bf16 layer with a float32 λ (the registered ops; aot_eager keeps the test
    fast): no graph break, the same accuracy."""
    dtype = torch.bfloat16
    layer, call, args, lam = _layer(name, dtype, lambda m: m.to(dtype))
    torch._dynamo.reset()
    try:
        errors = _errors(layer, lambda m, **kw: call(torch.compile(m, backend="aot_eager", fullgraph=True), **kw),
                         {**args, "hparams": lam})
    finally:
        torch._dynamo.reset()
    _assert_grad_dtypes(layer, torch.float32, None)
    _assert_within(errors, _plain_errors(name, dtype), dtype)


def test_host_path_cache_is_dropped_by_to():
    """A float32 layer that took the compiled host path, then .to(bf16): the next call with a float32 λ takes the
    Python fast path and matches the float64 math; .float() again returns to the host path."""
    if not host.HOST.loaded():
        pytest.skip("the host extension is not built here")
    layer, call, args, lam = _layer("linear-fast", torch.float32, lambda m: m.float())
    assert type(call(layer, **args, hparams=lam).grad_fn).__name__ == "CppFunction"
    layer.to(torch.bfloat16)
    args = {k: v.to(torch.bfloat16) for k, v in args.items()}
    out = call(layer, **args, hparams=lam)
    assert type(out.grad_fn).__name__ != "CppFunction" and out.dtype == torch.bfloat16
    _assert_within(_errors(layer, call, {**args, "hparams": lam}), _plain_errors("linear-fast", torch.bfloat16),
                   torch.bfloat16)
    layer.float()
    assert type(call(layer, **{k: v.float() for k, v in args.items()}, hparams=lam).grad_fn).__name__ == "CppFunction"


@pytest.mark.parametrize("lam_dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("name", ["linear-fast", "linear-full", "conv-fast", "embedding-fast", "lstm-cell-fast",
                                  "lstm"])
def test_half_layer_rejects_other_hparams_dtypes(name, lam_dtype):
    """λ in float64, or in the other half dtype: a TypeError naming hparams and the dtypes it may have."""
    layer, call, args, lam = _layer(name, torch.bfloat16, lambda m: m.to(torch.bfloat16))
    with pytest.raises(TypeError, match=rf"^hparams: expected dtype torch.bfloat16 or torch.float32 .*got {lam_dtype}"):
        call(layer, **args, hparams=lam.to(lam_dtype))


def test_functional_float32_hparams_with_half_scales():
    """The public functions follow the same rule: V and C in bf16 with λ in float32."""
    dtype = torch.bfloat16
    x, w, wh, b, bh = (_data(*s, seed=i).to(dtype) for i, s in enumerate([(5, 7), (4, 7), (4, 7), (4,), (4,)]))
    v, c = (_data(4, H, seed=9 + i).to(dtype) for i in range(2))
    lam = _lam(5, H)

    def call(m, **kwargs):
        return stn_kernels.hyper_linear(kwargs["x"], kwargs["hparams"], *(kwargs[k] for k in "w wh b bh v c".split()))

    errors = _errors(nn.Module(), call, dict(x=x, w=w, wh=wh, b=b, bh=bh, v=v, c=c, hparams=lam))
    plain = _errors(nn.Module(), lambda m, x, w, b: nn.functional.linear(x, w, b), dict(x=x, w=w, b=b))
    _assert_within(errors, plain, dtype)


# ----------------------------------------------------------------------------- converted models

class SmallResNet(nn.Module):
    """conv-BN-SiLU, a residual conv-BN block, global pooling, a linear head. (SiLU, not ReLU: where a value sits
    within rounding of ReLU's kink, the half model and the float64 one take different branches and the gradients
    differ by O(1), which says nothing about either.)"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = nn.functional.silu(self.bn1(self.conv1(x)))
        y = nn.functional.silu(y + self.bn2(self.conv2(y)))
        return self.head(y.mean((2, 3)))


class SmallLM(nn.Module):
    """Embedding → LSTM (batch_first) → Linear."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.decoder = nn.Linear(6, 30)

    def forward(self, x):
        return self.decoder(self.lstm(self.embedding(x))[0])


MODELS = {"resnet": (SmallResNet, lambda: _data(8, 3, 8, 8)), "lm": (SmallLM, lambda: _tokens(4, 5, high=30))}


def _in_torch_gate_order(t: torch.Tensor) -> torch.Tensor:
    """Rows in our gate order (f, i, o, g) to nn.LSTM's (i, f, g, o)."""
    f, i, o, g = t.chunk(4)
    return torch.cat((i, f, g, o))


def _folded(converted: nn.Module, lam: torch.Tensor) -> nn.Module:
    """The plain torch.nn model (``revert`` of a copy) computing what ``converted`` computes at the shared λ [H]:
    each hyper layer folded into its elementary weights, W + diag(V·λ)·W_hyper and b + (C·λ) ⊙ b_hyper (per output
    row; per column for an embedding; per gate row, in torch's gate order, for an LSTM)."""
    model = copy.deepcopy(converted)
    folds = []

    def fold(weight, bias, linear):
        n = linear.hyper_weight.shape[0]
        s, t = (linear.hparam_weight @ lam.to(linear.hparam_weight.dtype)).split(n)
        s = s.view(-1, *[1] * (weight.dim() - 1))
        reorder = _in_torch_gate_order if isinstance(linear, HyperLinear) and linear.weight is None else (lambda v: v)
        folds.append((weight, weight + reorder(s * linear.hyper_weight)))
        if bias is not None:
            folds.append((bias, bias + reorder(t * linear.hyper_bias)))

    for module in model.modules():
        if isinstance(module, (HyperLinear, HyperConv2d)) and module.weight is not None:
            fold(module.weight, module.bias, module)
        elif isinstance(module, HyperEmbedding):
            folds.append((module.weight, module.weight + (module.hparam_weight @ lam.to(module.weight.dtype))
                          * module.hyper_weight))
        elif isinstance(module, HyperLSTM):  # a converted nn.LSTM: its Parameters under nn.LSTM's names
            for k, cell in enumerate(module.cells):
                fold(getattr(module, f"weight_ih_l{k}"), getattr(module, f"bias_ih_l{k}"), cell.i2h)
                fold(getattr(module, f"weight_hh_l{k}"), getattr(module, f"bias_hh_l{k}"), cell.h2h)
    with torch.no_grad():
        for param, value in folds:
            param.copy_(value)
    return stn_kernels.revert(model)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per-example"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_converted_model_to_half_with_float32_hparams(model_name, per_example, dtype):
    """convert, then .to(dtype), then a forward inside ``stn_kernels.hparams(λ float32)`` (train mode: BatchNorm on
    batch statistics): every output and gradient (BatchNorm's and dλ included) within 4 × PyTorch's error for the
    same function in that dtype, the plain model with the hyper path folded in at λ (λ shared [H], or per example
    [B, H] with equal rows, which takes the per-example path and computes the same function)."""
    make, data = MODELS[model_name]
    torch.manual_seed(0)
    converted = _randomized(stn_kernels.convert(make().to(F64), num_hparams=H))
    x = data()
    x = x.to(dtype) if x.is_floating_point() else x
    lam = _lam(H)
    plain = _folded(converted, lam.to(F64))
    assert not any(isinstance(m, (HyperLinear, HyperConv2d, HyperEmbedding, HyperLSTM)) for m in plain.modules())

    def call(model, x, hparams):
        with stn_kernels.hparams(hparams):
            return model(x)

    # the folded model is the converted one at λ (float64), so the bound is PyTorch's error for this function
    want = call(converted, x.to(F64) if x.is_floating_point() else x, lam.to(F64))
    assert rel_err(plain(x.to(F64) if x.is_floating_point() else x), want) < 1e-12
    plain_errors = _errors(plain.to(dtype), lambda m, x: m(x), {"x": x})
    converted.to(dtype)
    errors = _errors(converted, call, {"x": x, "hparams": lam.expand(x.shape[0], H) if per_example else lam})
    _assert_grad_dtypes(converted, torch.float32, None)
    _assert_within(errors, plain_errors, dtype)
