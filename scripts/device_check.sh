#!/usr/bin/env bash
# One-shot check on a GPU machine (its python3 already has torch, triton, pytest, ninja and nvcc;
# nothing is downloaded), run from anywhere:   OUT=/some/dir bash scripts/device_check.sh
#
# Phases (the whole script ends within TOTAL_S=465 s < 8 min; every phase runs under `timeout`,
# and what a phase leaves unused goes to the ones after it):
#   0. first of all, the Triton kernels compiled for this GPU and loaded on it: registers, spill stores,
#      stack, shared memory per kernel (python -m stn_kernels.backends.triton.aot --device: the AOT step of
#      tests/test_triton_aot.py, which predicts them for sm_90 and sm_80 on a CPU) <= AOT_S (75 s)
#   1. GPU and versions                                                       ~10-20 s
#   2. pip install -e . (no deps, no build isolation): builds the CUDA extension ~40-120 s
#   3. pytest -m "gpu or triton" (all GPU-marked and Triton tests, incl. the CUDA
#      extension's; not the CPU-side AOT compile), no -x, in TEST_PROCS=5
#      processes at once (Triton's compiles are what take the time), and beside them
#      an untimed run of the linear benchmark's Triton cases that fills Triton's
#      compile cache for phase 4                                         <= TESTS_S (180 s)
#   4. benchmarks: first the host overhead of every layer at a tiny shape (python -m stn_kernels.bench
#      --host-overhead --gpu --quick: ours on Triton vs published vs the plain torch layer, per call,
#      the device synchronised around each loop of calls only)                    <= HOST_S (40 s)
#      then the whole STN cycle eager vs STNTrainer(compile=True) (reduce-overhead: CUDA graphs) on
#      AlexNet's STN classifier (python -m stn_kernels.bench --stn-step --gpu), appended to
#      host_overhead.md                                                          <= STEP_S (90 s)
#      then the per-example augmentation on CIFAR-10-shaped batches (python -m stn_kernels.bench
#      --layer augment --gpu --quick: images per second), appended to host_overhead.md <= AUG_S (40 s)
#      then the price of self-tuning (python -m stn_kernels.bench --price --gpu --quick, eager: the converted
#      models' training step and STN cycle against the plain ones), appended to host_overhead.md <= PRICE_S (90 s)
#      then python -m stn_kernels.bench --gpu --layer NAME, each with its own --time-budget:
#        linear (hyper_linear: floor, published, published+compile, stn:reference/triton/cuda,
#          stn:triton+compile)
#          at the STN and large shapes, bfloat16 first                       ~55 % of what is left
#        conv2d at the AlexNet shapes and embedding 10000x650, bfloat16        ~20 %
#        HyperLSTM (B=40, T=70, 2x650, H=7), bfloat16, fwd and fwd+bwd          the rest
#      torch.compile(mode="max-autotune") is slow to compile (~30-90 s per graph): each run's
#      --compile-budget stops adding it once its share is spent.
#   5. the tables (results/*.md), printed last.
# Files written to RESULTS=${OUT:-benchmarks/results/run-<date>} (at most 8): log.txt (the AOT table first,
# the pytest output at its end), linear.md, linear.csv, speedup.png, conv2d.md, embedding.md, lstm.md, host_overhead.md
# (with the STN cycle and augmentation tables at its end).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}  # the interpreter that has torch (the GPU image: plain python3)
TOTAL_S=${TOTAL_S:-465}
AOT_S=${AOT_S:-75}
AOT_PROCS=${AOT_PROCS:-8}
TESTS_S=${TESTS_S:-180}
HOST_S=${HOST_S:-40}
STEP_S=${STEP_S:-90}
AUG_S=${AUG_S:-40}
TEST_PROCS=${TEST_PROCS:-5}
RESULTS=${OUT:-benchmarks/results/run-$(date +%F)}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
unset STN_KERNELS_BACKEND TRITON_INTERPRET
START=$SECONDS
LOG="$RESULTS/log.txt"
left() { echo $(( TOTAL_S - (SECONDS - START) )); }
phase() { echo; echo "=== $1 (t=$(( SECONDS - START )) s, $(left) s left)" | tee -a "$LOG"; }

phase "0/5 the Triton kernels compiled for this GPU: registers, spills, shared memory"
# The fast subset of the AOT test's compiles (every kernel x dtype at its widest variant and no-autotune default,
# the riskiest kept autotune configs), for this GPU, each loaded: ptxas's report beside the driver's figures.
# --budget stops the compiles in time to print what they found.
timeout -k 5 "$AOT_S" "$PY" -m stn_kernels.backends.triton.aot --device --workers "$AOT_PROCS" --each \
    --budget $(( AOT_S - 20 )) 2>&1 | tee -a "$LOG"
