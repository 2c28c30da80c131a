#!/usr/bin/env bash
# One-shot check on the GPU machine (Python 3.12, torch 2.11, triton 3.6, no network), run from
# anywhere (it cd's to the repo root):   OUT=/some/dir bash scripts/device_check.sh
#
# Writes into RESULTS=${OUT:-benchmarks/results/run-<date>} (at most 7 files, one level deep):
# env.txt, tests.log, bench.log, results.csv, results.md, speedup.png (when matplotlib is
# installed) and, only if the bench is killed while rewriting it, results.md.tmp.
#
# Phases and their expected time on one H100 (the whole script ends within TOTAL_S=465 s < 8 min,
# every phase runs under `timeout`, and what a phase leaves unused goes to the benchmark):
#   1. nvidia-smi summary and versions                          ~10-20 s (first torch/CUDA import)
#   2. pip install -e . (no deps, no build isolation)           ~5-15 s; up to 120 s if csrc/ has
#                                                               sources to build (the CUDA extension)
#   3. pytest -m "gpu or triton" tests (timeout 150 s)          mostly Triton JIT compiles; <= 150 s
#   4. python3 -m stn_kernels.bench --gpu                       the rest, ~270-330 s when 2-3 are quick
#      Cases run bfloat16 at every shape first, then float16, then float32; --time-budget stops
#      starting new cases BENCH_HEADROOM_S (80 s) before the phase's own timeout, which covers the
#      case in progress (one torch.compile max-autotune of the fwd+bwd graphs, ~30-90 s per
#      (shape, dtype), plus its timing, ~5-15 s). --compile-budget (COMPILE_SHARE=60 % of the
#      bench budget) stops adding published+compile once its compile time is spent, so the
#      other providers still reach every shape. CSV and results.md are rewritten after each
#      case, so a timeout still leaves what was measured.
#   5. cat results.md: the table is the last thing printed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

TOTAL_S=${TOTAL_S:-465}
BENCH_HEADROOM_S=${BENCH_HEADROOM_S:-80}
COMPILE_SHARE=${COMPILE_SHARE:-60}
RESULTS=${OUT:-benchmarks/results/run-$(date +%F)}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
unset STN_KERNELS_BACKEND TRITON_INTERPRET
START=$SECONDS
left() { echo $(( TOTAL_S - (SECONDS - START) )); }
phase() { echo; echo "=== $1 (t=$(( SECONDS - START )) s, $(left) s left)"; }

phase "1/5 device and versions"
timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,temperature.gpu,clocks.sm,clocks.max.sm,power.limit --format=csv \
    || echo "nvidia-smi failed or timed out"
timeout 45 python3 - <<'EOF' 2>&1 | tee "$RESULTS/env.txt"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {torch.cuda.get_device_name(0)}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
for mod in ("triton", "pytest", "pytest_benchmark", "matplotlib", "numpy"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod} missing ({type(exc).__name__})")
EOF

phase "2/5 pip install -e ."
PIP_T=60
if ls csrc/*.cu csrc/*.cpp >/dev/null 2>&1; then PIP_T=120; fi
timeout -k 5 "$PIP_T" python3 -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 | tail -n 15
echo "pip exit ${PIPESTATUS[0]} (124: timed out; the bench and tests still import stn_kernels from the repo root)"

phase "3/5 tests: -m 'gpu or triton'"
PYTEST_ARGS=(-q -x -m "gpu or triton" tests)
# pyproject's addopts pass --benchmark-disable, which pytest rejects without pytest-benchmark.
if ! python3 -c "import pytest_benchmark" >/dev/null 2>&1; then PYTEST_ARGS=(-o "addopts=-ra" "${PYTEST_ARGS[@]}"); fi
if python3 -c "import pytest" >/dev/null 2>&1; then
    timeout -k 10 150 python3 -m pytest "${PYTEST_ARGS[@]}" 2>&1 | tee "$RESULTS/tests.log" | tail -n 60
    echo "pytest exit ${PIPESTATUS[0]} (124: timed out at 150 s)"
else
    echo "pytest is not installed: tests skipped" | tee "$RESULTS/tests.log"
fi

phase "4/5 benchmark"
BENCH_T=$(( $(left) - 15 ))
(( BENCH_T < 60 )) && BENCH_T=60
BUDGET=$(( BENCH_T - BENCH_HEADROOM_S ))
(( BUDGET < 20 )) && BUDGET=20
COMPILE_BUDGET=$(( BUDGET * COMPILE_SHARE / 100 ))
echo "bench: timeout ${BENCH_T} s, --time-budget ${BUDGET} s, --compile-budget ${COMPILE_BUDGET} s"
# Full output (with inductor's autotuning tables) in bench.log; the progress tail here.
timeout -k 10 "$BENCH_T" python3 -m stn_kernels.bench --gpu --out "$RESULTS" --time-budget "$BUDGET" \
    --compile-budget "$COMPILE_BUDGET" 2>&1 | tee "$RESULTS/bench.log" | grep -E '^\[bench\]|^- |^stn_kernels.bench|Traceback|Error' | tail -n 60
echo "bench exit ${PIPESTATUS[0]} (124: timed out; partial results are kept)"

phase "5/5 results ($RESULTS: $(ls "$RESULTS" | tr '\n' ' '))"
if [ -s "$RESULTS/results.md" ]; then
    cat "$RESULTS/results.md"
else
    echo "no results.md was written; the last lines of bench.log:"
    tail -n 40 "$RESULTS/bench.log" 2>/dev/null
fi
