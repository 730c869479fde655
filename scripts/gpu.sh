#!/usr/bin/env bash
# Everything that needs a GPU, in one unattended command for a CUDA machine (the device tool's
# H100/H200): build relprop there, run the tests that a CPU cannot run, and the GPU benchmarks.
#
#   bash scripts/gpu.sh [STEP ...]      STEP: tests | suite | resources | bench-ops | bench | profile |
#                                             memory | all
#
#   tests      tests marked gpu, and the op and kernel tests (compiled Triton, CUDA kernels)
#   suite      the rest of the test suite, on a machine where CUDA is visible
#   resources  benchmarks/triton_resources.py with the machine's Triton: registers and spills
#   bench-ops  benchmarks/bench_ops_triton.py: fused kernels vs torch per layer shape
#   bench      benchmarks/run.py --device cuda: issue 3's table (vgg16, resnet50, batch 64)
#   profile    one profiled call of the gradient and of each relprop method (float32): the
#              kernels with the most GPU time, and how much of the call the GPU was busy
#   memory     benchmarks/peak_steps.py --device cuda: where each method's memory peaks (the
#              plan step, or the gradient's aten op), cuDNN's workspaces included
#
# Narrow a run with TESTS_K (pytest -k expression for `tests`), BENCH_ARGS (more run.py options,
# e.g. "--dtype bfloat16"), BENCH_NAME (its output files' stem, default gpu), BENCH_OPS_ARGS
# (e.g. "--filter conv1 --dtypes bf16"), PROFILE_ARGS (e.g. "--models resnet50") and MEMORY_ARGS
# (e.g. "--models vgg16 --methods gradient,lrp.epsilon").
#
# Logs, CSV and markdown go to $OUT (the device tool sets it; default out/gpu). The machine has
# torch, Triton, nvcc, CMake, pybind11 and scikit-build-core but no network: Zennit and Captum
# come as wheels in .whl/ (benchmarks/README.md says how to fetch them). The build is skipped
# when the installed relprop was built from the same sources (a warm machine, a second call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-8}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/relprop-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/relprop-site${PYTHONPATH:+:$PYTHONPATH}
fi

sources=$(find python kernels csrc CMakeLists.txt pyproject.toml -type f -not -name '*.pyc' \
    | sort | xargs sha1sum | sha1sum | cut -c1-16)
stamp=/tmp/relprop-build-$sources
if [[ ! -e $stamp ]]; then
    # Hopper only: the machine is an H100/H200 and one architecture halves nvcc's time.
    start=$SECONDS
    CUDAARCHS=${CUDAARCHS:-90} "$PY" -m pip install -q --no-build-isolation --no-deps . \
        >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    touch "$stamp"
    echo "built relprop in $((SECONDS - start)) s"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
"$PY" -c "import torch, triton, relprop; print('torch', torch.__version__, 'triton',
triton.__version__, 'native', relprop.native_available(), torch.cuda.get_device_name())"

status=0
# A `timeout -s INT` (or TERM) around this script reaches bash alone, which would wait for the
# running step and leave it (and pytest's xdist workers) running into the next command: a bench
# started after such a suite once ran at a load average of 120. The step runs in the background
# and a trapped signal is passed on to it, and the script ends once it has.
step_pid=
stop_step() {
    if [[ -n $step_pid ]]; then
        # pytest prints its summary on an interrupt; whatever is left after 20 s is killed.
        kill -INT -- "-$step_pid" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$step_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$step_pid" 2>/dev/null
    fi
    echo "=== stopped by a signal" >&2
    exit 130
}
trap stop_step INT TERM

run_step() {
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    # In a process group of its own (setsid), so that a signal reaches pytest's workers too. An
    # asynchronous command starts with SIGINT ignored, and Python leaves an ignored SIGINT
    # ignored: it is reset to the default before the step's program starts. The log's tee
    # ignores the signals (`timeout` signals its whole process group) to keep what the step
    # prints as it stops (pytest's summary).
    setsid "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@" > >(trap '' INT TERM; tee "$OUT/$name.log") 2>&1 &
    step_pid=$!
    wait "$step_pid"
    local rc=$?
    step_pid=
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [[ $rc -eq 0 ]] || status=1
}

pytest_args=(-q -p no:cacheprovider -rfE --durations=15)
if "$PY" -c "import xdist" 2>/dev/null; then pytest_args+=(-n "$WORKERS"); fi

steps=("$@")
[[ ${#steps[@]} -eq 0 || ${steps[0]} == all ]] && steps=(tests suite resources bench-ops bench profile memory)
for step in "${steps[@]}"; do
    case $step in
    tests)
        run_step tests "$PY" -m pytest "${pytest_args[@]}" --junitxml="$OUT/tests.xml" \
            ${TESTS_K:+-k "$TESTS_K"} tests/analyzers/test_gpu.py tests/ops tests/kernels
        ;;
    suite)
        run_step suite "$PY" -m pytest "${pytest_args[@]}" --junitxml="$OUT/suite.xml" tests \
            --ignore tests/analyzers/test_gpu.py --ignore tests/ops --ignore tests/kernels
        ;;
    bench-ops)
        # shellcheck disable=SC2086  # BENCH_OPS_ARGS holds several words
        run_step bench_ops "$PY" benchmarks/bench_ops_triton.py --out "$OUT/bench_ops_triton.csv" \
            ${BENCH_OPS_ARGS:-}
        ;;
    bench)
        name=${BENCH_NAME:-gpu}
        # shellcheck disable=SC2086  # BENCH_ARGS holds several words
        run_step "$name" "$PY" benchmarks/run.py --device cuda --csv "$OUT/results_$name.csv" \
            --markdown "$OUT/$name.md" ${BENCH_ARGS:-}
        ;;
    resources)
        # What the machine's own Triton makes of the kernels: registers, spills, shared memory.
        run_step resources "$PY" benchmarks/triton_resources.py --arch 90 \
            --markdown "$OUT/triton_resources.md" --json "$OUT/triton_resources.json"
        ;;
    profile)
        # shellcheck disable=SC2086  # PROFILE_ARGS holds several words
        run_step profile "$PY" benchmarks/run.py --device cuda --dtype float32 --rounds 3 \
            --no-memory --providers relprop --relprop-backends default --profile 20 \
            --csv "$OUT/results_profile.csv" --markdown "$OUT/profile_times.md" ${PROFILE_ARGS:-}
        ;;
    memory)
        # shellcheck disable=SC2086  # MEMORY_ARGS holds several words
        run_step memory "$PY" benchmarks/peak_steps.py --device cuda --out "$OUT/peak_steps.md" \
            ${MEMORY_ARGS:-}
        ;;
    *)
        echo "unknown step $step (tests, suite, resources, bench-ops, bench, profile, memory, all)" >&2
        exit 2
        ;;
    esac
done
exit $status
