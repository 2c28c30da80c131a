"""The models of ``python -m stn_kernels.bench --price``, as data: each written with plain ``torch.nn`` only, as a
user's own model would be, then converted with :func:`stn_kernels.convert` (every ``nn.Linear``, ``nn.Conv2d``,
``nn.Embedding``, ``nn.LSTM`` and ``nn.MultiheadAttention`` made a hyper layer, every ``nn.Dropout`` a
:class:`~stn_kernels.TunedDropout` whose rate the hyperparameter ``dropout`` sets per example; the transformer's
attention dropout too).

=================  ====================================================================================
model              what (sizes of the default; ``tiny``: the smoke-test sizes)
=================  ====================================================================================
``mlp``            784 → 1024 → 1024 → 10, ReLU and dropout after each hidden layer, B = 128
``cnn``            resnet-style: 3×3 conv stem (32 ch), a residual block, a stride-2 conv (64 ch), a residual
                   block, BatchNorm after every conv, global average pool, dropout, fc; 3×32×32 images, B = 32
``lstm-lm``        Embedding(2000, 256) → dropout → LSTM(256, 256), time-major → dropout → Linear(256, 2000);
                   T = 35, B = 20
``transformer-lm`` Embedding(2000, 256) + learned positions → 2 ``nn.TransformerEncoderLayer`` (4 heads,
                   feed-forward 1024, dropout 0.1, causal mask, batch first) → Linear(256, 2000); T = 64, B = 8
=================  ====================================================================================

Each :class:`PriceModel` makes the plain model, a fixed batch (inputs, targets) and says where the examples lie
(``batch_dim``, for ``STNTrainer``); the loss is cross-entropy over the targets (next-token for the LMs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """Linear layers with ReLU and dropout after each hidden one."""

    def __init__(self, widths: Tuple[int, ...], dropout: float = 0.2) -> None:
        super().__init__()
        layers = []
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if index < len(widths) - 2:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, classes] of x [B, widths[0]]."""
        return self.net(x)


class ResidualBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), 3×3 convolutions without bias, as resnet's basic block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, shaped as x."""
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetStyle(nn.Module):
    """Stem conv, a residual block, a stride-2 conv to twice the channels, a residual block, pool, dropout, fc."""

    def __init__(self, channels: int, classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(channels)
        self.block1 = ResidualBlock(channels)
        self.down = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(2 * channels)
        self.block2 = ResidualBlock(2 * channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, classes] of images x [B, 3, H, W]."""
        x = self.block1(F.relu(self.bn_stem(self.stem(x))))
        x = self.block2(F.relu(self.bn_down(self.down(x))))
        return self.fc(self.dropout(x.mean((2, 3))))


class LstmLm(nn.Module):
    """Embedding → dropout → nn.LSTM (time-major) → dropout → Linear decoder; logits of every position."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding, hidden, layers)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [T·B, vocab] of tokens [T, B]."""
        out, _ = self.lstm(self.dropout(self.embedding(tokens)))
        return self.decoder(self.dropout(out)).flatten(0, 1)


class TransformerLm(nn.Module):
    """Token embedding plus learned positions → causal nn.TransformerEncoder (batch first) → Linear decoder."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, context: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B·T, vocab] of tokens [B, T]."""
        steps = tokens.shape[1]
        x = self.embedding(tokens) + self.positions[:steps]
        x = self.encoder(x, mask=self.mask[:steps, :steps], is_causal=True)
        return self.decoder(x).flatten(0, 1)


@dataclass(frozen=True)
class PriceModel:
    """One model of the price table: ``make(sizes)`` the plain model, ``batch(sizes, generator)`` its
    (inputs, targets); ``sizes`` the default, ``tiny`` the smoke-test sizes; ``batch_dim`` where the examples lie in
    the inputs (1: time-major)."""

    name: str
    description: str
    make: Callable[[dict], nn.Module]
    batch: Callable[[dict, torch.Generator], Tuple[Tensor, Tensor]]
    sizes: Dict[str, int]
    tiny: Dict[str, int]
    batch_dim: int = 0
    shape: str = ""  # the batch, in words, for the table
    # convert(..., rates=): what the hyperparameter "dropout" tunes per example
    rates: Tuple[type, ...] = (nn.Dropout,)


def _classes(s: dict, gen: torch.Generator) -> Tensor:
    return torch.randint(0, s["classes"], (s["batch"],), generator=gen)


def _tokens(shape: Tuple[int, int], vocab: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, vocab, shape, generator=gen)


def _lm_batch(s: dict, gen: torch.Generator, time_major: bool) -> Tuple[Tensor, Tensor]:
    """Tokens and their next tokens, flattened as the LM's logits are (time-major: [T·B], else [B·T])."""
    shape = (s["steps"] + 1, s["batch"]) if time_major else (s["batch"], s["steps"] + 1)
    tokens = _tokens(shape, s["vocab"], gen)
    if time_major:
        return tokens[:-1], tokens[1:].flatten()
    return tokens[:, :-1], tokens[:, 1:].flatten()


MODELS: Dict[str, PriceModel] = {m.name: m for m in (
    PriceModel(
        "mlp", "MLP 784→1024→1024→10, ReLU, dropout 0.2",
        make=lambda s: Mlp((s["features"], s["hidden"], s["hidden"], s["classes"])),
        batch=lambda s, gen: (torch.randn(s["batch"], s["features"], generator=gen), _classes(s, gen)),
        sizes={"batch": 128, "features": 784, "hidden": 1024, "classes": 10},
        tiny={"batch": 6, "features": 12, "hidden": 16, "classes": 5}, shape="B=128"),
    PriceModel(
        "cnn", "resnet-style CNN, 32/64 ch, BatchNorm, 2 residual blocks, dropout, fc",
        make=lambda s: ResNetStyle(s["channels"], s["classes"]),
        batch=lambda s, gen: (torch.randn(s["batch"], 3, s["size"], s["size"], generator=gen), _classes(s, gen)),
        sizes={"batch": 32, "channels": 32, "size": 32, "classes": 10},
        tiny={"batch": 4, "channels": 4, "size": 8, "classes": 5}, shape="B=32, 3×32×32"),
    PriceModel(
        "lstm-lm", "Embedding(2000, 256) → LSTM(256, 256) → Linear(256, 2000), dropout 0.2",
        make=lambda s: LstmLm(s["vocab"], s["width"], s["width"]),
        batch=lambda s, gen: _lm_batch(s, gen, time_major=True),
        sizes={"batch": 20, "steps": 35, "vocab": 2000, "width": 256},
        tiny={"batch": 3, "steps": 5, "vocab": 11, "width": 8}, batch_dim=1, shape="T=35, B=20"),
    PriceModel(
        "transformer-lm", "Embedding(2000, 256) → 2 encoder layers (4 heads, ff 1024, causal) → Linear(256, 2000)",
        make=lambda s: TransformerLm(s["vocab"], s["width"], s["heads"], s["layers"], s["steps"]),
        batch=lambda s, gen: _lm_batch(s, gen, time_major=False),
        sizes={"batch": 8, "steps": 64, "vocab": 2000, "width": 256, "heads": 4, "layers": 2},
        tiny={"batch": 2, "steps": 6, "vocab": 11, "width": 8, "heads": 2, "layers": 1}, shape="B=8, T=64",
        rates=(nn.Dropout, nn.MultiheadAttention)),
)}
