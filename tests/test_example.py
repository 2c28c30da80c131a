"""examples/stn_digits.py: the --quick run end to end (as a user runs it), and its determinism."""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "stn_digits.py")

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _load_example():
    spec = importlib.util.spec_from_file_location("stn_digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_its_table_and_plot(tmp_path):
    # No timed assertion (a loaded CI machine would make it flaky); the timeout only guards against a hang.
    start = time.perf_counter()
    run = subprocess.run([sys.executable, EXAMPLE, "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    print(f"--quick took {time.perf_counter() - start:.1f} s")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "dropout1 / 2 / noise / bright / contrast / holes / length" in out and "val loss" in out
    assert "test acc" in out
    for row in ("MLP    STN", "MLP    grid search", "MLP    random search", "CNN    STN", "CNN    grid search",
                "CNN    random search"):
        assert row in out, row
    png = tmp_path / "stn_digits_schedules.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["table"] in out
    runs = results["runs"]
    expected_runs = {(m, k) for m in ("mlp", "cnn") for k in ("stn", "grid", "random")}
    assert {(r["model"], r["method"]) for r in runs} == expected_runs
    # Every run trained for the same number of weight updates, and STN recorded its schedule.
    assert {r["best_step"] <= results["args"]["steps"] for r in runs} == {True}
    stn_schedule = next(r for r in runs if r["method"] == "stn")["schedule"]
    assert stn_schedule[-1]["step"] == results["args"]["steps"]
    for r in runs:
        assert 0.0 < r["val_loss"] < 2.3 and 0.1 < r["val_acc"] <= 1.0   # better than chance (log 10 ≈ 2.3, 10 %)
        if r["method"] != "random":
            # STN and the grid start from weak augmentation: far better than chance. A random point may draw
            # four holes of side up to 8 on 8×8 images (the seeded quick run's CNN point learns little: 26 %).
            assert 0.5 < r["val_acc"], r
        assert set(r["hparams"]) == {"dropout1", "dropout2", "noise", "bright", "contrast", "cutholes", "cutlength"}
    # The schedule records the augmentation hyperparameters STN tunes, discrete ones as integers.
    assert {0 <= s["cutholes"] <= 4 and s["cutholes"] == int(s["cutholes"]) for s in stn_schedule} == {True}
    assert {0 <= s["cutlength"] <= 8 and 0 <= s["bright"] <= 1 for s in stn_schedule} == {True}


def test_training_is_deterministic():
    example = _load_example()
    args = example.parse_args(["--steps", "12", "--workers", "1"])
    args.eval_every = 4
    data = example.load_digits_splits(0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, method in (("mlp", "stn"), ("cnn", "grid")):
            values = dict(example.START)
            first = example.train_run(kind, method, values, data, args, log=lambda line: None)
            second = example.train_run(kind, method, values, data, args, log=lambda line: None)
            assert (first.val_loss, first.test_loss, first.hparams) == (second.val_loss, second.test_loss,
                                                                         second.hparams)
            assert first.schedule == second.schedule
    finally:
        torch.set_num_threads(previous_threads)


def test_torchrun_data_parallel_run(tmp_path):
    """`torchrun --nproc-per-node 2 examples/stn_digits.py` on the CPU (gloo): shorter than --quick, one model.
    The example itself checks, after every run, that all ranks hold the same weights, λ and σ."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # --standalone: a rendezvous on a free port, so parallel test runs cannot collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", EXAMPLE,
               "--models", "mlp", "--steps", "40", "--grid", "0.1", "--random-runs", "0", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    out = run.stdout
    assert out.count("digits: ") == 1 and "(2 ranks × 32, DDP)" in out           # rank 0 alone prints
    assert "checked: weights, λ and σ identical on all 2 ranks at the end of every run" in out
    assert "MLP    STN (1 run)" in out and "MLP    grid search, best" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["model"], r["method"]) for r in results["runs"]} == {("mlp", "stn"), ("mlp", "grid")}
    assert next(r for r in results["runs"] if r["method"] == "stn")["schedule"][-1]["step"] == 40


def test_help_says_each_default_once_and_explains_every_option():
    run = subprocess.run([sys.executable, EXAMPLE, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    text = " ".join(run.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default 1000, quick 150) " in text and "quick 150) (default" not in text
    assert "--seed SEED seed of the data split" in text and "(default: 0)" in text  # a 0 default is still said
    assert "--batch-size BATCH_SIZE examples per step" in text


@pytest.fixture(scope="module")
def uninterrupted_results(tmp_path_factory):
    """The short experiment of the resume test, run without a break."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run = subprocess.run([sys.executable, EXAMPLE, *SHORT, "--out", str(out)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=WORKTREE_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


# One model, STN and one grid run, a checkpoint every 10 weight updates.
SHORT = ["--models", "mlp", "--steps", "60", "--grid", "0.1", "--random-runs", "0", "--workers", "1"]
# The example as a user runs it, importing this checkout's stn_kernels.
WORKTREE_ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_a_killed_experiment_resumes_to_the_same_results(tmp_path, uninterrupted_results):
    """`--checkpoint DIR` killed with SIGKILL once a run has saved itself (the STN run, or the grid run after it:
    drawn at random), then `--resume`: the same table and runs as without the break (all but the timings)."""
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "out"
    command = [sys.executable, EXAMPLE, *SHORT, "--out", str(out), "--checkpoint", str(checkpoints),
               "--checkpoint-every", "10"]
    killed_in = random.choice(["run-01-mlp-stn.pt", "run-02-mlp-grid.pt"])
    job = subprocess.Popen(command, cwd=ROOT, env=WORKTREE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (checkpoints / killed_in).exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    stderr = job.communicate()[1].decode()
    assert job.returncode == -signal.SIGKILL, f"not killed in {killed_in}: exit {job.returncode}\n{stderr[-3000:]}"
    assert not (out / "results.json").exists()
    # Without --resume, or with other settings, the directory is refused (the example's own check, here).
    example = _load_example()
    with pytest.raises(SystemExit, match="holds the checkpoints of an experiment: continue it with --resume"):
        example.prepare_checkpoints(example.parse_args(command[2:]), 1)
    with pytest.raises(SystemExit, match=r"was saved with other settings \(steps: 60 saved, 70 now\)"):
        example.prepare_checkpoints(example.parse_args(command[2:] + ["--resume", "--steps", "70"]), 1)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env=WORKTREE_ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stdout, (killed_in, resumed.stdout)
    assert ("finished before" in resumed.stdout) == (killed_in == "run-02-mlp-grid.pt"), resumed.stdout
    results = json.loads((out / "results.json").read_text())
    timings = ("seconds", "cycle_ms")
    strip = lambda run: {k: v for k, v in run.items() if k not in timings}  # noqa: E731
    assert results["table"] == uninterrupted_results["table"]
    assert [strip(r) for r in results["runs"]] == [strip(r) for r in uninterrupted_results["runs"]]
    assert sorted(os.listdir(checkpoints)) == ["plan.json", "run-01-mlp-stn.json", "run-02-mlp-grid.json"]
