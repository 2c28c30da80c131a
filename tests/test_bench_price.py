"""Smoke tests of ``python -m stn_kernels.bench --price`` (stn_kernels/bench/price.py) at the models' tiny sizes:
the tables, the CSV and the plot are written with a row per provider, ratios taken against ``plain``, and the FLOP
floor counted as documented. No timing is asserted."""

import csv

import pytest
import torch
from torch import nn

from stn_kernels.bench import main, price, price_models


def test_eager_providers_of_every_model(tmp_path, capsys):
    results = price.run(list(price_models.MODELS), price.EAGER, quick=True, out=str(tmp_path), tiny=True)
    assert [r.model for r in results] == list(price_models.MODELS)
    for r in results:
        assert set(r.ms) == set(price.EAGER) and all(v > 0 for v in r.ms.values()), r
        assert r.ratios["plain"] == [1.0] * r.rounds and len(r.ratios["converted"]) == r.rounds
        assert not r.notes, r.notes
    md = (tmp_path / "price.md").read_text()
    assert md.startswith("# stn_kernels benchmark: the price of self-tuning") and "load average" in md
    assert md in capsys.readouterr().out
    for name in price_models.MODELS:
        assert any(line.startswith(f"| {name} | ") for line in md.splitlines()), name
    with open(tmp_path / "price.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["provider"]) for r in rows] == [(m, p) for m in price_models.MODELS for p in price.EAGER]
    assert all(float(r["vs_plain_q1"]) <= float(r["vs_plain"]) <= float(r["vs_plain_q3"]) for r in rows)
    assert (tmp_path / "price.png").exists()


def test_flop_floor_counts_the_products_of_the_converted_layers_twice():
    floors = {}
    for name, spec in price_models.MODELS.items():
        torch.manual_seed(0)
        base = spec.make(spec.tiny)
        inputs, targets = spec.batch(spec.tiny, torch.Generator().manual_seed(0))
        floors[name] = price.flop_floor(spec, base, inputs, targets)[0]
    # All products in hyper layers: exactly twice (BatchNorm and pooling count no FLOPs).
    assert floors["mlp"] == floors["cnn"] == floors["lstm-lm"] == 2.0
    # Attention's score and weighted-sum products are not doubled: less than 2.
    assert 1.0 < floors["transformer-lm"] < 2.0


def test_converted_names_are_the_outermost_replaced_modules():
    spec = price_models.MODELS["transformer-lm"]
    base = spec.make(spec.tiny)
    names = price.converted_names(spec, base)
    assert "encoder.layers.0.self_attn" in names and "lstm" not in names
    assert not any(n.startswith("encoder.layers.0.self_attn.") for n in names)  # its out_proj counted once
    assert {"embedding", "decoder", "encoder.layers.0.linear1", "encoder.layers.0.linear2"} <= set(names)
    lstm = price_models.MODELS["lstm-lm"]
    assert set(price.converted_names(lstm, lstm.make(lstm.tiny))) == {"embedding", "lstm", "decoder"}
    assert isinstance(lstm.make(lstm.tiny).lstm, nn.LSTM)


def test_command_line_rejects_unknown_models_and_providers():
    with pytest.raises(SystemExit, match="unknown price model nope"):
        main(["--price", "nope"])
    with pytest.raises(SystemExit, match="unknown price provider nope"):
        main(["--price", "mlp", "--providers", "nope"])
