"""Smoke tests of the benchmark harness (stn_kernels.bench) on a tiny shape."""

import csv
import math

import pytest
import torch

from stn_kernels import bench

CPU_DEFAULT = ["published", "packed-gemm", "prepacked-gemm", "stn:reference"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_main_writes_every_provider_row(tmp_path, capsys):
    out = tmp_path / "res"
    rows = bench.main(["--quick", "--shape", "6,3,16,24", "--modes", "fwd,bwd,fwd+bwd", "--out", str(out)])
    printed = capsys.readouterr().out

    csv_rows = _rows(out / "results.csv")
    md = (out / "results.md").read_text()
    assert len(rows) == len(csv_rows) == len(CPU_DEFAULT) * 3
    seen = {(r["mode"], r["provider"]) for r in csv_rows}
    assert seen == {(m, p) for m in ("fwd", "bwd", "fwd+bwd") for p in CPU_DEFAULT}
    for r in csv_rows:
        assert r["case"] == "custom-6x3x16x24" and r["dtype"] == "float32"
        assert (r["B"], r["H"], r["K"], r["N"]) == ("6", "3", "16", "24")
        ms = float(r["median_ms"])
        assert math.isfinite(ms) and ms > 0, r
        assert float(r["vs_published"]) > 0
        assert "MISMATCH" not in r["note"] and "error" not in r["note"], r
    for p in CPU_DEFAULT:
        assert f"| custom-6x3x16x24 | float32 | fwd+bwd | {p} |" in md
        assert f"| {p} |" in printed
    assert md.splitlines()[0].startswith("# stn_kernels benchmark")
    assert "torch " + torch.__version__ in md
    if (out / "speedup.png").exists():
        assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "speedup.png not written" in md


def test_provider_api_matches_published():
    case = bench.make_case("5,2,12,10", torch.float32, "cpu")
    expected = bench.provider_fn("published", case, "fwd")()
    for p in ("packed-gemm", "prepacked-gemm", "stn:reference", "floor"):
        out = bench.provider_fn(p, case, "fwd")()
        if p == "floor":
            assert out.shape == (5, 20)
        else:
            torch.testing.assert_close(out, expected)
        grads = bench.provider_fn(p, case, "bwd")()
        assert all(torch.isfinite(g).all() for g in grads)
    assert all(not impl.notes for impl in case.impls.values()), {k: v.notes for k, v in case.impls.items()}


def test_time_budget_stops_early(tmp_path):
    rows = bench.main(["--quick", "--shape", "4,2,8,8", "--shape", "4,2,8,16", "--modes", "fwd",
                       "--providers", "published", "--time-budget", "1e-9", "--out", str(tmp_path)])
    assert rows == []
    assert "time budget" in (tmp_path / "results.md").read_text()


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="unknown provider"):
        bench.main(["--providers", "nope"])
    with pytest.raises(SystemExit, match="B,H,K,N"):
        bench.main(["--shape", "1,2,3"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--gpu", "--quick"])
    assert isinstance(info.value.code, str) and "--gpu needs a CUDA device" in info.value.code
    assert capsys.readouterr().out == ""  # nothing run, no table started


@pytest.mark.parametrize("layer, shape", [("conv2d", "4,3,8,16,8"), ("embedding", "4,3,50,32,6")])
def test_other_layers_run_through_the_same_harness(layer, shape, tmp_path, capsys):
    bench.main(["--layer", layer, "--quick", "--shape", shape, "--modes", "fwd,fwd+bwd", "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    for provider in ("published", "stn:reference"):
        assert f"| {provider} |" in table, provider
    assert "MISMATCH" not in table and "error" not in table.lower()


def test_lstm_cases_run_through_the_same_harness(tmp_path):
    bench.main(["--quick", "--shape", "6,3,16,24", "--modes", "fwd,fwd+bwd", "--lstm", "lstm-tiny",
                "--providers", "published,stn:reference", "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    assert "| lstm-tiny" in table
    assert "MISMATCH" not in table and "error" not in table.lower()


@pytest.mark.triton
def test_compiled_providers_share_a_case_without_recompiling():
    """stn:triton+compile (the registered op in a compiled graph; Triton interpreter on CPU) agrees with
    published, and building it does not reset published+compile's compiled code in the same case."""
    from torch._dynamo.utils import counters

    case = bench.make_case("5,2,12,10", torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    expected = bench.provider_fn("published", case, "fwd")()
    published_compiled = bench.provider_fn("published+compile", case, "fwd")
    stn_compiled = bench.provider_fn("stn:triton+compile", case, "fwd")
    frames = counters["frames"]["total"]
    torch.testing.assert_close(published_compiled(), expected)
    torch.testing.assert_close(stn_compiled(), expected, rtol=1e-5, atol=1e-5)
    assert counters["frames"]["total"] == frames, "a compiled provider was recompiled"
    grads = bench.provider_fn("stn:triton+compile", case, "fwd+bwd")()
    assert all(torch.isfinite(g).all() for g in grads)
    assert bench.is_compiled("stn:triton+compile") and not bench.is_compiled("stn:triton")
    assert all(not impl.notes for impl in case.impls.values()), {k: v.notes for k, v in case.impls.items()}


def _row(shape, mode, provider, ms, wall=None, mem=None):
    return bench.Row(bench.ALL_SHAPES[shape], "bfloat16", mode, provider, ms, wall_ms=wall, mem_vs_published=mem)


def test_targets_summary_checks_each_target_where_it_applies():
    rows = [
        # alexnet-fc1 (STN, B=128): 2.5x published (2.2x wall), 1.25x published+compile; memory 0.6
        _row("alexnet-fc1", "fwd", "floor", 0.010), _row("alexnet-fc1", "fwd", "stn:triton", 0.020),
        _row("alexnet-fc1", "fwd+bwd", "published", 0.100, wall=0.110),
        _row("alexnet-fc1", "fwd+bwd", "published+compile", 0.050, wall=0.050),
        _row("alexnet-fc1", "fwd+bwd", "stn:triton", 0.040, wall=0.050, mem=0.6),
        # large-4k (B=4096): forward 1.05x the floor by median but 1.2x by wall; memory 0.8
        _row("large-4k", "fwd", "floor", 1.0, wall=1.0), _row("large-4k", "fwd", "stn:triton", 1.05, wall=1.2),
        _row("large-4k", "fwd+bwd", "published", 4.0), _row("large-4k", "fwd+bwd", "stn:triton", 3.0, mem=0.8),
        _row("large-4k", "fwd", "published", 2.0),
    ]
    lines = bench.targets_summary(rows)
    table = {line.split(" | ")[0].strip("| ") + "/" + line.split(" | ")[2]: line.split(" | ")[3:]
             for line in lines if line.startswith("| alexnet") or line.startswith("| large")}
    fc1 = [c.strip(" |") for c in table["alexnet-fc1/stn:triton"]]
    assert fc1 == ["2.00", "2.50 / 2.20 ✓", "1.25 / 1.00 ✗", "0.60 ✓"]  # no floor target below B = 1024
    large = [c.strip(" |") for c in table["large-4k/stn:triton"]]
    assert large == ["1.05 / 1.20 ✗", "1.33", "–", "0.80 ✗"]  # speed-up targets are for the STN shapes
    assert bench.targets_summary([r for r in rows if r.provider != "stn:triton"]) == []


def test_targets_section_in_the_markdown_of_a_linear_run(tmp_path):
    bench.main(["--quick", "--shape", "6,3,16,24", "--modes", "fwd,fwd+bwd", "--providers", "published,stn:reference",
                "--out", str(tmp_path)])
    assert "## Targets" not in (tmp_path / "results.md").read_text()  # no fused provider ran
    report = bench._Report(None, ["t"], summary=bench.targets_summary)
    report.rows = [_row("mlp-fc1", "fwd+bwd", "published", 0.3), _row("mlp-fc1", "fwd+bwd", "stn:triton", 0.1)]
    assert "| mlp-fc1 | bfloat16 | stn:triton | – | 3.00 ✓ | – | – |" in report.markdown()
