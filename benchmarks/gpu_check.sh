#!/usr/bin/env bash
# The one script run on a GPU machine (repo root as cwd, python3 holding torch and triton): the GPU
# benchmark rows first, then the compiled test subset, in at most GPU_CHECK_LIMIT_S seconds (default
# 420 = 7 minutes).  Everything is written to $OUT as it happens (tee, line-buffered), so a run that is
# stopped early still leaves its log, the steps done so far and the tables finished so far.
#
#   bash benchmarks/gpu_check.sh                 # OUT defaults to /tmp/gpu_check_out
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh # CPU dry run: the same steps, tiny, no GPU needed
#
# Rows (bf16, fwd+bwd, each against the peers that apply and torch.mm's rate, OOM / cannot-fit rows say
# so): CLIP M=2 D=512 at B = 8k, 32k, 64k and the SCALE NT-Xent M=5 loss with S' weights
# (benchmarks/bench_contrastive.py: naive, OpenCLIP ClipLoss, Inf-CL); a per-kernel time breakdown of
# one fwd+bwd iteration of CLIP B=8192 D=512 and SCALE M=5 B=16384 D=256 (benchmarks/profile_kernels.py,
# torch.profiler, profile_cuda.md); linear cross-entropy at
# N=16384, K=21128, H=768 (benchmarks/bench_linear_ce.py: Liger, Cut CE, F.linear + cross_entropy);
# after the tests, when at least 100 s are left, the sigmoid (SigLIP) loss at B = 8k, 32k
# (bench_contrastive.py --form siglip: naive, OpenCLIP SigLipLoss).
# Shapes a bench script does not take as flags (--dim/--modalities, --rows/--vocab) are run only when
# the script defines them; otherwise steps.txt says so.
#
# Peers: from a local wheel folder named by SCALE_FAST_WHEELS (e.g. a folder carried to the GPU machine), with
# pip --no-index --no-deps, else by name from the index, --no-deps (nothing may pull another torch or
# triton).  Files in $OUT: gpu_check.log (all output), steps.txt (one line
# per step: name, exit code, seconds), the benchmark tables (*.md, *.csv), kernel_report.txt.
set -u

T0=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-420}
OUT=${OUT:-/tmp/gpu_check_out}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.txt"
: > "$STEPS"
exec > >(stdbuf -oL tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
REPO=$(pwd)
MARK=$(mktemp /tmp/gpu_check_start.XXXXXX)      # tables newer than this were made by this run

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(date +%s) + T0 )); }

