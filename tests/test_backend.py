"""The one backend table (stn_kernels.backends.registry) drives all six ops: resolution rules, the
modules it loads, that every op really asks it (no kernel runs in the resolution tests), and the
measured rules table (stn_kernels/backends/rules.json) between triton and cuda."""

import threading

import pytest
import torch

import stn_kernels
from stn_kernels import backends
from stn_kernels.backends import TABLE, registry, resolve_backend, rules

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
OPS = ("hyper_linear", "hyper_conv2d", "hyper_embedding", "hyper_lstm_recurrence", "per_example_dropout",
       "augment", "affine")


def test_the_table_has_every_op_and_every_op_has_a_reference():
    assert set(TABLE) == set(OPS)
    for op, entry in TABLE.items():
        assert "reference" in entry.kernels, op
        assert set(entry.auto) <= set(entry.kernels) - {"reference"}, op


@pytest.mark.parametrize("op", OPS)
def test_every_backend_module_has_the_op_contract(op):
    """Each loader gives a module with ``{op}_forward`` (and ``{op}_backward`` where the op has a backward op)."""
    for backend in TABLE[op].kernels:
        if backend == "triton":
            pytest.importorskip("triton")
        module = backends.load(op, backend)
        # dropout's backward is the op itself; augment's and affine's are the reference's autograd on every backend
        has_backward = op != "per_example_dropout" and (op not in ("augment", "affine") or backend == "reference")
        assert callable(getattr(module, f"{op}_forward")), (op, backend)
        assert callable(getattr(module, f"{op}_backward", None)) or not has_backward, (op, backend)


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_is_the_reference(op):
    assert resolve_backend(op, CPU) == "reference"


def test_auto_on_cuda_takes_only_gpu_checked_kernels():
    pytest.importorskip("triton")
    assert resolve_backend("hyper_linear", CUDA) == "triton"
    # Interpreter-tested only: opt-in until a GPU run checks them.
    for op in ("hyper_conv2d", "hyper_embedding", "hyper_lstm_recurrence", "per_example_dropout", "augment", "affine"):
        assert resolve_backend(op, CUDA) == "reference", op


@pytest.mark.parametrize("op", [op for op in OPS if "cuda" not in TABLE[op].kernels])
def test_explicit_backend_without_a_kernel_for_the_op_raises(op):
    with stn_kernels.use_backend("cuda"):
        with pytest.raises(stn_kernels.BackendUnavailableError, match=f"{op}.*'cuda' has no kernel"):
            resolve_backend(op, CUDA)


@pytest.mark.parametrize("op", OPS)
def test_explicit_triton_on_cpu_without_the_interpreter_raises(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with stn_kernels.use_backend("triton"):
        with pytest.raises(stn_kernels.BackendUnavailableError, match=f"{op}.*'triton' cannot run here"):
            resolve_backend(op, CPU)


def test_explicit_cuda_on_cpu_tensors_raises():
    with stn_kernels.use_backend("cuda"):
        with pytest.raises(stn_kernels.BackendUnavailableError, match="runs CUDA tensors only"):
            resolve_backend("hyper_linear", CPU)


def _calls(op, device="cpu"):
    """One call of each op's public entry on tiny inputs that require grad (forward and backward)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()

    lam = r(2, 3)
    if op == "hyper_linear":
        return stn_kernels.hyper_linear(r(2, 4), lam, r(5, 4), r(5, 4), r(5), r(5), r(5, 3), r(5, 3))
    if op == "hyper_conv2d":
        return stn_kernels.hyper_conv2d(r(2, 2, 5, 5), lam, r(4, 2, 3, 3), r(4, 2, 3, 3), r(4), r(4), r(4, 3),
                                        r(4, 3))
    if op == "hyper_embedding":
        return stn_kernels.hyper_embedding(torch.tensor([[1, 0], [2, 1]]), lam, r(3, 4), r(3, 4), r(4, 3))
    if op == "hyper_lstm_recurrence":
        return stn_kernels.hyper_lstm_recurrence(r(3, 2, 8), r(2, 2), r(2, 2), lam, r(8, 2), r(8, 2), r(8), r(8),
                                                 r(8, 3), r(8, 3))[0]
    if op == "augment":
        images = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
        return stn_kernels.augment_images(images, brightness=0.3, contrast=0.3, holes=1, length=2, scale=0.2,
                                          seed=1)
    if op == "affine":
        images = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
        return stn_kernels.affine(images, 20.0, 0.2, 0.1, 5.0, interpolation="bilinear", seed=1)
    return stn_kernels.per_example_dropout(r(2, 6), torch.tensor([0.25, 0.5]), seed=1)


@pytest.mark.parametrize("op", OPS)
def test_every_op_gets_its_kernels_from_the_table(op, monkeypatch):
    """Swapping the table's reference entry for a recording wrapper reroutes the op: forward and backward."""
    real = backends.load(op, "reference")
    called = []

    class Recording:
        def __getattr__(self, name):
            called.append(name)
            return getattr(real, name)

    recording = Recording()
    entry = TABLE[op]
    monkeypatch.setitem(TABLE, op, backends.OpBackends({**entry.kernels, "reference": lambda: recording}, entry.auto))
    out = _calls(op)
    out.sum().backward()
    assert f"{op}_forward" in called
    if op != "per_example_dropout":  # its backward is the forward op again
        assert f"{op}_backward" in called
    else:
        assert called.count(f"{op}_forward") == 2


def test_use_backend_is_seen_from_other_threads():
    """The autograd engine runs CUDA backward ops on worker threads: they must see the same backend."""
    seen = []
    with stn_kernels.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(stn_kernels.requested_backend()))
        thread.start()
        thread.join()
    assert seen == ["reference"]
    assert stn_kernels.requested_backend() == "auto"


