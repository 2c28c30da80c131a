"""HyperMultiheadAttention: without λ exactly nn.MultiheadAttention (outputs, attention weights, every gradient, in
float64, across masks, layouts and options); with λ against a naive per-example, per-head formulation written here;
per-example attention dropout; fold to a plain nn.MultiheadAttention; bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels.modules_attention import HyperMultiheadAttention

from _naive import assert_close_rel, naive_hyper_linear

D64 = torch.float64
E, HEADS, H = 6, 3, 2       # head_dim 2
N, L, S = 3, 5, 7           # batch, target and source lengths (odd, all different)

CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "kdim_vdim": {"kdim": 3, "vdim": 5},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
    "no_bias": {"bias": False},
    "kdim_vdim_bias_kv": {"kdim": 5, "vdim": 2, "add_bias_kv": True, "add_zero_attn": True},
}
MASKS = ["none", "kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_3d", "both_bool", "causal", "causal_kpm"]


def _randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter at O(1) output scale: weights std 1/√fan_in, λ-maps std 1/√H, the rest std 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = (p.shape[1] ** -0.5 if name.endswith("hparam_weight") or p.dim() == 2 else 1.0)
            p.copy_(torch.randn(p.shape, dtype=D64, generator=g) * std)
    return module


def _pair(seed: int = 0, **options):
    """(nn.MultiheadAttention, HyperMultiheadAttention with the same elementary Parameters' values and a random
    hyper path), float64."""
    torch.manual_seed(seed)
    plain = _randomize_(nn.MultiheadAttention(E, HEADS, dtype=D64, **options), seed)
    hyper = _randomize_(HyperMultiheadAttention(E, HEADS, num_hparams=H, dtype=D64, **options), seed + 1)
    ours = dict(hyper.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            ours[name].copy_(p)
    return plain, hyper


def _inputs(module, self_attention: bool, batched: bool = True, seed: int = 2):
    """query, key, value in ``module``'s layout, leaves requiring grad (one tensor three times for self-attention)."""
    g = torch.Generator().manual_seed(seed)

    def make(length, features):
        shape = ((N, length, features) if module.batch_first else (length, N, features)) if batched else \
            (length, features)
        return torch.randn(shape, dtype=D64, generator=g).requires_grad_()

    if self_attention:
        x = make(L, E)
        return x, x, x
    return make(L, E), make(S, module.kdim), make(S, module.vdim)


def _masks(kind: str, src_len: int, batched: bool = True, seed: int = 3) -> dict:
    """The keyword masks of a case; never a fully masked row (key 0 always visible)."""
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand((N, src_len) if batched else (src_len,), generator=g) < 0.4
    kpm[..., 0] = False
    attn_bool = torch.rand(L, src_len, generator=g) < 0.4
    attn_bool[:, 0] = False
    causal = torch.ones(L, src_len, dtype=torch.bool).tril().logical_not()
    heads_batch = N * HEADS if batched else HEADS
    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm},
        "kpm_float": {"key_padding_mask": torch.randn(kpm.shape, dtype=D64, generator=g).requires_grad_()},
        "attn_bool_2d": {"attn_mask": attn_bool},
        "attn_float_3d": {"attn_mask": torch.randn(heads_batch, L, src_len, dtype=D64,
                                                   generator=g).requires_grad_()},
        "both_bool": {"attn_mask": attn_bool, "key_padding_mask": kpm},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal_kpm": {"attn_mask": causal, "is_causal": True, "key_padding_mask": kpm},
    }[kind]


def _leaves(module, inputs, masks, hparams=None):
    found = {f"param {n}": p for n, p in module.named_parameters()}
    found.update({f"input {i}": t for i, t in enumerate(dict.fromkeys(inputs))})
    found.update({f"mask {k}": m for k, m in masks.items() if isinstance(m, torch.Tensor) and m.requires_grad})
    if hparams is not None:
        found["hparams"] = hparams
    return found


def _grads(out, weights, leaves: dict, seed: int = 4) -> dict:
    """Gradients of a fixed random linear function of the output (and the weights) with respect to ``leaves``."""
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, dtype=D64, generator=g)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, dtype=D64, generator=g)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


