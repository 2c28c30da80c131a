"""torch.compile(fullgraph=True) on the CPU: tiny STN models match eager in the forward and in every
gradient (λ and the input included)."""

import pytest
import torch
from torch import nn

import stn_kernels

from _naive import assert_close_rel, randomize_module_

H = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ConvNet(nn.Module):
    """HyperConv2d -> ReLU -> HyperLinear -> ReLU -> HyperLinear."""

    def __init__(self):
        super().__init__()
        self.conv = stn_kernels.HyperConv2d(3, 4, 3, num_hparams=H, stride=2, padding=1)
        self.fc1 = stn_kernels.HyperLinear(4 * 3 * 4, 10, num_hparams=H)
        self.fc2 = stn_kernels.HyperLinear(10, 5, num_hparams=H)

    def forward(self, x, hparams):
        y = torch.relu(self.conv(x, hparams)).flatten(1)
        y = torch.relu(self.fc1(y, hparams))
        return self.fc2(y, hparams)


class EmbeddingNet(nn.Module):
    """HyperEmbedding on [B, T] -> mean over T -> HyperLinear."""

    def __init__(self):
        super().__init__()
        self.emb = stn_kernels.HyperEmbedding(20, 8, num_hparams=H)
        self.fc = stn_kernels.HyperLinear(8, 5, num_hparams=H)

    def forward(self, idx, hparams):
        return self.fc(torch.tanh(self.emb(idx, hparams)).mean(1), hparams)


def _forward_backward(model, x, hparams, g):
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    hparams = hparams.detach().clone().requires_grad_()
    out = model(x, hparams)
    inputs = [hparams] + ([x] if x.is_floating_point() else []) + list(model.parameters())
    grads = torch.autograd.grad(out, inputs, g)
    names = (["hparams"] + (["x"] if x.is_floating_point() else [])
             + [n.removeprefix("_orig_mod.") for n, _ in model.named_parameters()])
    return out, dict(zip(names, grads))


def _check_compiled_matches_eager(model, x, hparams):
    for m in model.modules():
        if isinstance(m, (stn_kernels.HyperLinear, stn_kernels.HyperConv2d, stn_kernels.HyperEmbedding)):
            randomize_module_(m)
    compiled = torch.compile(model, fullgraph=True)
    g = torch.randn(x.shape[0], 5)
    out, grads = _forward_backward(model, x, hparams, g)
    out_c, grads_c = _forward_backward(compiled, x, hparams, g)
    assert_close_rel(out_c, out, torch.float32, "output")
    assert grads_c.keys() == grads.keys()
    for name in grads:
        assert_close_rel(grads_c[name], grads[name], torch.float32, f"grad {name}")


def test_conv_linear_model():
    _check_compiled_matches_eager(ConvNet(), torch.randn(4, 3, 5, 7), torch.randn(4, H))


def test_embedding_linear_model():
    _check_compiled_matches_eager(EmbeddingNet(), torch.randint(0, 20, (4, 6)), torch.randn(4, H))


def test_conv_linear_model_channels_last_input():
    x = torch.randn(4, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    _check_compiled_matches_eager(ConvNet(), x, torch.randn(4, H))