# ----------------------------------------------------------------------------- the measured rules (triton / cuda)


def test_committed_rules_table_has_no_guessed_entries():
    with open(rules.RULES_FILE, encoding="utf-8") as f:
        import json

        raw = json.load(f)
    table = rules.load_rules()
    if not raw.get("measured"):
        assert raw["rules"] == {}, "an unmeasured table must not choose"
        assert "No GPU measurements" in raw["note"]
    assert table["default"] == "triton"
    for m in (1, 64, 65, 128, 4096, 10 ** 6):
        for dtype in (F32, F16, BF16):
            assert rules.auto_choice(m, dtype) in ("triton", "cuda")
    assert rules.auto_choice(128, F16, rules.EMPTY_TABLE) == "triton"


def test_auto_follows_the_rules_table(tmp_path, monkeypatch):
    """"auto" on CUDA tensors: triton, except in classes the table gives to cuda (extension loaded)."""
    table = dict(rules.EMPTY_TABLE, measured=True, rules={"float16/M<=256": "cuda"})
    path = tmp_path / "rules.json"
    rules.write_rules(table, str(path))
    real_load = rules.load_rules
    monkeypatch.setattr(rules, "load_rules", lambda p=None: real_load(str(path)))
    monkeypatch.setattr(registry, "triton_importable", lambda: True)
    monkeypatch.setattr(registry, "cuda_extension_available", lambda device: True)
    entry = TABLE["hyper_linear"]

    def pick(rows, dtype, auto=("triton", "cuda"), device=CUDA):
        monkeypatch.setitem(TABLE, "hyper_linear", backends.OpBackends(entry.kernels, auto))
        return resolve_backend("hyper_linear", device, rows, dtype)

    assert pick(128, F16) == "cuda"
    assert pick(1000, F16) == "triton" and pick(128, BF16) == "triton"
    assert pick(128, F16, ("triton",)) == "triton"  # cuda not among the op's auto choices
    assert pick(None, None) == "triton"  # no shape given
    assert pick(128, F16, device=CPU) == "reference"
    monkeypatch.setattr(registry, "cuda_extension_available", lambda device: False)
    assert pick(128, F16) == "triton"  # the table's choice needs the extension loaded
    monkeypatch.setattr(registry, "triton_importable", lambda: False)
    assert pick(1000, F16) == "reference"


def test_rules_regenerated_from_results_csv(tmp_path):
    csv_path = tmp_path / "results.csv"
    header = "case,B,H,K,N,dtype,mode,provider,median_ms,samples,vs_published,vs_floor,wall_ms,peak_mib," \
             "mem_vs_published,note\n"
    rows = [
        # M=128 float16: cuda faster on both cases -> cuda
        ("alexnet-fc1", 128, "float16", "fwd+bwd", "stn:triton", 0.10, ""),
        ("alexnet-fc1", 128, "float16", "fwd+bwd", "stn:cuda", 0.08, ""),
        ("mlp-fc1", 128, "float16", "fwd+bwd", "stn:triton", 0.05, ""),
        ("mlp-fc1", 128, "float16", "fwd+bwd", "stn:cuda", 0.045, ""),
        # M=4096 float16: cuda 3 % faster, inside the margin -> triton
        ("large-4k", 4096, "float16", "fwd+bwd", "stn:triton", 2.0, ""),
        ("large-4k", 4096, "float16", "fwd+bwd", "stn:cuda", 1.94, ""),
        # M=40 bfloat16: cuda faster but its result mismatched -> left out, no entry
        ("lstm-i2h", 40, "bfloat16", "fwd+bwd", "stn:triton", 0.09, ""),
        ("lstm-i2h", 40, "bfloat16", "fwd+bwd", "stn:cuda", 0.05, "mismatch: dx 0.3"),
        # other modes and providers are ignored
        ("alexnet-fc1", 128, "float32", "fwd", "stn:cuda", 0.01, ""),
        ("alexnet-fc1", 128, "float32", "fwd", "published", 0.5, ""),
    ]
    with open(csv_path, "w") as f:
        f.write(header)
        for case, b, dtype, mode, provider, ms, note in rows:
            f.write(f"{case},{b},15,1024,4096,{dtype},{mode},{provider},{ms},10,,,,,,{note}\n")
    table = rules.rules_from_results([str(csv_path)], device="test GPU")
    assert table["rules"] == {"float16/M<=256": "cuda", "float16/M<=4096": "triton"}
    assert table["measured"] is True
    assert table["evidence"]["float16/M<=256"]["cases"] == ["alexnet-fc1", "mlp-fc1"]
    out = tmp_path / "rules.json"
    rules.write_rules(table, str(out))
    loaded = rules.load_rules(str(out))
    assert rules.auto_choice(100, F16, loaded) == "cuda"
    assert rules.auto_choice(300, F16, loaded) == "triton"
    assert rules.auto_choice(40, BF16, loaded) == "triton"
    assert rules.auto_choice(100, F32, loaded) == "triton"
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1, "rules": {"float16/M<=64": "cudnn"}}')
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert rules.load_rules(str(bad))["rules"] == {}