def _assert_same(got, want, what):
    if want is None:
        assert got is None, what
    else:
        assert_close_rel(got, want, D64, what)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", CONFIGS)
def test_without_lambda_equals_nn_multihead_attention_outputs_weights_and_every_gradient(config, mask):
    plain, hyper = _pair(**CONFIGS[config])
    kinds = [False] + ([True] if hyper.packed_in_proj else [])
    for self_attention in kinds:
        src_len = L if self_attention else S
        inputs = _inputs(plain, self_attention)
        masks = _masks(mask, src_len)
        for need_weights, average in ((True, True), (True, False), (False, True)):
            kwargs = dict(masks, need_weights=need_weights, average_attn_weights=average)
            want_out, want_w = plain(*inputs, **kwargs)
            got_out, got_w = hyper(*inputs, **kwargs)
            case = f"{config}/{mask}/self={self_attention}/weights={need_weights}/average={average}"
            _assert_same(got_out, want_out, f"{case}: output")
            _assert_same(got_w, want_w, f"{case}: attention weights")
            want = _grads(want_out, want_w, _leaves(plain, inputs, masks))
            got = _grads(got_out, got_w, _leaves(hyper, inputs, masks))
            for name, grad in got.items():
                if name in want:
                    _assert_same(grad, want[name], f"{case}: d/d {name}")
                else:  # the hyper path: no λ, no gradient
                    assert grad is None or not grad.any(), f"{case}: d/d {name} without λ"


@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched_input_equals_nn_multihead_attention_and_takes_a_shared_lambda(need_weights):
    plain, hyper = _pair(kdim=4, vdim=5)
    inputs = _inputs(plain, False, batched=False)
    lam = torch.randn(H, dtype=D64, requires_grad=True)
    for masks in ({}, _masks("kpm_bool", S, batched=False), _masks("attn_float_3d", S, batched=False),
                  _masks("causal", S, batched=False)):
        want_out, want_w = plain(*inputs, need_weights=need_weights, **masks)
        got_out, got_w = hyper(*inputs, need_weights=need_weights, **masks)
        assert got_out.shape == (L, E)
        _assert_same(got_out, want_out, f"output {list(masks)}")
        _assert_same(got_w, want_w, f"weights {list(masks)}")
        # λ [H] with an unbatched input: the batched module on a batch of one
        batched_masks = {k: (v.unsqueeze(0) if k == "key_padding_mask" else v) for k, v in masks.items()}
        out, _ = hyper(*inputs, need_weights=need_weights, hparams=lam, **masks)
        one, _ = hyper(*(t.unsqueeze(1) for t in inputs), need_weights=need_weights, hparams=lam, **batched_masks)
        assert_close_rel(out, one.squeeze(1), D64, f"unbatched with λ {list(masks)}")
    with pytest.raises(ValueError, match=r"hparams: expected shape \[2\] with an unbatched query"):
        hyper(*inputs, hparams=lam.detach().expand(1, H))


