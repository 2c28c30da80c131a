"""Bad input raises the right exception type, with a message naming the argument and showing
expected and actual values; backend selection errors."""

import re

import pytest
import torch

import stn_kernels
from stn_kernels import BackendUnavailableError, hyper_conv2d, hyper_embedding, hyper_linear

B, K, N, H = 3, 6, 4, 2


def lin(dtype=torch.float32, device="cpu", **over):
    """Valid hyper_linear arguments (x [B, K], λ [B, H]) with some replaced."""
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    args = {"input": r(B, K), "hparams": r(B, H), "weight": r(N, K), "hyper_weight": r(N, K), "bias": r(N),
            "hyper_bias": r(N), "weight_scale": r(N, H), "bias_scale": r(N, H)}
    args.update(over)
    return args


def conv(dtype=torch.float32, **over):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype)

    args = {"input": r(2, 3, 7, 9), "hparams": r(2, H), "weight": r(6, 3, 3, 3), "hyper_weight": r(6, 3, 3, 3),
            "bias": r(6), "hyper_bias": r(6), "weight_scale": r(6, H), "bias_scale": r(6, H)}
    args.update(over)
    return args


def emb(dtype=torch.float32, **over):
    args = {"input": torch.randint(0, 7, (5, 3)), "hparams": torch.randn(5, H, dtype=dtype),
            "weight": torch.randn(7, 4, dtype=dtype), "hyper_weight": torch.randn(7, 4, dtype=dtype),
            "weight_scale": torch.randn(4, H, dtype=dtype)}
    args.update(over)
    return args