echo "aot exit ${PIPESTATUS[0]} (1: problems listed above or stopped at the budget; 124: timed out)" | tee -a "$LOG"

phase "1/5 device and versions"
timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv \
    2>&1 | tee -a "$LOG" || echo "nvidia-smi failed or timed out"
timeout 45 "$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {torch.cuda.get_device_name(0)}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
for mod in ("triton", "pytest", "pytest_benchmark", "matplotlib", "ninja"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod} missing ({type(exc).__name__})")
PY

phase "2/5 pip install -e . (builds the CUDA extension)"
export MAX_JOBS=${MAX_JOBS:-16}
timeout -k 5 150 "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
    2>&1 | tail -n 15 | tee -a "$LOG"
echo "pip exit ${PIPESTATUS[0]} (124: timed out; tests and benchmarks still import stn_kernels from the repo root)" \
    | tee -a "$LOG"
timeout 60 "$PY" -c "import stn_kernels.backends.extension as e; print('extension loaded:', e.loaded(), e.load_error() or '')" \
    2>&1 | tee -a "$LOG"

phase "3/5 tests: -m 'gpu or triton', $TEST_PROCS processes"
# Most of this phase is Triton compiling kernels on the CPU, one at a time per process: the test files
# are dealt to TEST_PROCS pytest processes that share the GPU (and Triton's disk cache).
# The ahead-of-time compile test is for machines without a GPU (~50 s); here the tests compile and run
# the same kernels, and the benchmarks autotune over the configs it checks.
PYTEST_OPTS=(-q -m "gpu or triton")
# pyproject's addopts pass --benchmark-disable, which pytest rejects without pytest-benchmark.
if ! "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then PYTEST_OPTS=(-o "addopts=-ra" "${PYTEST_OPTS[@]}"); fi
T=$(( $(left) - 150 - (HOST_S + STEP_S + AUG_S) / 2 )); (( T > TESTS_S )) && T=$TESTS_S; (( T < 60 )) && T=60
# Files dealt by their number of selected tests, most first, each to the least loaded process.
mapfile -t TEST_GROUPS < <(timeout 60 "$PY" - "$TEST_PROCS" "${PYTEST_OPTS[@]}" <<'PY'
import collections, subprocess, sys
procs, opts = int(sys.argv[1]), sys.argv[2:]
out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *opts,
                      "--ignore=tests/test_triton_aot.py", "tests"], capture_output=True, text=True).stdout
counts = collections.Counter()
for line in out.splitlines():  # "path::test" (-q) or "path: count" (-qq)
    path, sep, rest = line.partition("::") if "::" in line else line.partition(": ")
    if sep and path.endswith(".py"):
        counts[path] += 1 if sep == "::" else int(rest)
groups = [[0, []] for _ in range(procs)]
for path, n in counts.most_common():
    least = min(groups, key=lambda g: g[0])
    least[0] += n
    least[1].append(path)
for n, files in groups:
    if files:
        print(" ".join(files))
