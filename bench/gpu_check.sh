#!/usr/bin/env bash
# One call on a GPU machine: correctness at real sizes, then time and memory of ours against the
# peers, in one run, as ratios that compare across cards. From the repository root:
#
#   bash bench/gpu_check.sh              # full: about 8 minutes (tests, then the GPU sweep)
#   bash bench/gpu_check.sh --quick      # about 4 minutes: fewer points, fwd_bwd only
#   bash bench/gpu_check.sh --dry-run    # no GPU: the same steps on the CPU with tiny sizes
#   bash bench/gpu_check.sh [--no-tests] [--budget S] [-- extra `python -m bench` flags]
#
# Steps:
#   1. Peers: if .whl/ holds wheels (bench/fetch_peers.sh, carried to the machine), install them
#      into /tmp/site (no network, no dependencies) and put it on PYTHONPATH; the only install.
#      (A dry run installs into its scratch folder instead.)
#      Without them, liger and cce are skipped by the bench with a message.
#   2. GPU tests: python -m pytest -m gpu with TRITON_INTERPRET=0 (no -x: one failure must not
#      hide the rest), at most TEST_TIMEOUT seconds.
#   3. The sweep: python -m bench (triton_xent, torch eager, torch.compile, Liger, CCE; copy
#      bandwidth and matmul rate of the same run), with --time-budget set from what is left of
#      the budget, so it stops starting cases in time and keeps what it measured.
#   4. If $OUT is set: the log, results.csv, skipped.csv, gpu_checks.jsonl, up to 3 PNGs and a
#      tarball of everything (bench_results.tar.gz) go there (8 files at most, no folders).
#   The short table (ratios) is printed last.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
MODE=full DRY=0 TESTS=1 BUDGET="" EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --dry-run) DRY=1 ;;
        --no-tests) TESTS=0 ;;
        --budget) BUDGET=$2; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done