def naive_attention(module: HyperMultiheadAttention, query, key, value, hparams, key_padding_mask=None,
                    attn_mask=None, is_causal=False, need_weights=True):
    """The module's function written out: per-projection hyper linear layers (tests/_naive.py), then for every
    example and head softmax(q kᵀ/√d + masks) v with the extra key/value columns of bias_kv and zero_attn
    appended, then the out-projection. Returns (output in the module's layout, weights [N, heads, L, S']).
    nn.MultiheadAttention's rule for ``is_causal``: without key_padding_mask and weights, the hint stands for
    attn_mask (a top-left causal mask over every key column, the appended ones too)."""
    p = dict(module.named_parameters())
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n_batch, tgt_len, width = query.shape
    src_len = key.shape[1]
    if module.packed_in_proj:
        weights = p["in_proj_weight"].chunk(3)
        hyper_weights = p["in_proj_hyper_weight"].chunk(3)
    else:
        weights = [p[f"{x}_proj_weight"] for x in "qkv"]
        hyper_weights = [p[f"{x}_proj_hyper_weight"] for x in "qkv"]
    biases = p["in_proj_bias"].chunk(3) if "in_proj_bias" in p else [None] * 3
    hyper_biases = p["in_proj_hyper_bias"].chunk(3) if "in_proj_hyper_bias" in p else [None] * 3
    V, C = p["in_proj_hparam_weight"][:3 * width], p["in_proj_hparam_weight"][3 * width:]
    projected = []
    for i, x in enumerate((query, key, value)):
        rows = slice(i * width, (i + 1) * width)
        projected.append(naive_hyper_linear(x, hparams, weights[i], hyper_weights[i], biases[i], hyper_biases[i],
                                            V[rows], C[rows]))
    q, k, v = projected
    extra = []
    if module.bias_k is not None:
        extra.append((module.bias_k.reshape(1, width).expand(n_batch, 1, width),
                      module.bias_v.reshape(1, width).expand(n_batch, 1, width)))
    if module.add_zero_attn:
        extra.append((k.new_zeros(n_batch, 1, width), v.new_zeros(n_batch, 1, width)))
    for extra_k, extra_v in extra:
        k, v = torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1)
    total = k.shape[1]
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask, src_len = torch.ones(tgt_len, total, dtype=torch.bool).tril().logical_not(), total
    d = width // module.num_heads
    heads_out, all_weights = [], []
    for b in range(n_batch):
        per_head, per_head_w = [], []
        for h in range(module.num_heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(d)
            additive = torch.zeros(tgt_len, total, dtype=q.dtype)
            for mask in (attn_mask if attn_mask is None or attn_mask.dim() == 2 else attn_mask[b * module.num_heads
                                                                                                + h],
                         None if key_padding_mask is None else key_padding_mask[b].expand(tgt_len, src_len)):
                if mask is None:
                    continue
                block = torch.zeros(tgt_len, src_len, dtype=q.dtype).masked_fill(mask, -math.inf) \
                    if mask.dtype == torch.bool else mask
                additive = additive + F.pad(block, (0, total - src_len))
            w = torch.softmax(scores + additive, dim=-1)
            per_head.append(w @ v[b, :, cols])
            per_head_w.append(w)
        heads_out.append(torch.cat(per_head, dim=-1))
        all_weights.append(torch.stack(per_head_w))
    out_proj = module.out_proj
    Vo, Co = out_proj.hparam_weight.chunk(2)
    out = naive_hyper_linear(torch.stack(heads_out), hparams, out_proj.weight, out_proj.hyper_weight, out_proj.bias,
                             out_proj.hyper_bias, Vo, Co)
    return (out if module.batch_first else out.transpose(0, 1)), torch.stack(all_weights)


@pytest.mark.parametrize("lam_kind", ["per_example", "shared"])
@pytest.mark.parametrize("config", CONFIGS)
def test_with_lambda_output_weights_and_every_gradient_match_the_naive_formulation(config, lam_kind):
    _, hyper = _pair(**CONFIGS[config])
    g = torch.Generator().manual_seed(5)
    lam = torch.randn((N, H) if lam_kind == "per_example" else (H,), dtype=D64, generator=g).requires_grad_()
    for self_attention in [False] + ([True] if hyper.packed_in_proj else []):
        src_len = L if self_attention else S
        inputs = _inputs(hyper, self_attention)
        for mask in ("none", "both_bool", "attn_float_3d", "causal"):
            masks = _masks(mask, src_len)
            for need_weights in (True, False):
                want_out, want_w = naive_attention(hyper, *inputs, lam, need_weights=need_weights, **masks)
                got_out, got_w = hyper(*inputs, need_weights=need_weights, average_attn_weights=False,
                                       hparams=lam, **masks)
                case = f"{config}/{lam_kind}/{mask}/self={self_attention}/weights={need_weights}"
                assert_close_rel(got_out, want_out, D64, f"{case}: output")
                leaves = _leaves(hyper, inputs, masks, lam)
                if need_weights:
                    assert_close_rel(got_w, want_w, D64, f"{case}: weights")
                got = _grads(got_out, got_w if need_weights else None, leaves)
                want = _grads(want_out, want_w if need_weights else None, leaves)
                for name in leaves:
                    if want[name] is None:
                        assert got[name] is None or not got[name].any(), f"{case}: d/d {name}"
                    else:
                        assert_close_rel(got[name], want[name], D64, f"{case}: d/d {name}")
                assert got["hparams"].abs().sum() > 0


@pytest.mark.parametrize("config", ["default", "kdim_vdim_bias_kv"])
def test_gradcheck_in_float64_lambda_and_query(config):
    torch.manual_seed(0)
    hyper = _randomize_(HyperMultiheadAttention(4, 2, num_hparams=H, dtype=D64, **CONFIGS[config]), 3)
    query = torch.randn(3, 2, 4, dtype=D64, requires_grad=True)
    key = torch.randn(4, 2, hyper.kdim, dtype=D64)    # (their gradients: against the naive formulation above)
    value = torch.randn(4, 2, hyper.vdim, dtype=D64)
    lam = torch.randn(2, H, dtype=D64, requires_grad=True)
    kpm = torch.tensor([[False, True, False, False], [False, False, False, True]])

    def cross(lam, query):
        return hyper(query, key, value, key_padding_mask=kpm, hparams=lam)

    assert torch.autograd.gradcheck(cross, (lam, query))
    if hyper.packed_in_proj:  # self-attention: one packed product, and the SDPA path
        x = torch.randn(3, 2, 4, dtype=D64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda lam, x: hyper(x, x, x, need_weights=False, hparams=lam)[0],
                                        (lam, x))


def test_a_float_mask_of_another_dtype_is_added_in_the_querys_as_sdpa_does():
    plain, hyper = _pair()
    inputs = _inputs(plain, False)
    mask = torch.randn(L, S, dtype=torch.float32)
    want = plain(*inputs, attn_mask=mask, need_weights=False)[0]   # (with weights nn.MultiheadAttention raises)
    _assert_same(hyper(*inputs, attn_mask=mask, need_weights=False)[0], want, "SDPA path")
    _assert_same(hyper(*inputs, attn_mask=mask)[0], want, "explicit path")
    _assert_same(hyper(*inputs, attn_mask=mask.double())[0], want, "float64 mask")


@pytest.mark.parametrize("need_weights", [True, False])
def test_training_mode_dropout_draws_what_nn_multihead_attention_draws(need_weights):
    plain, hyper = _pair(dropout=0.4)
    inputs = _inputs(plain, True)
    torch.manual_seed(7)
    want_out, want_w = plain(*inputs, need_weights=need_weights)
    torch.manual_seed(7)
    got_out, got_w = hyper(*inputs, need_weights=need_weights)
    _assert_same(got_out, want_out, "output")
    _assert_same(got_w, want_w, "weights")
    plain.eval(), hyper.eval()  # no dropout in eval mode
    _assert_same(hyper(*inputs)[0], plain(*inputs)[0], "eval output")


# ----------------------------------------------------------------------------- per-example attention dropout

def _dropout_module(**options):
    _, hyper = _pair(**options)
    hyper.dropout_hparam = "attention_dropout"
    return hyper


def test_per_example_attention_dropout_rate_zero_keeps_an_example_and_a_high_rate_drops_its_weights():
    hyper = _dropout_module(dropout=0.5, batch_first=True)   # the fixed rate is not used while the block has one
    inputs = _inputs(hyper, True)
    lam = torch.randn(N, H, dtype=D64)
    hyper.eval()
    clean_out, clean_w = hyper(*inputs, hparams=lam, average_attn_weights=False)
    hyper.train()
    rates = torch.tensor([0.0, 0.9, 0.3], dtype=D64)
    torch.manual_seed(0)
    with stn_kernels.hparams(lam, rates={"attention_dropout": rates}):
        out, weights = hyper(*inputs, hparams=lam, average_attn_weights=False)
    # Example 0 (rate 0): exactly the eval-mode computation; the others: each weight dropped or scaled by 1/(1−p).
    torch.testing.assert_close(out[0], clean_out[0], rtol=0, atol=0)
    for b in (1, 2):
        kept = weights[b] != 0
        scaled = clean_w[b] / (1 - rates[b])
        torch.testing.assert_close(weights[b][kept], scaled[kept], rtol=1e-14, atol=0)
        assert not torch.equal(out[b], clean_out[b])
    dropped = (weights == 0).double().mean(dim=(1, 2, 3))
    assert dropped[0] == 0 and dropped[1] > 0.75 and 0.1 < dropped[2] < 0.6, dropped
    # The rates follow the examples: rolled by one, rate 0 now keeps example 1 and 0.9 drops example 2.
    torch.manual_seed(0)
    with stn_kernels.hparams(lam, rates={"attention_dropout": rates.roll(1)}):
        rolled_out, rolled = hyper(*inputs, hparams=lam, average_attn_weights=False)
    torch.testing.assert_close(rolled_out[1], clean_out[1], rtol=0, atol=0)
    dropped = (rolled == 0).double().mean(dim=(1, 2, 3))
    assert dropped[1] == 0 and dropped[2] > 0.75 and 0.1 < dropped[0] < 0.6, dropped


def test_per_example_attention_dropout_without_weights_and_with_a_float_rate_and_eval_mode():
    hyper = _dropout_module()
    inputs = _inputs(hyper, True)
    rates = torch.tensor([0.2, 0.6, 0.4], dtype=D64)
    lam = torch.randn(N, H, dtype=D64)
    results = []
    for need_weights in (True, False):  # the per-example path also when no weights are returned
        torch.manual_seed(1)
        with stn_kernels.hparams(lam, rates={"attention_dropout": rates}):
            results.append(hyper(*inputs, hparams=lam, need_weights=need_weights)[0])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    hyper.eval()
    with stn_kernels.hparams(lam, rates={"attention_dropout": rates}):
        eval_out = hyper(*inputs, hparams=lam)[0]
    hyper.dropout_hparam = None
    torch.testing.assert_close(eval_out, hyper(*inputs, hparams=lam)[0], rtol=0, atol=0)
    hyper.train()
    assert not torch.equal(results[0], eval_out)
    # No rate of that name in the block: the fixed dropout (0 here), i.e. no dropout at all.
    hyper.dropout_hparam = "attention_dropout"
    with stn_kernels.hparams(lam, rates={"other": 0.5}):
        torch.testing.assert_close(hyper(*inputs, hparams=lam)[0], eval_out, rtol=0, atol=0)
    # A float rate: every example; wrong number of rates: an error naming them.
    torch.manual_seed(2)
    with stn_kernels.hparams(lam, rates={"attention_dropout": 0.5}):
        _, weights = hyper(*inputs, hparams=lam, average_attn_weights=False)
    assert ((weights == 0).double().mean(dim=(1, 2, 3)) > 0.2).all()
    with stn_kernels.hparams(lam[:2], rates={"attention_dropout": rates[:2]}):
        with pytest.raises(ValueError, match=r"rates\['attention_dropout'\]: expected 3 rates"):
            hyper(*inputs, hparams=lam)


def test_context_lambda_follows_batch_first_not_the_blocks_batch_dim():
    _, hyper = _pair()   # batch_first=False: λ's rows along dim 1 of the input
    inputs = _inputs(hyper, False)
    lam = torch.randn(N, H, dtype=D64)
    want = hyper(*inputs, hparams=lam)[0]
    with stn_kernels.hparams(lam, batch_dim=0):
        assert torch.equal(hyper(*inputs)[0], hyper(*inputs, hparams=None)[0])   # not a converted module: no λ
        hyper.context_hparams = True
        torch.testing.assert_close(hyper(*inputs)[0], want, rtol=0, atol=0)
    assert not torch.equal(hyper(*inputs)[0], want)   # outside the block: no λ


# ----------------------------------------------------------------------------- fold

@pytest.mark.parametrize("config", CONFIGS)
def test_fold_is_a_plain_multihead_attention_computing_the_module_at_lambda(config):
    _, hyper = _pair(**CONFIGS[config])
    hyper.out_proj.weight.requires_grad_(False)
    lam = torch.randn(H, dtype=D64)
    plain = hyper.fold(lam)
    assert type(plain) is nn.MultiheadAttention and plain.training
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in nn.MultiheadAttention(
        E, HEADS, device="meta", **CONFIGS[config]).named_parameters()]
    ours = dict(hyper.named_parameters())
    for name, p in plain.named_parameters():
        assert p.requires_grad == ours[name].requires_grad and p.data_ptr() != ours[name].data_ptr(), name
        assert p.grad_fn is None and p.device.type == "cpu" and p.dtype == D64
    for self_attention in [False] + ([True] if hyper.packed_in_proj else []):
        inputs = _inputs(hyper, self_attention)
        masks = _masks("both_bool", L if self_attention else S)
        plain.eval(), hyper.eval()
        want_out, want_w = hyper(*inputs, hparams=lam, **masks)
        with torch.no_grad():   # also through nn.MultiheadAttention's fast path where it takes it
            got_out, got_w = plain(*inputs, **masks)
        torch.testing.assert_close(got_out, want_out.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_w, want_w.detach(), rtol=1e-12, atol=1e-12)


