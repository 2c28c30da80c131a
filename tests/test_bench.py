"""Smoke tests of the benchmark (the stn_kernels.bench package) on tiny shapes."""

import ast
import csv
import io
import math
import os
import subprocess
import sys

import pytest
import torch

from stn_kernels.bench import LAYERS, cli, harness, linear, lstm, main, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "stn_kernels", "bench")

CPU_DEFAULT = ["published", "packed-gemm", "prepacked-gemm", "stn:reference"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_main_writes_every_provider_row(tmp_path, capsys):
    out = tmp_path / "res"
    rows = main(["--quick", "--shape", "6,3,16,24", "--modes", "fwd,bwd,fwd+bwd", "--out", str(out)])
    printed = capsys.readouterr().out

    csv_rows = _rows(out / "results.csv")
    with open(out / "results.csv", newline="") as f:  # the columns stn_kernels.backend_rules reads
        assert next(csv.reader(f)) == ["case", "B", "H", "K", "N", "dtype", "mode", "provider", "median_ms", "samples",
                                       "iqr_pct", "vs_published", "vs_floor", "wall_ms", "peak_mib",
                                       "mem_vs_published", "note"]
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
    assert md.splitlines()[0] == "# stn_kernels benchmark: hyper_linear"
    assert "torch " + torch.__version__ in md
    if (out / "speedup.png").exists():
        assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "speedup.png not written" in md


def test_provider_api_matches_published():
    case = linear.make_case("5,2,12,10", torch.float32, "cpu")
    expected = harness.provider_fn("published", case, "fwd")()
    for p in ("packed-gemm", "prepacked-gemm", "stn:reference", "floor"):
        out = harness.provider_fn(p, case, "fwd")()
        if p == "floor":
            assert out.shape == (5, 20)
        else:
            torch.testing.assert_close(out, expected)
        grads = harness.provider_fn(p, case, "bwd")()
        assert all(torch.isfinite(g).all() for g in grads)
    assert all(not impl.notes for impl in case.impls.values()), {k: v.notes for k, v in case.impls.items()}


def test_time_budget_stops_early(tmp_path):
    rows = main(["--quick", "--shape", "4,2,8,8", "--shape", "4,2,8,16", "--modes", "fwd",
                       "--providers", "published", "--time-budget", "1e-9", "--out", str(tmp_path)])
    assert rows == []
    assert "time budget" in (tmp_path / "results.md").read_text()


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="unknown provider"):
        main(["--providers", "nope"])
    with pytest.raises(SystemExit, match="B,H,K,N"):
        main(["--shape", "1,2,3"])


@pytest.mark.parametrize("value", ["-3", "0", "two", "1.5"])
def test_threads_must_be_a_positive_whole_number(value, capsys):
    """A usage error naming --threads, the range and the value (it was a raw traceback from torch for -3, and 0
    was silently ignored)."""
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--threads", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m stn_kernels.bench" in err
    assert f"argument --threads: expected a whole number of threads, 1 or more, got '{value}'" in err


def test_threads_accepts_a_count():
    assert cli.parse_args(["--threads", "3"]).threads == 3 and cli.parse_args([]).threads is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--gpu", "--quick"])
    assert isinstance(info.value.code, str) and "--gpu needs a CUDA device" in info.value.code
    assert capsys.readouterr().out == ""  # nothing run, no table started