# Seconds for the whole script, and the tests' share of it.
if [ "$MODE" = quick ]; then BUDGET=${BUDGET:-240}; TEST_TIMEOUT=${TEST_TIMEOUT:-120}
else BUDGET=${BUDGET:-480}; TEST_TIMEOUT=${TEST_TIMEOUT:-180}; fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
[ $DRY = 1 ] && trap 'rm -rf "$WORK"' EXIT  # a dry run leaves nothing behind but $OUT
LOG=$WORK/gpu_check.log
exec > >(tee "$LOG") 2>&1
OUT_DIR=${OUT:-}
[ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR"
export TRITON_XENT_GPU_REPORT="$WORK/gpu_checks.jsonl"
echo "gpu_check: mode $MODE$([ $DRY = 1 ] && echo ' (dry run on the CPU)'), budget ${BUDGET}s, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

echo "== peers"
SITE=/tmp/site
[ $DRY = 1 ] && SITE=$WORK/site  # a dry run touches nothing outside its scratch folder
if ls .whl/*.whl >/dev/null 2>&1; then
    rm -rf "$SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
        # pure-Python wheels are zip files that run from where they are unpacked
        echo "peers: pip install from .whl/ failed; unpacking the wheels instead"
        for whl in .whl/*.whl; do "$PY" -m zipfile -e "$whl" "$SITE"; done
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
    echo "peers: no wheels in .whl/ (run bench/fetch_peers.sh where there is network and carry" \
         ".whl to this machine): liger and cce will be skipped"
fi
for mod in liger_kernel cut_cross_entropy; do
    "$PY" -c "import importlib.metadata as m, $mod; print('peers: $mod', m.version('${mod//_/-}'))" \
        2>/dev/null || echo "peers: $mod not importable: its provider will be skipped"
done

echo "== device"
if [ $DRY = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv,noheader 2>&1 || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))" || { echo "no usable GPU"; exit 1; }
else
    "$PY" -c "import torch; print('torch', torch.__version__, '| cuda available:', torch.cuda.is_available())"
fi

echo "== GPU tests collected (python -m pytest --collect-only -m gpu)"
"$PY" -m pytest --collect-only -q -m gpu -p no:cacheprovider tests >"$WORK/collect.log" 2>&1
crc=$?
ngpu=$(grep -c "::" "$WORK/collect.log")
echo "GPU tests: $ngpu collected (exit $crc)"
if [ $crc != 0 ] && [ $crc != 5 ]; then
    grep -E "ERROR|Error" "$WORK/collect.log" | head -n 20
    echo "GPU tests: COLLECTION FAILED"
    [ $DRY = 1 ] && exit 2
fi
echo "== model (bench/roofline.py: expected times, not measurements)"
"$PY" -m bench --roofline 2>&1 | tail -n +3 | head -n 22
if [ $DRY = 1 ]; then
    echo "== cases a GPU run would measure (python -m bench --list-cases${EXTRA[*]:+ ${EXTRA[*]}})"
    "$PY" -m bench --device cuda --list-cases "${EXTRA[@]}" 2>&1 | tee "$WORK/cases.txt" | head -n 60
    echo "estimate on an H100: peers ~15 s, GPU tests <= ${TEST_TIMEOUT}s ($ngpu tests), sweep" \
         "$(grep -c . "$WORK/cases.txt") cases within --time-budget $((BUDGET - TEST_TIMEOUT - 40))s," \
         "all in <= ${BUDGET}s + 90 s"
fi

tests="not run (--no-tests)"
trc=0
if [ $TESTS = 1 ]; then
    echo "== GPU tests (python -m pytest -m gpu, at most ${TEST_TIMEOUT}s)"
    t=$SECONDS
    timeout -k 20 "$TEST_TIMEOUT" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests \
        >"$WORK/gpu_tests.log" 2>&1
    trc=$?
    grep -E "GPU-CHECK|FAILED|ERROR" "$WORK/gpu_tests.log" | head -n 40
    tail -n 15 "$WORK/gpu_tests.log"
    case $trc in
        0) tests="passed: $(tail -n 1 "$WORK/gpu_tests.log" | tr -d '=')" ;;
        5) tests="none collected" ;;
        124|137) tests="TIMED OUT after ${TEST_TIMEOUT}s" ;;
        *) tests="FAILED (exit $trc): $(tail -n 1 "$WORK/gpu_tests.log" | tr -d '=')" ;;
    esac
    tests="$tests ($((SECONDS - t))s)"
    echo "GPU tests: $tests"
fi

BENCH=()
[ "$MODE" = quick ] && BENCH+=(--quick)
if [ $DRY = 1 ]; then  # the CPU's quick curves, no compilation, into a scratch folder
    BENCH=(--device cpu --quick --providers triton_xent torch_eager_fp32 torch_eager liger cce
           --out "$WORK/results")
fi
left=$((BUDGET - SECONDS - 25))  # 25 s for plots, tables and packing
[ $left -lt 30 ] && left=30
echo "== sweep: python -m bench ${BENCH[*]} ${EXTRA[*]} --time-budget $left"
# The bench starts no provider run after --time-budget (one run can go over it: a compilation
# plus timing, under a minute); timeout (SIGINT: it keeps what it has, then SIGKILL) guards
# against a run that hangs. Worst case, all in: BUDGET - 25 + 75 + 15 s, under 10 minutes.
timeout -s INT -k 15 $((left + 75)) "$PY" -m bench "${BENCH[@]}" "${EXTRA[@]}" \
    --time-budget "$left" >"$WORK/bench.log" 2>"$WORK/bench.err"
brc=$?
grep -E "^(WARNING|memory of|interrupted|sweep stopped)" "$WORK/bench.log" | sort -u | head -n 20
grep -E "Error|error" "$WORK/bench.err" | grep -v "^skipped" | head -n 10
res_dir=$(sed -n 's/.*; output \(.*\)$/\1/p' "$WORK/bench.log" | head -n 1)
case $brc in
    0) sweep="complete" ;;
    3) sweep="CUT SHORT by the time budget (see skipped.csv)" ;;
    124|130|137) sweep="KILLED by timeout" ;;
    *) sweep="FAILED (exit $brc)"; tail -n 20 "$WORK/bench.err" ;;
esac

# The model beside what was measured (where the first GPU run says the model is wrong).
if [ -n "$res_dir" ] && [ -f "$res_dir/results.csv" ]; then
    echo "== model vs measured (bench/roofline.py --compare)"
    "$PY" -m bench.roofline --compare "$res_dir/results.csv" 2>&1 | head -n 60
fi

# The detailed tables, then the short one last.
sed -n '/^== .* | torch /,/^== summary/p' "$WORK/bench.log" | sed '$d'
echo
echo "GPU tests: $tests | sweep: $sweep ($((SECONDS))s so far) | results: ${res_dir:-none}"
sed -n '/^== summary/,$p' "$WORK/bench.log"

if [ -n "$OUT_DIR" ]; then
    files=("$LOG")
    [ -f "$TRITON_XENT_GPU_REPORT" ] && files+=("$TRITON_XENT_GPU_REPORT")
    if [ -n "$res_dir" ] && [ -d "$res_dir" ]; then
        files+=("$res_dir/results.csv" "$res_dir/skipped.csv")
        mapfile -t pngs < <(ls "$res_dir"/*.png 2>/dev/null | head -n 3)
        files+=("${pngs[@]}")
        case $res_dir in "$WORK"/*) ;; *) cp -r "$res_dir" "$WORK/results" ;; esac
    fi
    cp "${files[@]}" "$OUT_DIR/" 2>/dev/null
    sleep 1  # let tee catch up
    tar -czf "$OUT_DIR/bench_results.tar.gz" -C "$WORK" . 2>/dev/null
    cp "$LOG" "$OUT_DIR/"  # the log again, complete up to here
    echo "copied to \$OUT: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
fi
[ "$brc" = 0 ] && { [ "$trc" = 0 ] || [ "$trc" = 5 ]; }
