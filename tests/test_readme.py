"""The README's code examples run as written (the toolkit loop needs the user's data loaders and is
covered by tests/test_stn_toolkit.py instead)."""

import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _block_after(heading: str) -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_example_runs():
    scope = {}
    exec(_block_after("## Usage: swap a layer into a model"), scope)
    assert scope["hparams"].grad is not None and scope["hparams"].grad.shape == (128, 3)


def test_stn_cnn_and_lstm_example_runs():
    scope = {}
    exec(_block_after("## An STN CNN and an STN LSTM"), scope)
    torch.manual_seed(0)
    hparams = torch.randn(4, 5, requires_grad=True)
    cnn = scope["HyperAlexNetHead"](5)
    out = cnn(torch.randn(4, 3, 32, 32), hparams, torch.full((4,), 0.3))
    assert out.shape == (4, 10)
    lm = scope["HyperLanguageModel"](50, 16, 12, 5)
    logits, (h, c) = lm(torch.randint(0, 50, (7, 4)), None, hparams, torch.full((4,), 0.25))
    assert logits.shape == (7, 4, 50) and h.shape == c.shape == (2, 4, 12)
    (out.sum() + logits.sum()).backward()
    assert hparams.grad is not None and torch.isfinite(hparams.grad).all()


def test_constructor_example_runs():
    scope = {}
    exec(_block_after("**Constructors** are"), scope)
    assert scope["layer"].bias is None and scope["layer"].num_hparams == 3


def test_convert_with_hparams_block_runs():
    text = open(README, encoding="utf-8").read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "stn_kernels.hparams(lam)" in b)
    scope = {}
    exec(block, scope)
    assert scope["lam"].grad is not None and scope["lam"].grad.shape == (4, 2)
    assert [type(m) for m in scope["net"]] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Flatten, torch.nn.Linear]