@pytest.mark.parametrize("layer, shape", [("conv2d", "4,3,8,16,8"), ("embedding", "4,3,50,32,6")])
def test_other_layers_run_through_the_same_harness(layer, shape, tmp_path, capsys):
    main(["--layer", layer, "--quick", "--shape", shape, "--modes", "fwd,fwd+bwd", "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    for provider in ("published", "stn:reference"):
        assert f"| {provider} |" in table, provider
    assert "MISMATCH" not in table and "error" not in table.lower()


def test_lstm_layer_from_the_command_line(tmp_path):
    """`python -m stn_kernels.bench --layer lstm` (the package's __main__) runs and writes its table."""
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "stn_kernels.bench", "--layer", "lstm", "--quick", "--shapes",
                           "lstm-tiny", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# stn_kernels benchmark: HyperLSTM")
    for mode in ("fwd", "fwd+bwd"):
        for provider in ("published", "stn:reference"):
            assert f"| lstm-tiny-T4-L2 | float32 | {mode} | {provider} |" in proc.stdout, (mode, provider)
    table = (out / "results.md").read_text()
    assert "| lstm-tiny-T4-L2 | float32 | fwd+bwd | stn:reference |" in table
    assert "MISMATCH" not in table and "error" not in table.lower()
    assert len(_rows(out / "results.csv")) == 4


def test_lstm_alias_means_layer_lstm(tmp_path):
    """--lstm SHAPES (the old flag) is --layer lstm --shapes SHAPES; it does not combine with another layer."""
    rows = main(["--quick", "--modes", "fwd,fwd+bwd", "--lstm", "lstm-tiny", "--providers", "published,stn:reference",
                 "--out", str(tmp_path)])
    assert [(r.case.name, r.mode, r.provider) for r in rows] == [
        ("lstm-tiny-T4-L2", m, p) for m in ("fwd", "fwd+bwd") for p in ("published", "stn:reference")]
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("# stn_kernels benchmark: HyperLSTM") and "| lstm-tiny" in table
    assert "MISMATCH" not in table and "error" not in table.lower()
    args = cli.parse_args(["--lstm"])
    assert (args.layer, args.shapes) == ("lstm", "lstm-ptb")
    with pytest.raises(SystemExit, match="--lstm means --layer lstm"):
        main(["--lstm", "lstm-tiny", "--layer", "conv2d"])
    with pytest.raises(SystemExit, match="B,T,K,N,L,H"):
        main(["--lstm", "lstm-tiny", "--shape", "6,3,16,24"])  # a linear shape is not an LSTM one


def test_benchmark_hook_tiny_case():
    """The LSTM layer through the generic harness (moved here from tests/test_hyper_lstm.py)."""
    case = LAYERS["lstm"].make_case("lstm-tiny")
    assert case.shape.name == "lstm-tiny-T4-L2" and case.layer.providers is lstm.PROVIDERS
    expected = harness.provider_fn("published", case, "fwd")()
    got = harness.provider_fn("stn:reference", case, "fwd")()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grads = harness.provider_fn("stn:reference", case, "fwd+bwd")()
    assert len(grads) == len(lstm.grad_names(case.spec)) and all(torch.isfinite(g).all() for g in grads)
    assert all(not impl.notes for impl in case.impls.values()), {k: v.notes for k, v in case.impls.items()}
    rep = report.Report(None, ["lstm"], stream=io.StringIO())
    assert harness.run_case(case, ["published", "stn:reference", "floor"], ["fwd"], harness.QUICK, harness.Options(),
                            rep, None, {"spent": 0.0, "budget": None})
    assert [r.provider for r in rep.rows] == ["published", "stn:reference"]
    assert all(r.median_ms and r.median_ms > 0 and "MISMATCH" not in r.note for r in rep.rows)
    assert any(n.startswith("floor skipped") for n in rep.notes)  # the LSTM layer has no floor


def test_shape_help_shows_every_layers_format():
    text = cli.build_parser().format_help()
    for layer in LAYERS.values():
        assert layer.shape_format in text, layer.name
    assert "B,T,K,N,L,H" in text and "B,H,K,N" in text


def _bench_sources():
    return {name[:-3]: ast.parse(open(os.path.join(BENCH_DIR, name), encoding="utf-8").read(), name)
            for name in sorted(os.listdir(BENCH_DIR)) if name.endswith(".py")}


def _imports(tree, modules):
    """(modules of stn_kernels.bench that ``tree`` imports, other stn_kernels modules and names it imports)."""
    local, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                local.add(node.module.split(".")[0])
            else:
                local.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            outside.add("." * node.level + (node.module or ""))  # reaches outside the package: not allowed
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stn_kernels"):
            parts = node.module.split(".")
            if parts[:2] == ["stn_kernels", "bench"]:
                local.update([parts[2]] if len(parts) > 2 else [a.name for a in node.names])
            else:
                outside.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[:2] == ["stn_kernels", "bench"] and len(parts) > 2:
                    local.add(parts[2])
                elif parts[0] == "stn_kernels":
                    outside.add(a.name)
    return local & set(modules), outside


def test_bench_package_has_no_import_cycle_and_a_layer_free_harness():
    sources = _bench_sources()
    graph, outside = {}, {}
    for name, tree in sources.items():
        graph[name], outside[name] = _imports(tree, sources)
    layers = {"linear", "conv2d", "embedding", "lstm"}
    whole_step_modes = {"stn_step", "augment", "host_overhead", "price", "price_models"}  # modes with their own table
    assert layers | whole_step_modes | {"harness", "report", "cli", "__init__", "__main__"} == set(sources)
    for base in ("harness", "report"):
        assert not graph[base] & (layers | whole_step_modes | {"cli"}), (base, graph[base])
        assert "hyper_linear" not in open(os.path.join(BENCH_DIR, base + ".py"), encoding="utf-8").read()
    assert not graph["report"], graph["report"]  # the report needs nothing of the harness

    state = {}

    def visit(name, path):  # depth-first search for a cycle
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(path + [name])
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
    # Only public names of the rest of stn_kernels, never a relative import out of the package.
    for name, imported in outside.items():
        bad = [i for i in imported if i.startswith(".") or any(part.startswith("_") for part in i.split("."))]
        assert not bad, (name, bad)
    for name in sources:
        with open(os.path.join(BENCH_DIR, name + ".py"), encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert len(lines) <= 700, (name, len(lines))
        assert max(map(len, lines), default=0) <= 120, name


@pytest.mark.triton
def test_compiled_providers_share_a_case_without_recompiling():
    """stn:triton+compile (the registered op in a compiled graph; Triton interpreter on CPU) agrees with
    published, and building it does not reset published+compile's compiled code in the same case."""
    from torch._dynamo.utils import counters

    case = linear.make_case("5,2,12,10", torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    expected = harness.provider_fn("published", case, "fwd")()
    published_compiled = harness.provider_fn("published+compile", case, "fwd")
    stn_compiled = harness.provider_fn("stn:triton+compile", case, "fwd")
    frames = counters["frames"]["total"]
    torch.testing.assert_close(published_compiled(), expected)
    torch.testing.assert_close(stn_compiled(), expected, rtol=1e-5, atol=1e-5)
    assert counters["frames"]["total"] == frames, "a compiled provider was recompiled"
    grads = harness.provider_fn("stn:triton+compile", case, "fwd+bwd")()
    assert all(torch.isfinite(g).all() for g in grads)
    assert harness.is_compiled("stn:triton+compile") and not harness.is_compiled("stn:triton")
    assert all(not impl.notes for impl in case.impls.values()), {k: v.notes for k, v in case.impls.items()}


def _row(shape, mode, provider, ms, wall=None, mem=None):
    return report.Row(linear.ALL_SHAPES[shape], "bfloat16", mode, provider, ms, wall_ms=wall, mem_vs_published=mem)


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
    lines = linear.targets_summary(rows)
    table = {line.split(" | ")[0].strip("| ") + "/" + line.split(" | ")[2]: line.split(" | ")[3:]
             for line in lines if line.startswith("| alexnet") or line.startswith("| large")}
    fc1 = [c.strip(" |") for c in table["alexnet-fc1/stn:triton"]]
    assert fc1 == ["2.00", "2.50 / 2.20 ✓", "1.25 / 1.00 ✗", "0.60 ✓"]  # no floor target below B = 1024
    large = [c.strip(" |") for c in table["large-4k/stn:triton"]]
    assert large == ["1.05 / 1.20 ✗", "1.33", "–", "0.80 ✗"]  # speed-up targets are for the STN shapes
    assert linear.targets_summary([r for r in rows if r.provider != "stn:triton"]) == []


def test_targets_section_in_the_markdown_of_a_linear_run(tmp_path):
    main(["--quick", "--shape", "6,3,16,24", "--modes", "fwd,fwd+bwd", "--providers", "published,stn:reference",
                "--out", str(tmp_path)])
    assert "## Targets" not in (tmp_path / "results.md").read_text()  # no fused provider ran
    rep = report.Report(None, ["t"], summary=linear.targets_summary)
    rep.rows = [_row("mlp-fc1", "fwd+bwd", "published", 0.3), _row("mlp-fc1", "fwd+bwd", "stn:triton", 0.1)]
    assert "| mlp-fc1 | bfloat16 | stn:triton | – | 3.00 ✓ | – | – |" in rep.markdown()


def test_backend_with_sets_and_restores_module_attributes():
    """The scope of the GPU-only Triton variants (stn:triton:two-conv, ...), on a stand-in module."""
    import types

    kernels = types.ModuleType("kernels")
    kernels.PACKED, kernels.TABLE_GRAD = True, "atomic"
    with harness.backend_with("reference", kernels, PACKED=False, TABLE_GRAD="sorted"):
        assert (kernels.PACKED, kernels.TABLE_GRAD) == (False, "sorted")
    assert (kernels.PACKED, kernels.TABLE_GRAD) == (True, "atomic")


def test_stn_step_mode_writes_its_table(tmp_path, capsys):
    torch._dynamo.reset()
    assert main(["--stn-step", "--quick", "--out", str(tmp_path)]) == []
    text = (tmp_path / "stn_step.md").read_text()
    assert text in capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| digits-mlp |"))
    eager, compiled, ratio = (cell.strip() for cell in row.split("|")[5:8])
    assert float(eager) > 0 and float(compiled) > 0 and ratio.endswith("×")
    with pytest.raises(SystemExit, match="unknown STN step model nope"):
        main(["--stn-step", "nope"])


def test_augment_layer_writes_its_table(tmp_path, capsys):
    pytest.importorskip("torchvision")
    assert main(["--layer", "augment", "--quick", "--shape", "4,3,8,8", "--out", str(tmp_path)]) == []
    text = (tmp_path / "augment.md").read_text()
    assert text in capsys.readouterr().out
    for provider in ("stn", "published-pil", "torchvision-v2"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {provider} |"))
        assert float(row.split("|")[3].replace(",", "")) > 0, row
    with pytest.raises(SystemExit, match="unknown provider nope"):
        main(["--layer", "augment", "--providers", "nope"])


def test_host_overhead_mode_writes_its_table(tmp_path, capsys):
    """--host-overhead --quick: one row per (layer, mode) with the three providers' times, the ratio and the
    target marked; the same rows in host_overhead.csv. (No timing is asserted: a smoke test.)"""
    from stn_kernels.bench import host_overhead

    main(["--host-overhead", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    md = (tmp_path / "host_overhead.md").read_text()
    assert md == printed and md.startswith("# stn_kernels host overhead")
    assert ("| layer | shape | mode | ours µs | published µs | torch µs | ours / published | target | | ours / torch | "
            "target | |") in md
    assert "torch threads 1," in md and "1 thread(s)" in md  # the mode's default
    rows = _rows(tmp_path / "host_overhead.csv")
    layers = ("HyperLinear", "HyperConv2d", "HyperEmbedding", "HyperLSTM step")
    assert [(r["layer"], r["mode"]) for r in rows] == [(layer, m) for layer in layers for m in host_overhead.MODES]
    for r in rows:
        for column in ("ours_us", "published_us", "torch_us"):
            assert math.isfinite(float(r[column])) and float(r[column]) > 0, r
        assert math.isfinite(float(r["ratio"])) and float(r["ratio"]) > 0, r  # the median of per-round ratios
        assert float(r["target"]) == (0.8 if r["layer"] == "HyperLinear" else 1.0)
        assert r["met"] == str(float(r["ratio"]) <= float(r["target"]))
        assert float(r["ratio_torch"]) > 0, r
        if r["layer"] == "HyperLinear":
            assert float(r["target_torch"]) == 1.5 and r["met_torch"] == str(float(r["ratio_torch"]) <= 1.5)
        else:
            assert r["target_torch"] == r["met_torch"] == ""
        line = next(line for line in md.splitlines() if line.startswith(f"| {r['layer']} |") and
                    f"| {r['mode']} |" in line)
        assert "| met |" in line or "| not met |" in line, line


def test_cpu_table_prints_only_its_columns_a_legend_and_one_closing_line(tmp_path, capsys):
    main(["--quick", "--shape", "6,3,16,24", "--modes", "fwd", "--providers", "published,stn:reference",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| case |"))
    # No CUDA-only columns; the noise of each median (samples, interquartile range) is.
    assert header == "| case | dtype | mode | provider | median ms | samples | IQR % | vs published | note |"
    assert header in (tmp_path / "results.md").read_text()
    lines = out.rstrip("\n").splitlines()
    assert lines[-1].startswith("wall time ") and f"results in {tmp_path}" in lines[-1]
    assert sum(line.startswith("wall time") or line.startswith("- wall time") for line in lines) == 1
    assert any(line.startswith("median ms: median time of one call") for line in lines)  # the legend
    assert "vs floor" not in out  # nor in the legend
