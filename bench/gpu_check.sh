#!/usr/bin/env bash
# The prepared GPU session (a lent H100; no network there, so this installs nothing).
# From the repository root:   bash bench/gpu_check.sh [extra `python -m bench` flags]
#   1. GPU-marked tests (python -m pytest -m gpu -q; no -x: one failure must not hide the rest), Triton interpreter off; none is fine.
#   2. The default GPU sweep of `python -m bench` -> bench/results/<gpu-slug>/.
#   3. If $OUT is set: the log, results.csv, skipped.csv and a tarball of the results go there.
# The compact table of the sweep is printed last. Budget: tests <= TEST_TIMEOUT (240 s), sweep
# <= BENCH_TIMEOUT (300 s; the default sweep is sized for about 5 minutes on an H100).
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-}
LOG=$(mktemp /tmp/gpu_check.XXXXXX.log)
[ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR" && export TRITON_XENT_GPU_REPORT="$OUT_DIR/gpu_checks.jsonl"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader 2>&1 || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))" || { echo "no usable GPU"; exit 1; }

echo "== GPU tests"
TLOG=$(mktemp /tmp/gpu_tests.XXXXXX.log)
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests >"$TLOG" 2>&1
trc=$?
tail -n 25 "$TLOG"
[ -n "$OUT_DIR" ] && cp "$TLOG" "$OUT_DIR/gpu_tests.log"
case $trc in
    0) tests="exit 0: $(tail -n 1 "$TLOG" | tr -d '=')" ;;
    5) tests="none collected" ;;
    124) tests="TIMED OUT after ${TEST_TIMEOUT:-240}s" ;;
    *) tests="FAILED (exit $trc)" ;;
esac
echo "GPU tests: $tests"

echo "== sweep: python -m bench $*"
timeout "${BENCH_TIMEOUT:-300}" "$PY" -m bench "$@" >"$LOG" 2>&1
brc=$?
res_dir=$(sed -n 's/.*; output \(.*\)$/\1/p' "$LOG" | head -n 1)
if [ -n "$OUT_DIR" ]; then
    cp "$LOG" "$OUT_DIR/bench.log"
    if [ -n "$res_dir" ] && [ -d "$res_dir" ]; then
        cp "$res_dir/results.csv" "$res_dir/skipped.csv" "$OUT_DIR/" 2>/dev/null
        tar -czf "$OUT_DIR/bench_results.tar.gz" -C "$(dirname "$res_dir")" "$(basename "$res_dir")"
    fi
fi
grep -E '^(WARNING|memory of)' "$LOG" | sort -u | tail -n 20
echo "GPU tests: $tests | sweep exit $brc$([ $brc = 124 ] && echo ' (TIMED OUT)') | results: ${res_dir:-none}"
# The compact table is the end of the sweep's stdout.
sed -n '/^== .* | torch /,$p' "$LOG"
[ $brc = 0 ] && [ "$trc" != 124 ] && { [ "$trc" = 0 ] || [ "$trc" = 5 ]; }