def test_fold_dropout_from_rates_export_and_errors():
    _, hyper = _pair(dropout=0.1, batch_first=True)
    lam = torch.randn(H, dtype=D64)
    assert hyper.fold(lam).dropout == 0.1
    hyper.dropout_hparam = "attention_dropout"
    assert hyper.fold(lam, {"attention_dropout": torch.tensor(0.25)}).dropout == 0.25
    assert hyper.fold(lam, {"other": 0.5}).dropout == 0.1
    plain = hyper.fold(lam).eval()
    x = torch.randn(2, 4, E, dtype=D64)
    exported = torch.export.export(plain, (x, x, x))
    torch.testing.assert_close(exported.module()(x, x, x)[0], plain(x, x, x)[0], rtol=1e-12, atol=1e-12)
    hyper.eval()
    torch.testing.assert_close(exported.module()(x, x, x)[0], hyper(x, x, x, hparams=lam)[0].detach(),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"hparams: expected one shared λ of shape \[2\] to fold"):
        hyper.fold(lam.expand(3, H))
    with pytest.raises(TypeError, match=r"hparams: expected a torch.Tensor"):
        hyper.fold([0.0, 1.0])
    with pytest.raises(TypeError, match=r"rates: expected a mapping"):
        hyper.fold(lam, [0.1])
    with pytest.raises(ValueError, match=r"rates\['attention_dropout'\]: expected one shared rate"):
        hyper.fold(lam, {"attention_dropout": torch.full((3,), 0.1)})