def raises(exc, *fragments):
    """pytest.raises matching every fragment (literal text) in order."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


def test_valid_arguments_run():
    """The factories above are valid: every case below differs from a working call in one argument."""
    assert hyper_linear(**lin()).shape == (B, N)
    assert hyper_conv2d(**conv()).shape == (2, 6, 5, 7)
    assert hyper_embedding(**emb()).shape == (5, 3, 4)


# ----------------------------------------------------------------------------- hyper_linear

LINEAR_CASES = {
    "weight-1d": (dict(weight=torch.randn(N)), ValueError,
                  ("weight", "[out_features, in_features]", "(4,)")),
    "hyper_weight-shape": (dict(hyper_weight=torch.randn(N, K + 1)), ValueError,
                           ("hyper_weight", "(4, 6)", "(4, 7)")),
    "bias-shape": (dict(bias=torch.randn(N + 1)), ValueError, ("bias", "(4,)", "(5,)")),
    "hyper_bias-shape": (dict(hyper_bias=torch.randn(1, N)), ValueError, ("hyper_bias", "(4,)", "(1, 4)")),
    "feature-mismatch": (dict(input=torch.randn(B, K + 1)), ValueError, ("input", "[B, 6]", "(3, 7)")),
    "input-0d": (dict(input=torch.tensor(1.0)), ValueError, ("input", "[B, 6]", "()")),
    "hparams-batch": (dict(hparams=torch.randn(B + 1, H)), ValueError, ("hparams", "batch size 3", "(4, 2)")),
    "hparams-width": (dict(hparams=torch.randn(B, H + 3)), ValueError, ("hparams", "2 hyperparameters", "(3, 5)")),
    "hparams-shared-width": (dict(hparams=torch.randn(H + 1)), ValueError, ("hparams", "2 hyperparameters", "(3,)")),
    "hparams-3d": (dict(hparams=torch.randn(B, 1, H)), ValueError, ("hparams", "[B, 2] or [2]", "(3, 1, 2)")),
    "weight_scale-shape": (dict(weight_scale=torch.randn(N + 1, H)), ValueError,
                           ("weight_scale", "[4, H]", "(5, 2)")),
    "bias_scale-shape": (dict(bias_scale=torch.randn(N, H + 1)), ValueError, ("bias_scale", "(4, 2)", "(4, 3)")),
    "weight_scale-missing": (dict(weight_scale=None), ValueError, ("weight_scale", "required", "None")),
    "bias_scale-missing": (dict(bias_scale=None), ValueError, ("bias_scale", "required", "None")),
    "weight-dtype": (dict(weight=torch.randn(N, K, dtype=torch.float64)), TypeError,
                     ("weight", "torch.float32", "torch.float64")),
    "bias-dtype": (dict(bias=torch.randn(N, dtype=torch.float64)), TypeError,
                   ("bias", "torch.float32", "torch.float64")),
    "hparams-dtype": (dict(hparams=torch.randn(B, H, dtype=torch.float64)), TypeError,
                      ("hparams", "torch.float32", "torch.float64")),
    "weight_scale-dtype": (dict(weight_scale=torch.randn(N, H, dtype=torch.float64)), TypeError,
                           ("weight_scale", "torch.float32", "torch.float64")),
    "input-int": (dict(input=torch.ones(B, K, dtype=torch.int64)), TypeError,
                  ("input", "floating-point", "torch.int64")),
    "input-list": (dict(input=[[1.0] * K] * B), TypeError, ("input", "torch.Tensor", "list")),
    "hparams-list": (dict(hparams=[[0.5] * H] * B), TypeError, ("hparams", "torch.Tensor", "list")),
    "weight-int": (dict(weight=torch.ones(N, K, dtype=torch.int32)), TypeError,
                   ("weight", "floating-point", "torch.int32")),
    "weight-meta": (dict(weight=torch.randn(N, K, device="meta")), ValueError, ("weight", "cpu", "meta")),
    "hyper_bias-meta": (dict(hyper_bias=torch.randn(N, device="meta")), ValueError, ("hyper_bias", "cpu", "meta")),
    "hparams-meta": (dict(hparams=torch.randn(B, H, device="meta")), ValueError, ("hparams", "cpu", "meta")),
    "weight_scale-meta": (dict(weight_scale=torch.randn(N, H, device="meta")), ValueError,
                          ("weight_scale", "cpu", "meta")),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES), ids=list(LINEAR_CASES))
def test_hyper_linear_rejects(case):
    over, exc, fragments = LINEAR_CASES[case]
    with raises(exc, *fragments):
        hyper_linear(**lin(**over))


def test_hyper_linear_rejects_all_weights_on_other_device():
    """Every weight on 'meta', input on the CPU."""
    args = lin(device="meta")
    args["input"], args["hparams"] = torch.randn(B, K), torch.randn(B, H)
    with raises(ValueError, "weight", "cpu", "meta"):
        hyper_linear(**args)


def test_hyper_linear_rejects_input_on_other_device():
    args = lin()
    args["input"] = torch.randn(B, K, device="meta")
    with raises(ValueError, "expected device meta", "got cpu"):
        hyper_linear(**args)


def test_hyper_linear_1d_input_with_per_example_hparams():
    with raises(ValueError, "input", "per-example hparams", "(3, 2)", "(6,)"):
        hyper_linear(**lin(input=torch.randn(K)))


def test_hyper_linear_1d_input_with_non_tensor_hparams():
    with raises(TypeError, "hparams", "torch.Tensor", "list"):
        hyper_linear(**lin(input=torch.randn(K), hparams=[0.5] * H))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_hyper_linear_half_input_rejects_float64_hparams(half):
    args = lin(dtype=half)
    args["hparams"] = torch.randn(B, H, dtype=torch.float64)
    with raises(TypeError, "hparams", f"{half} or torch.float32", "torch.float64"):
        hyper_linear(**args)


@pytest.mark.parametrize("name", ["weight_scale", "bias_scale"])
def test_hyper_linear_half_input_rejects_float64_scales(name):
    """V and C may be in the input's half dtype or float32 (with λ in either: the λ side runs in the wider, see
    tests/test_dtypes.py), not float64."""
    args = lin(dtype=torch.bfloat16)
    args["hparams"] = torch.randn(B, H)
    args[name] = torch.randn(N, H, dtype=torch.float64)
    with raises(TypeError, name, "torch.bfloat16 or torch.float32", "torch.float64"):
        hyper_linear(**args)


def test_hyper_linear_module_wrong_hparams_width():
    m = stn_kernels.HyperLinear(K, N, num_hparams=H)
    with raises(ValueError, "hparams", "2 hyperparameters", "(3, 3)"):
        m(torch.randn(B, K), torch.randn(B, H + 1))


def test_hyper_linear_module_wrong_features():
    m = stn_kernels.HyperLinear(K, N, num_hparams=H)
    with raises(ValueError, "input", "[B, 6]", "(3, 5)"):
        m(torch.randn(B, K - 1), torch.randn(B, H))


# ----------------------------------------------------------------------------- hyper_conv2d

CONV_CASES = {
    "input-3d": (dict(input=torch.randn(3, 7, 9)), {}, ValueError, ("input", "[B, 3, H, W]", "(3, 7, 9)")),
    "weight-3d": (dict(weight=torch.randn(6, 3, 3)), {}, ValueError,
                  ("weight", "[out_channels, in_channels/groups, kh, kw]", "(6, 3, 3)")),
    "hyper_weight-shape": (dict(hyper_weight=torch.randn(6, 3, 1, 1)), {}, ValueError,
                           ("hyper_weight", "(6, 3, 3, 3)", "(6, 3, 1, 1)")),
    "bias-shape": (dict(bias=torch.randn(5)), {}, ValueError, ("bias", "(6,)", "(5,)")),
    "channel-mismatch": (dict(input=torch.randn(2, 4, 7, 9)), {}, ValueError,
                         ("input", "[B, 3, H, W]", "(2, 4, 7, 9)")),
    "smaller-than-kernel": (dict(input=torch.randn(2, 3, 2, 9)), {}, ValueError,
                            ("input", "(2, 9)", "smaller than", "(3, 3)")),
    "smaller-than-dilated-kernel": (dict(input=torch.randn(2, 3, 4, 4)), {"dilation": 2}, ValueError,
                                    ("input", "(4, 4)", "smaller than", "(3, 3)")),
    "groups-0": ({}, {"groups": 0}, ValueError, ("groups", "out_channels=6", "0")),
    "groups-not-dividing": ({}, {"groups": 4}, ValueError, ("groups", "out_channels=6", "got 4")),
    "groups-float": ({}, {"groups": 1.0}, ValueError, ("groups", "positive int", "1.0")),
    "stride-0": ({}, {"stride": 0}, ValueError, ("stride", ">= 1", "[0, 0]")),
    "stride-negative": ({}, {"stride": (1, -2)}, ValueError, ("stride", ">= 1", "[1, -2]")),
    "padding-negative": ({}, {"padding": -1}, ValueError, ("padding", ">= 0", "[-1, -1]")),
    "dilation-0": ({}, {"dilation": 0}, ValueError, ("dilation", ">= 1", "[0, 0]")),
    "hparams-batch": (dict(hparams=torch.randn(3, H)), {}, ValueError, ("hparams", "batch size 2", "(3, 2)")),
    "hparams-width": (dict(hparams=torch.randn(2, H + 1)), {}, ValueError, ("hparams", "2 hyperparameters", "(2, 3)")),
    "hparams-3d": (dict(hparams=torch.randn(2, H, 1)), {}, ValueError, ("hparams", "[B, 2] or [2]", "(2, 2, 1)")),
    "weight-dtype": (dict(weight=torch.randn(6, 3, 3, 3, dtype=torch.float64)), {}, TypeError,
                     ("weight", "torch.float32", "torch.float64")),
    "hparams-dtype": (dict(hparams=torch.randn(2, H, dtype=torch.float64)), {}, TypeError,
                      ("hparams", "torch.float32", "torch.float64")),
    "input-int": (dict(input=torch.ones(2, 3, 7, 9, dtype=torch.int64)), {}, TypeError,
                  ("input", "floating-point", "torch.int64")),
    "input-numpy": (dict(input=torch.randn(2, 3, 7, 9).numpy()), {}, TypeError, ("input", "torch.Tensor", "ndarray")),
    "weight-meta": (dict(weight=torch.randn(6, 3, 3, 3, device="meta")), {}, ValueError, ("weight", "cpu", "meta")),
    "weight_scale-missing": (dict(weight_scale=None), {}, ValueError, ("weight_scale", "required", "None")),
}


@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_hyper_conv2d_rejects(case):
    over, geometry, exc, fragments = CONV_CASES[case]
    with raises(exc, *fragments):
        hyper_conv2d(**conv(**over), **geometry)


def test_hyper_conv2d_module_bad_groups():
    with raises(ValueError, "groups", "in_channels=3", "out_channels=6", "got 2"):
        stn_kernels.HyperConv2d(3, 6, 3, num_hparams=H, groups=2)


# ----------------------------------------------------------------------------- hyper_embedding

EMB_CASES = {
    "index-too-large": (dict(input=torch.tensor([[0, 7, 2]])), ValueError, ("input", "[0, 6]", "[0, 7]")),
    "index-negative": (dict(input=torch.tensor([[-1, 3, 2]])), ValueError, ("input", "[0, 6]", "[-1, 3]")),
    "float-indices": (dict(input=torch.zeros(5, 3)), TypeError, ("input", "integer indices", "torch.float32")),
    "int16-indices": (dict(input=torch.zeros(5, 3, dtype=torch.int16)), TypeError,
                      ("input", "torch.int64 or torch.int32", "torch.int16")),
    "indices-list": (dict(input=[[1, 2, 3]] * 5), TypeError, ("input", "torch.Tensor", "list")),
    "indices-0d": (dict(input=torch.tensor(3)), ValueError, ("input", "[B] or [B, *]", "()")),
    "weight-1d": (dict(weight=torch.randn(7)), ValueError, ("weight", "[num_embeddings, embedding_dim]", "(7,)")),
    "hyper_weight-shape": (dict(hyper_weight=torch.randn(8, 4)), ValueError, ("hyper_weight", "(7, 4)", "(8, 4)")),
    "hyper_weight-dtype": (dict(hyper_weight=torch.randn(7, 4, dtype=torch.float64)), TypeError,
                           ("hyper_weight", "torch.float32", "torch.float64")),
    "hparams-batch": (dict(hparams=torch.randn(4, H)), ValueError, ("hparams", "batch size 5", "(4, 2)")),
    "hparams-width": (dict(hparams=torch.randn(5, H + 1)), ValueError, ("hparams", "2 hyperparameters", "(5, 3)")),
    "hparams-3d": (dict(hparams=torch.randn(5, 1, H)), ValueError, ("hparams", "[B, 2] or [2]", "(5, 1, 2)")),
    "hparams-dtype": (dict(hparams=torch.randn(5, H, dtype=torch.float64)), TypeError,
                      ("hparams", "torch.float32", "torch.float64")),
    "weight_scale-shape": (dict(weight_scale=torch.randn(H, 4)), ValueError, ("weight_scale", "[4, H]", "(2, 4)")),
    "weight_scale-missing": (dict(weight_scale=None), ValueError, ("weight_scale", "required", "None")),
    "indices-meta": (dict(input=torch.zeros(5, 3, dtype=torch.int64, device="meta")), ValueError,
                     ("input", "cpu", "meta")),
    "hyper_weight-meta": (dict(hyper_weight=torch.randn(7, 4, device="meta")), ValueError,
                          ("hyper_weight", "cpu", "meta")),
}


@pytest.mark.parametrize("case", list(EMB_CASES), ids=list(EMB_CASES))
def test_hyper_embedding_rejects(case):
    over, exc, fragments = EMB_CASES[case]
    args = emb(**over)
    if case.startswith("index-"):
        args["hparams"] = torch.randn(1, H)
    with raises(exc, *fragments):
        hyper_embedding(**args)


def test_hyper_embedding_module_bad_batch_dim():
    m = stn_kernels.HyperEmbedding(7, 4, num_hparams=H)
    with raises(ValueError, "batch_dim", "0 or 1", "2"):
        m(torch.zeros(5, 3, dtype=torch.int64), torch.randn(5, H), batch_dim=2)
    with raises(ValueError, "input", "[T, B, ...]", "(5,)"):
        m(torch.zeros(5, dtype=torch.int64), torch.randn(5, H), batch_dim=1)
    with raises(ValueError, "hparams", "batch size 3", "(5, 2)"):  # [T=5, B=3] time-major, λ for 5
        m(torch.zeros(5, 3, dtype=torch.int64), torch.randn(5, H), batch_dim=1)


# ----------------------------------------------------------------------------- backends

@pytest.fixture
def no_env_backend(monkeypatch):
    monkeypatch.delenv("STN_KERNELS_BACKEND", raising=False)


def run_all_ops():
    """One call of each public op (float32 CPU); returns the outputs."""
    return hyper_linear(**lin()), hyper_conv2d(**conv()), hyper_embedding(**emb())


def test_unknown_backend_name(no_env_backend):
    with raises(ValueError, "use_backend", "'reference'", "'nope'"):
        with stn_kernels.use_backend("nope"):
            pass
    with raises(TypeError, "use_backend", "str", "int"):
        with stn_kernels.use_backend(3):
            pass


@pytest.mark.parametrize("op", ["linear", "conv2d", "embedding"])
def test_unknown_backend_environment_variable(monkeypatch, op):
    monkeypatch.setenv("STN_KERNELS_BACKEND", "nope")
    call = {"linear": lambda: hyper_linear(**lin()), "conv2d": lambda: hyper_conv2d(**conv()),
            "embedding": lambda: hyper_embedding(**emb())}[op]
    with raises(ValueError, "STN_KERNELS_BACKEND", "'nope'"):
        call()


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("STN_KERNELS_BACKEND", " Reference ")
    assert stn_kernels.requested_backend() == "reference"
    run_all_ops()
    monkeypatch.setenv("STN_KERNELS_BACKEND", "cuda")
    with raises(BackendUnavailableError, "'cuda'"):
        hyper_linear(**lin())
    with stn_kernels.use_backend("reference"):  # the block wins over the variable
        run_all_ops()


@pytest.mark.parametrize("op", ["linear", "conv2d", "embedding"])
def test_cuda_backend_on_cpu_tensors(no_env_backend, op):
    call = {"linear": lambda: hyper_linear(**lin()), "conv2d": lambda: hyper_conv2d(**conv()),
            "embedding": lambda: hyper_embedding(**emb())}[op]
    with stn_kernels.use_backend("cuda"):
        with raises(BackendUnavailableError, "'cuda'"):
            call()
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_cuda_backend_raises_in_backward(no_env_backend):
    """The backend is resolved when each op runs: a backward run under 'cuda' on CPU tensors raises too."""
    args = lin()
    args["input"].requires_grad_()
    out = hyper_linear(**args)
    with stn_kernels.use_backend("cuda"):
        with raises(BackendUnavailableError, "'cuda'"):
            out.sum().backward()


def test_reference_backend_matches_auto(no_env_backend):
    torch.manual_seed(0)
    auto = run_all_ops()
    torch.manual_seed(0)
    with stn_kernels.use_backend("reference") as name:
        assert name == "reference"
        ref = run_all_ops()
    for a, r in zip(auto, ref):
        assert torch.equal(a, r)


def test_nested_backends_restore(no_env_backend):
    assert stn_kernels.requested_backend() == "auto"
    with stn_kernels.use_backend("reference"):
        with stn_kernels.use_backend("cuda"):
            assert stn_kernels.requested_backend() == "cuda"
            with raises(BackendUnavailableError, "'cuda'"):
                hyper_linear(**lin())
        assert stn_kernels.requested_backend() == "reference"
        run_all_ops()
        with pytest.raises(KeyError):
            with stn_kernels.use_backend("cuda"):
                raise KeyError("inside")
        assert stn_kernels.requested_backend() == "reference"
    assert stn_kernels.requested_backend() == "auto"
    run_all_ops()


def test_backends_listed():
    assert set(stn_kernels.BACKENDS) == {"auto", "reference", "triton", "cuda"}
