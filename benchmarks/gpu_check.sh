#!/usr/bin/env bash
# The one script run on the GPU machine (repo root as cwd, $OUT an output folder, python3
# the interpreter that holds torch): environment, peer wheels, the package, the test suite
# on CUDA, then the GPU benchmark tables.  Every step is recorded and a failed step does not
# stop the ones after it; the whole script stays under 5 minutes.
#
#   bash benchmarks/gpu_check.sh            # OUT defaults to /tmp/gpu_check_out
#
# Files left in $OUT (at most 8): gpu_check.log (everything printed), steps.txt (one line per
# step: name, exit code, seconds), contrastive_<gpu>.md/.csv, linear_ce_<gpu>.md/.csv.
set -u

T0=$(date +%s)
TOTAL_LIMIT=${GPU_CHECK_LIMIT_S:-285}        # seconds for the whole script
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
MARK=$(mktemp /tmp/gpu_check_start.XXXXXX)      # tables newer than this one were made by this run
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.txt"
: > "$STEPS"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL_LIMIT - $(date +%s) + T0 )); }

# step NAME CMD...: run, record "NAME rc=N Ns" in steps.txt, never abort the script
step() {
    local name=$1; shift
    local t=$(date +%s)
    echo
    echo "===== [$(elapsed)s] $name: $*"
    "$@"
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t ))s" | tee -a "$STEPS"
    return $rc
}

step env bash -c '
    date -u; uname -a
    nvidia-smi || echo "nvidia-smi failed"
    python3 -c "import sys, torch, triton; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(\"triton\", triton.__version__); print(\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
'

# peers as wheels (no index, no deps: nothing may pull another torch or triton)
step wheels python3 -m pip install -q --no-index --no-deps --no-cache-dir benchmarks/wheels/*.whl
python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|open.clip|inf.cl|liger|cut.cross|ftfy|wcwidth) " || true

# the project itself: editable, else a plain copy, else the source tree on PYTHONPATH
install_project() {
    python3 -m pip install -q --no-deps --no-build-isolation -e . \
        && python3 -c "import scale_fast, scale_fast.backends.triton" && return 0
    echo "editable install failed or scale_fast.backends.triton missing; trying a plain install"
    python3 -m pip install -q --no-deps --no-build-isolation . \
        && (cd /tmp && python3 -c "import scale_fast, scale_fast.backends.triton") && return 0
    echo "plain install failed; overlaying the source tree on PYTHONPATH"
    rm -rf /tmp/sf_overlay && mkdir -p /tmp/sf_overlay \
        && cp -r scale_fast /tmp/sf_overlay/scale_fast
    export PYTHONPATH=/tmp/sf_overlay${PYTHONPATH:+:$PYTHONPATH}
    (cd /tmp && python3 -c "import scale_fast, scale_fast.backends.triton")
}
REPO=$(pwd)
# tests and checks run from /tmp: "python3 -m pytest" puts the cwd first on sys.path, and the
# installed package is the one under test
RUN_DIR=/tmp
step install install_project
step import bash -c "cd '$RUN_DIR' && python3 -c \"import scale_fast as sf; print('scale_fast', getattr(sf, '__version__', '?'), sf.__file__); print('backends', sf.available_backends())\""

# the test suite on CUDA
# (at most 150 s, and at least ~120 s are kept for the benchmarks)
t=$(( $(left) - 125 )); [ "$t" -gt 150 ] && t=150; [ "$t" -lt 30 ] && t=30
OP_TESTS="'$REPO/tests/test_scores.py' '$REPO/tests/test_contrastive.py' '$REPO/tests/test_linear_ce.py' '$REPO/tests/test_scale_loss.py' '$REPO/tests/test_compile.py'"
step tests bash -c "cd '$RUN_DIR' && timeout $t python3 -m pytest $OP_TESTS -q -k triton --maxfail=25 -p no:cacheprovider --rootdir '$REPO' -W ignore"

# the GPU tables: linear CE first (short), then contrastive with what is left
b=$(( $(left) - 10 )); [ "$b" -gt 200 ] && b=200
if [ "$b" -ge 40 ]; then
    bl=$(( b * 30 / 100 )); [ "$bl" -gt 60 ] && bl=60
    step bench_linear_ce timeout $(( bl + 40 )) python3 benchmarks/bench_linear_ce.py --device cuda --budget-s "$bl"
    bc=$(( $(left) - 15 )); [ "$bc" -gt 200 ] && bc=200
    if [ "$bc" -ge 30 ]; then
        step bench_contrastive timeout $(( bc + 40 )) python3 benchmarks/bench_contrastive.py --device cuda --budget-s "$bc"
    else
        echo "bench_contrastive rc=skipped (only ${bc}s left)" | tee -a "$STEPS"
    fi
else
    echo "benchmarks rc=skipped (only ${b}s left)" | tee -a "$STEPS"
fi

# tables into $OUT (they already are in benchmarks/results/, with device, versions and date)
for f in benchmarks/results/contrastive_*.md benchmarks/results/contrastive_*.csv \
         benchmarks/results/linear_ce_*.md benchmarks/results/linear_ce_*.csv; do
    case "$f" in *_cpu*|*dryrun*) continue ;; esac
    [ -f "$f" ] && [ "$f" -nt "$MARK" ] && cp "$f" "$OUT/"
done
echo
echo "===== done in $(elapsed)s; steps:"
cat "$STEPS"
ls -la "$OUT"
exit 0