# ----------------------------------------------------------------------------- constructor, names, bad inputs

def test_constructor_and_parameter_names_follow_nn_multihead_attention():
    for options in CONFIGS.values():
        plain = nn.MultiheadAttention(E, HEADS, **options)
        hyper = HyperMultiheadAttention(E, HEADS, num_hparams=H, **options)
        ours = dict(hyper.named_parameters())
        for name, p in plain.named_parameters():
            assert ours[name].shape == p.shape, name
        hyper_names = set(ours) - set(dict(plain.named_parameters()))
        packed = "in_proj_weight" in ours
        expected = {"in_proj_hparam_weight", "out_proj.hyper_weight", "out_proj.hparam_weight"}
        expected |= {"in_proj_hyper_weight"} if packed else {f"{x}_proj_hyper_weight" for x in "qkv"}
        expected |= {"in_proj_hyper_bias", "out_proj.hyper_bias"} if options.get("bias", True) else set()
        assert hyper_names == expected
        assert ours["in_proj_hparam_weight"].shape == (6 * E, H)
        # nn.MultiheadAttention's state dict loads into it (the hyper path stays as it is)
        missing, unexpected = hyper.load_state_dict(plain.state_dict(), strict=False)
        assert set(missing) == hyper_names and not unexpected
        assert isinstance(hyper.out_proj, stn_kernels.HyperLinear)
        assert hyper._qkv_same_embed_dim is False and hyper.packed_in_proj == packed
    hyper = HyperMultiheadAttention(8, 2, num_hparams=3)
    assert not hyper.in_proj_bias.any() and not hyper.out_proj.bias.any() and hyper.in_proj_hyper_bias.any()
    assert "num_hparams=3" in repr(hyper) and stn_kernels.HyperMultiheadAttention is HyperMultiheadAttention


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0, 2), {"num_hparams": H}, ValueError, r"embed_dim: expected an int >= 1, got 0"),
    ((6, 4), {"num_hparams": H}, ValueError, r"num_heads: expected a divisor of embed_dim=6, got 4"),
    ((6, 2.0), {"num_hparams": H}, TypeError, r"num_heads: expected an int >= 1"),
    ((6, 2, 1.5), {"num_hparams": H}, ValueError, r"dropout: expected a probability in \[0, 1\], got 1.5"),
    ((6, 2, 2), {}, ValueError, r"dropout: .*num_hparams is keyword-only"),
    ((6, 2), {"bias": 1, "num_hparams": H}, TypeError, r"bias: expected a bool"),
    ((6, 2), {"batch_first": None, "num_hparams": H}, TypeError, r"batch_first: expected a bool"),
    ((6, 2), {"kdim": 0, "num_hparams": H}, ValueError, r"kdim: expected an int >= 1, got 0"),
    ((6, 2), {"vdim": "4", "num_hparams": H}, TypeError, r"vdim: expected an int >= 1"),
    ((6, 2), {}, TypeError, r"num_hparams: missing"),
    ((6, 2), {"num_hparams": 0}, ValueError, r"num_hparams: expected an int >= 1"),
])
def test_constructor_bad_arguments_raise_naming_them(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        HyperMultiheadAttention(*args, **kwargs)


def _bad_calls():
    q = torch.randn(L, N, E, dtype=D64)
    k = torch.randn(S, N, E, dtype=D64)
    lam = torch.randn(N, H, dtype=D64)
    return [
        ((q.unsqueeze(0), q, q), {}, ValueError, r"query: expected shape \[L, E\] \(unbatched\), \[L, N, E\]"),
        (("x", q, q), {}, TypeError, r"query: expected a torch.Tensor, got str"),
        ((q, q.long(), q), {}, TypeError, r"key: expected a floating-point tensor"),
        ((q, k[..., :4], k), {}, ValueError, r"key: expected 6 features in the last dim \(kdim\)"),
        ((q, k, k[0]), {}, ValueError, r"value: expected a 3-D tensor like query"),
        ((q, k, k.float()), {}, TypeError, r"value: expected dtype torch.float64 \(the dtype of query\)"),
        ((q.float(),) * 3, {}, TypeError, r"query: expected dtype torch.float64 \(the dtype of the module's weights\)"),
        ((q, k[:, :2], k[:, :2]), {}, ValueError, r"key, value: expected the batch size of query \(3, dim 1"),
        ((q, k, k[:4]), {}, ValueError, r"value: expected the sequence length of key \(7, dim 0\)"),
        ((q, k, k), {"hparams": lam[:2]}, ValueError, r"hparams: expected 3 rows \(one per example along dim 1 of "
                                                       r"query of shape \(5, 3, 6\), batch_first=False\)"),
        ((q, k, k), {"hparams": lam[:, :1]}, ValueError, r"hparams: expected shape \[N, 2\] .* or \[2\]"),
        ((q, k, k), {"hparams": "λ"}, TypeError, r"hparams: expected a torch.Tensor"),
        ((q, k, k), {"key_padding_mask": torch.zeros(N, L, dtype=torch.bool)}, ValueError,
         r"key_padding_mask: expected shape \(3, 7\)"),
        ((q, k, k), {"key_padding_mask": torch.zeros(N, S, dtype=torch.long)}, TypeError,
         r"key_padding_mask: expected a bool or floating-point tensor, got dtype torch.int64"),
        ((q, k, k), {"attn_mask": torch.zeros(L, L, dtype=torch.bool)}, ValueError,
         r"attn_mask: expected shape \(5, 7\) \(\[L, S\]\) or \(9, 5, 7\)"),
        ((q, k, k), {"attn_mask": torch.zeros(L, S, dtype=torch.int32)}, TypeError,
         r"attn_mask: expected a bool or floating-point tensor, got dtype torch.int32"),
        ((q, k, k), {"is_causal": True}, ValueError, r"is_causal: True needs attn_mask"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_forward_bad_inputs_raise_naming_the_argument(case):
    _, hyper = _pair()
    args, kwargs, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        hyper(*args, **kwargs)
