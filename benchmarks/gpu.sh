#!/usr/bin/env bash
# The whole GPU run in one call, from the repo root of a GPU machine:
#   1. pip install -e . (builds the CUDA extension against the machine's torch, which stays as is),
#   2. the test suite on the GPU (MILKERNELS_TEST_GPU=1) but for the aot compiles, its exit code recorded,
#   3. the benchmark sweep (python -m milkernels.bench), whatever the tests gave,
#   4. the complexity comparison (python -m milkernels.bench complexity),
#   5. the model zoo's profile on a synthetic 100k-patch bag (python -m milkernels.bench profile).
# Results go to benchmarks/results/<UTC stamp>-<gpu>/ and, when $OUT is set, to $OUT/<stamp>-<gpu>/
# after every step (so a run cut short still hands back what it has).
#
# Usage: bash benchmarks/gpu.sh [sweep options, e.g. --sizes 1k,64k,1M --no-compile]
# Environment: PYTHON (default python3); STEPS, the steps to run (default "install tests sweep
# complexity profile"; a 10-minute device call fits "install tests", then "install sweep" and then
# "install complexity" and "install profile" on the warm machine); TEST_TIMEOUT and BENCH_TIMEOUT in
# seconds (default 180 each); TEST_WORKERS, pytest-xdist workers for the tests (default 0: none; needs
# pytest-xdist, which the lent H200's image has and the project does not install),
# COMPLEXITY_TIMEOUT (default 450: the complexity run's worst case at its
# default budget is about 11 mechanisms x 8 sizes x 5 s = 440 s), PROFILE_TIMEOUT (default 300); 0 = none. A step past its limit gets SIGINT and
# writes what it measured (the complexity run writes its tables after every point anyway);
# MILKERNELS_GIT_SHA (recorded when the tree has no .git, e.g. a copy sent to a device machine).
set -u
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${gpu:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
stamp=$(date -u +%Y%m%d-%H%M%S)
res="benchmarks/results/$stamp-$slug"
mkdir -p "$res"

publish() {  # copy what exists so far into $OUT (the device tool returns at most 8 files, 2 folders deep):
             # the logs and tables to read at once, and everything in one tarball
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT/$stamp-$slug"
    for f in gpu.log tests.log results.csv complexity/complexity.md complexity/complexity.png profile/summary.md; do
        [ -f "$res/$f" ] && cp "$res/$f" "$OUT/$stamp-$slug/"
    done
    tar -czf "$OUT/$stamp-$slug/results.tar.gz" -C "$(dirname "$res")" "$(basename "$res")"
    return 0
}

wants() {  # is step $1 among $STEPS?
    case " ${STEPS:-install tests sweep complexity profile} " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

if [ -z "${MILKERNELS_GIT_SHA:-}" ]; then
    MILKERNELS_GIT_SHA=$(git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export MILKERNELS_GIT_SHA
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | head -c 1)

versions() {
    "$PY" -c 'import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}")'
}

limit() {  # run "$@" under a time limit of $1 seconds (0 = none); SIGINT first, so pytest still reports
           # and the complexity run writes what it has
    local seconds=$1; shift
    if [ "$seconds" -gt 0 ]; then timeout --signal=INT --kill-after=30 "$seconds" "$@"; else "$@"; fi
}

main() {
    echo "== $stamp $gpu"
    {
        echo "date_utc $stamp"
        echo "git_sha $MILKERNELS_GIT_SHA${dirty:+ (dirty)}"
        versions
        nvcc --version 2>&1 | tail -n 2
    } > "$res/env.txt"
    {
        nvidia-smi
        nvidia-smi --format=csv \
            --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu
    } > "$res/nvidia-smi.txt" 2>&1
    cat "$res/env.txt"
    publish

    install_rc=skipped test_rc=skipped bench_rc=skipped complexity_rc=skipped profile_rc=skipped
    torch_before=$("$PY" -c 'import torch; print(torch.__version__)')
    torch_after=$torch_before
    if wants install; then
        echo "== pip install -e . --no-build-isolation --no-deps"
        "$PY" -m pip install -e . --no-build-isolation --no-deps
        install_rc=$?
        torch_after=$("$PY" -c 'import torch; print(torch.__version__)')
        if [ "$torch_before" != "$torch_after" ]; then
            echo "WARNING: torch changed from $torch_before to $torch_after during the install"
        fi
    fi
    "$PY" -c 'import milkernels; print("backends:", milkernels.backends())'
    publish

    if wants tests; then
        echo "== MILKERNELS_TEST_GPU=1 $PY -m pytest tests -q -m 'not aot'"
        # pytest.main with SIGINT restored (a job started in the background ignores it), so a timed-out
        # run still prints its failures; otherwise the same as `python -m pytest tests -q -m "not aot"`.
        # The aot tests (ahead-of-time sm_90 compiles, for machines without a GPU) are deselected: here
        # the kernels really run, and those compiles alone would use up the step's time limit.
        limit "${TEST_TIMEOUT:-180}" env MILKERNELS_TEST_GPU=1 "$PY" -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
workers = [] if sys.argv[1] == "0" else ["-n", sys.argv[1]]
sys.exit(pytest.main(["tests", "-q", "-m", "not aot", "-rfE", "--durations=15"] + workers))' "${TEST_WORKERS:-0}" \
            2>&1 | tee "$res/tests.log"
        test_rc=${PIPESTATUS[0]}
        publish
    fi

    if wants sweep; then
        echo "== $PY -m milkernels.bench --out $res $*"
        limit "${BENCH_TIMEOUT:-180}" env PYTHONUNBUFFERED=1 "$PY" -m milkernels.bench --out "$res" "$@"
        bench_rc=$?
        publish
    fi

    if wants complexity; then
        echo "== $PY -m milkernels.bench complexity --out $res/complexity"
        # main() with SIGINT restored, as for the tests, so a timed-out run writes its rows and exits
        limit "${COMPLEXITY_TIMEOUT:-450}" env PYTHONUNBUFFERED=1 "$PY" -c 'import signal, sys
from milkernels.bench.__main__ import main
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(sys.argv[1:]))' complexity --out "$res/complexity"
        complexity_rc=$?
        publish
    fi
    if wants profile; then
        echo "== $PY -m milkernels.bench profile --synthetic 100000 --model all --out $res/profile"
        limit "${PROFILE_TIMEOUT:-300}" env PYTHONUNBUFFERED=1 "$PY" -m milkernels.bench profile --synthetic 100000 \
            --model all --no-progress --out "$res/profile"
        profile_rc=$?
        publish
    fi
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> "$res/nvidia-smi.txt" 2>&1

    echo
    echo "== summary"
    echo "device:  ${gpu:-none} | $(versions)"
    echo "git:     $MILKERNELS_GIT_SHA${dirty:+ (dirty)}"
    echo "install: exit $install_rc (torch $torch_before -> $torch_after)"
    echo "tests:   exit $test_rc | $(grep -sE '(passed|failed|error|no tests ran)' "$res/tests.log" | tail -n 1)"
    echo "bench:   exit $bench_rc (1 = an implementation errored, 124/130 = timed out) | $res"
    echo "complexity: exit $complexity_rc (1 = a mechanism errored, 124/130 = timed out, rows so far kept) | $res/complexity"
    echo "profile: exit $profile_rc (1 = a model errored, 124/130 = timed out) | $res/profile"
    [ -n "${OUT:-}" ] && echo "copied:  $OUT/$stamp-$slug/"
    for rc in "$install_rc" "$test_rc" "$bench_rc" "$complexity_rc" "$profile_rc"; do
        case $rc in 0|skipped) ;; *) return 1 ;; esac
    done
    return 0
}

main "$@" 2>&1 | tee "$res/gpu.log"
status=${PIPESTATUS[0]}
publish
exit "$status"
