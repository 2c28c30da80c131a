"""Every ```python block of the README and of docs/ runs as written, on its own: each in a fresh namespace (the
torchrun script as a file, on 2 gloo processes), followed by a check of what it computed. ```bash blocks are
commands (pip install, make, torchrun) and are not run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _naive import assert_close_rel

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))


def _python_blocks(path: Path) -> list:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def _block_after(heading: str, page: Path = README) -> str:
    """The first python block of ``page`` after ``heading`` (also used by test_stn_compile.py)."""
    text = page.read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def _check_first_model(scope):
    assert scope["hparams"].grad is not None and scope["hparams"].grad.shape == (128, 3)
    assert torch.isfinite(scope["hparams"].grad).all() and scope["hparams"].grad.abs().sum() > 0
    torch.testing.assert_close(scope["out"], scope["model"](scope["x"], scope["hparams"]))  # compiled == eager


def _check_quick_start(scope):
    model, plain, hp, trainer = (scope[name] for name in ("model", "plain", "hp", "trainer"))
    ours = scope["stn_kernels"]
    assert isinstance(model[0], ours.HyperLinear) and isinstance(model[2], ours.TunedDropout)
    assert trainer.valid_steps_done > 0 and hp.unconstrained.grad.abs().sum() > 0  # λ moved on its gradient
    assert [type(m) for m in plain] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    assert plain[2].p == hp.values()["dropout"] != 0.2
    x = torch.randn(2, 64)  # the exported program's static shape
    model.eval()
    with torch.no_grad(), ours.hparams(trainer.tuned_layer_input()):
        torch.testing.assert_close(plain(x), model(x))
        torch.testing.assert_close(scope["exported"].module()(x), model(x))


def _check_constructors(scope):
    assert scope["layer"].bias is None and scope["layer"].num_hparams == 3
    published_order, no_h = scope["errors"]
    assert "bias: expected a bool" in published_order
    assert "num_hparams is keyword-only: HyperLinear(8, 5, num_hparams=3)" in published_order
    assert no_h.startswith("num_hparams: missing")


def _check_convert(scope):
    assert scope["lam"].grad is not None and scope["lam"].grad.shape == (4, 2)
    assert [type(m) for m in scope["net"]] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Flatten, torch.nn.Linear]
    assert [name for name, _, _ in scope["report"].converted] == ["0", "3"]


def _check_convert_lstm(scope):
    lm, out, h = scope["lm"], scope["out"], scope["h"]
    assert type(lm["lstm"]) is torch.nn.LSTM and scope["lam"].grad.shape == (4, 2)
    assert [name for name, _, _ in scope["report"].converted] == ["embed", "lstm", "decoder"]
    with torch.no_grad():  # V, C start at zero: the converted LSTM computed what the reverted nn.LSTM computes
        expected, (h_expected, _) = lm["lstm"](lm["embed"](scope["tokens"]))
    assert out.shape == (4, 7, 32) and h.shape == (2, 4, 32)
    assert_close_rel(out.detach(), expected, torch.float32)
    assert_close_rel(h.detach(), h_expected, torch.float32)


def _check_cnn_and_lstm(scope):
    assert scope["logits"].shape == (4, 10) and scope["word_logits"].shape == (7, 4, 50)
    assert scope["h_n"].shape == scope["c_n"].shape == (2, 4, 12)
    # The classes as a user builds them, with a λ that needs its gradient through both models.
    torch.manual_seed(0)
    hparams = torch.randn(4, 5, requires_grad=True)
    out = scope["HyperAlexNetHead"](5)(torch.randn(4, 3, 32, 32), hparams, torch.full((4,), 0.3))
    logits, _ = scope["HyperLanguageModel"](50, 16, 12, 5)(torch.randint(0, 50, (7, 4)), None, hparams,
                                                           torch.full((4,), 0.25))
    (out.sum() + logits.sum()).backward()
    assert hparams.grad is not None and torch.isfinite(hparams.grad).all()


def _check_stn_loop(scope):
    values, scales = scope["hp"].values(), scope["hp"].scales()
    assert set(values) == {"dropout", "noise"}
    # 100 validation steps after the warm-up moved λ from its start (0.05 each) and kept it in range.
    assert values["dropout"] != 0.05 and values["noise"] != 0.05
    assert 0.0 < values["dropout"] < 0.9 and 0.0 < values["noise"] < 1.0 and min(scales.values()) > 0


def _check_augment(scope):
    x, images = scope["x"], scope["images"]
    assert x.shape == images.shape and x.dtype == images.dtype and torch.isfinite(x).all()


def _check_backends(scope):
    layer, x, lam = scope["layer"], scope["x"], scope["lam"]
    with torch.no_grad():  # the formula in float64
        x, lam, w, wh, b, bh, m = (t.double() for t in (x, lam, layer.weight, layer.hyper_weight, layer.bias,
                                                        layer.hyper_bias, layer.hparam_weight))
        v, c = m.chunk(2)
        naive = x @ w.t() + (lam @ v.t()) * (x @ wh.t()) + b + (lam @ c.t()) * bh
    assert_close_rel(scope["y"].detach(), naive, torch.float32)


def _check_freeze(scope):
    net, plain, lam, x, stn_kernels = (scope[name] for name in ("net", "plain", "lam", "x", "stn_kernels"))
    assert [type(m) for m in plain] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Flatten,
                                        torch.nn.Linear]
    assert lam.shape == (1,) and isinstance(net[0], stn_kernels.HyperConv2d)  # the converted model is left as it was
    with torch.no_grad(), stn_kernels.hparams(torch.zeros(1)):
        at_zero = net(x)
    assert (plain(x) - at_zero).abs().max() > 1e-4  # λ was folded in: the trained hyper path counts


def _check_time_major(scope):
    lm, report = scope["lm"], scope["report"]
    assert report.batch_first is False and lm.decoder.hparams_batch_dim == 1
    assert sorted(report.tuned) == [("drop", "Dropout", "dropout"), ("embed_drop", "Dropout", "emb_dropout")]
    assert scope["logits"].shape == (35, 4, 50) and lm.decoder.hparam_weight.grad.abs().sum() > 0


def _check_transformers(scope):
    from stn_kernels.modules_attention import HyperTransformerEncoder

    encoder, lam = scope["encoder"], scope["lam"]
    assert type(encoder) is HyperTransformerEncoder and len(scope["report"].converted) == 2 * 4 + 1
    assert scope["out"].shape == scope["y"].shape == (4, 10, 16) and torch.isfinite(scope["y"]).all()
    assert lam.grad is not None and lam.grad.shape == (4, 2)
    assert type(scope["attention"]) is torch.nn.MultiheadAttention


def _run_torchrun_script(block, tmp_path):
    script = tmp_path / "stn_ddp.py"
    script.write_text(block, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # --standalone: a rendezvous on a free port, so parallel test runs cannot collide.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    # Both processes print to one pipe: a line may run into the other's (no ^...$ anchors).
    lines = dict(re.findall(r"rank (\d): (\{[^}]*\})", run.stdout))
    assert set(lines) == {"0", "1"}, run.stdout
    assert lines["0"] == lines["1"], lines                     # λ identical on both ranks
    assert lines["0"] != "{'dropout': 0.1}", lines             # and tuned: it moved from its start


def _check_trainer_page(scope):
    model, hp = scope["model"], scope["hp"]
    assert scope["augmented_trainer"].module is model and scope["trainer"].takes_sample is False
    # 4 training steps updated the batch norm's running statistics, the 2 validation steps did not.
    assert model[1].num_batches_tracked == 4
    assert not model.training                                     # the block's own eval(), kept by no step
    assert scope["tuned"].shape == (2,) and torch.equal(scope["tuned"], hp.unconstrained.detach())
    assert scope["logits"].shape == (32, 10) and torch.isfinite(scope["logits"]).all()
    assert hp.unconstrained.grad is not None and hp.unconstrained.grad.abs().sum() > 0   # λ got a hypergradient


def _check_checkpoints(scope):
    """docs/checkpoints.md: the run stopped after cycle 12 and resumed from its checkpoint of cycle 10 ends where the
    uninterrupted run ends, bit for bit, and both trained."""
    resumed, straight = scope["resumed"].state_dict(), scope["straight"].state_dict()
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    first, second = scope["resumed_trainer"], scope["straight_trainer"]
    assert first.train_steps_done == second.train_steps_done == 40 and first.valid_steps_done > 0
    assert torch.equal(first.hparams.unconstrained, second.hparams.unconstrained)
    assert torch.equal(first.hparams.raw_scale, second.hparams.raw_scale)
    stn = scope["stn"]
    initial = stn.HyperparameterSet([stn.Hyperparameter("dropout", init=0.2, low=0.0, high=0.9)])
    assert not torch.equal(first.hparams.unconstrained.detach(), initial.unconstrained.detach())   # λ moved


# A string only its block has -> the check of what it built; "torchrun" blocks run as a script on 2 processes.
CHECKS = {
    "class HyperMLP": _check_first_model,
    "stn_kernels.freeze(model, trainer.tuned_layer_input()": _check_quick_start,
    "HyperLinear(8, 5, False": _check_constructors,
    'torch.nn.Conv2d(3, 8, 3, padding="same")': _check_convert,
    "TorchLayoutHyperLSTM": _check_convert_lstm,
    "class HyperAlexNetHead": _check_cnn_and_lstm,
    "stn.STNTrainer(net,": _check_stn_loop,
    "stn.augment(images": _check_augment,
    'use_backend("reference")': _check_backends,
    "stn_kernels.freeze(net, lam)": _check_freeze,
    "dist.init_process_group": "torchrun",
    "class WordLM": _check_time_major,
    "augmented_trainer": _check_trainer_page,
    'dropout_hparam = "attention_dropout"': _check_transformers,
    "stn.load_checkpoint(path, trainer, model)": _check_checkpoints,
}


def _the_block(key: str) -> str:
    (block,) = [b for page in PAGES for b in _python_blocks(page) if key in b]
    return block


def test_every_python_block_has_exactly_one_check():
    blocks = [(page.name, b) for page in PAGES for b in _python_blocks(page)]
    assert len(blocks) >= len(CHECKS)
    for page, block in blocks:
        keys = [key for key in CHECKS if key in block]
        assert len(keys) == 1, f"{page}: a python block with checks {keys}:\n{block[:300]}"


@pytest.mark.parametrize("key", [k for k, check in CHECKS.items() if check != "torchrun"])
def test_block_runs_on_its_own(key):
    scope = {}
    exec(_the_block(key), scope)
    CHECKS[key](scope)


def test_torchrun_block_runs_on_two_processes(tmp_path):
    _run_torchrun_script(_the_block("dist.init_process_group"), tmp_path)


def test_bash_blocks_are_commands_not_python():
    """Blocks that must not run (pip install, make, torchrun) are fenced as bash, never as python."""
    text = README.read_text(encoding="utf-8")
    bash = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert any("pip install --no-build-isolation" in b for b in bash)
    assert not any(re.search(r"^\s*(pip|make|torchrun) ", b, re.M) for b in _python_blocks(README))


def _anchors(page: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped (but - and _), spaces to -."""
    headings = re.findall(r"^#+ (.*)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    """Every relative link of the README and docs/ names a file that exists (and a heading there, for #anchors)."""
    prose = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is not links
    links = re.findall(r"\]\(([^)\s]+)\)", prose)
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert relative or page != README
    for link in relative:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} -> {target} does not exist"
        if anchor:
            assert anchor in _anchors(target), f"{page.name}: {link}: no heading #{anchor} in {target.name}"