PY
)
(( ${#TEST_GROUPS[@]} )) || TEST_GROUPS=("--ignore=tests/test_triton_aot.py tests")  # collection failed: one process
echo "test processes: ${#TEST_GROUPS[@]}" | tee -a "$LOG"
TMP_LOGS=$(mktemp -d)
# Meanwhile one more process runs the linear benchmark's stn:triton cases in its order (bfloat16 first),
# untimed, only so that Triton compiles their autotune configs into its disk cache: the benchmark then
# loads them instead of compiling (~1 s each). Nothing of it is kept; it is stopped with the tests.
timeout -k 5 "$T" "$PY" -m stn_kernels.bench --gpu --layer linear --quick --providers stn:triton --modes fwd+bwd \
    --out "$TMP_LOGS/warm" > "$TMP_LOGS/warm.txt" 2>&1 &
WARM_PID=$!
PIDS=()
for (( i = 0; i < ${#TEST_GROUPS[@]}; i++ )); do
    read -r -a files <<< "${TEST_GROUPS[i]}"
    timeout -k 10 "$T" "$PY" -m pytest "${PYTEST_OPTS[@]}" "${files[@]}" > "$TMP_LOGS/$i.log" 2>&1 &
    PIDS+=("$!")
done
TESTS_RC=0
for (( i = 0; i < ${#PIDS[@]}; i++ )); do
    wait "${PIDS[i]}"; rc=$?
    (( rc == 5 )) && rc=0  # pytest's "no tests collected": a group without GPU or Triton tests
    (( rc > TESTS_RC )) && TESTS_RC=$rc
done
kill "$WARM_PID" 2>/dev/null; wait "$WARM_PID" 2>/dev/null
echo "Triton warm-up for the linear benchmark: $(grep -c '| stn:triton |' "$TMP_LOGS/warm.txt") cases compiled" \
    | tee -a "$LOG"
# The pytest output goes to the end of log.txt (kept here until then): $OUT brings back 8 files at most.
TESTS_LOG=$(mktemp)
for f in "$TMP_LOGS"/*.log; do echo "=== pytest process $(basename "$f" .log)"; cat "$f"; done > "$TESTS_LOG"
rm -rf "$TMP_LOGS"
echo "pytest exit $TESTS_RC (largest of the processes'; 124: timed out at $T s)" | tee -a "$LOG"
grep -E "(passed|failed|skipped|error|no tests ran).* in [0-9.]+s" "$TESTS_LOG" | tee -a "$LOG"
grep -E "^(FAILED|ERROR)" "$TESTS_LOG" | head -n 30 | tee -a "$LOG"

# own_table TITLE TIMEOUT FILE ARGS...: a benchmark mode that writes its own table FILE; the tables go, one after
# the other, into host_overhead.md ($OUT brings back 8 files at most).
own_table() {
    local title=$1 limit=$2 file=$3 tmp
    shift 3
    tmp=$(mktemp -d)
    phase "4/5 $title (timeout $limit s)"
    timeout -k 5 "$limit" "$PY" -m stn_kernels.bench --gpu --out "$tmp" "$@" >> "$LOG" 2>&1
    echo "$title exit $? (124: timed out)" | tee -a "$LOG"
    if [ -s "$tmp/$file" ]; then
        [ -s "$RESULTS/host_overhead.md" ] && echo >> "$RESULTS/host_overhead.md"
        cat "$tmp/$file" >> "$RESULTS/host_overhead.md"
    fi
    rm -rf "$tmp"
}
rm -f "$RESULTS/host_overhead.md"  # a rerun into the same folder starts the file anew
own_table "host overhead at tiny shapes" "$HOST_S" host_overhead.md --host-overhead --quick
own_table "the STN cycle, eager vs compiled" "$STEP_S" stn_step.md --stn-step
own_table "per-example augmentation" "$AUG_S" augment.md --layer augment --quick
own_table "the price of self-tuning, eager" "${PRICE_S:-90}" price.md --price --quick --providers plain,converted,stn-cycle

# bench NAME SHARE_PERCENT ARGS...: one harness run with its share of the time left.
bench() {
    local name=$1 share=$2; shift 2
    local t=$(( $(left) * share / 100 - 10 ))
    (( t < 40 )) && { echo "skipping $name: too little time left" | tee -a "$LOG"; return; }
    local budget=$(( t - t / 4 )) dir="$RESULTS/$name.tmp"
    phase "4/5 benchmark $name (timeout $t s, --time-budget $budget s)"
    timeout -k 10 "$t" "$PY" -m stn_kernels.bench --gpu --out "$dir" --time-budget "$budget" \
        --compile-budget $(( budget / 2 )) "$@" >> "$LOG" 2>&1
    echo "bench $name exit $?" | tee -a "$LOG"
    [ -s "$dir/results.md" ] && mv "$dir/results.md" "$RESULTS/$name.md"
    if [ "$name" = linear ]; then
        [ -s "$dir/results.csv" ] && mv "$dir/results.csv" "$RESULTS/linear.csv"
        [ -s "$dir/speedup.png" ] && mv "$dir/speedup.png" "$RESULTS/speedup.png"
    fi
    rm -rf "$dir"
}
bench linear 55 --layer linear
bench conv2d 45 --layer conv2d --dtypes bfloat16 --modes fwd,fwd+bwd \
    --shapes alexnet-3to64s2@32,alexnet-64to192@8,alexnet-192to384@4,alexnet-384to256@4,alexnet-256to256@4
bench embedding 30 --layer embedding --dtypes bfloat16 --modes fwd,fwd+bwd
bench lstm 95 --layer lstm --dtypes bfloat16 --modes fwd,fwd+bwd --shapes lstm-ptb

phase "5/5 results ($RESULTS: $(ls "$RESULTS" | tr '\n' ' '))"
for f in linear conv2d embedding lstm host_overhead; do
    [ -s "$RESULTS/$f.md" ] && { echo; cat "$RESULTS/$f.md"; }
done
{ echo; echo "=== pytest output"; cat "$TESTS_LOG"; } >> "$LOG"
rm -f "$TESTS_LOG"
# The script's status is the tests' (benchmark failures are in the log and the tables' notes).
exit "$TESTS_RC"