collect() {  # copy the tables this run wrote into $OUT (also on an early stop)
    for f in benchmarks/results/*.md benchmarks/results/*.csv /tmp/sf_bench_dryrun/*.md /tmp/sf_bench_dryrun/*.csv; do
        [ -f "$f" ] && [ "$f" -nt "$MARK" ] && cp "$f" "$OUT/" 2>/dev/null
    done
}
finish() {
    collect
    echo
    echo "===== gpu_check stopped or done after $(elapsed)s; steps:"
    cat "$STEPS"
}
trap 'echo "gpu_check: interrupted"; finish; exit 130' INT TERM
trap 'finish' EXIT

# step NAME SECONDS CMD...: run with a time limit (capped by what is left), record it, never abort
step() {
    local name=$1 cap=$2; shift 2
    local t=$(date +%s) lim rc
    lim=$(left); [ "$cap" -lt "$lim" ] && lim=$cap
    if [ "$lim" -lt 10 ]; then
        echo "$name rc=skipped (only $(left)s left)" | tee -a "$STEPS"
        return 0
    fi
    echo
    echo "===== [$(elapsed)s] $name (limit ${lim}s): $*"
    timeout --signal=TERM --kill-after=10 "$lim" "$@"
    rc=$?
    [ $rc -eq 124 ] && echo "$name: stopped at its ${lim}s limit"
    echo "$name rc=$rc $(( $(date +%s) - t ))s" | tee -a "$STEPS"
    collect
    return 0
}

# flag FILE FLAG: true when the script defines the option FLAG (read from its source: no python start-up)
flag() { grep -q -- "\"$2\"" "$1"; }

echo "gpu_check: $(date -u) limit ${LIMIT}s dry=${DRY} out=${OUT}"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" \
    || echo "gpu_check: torch/triton do not import"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true

# ---- peers and the package (fast; nothing here may replace torch or triton)
WHEELS=${SCALE_FAST_WHEELS:-}
install_peers() {
    if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
    else
        python3 -m pip install -q --no-deps open_clip_torch inf_cl liger_kernel cut_cross_entropy ftfy wcwidth
    fi
}
export -f install_peers
export WHEELS
[ "$DRY" = 1 ] || step peers 90 bash -c install_peers
step install 60 python3 -m pip install -q --no-deps --no-build-isolation -e .
if ! python3 -c "import scale_fast.backends.triton" 2>/dev/null; then
    echo "the installed package does not import; using the source tree on PYTHONPATH"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|open.clip|inf.cl|liger|cut.cross) " || true

# ---- GPU benchmark rows first
if [ "$DRY" = 1 ]; then
    BENCH=(--dry-run); CLIP_B=64,96
else
    BENCH=(--device cuda); CLIP_B=8192,32768,65536
fi
C=benchmarks/bench_contrastive.py
CARGS=("${BENCH[@]}" --batches "$CLIP_B")
step bench_contrastive 170 python3 "$C" "${CARGS[@]}" --budget-s 150
if flag "$C" "--dim" && flag "$C" "--modalities"; then  # the SCALE loss at D=256, B = 8k, 16k, 32k
    S_B=$([ "$DRY" = 1 ] && echo 64 || echo 8192,16384,32768)
    step bench_scale_d256 100 python3 "$C" "${BENCH[@]}" --batches "$S_B" --dim 256 --modalities 5 --budget-s 80
else
    echo "bench_scale_d256 rc=skipped ($C takes no --dim/--modalities: its M=5 rows run at D=512 above)" | tee -a "$STEPS"
fi
# where the time goes: one profiled fwd+bwd iteration of CLIP B=8192 D=512 and SCALE M=5 B=16384 D=256
PROF=$([ "$DRY" = 1 ] && echo "--dry-run" || echo "--device cuda")
step profile 60 python3 benchmarks/profile_kernels.py $PROF
L=benchmarks/bench_linear_ce.py
step bench_linear_ce 100 python3 "$L" "${BENCH[@]}" --budget-s 80
if flag "$L" "--vocab"; then  # a modern LLM vocabulary
    L_DRY=$([ "$DRY" = 1 ] && echo "--case-budget-s 1")   # torch's chunked peer takes seconds a call on a CPU
    step bench_linear_ce_151k 60 python3 "$L" "${BENCH[@]}" --rows 65536 --vocab 151936 --budget-s 50 $L_DRY
else
    echo "bench_linear_ce_151k rc=skipped ($L takes no --rows/--vocab)" | tee -a "$STEPS"
fi

# ---- then the compiled test subset (the Triton ops on CUDA) and the kernel report
TESTS="tests/test_contrastive.py tests/test_scores.py tests/test_linear_ce.py tests/test_scale_loss.py"
if [ "$DRY" = 1 ]; then
    step tests 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_contrastive.py -k "row_range and triton"
else
    step tests 150 python3 -m pytest -q --maxfail=20 -p no:cacheprovider $TESTS -k triton -W ignore
fi
if [ "$(left)" -gt 100 ]; then  # the sigmoid loss at M=2 (OpenCLIP SigLipLoss, naive) and M=5, when time is left
    SIG_B=$([ "$DRY" = 1 ] && echo 64 || echo 8192,32768)
    step bench_siglip 60 python3 "$C" "${BENCH[@]}" --form siglip --batches "$SIG_B" --budget-s 45
else
    echo "bench_siglip rc=skipped (only $(left)s left)" | tee -a "$STEPS"
fi
if [ "$(left)" -gt 40 ]; then
    step kernel_report 60 bash -c "TRITON_INTERPRET=0 python3 benchmarks/kernel_report.py --quick --arch sm_90a > '$OUT/kernel_report.txt' 2>&1; rc=\$?; tail -20 '$OUT/kernel_report.txt'; exit \$rc"
fi
exit 0
