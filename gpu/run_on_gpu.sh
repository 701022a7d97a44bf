#!/usr/bin/env bash
# The one command of a lent GPU machine (issue 24), run from the repository root:
#
#     bash gpu/run_on_gpu.sh "$OUT"
#
# 1. installs the carried wheels (.whl/) into a --target folder; where SimpleITK is missing, nnU-Net, MedPy and
#    nnunet_kd read and write NIfTI through gpu/sitk_shim (nibabel);
# 2. the 2 mm study: stock nnU-Net on T1ce (baseline) and on all four modalities, modality dropout and MGSD fed
#    T1ce, the MTCM-KD student; 3 folds of the 33 cases, one study process per fold, all 15 trainings at once on
#    the one GPU, the same EPOCHS x ITERATIONS for every model, eager (nnUNet_compile=0);
# 3. one pooled report over the folds (study --collect: also what finished if a fold ran out of time);
# 4. the benchmark on the 2 mm plans (fold 0's preprocessed data): eager against eager, then nnU-Net's defaults
#    (compiled on CUDA), peak memory, ratios to stock nnU-Net in the same run;
# 5. packs everything into OUT: results.tar.gz, benchmark.json, study.md, run_log.txt (4 files).
#
# Every part runs under `timeout` (its whole process group is killed), so a slow part never eats the next one;
# the parts' limits add up to at most T_TOTAL seconds. Every setting below can be overridden from the
# environment (the CPU rehearsal in gpu/README.md does); DRY=1 prints the plan and runs nothing.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${1:?usage: bash gpu/run_on_gpu.sh OUT_DIR}
: "${PY:=python3}" "${DEVICE:=cuda}" "${DRY:=0}"
: "${WHL:=$REPO/.whl}" "${DATA:=$REPO/.gpu_data/BraTS2018_2mm}"
: "${SITE:=/tmp/nnkd_site}" "${WORK:=/tmp/nnkd_work}"
# the study's budget (gpu/README.md: how it was chosen)
: "${EPOCHS:=5}" "${ITERATIONS:=16}" "${FOLDS:=3}" "${SPLITS:=0 1 2}" "${TARGET_SPACING:=}"
: "${MODELS:=nnUNetTrainerBudget_full nnUNetTrainerModalityDropout_full nnUNetTrainerMGSD_full \
nnUNetTrainerMTCMKD_full}"
: "${PARALLEL:=5}"      # trainings at once per fold process: the 5 models (the baseline comes with --only)
: "${NP_PREP:=5}"       # nnU-Net workers of each fold's conversion and preprocessing (3 folds at once)
: "${DA_WORKERS:=2}"    # nnUNet_n_proc_DA (and nnUNet_def_n_proc) of each of the 15 trainings
# time limits, seconds (wall clock of this script; the machine's start and the transfers are not in it)
: "${T_TOTAL:=510}" "${T_INSTALL:=60}" "${T_STUDY:=330}" "${T_REPORT:=30}" "${T_BENCH_MIN:=60}" "${T_PACK:=20}"
: "${PARTS:=install study report benchmark}"  # the parts to run (the import check and packing always run)
: "${STUDY_OMP:=1}"     # OMP_NUM_THREADS of the study's processes (15 trainings share 16 cores)
: "${RESUME:=0}"        # 1: the study continues in WORK's fold folders (--resume) instead of starting afresh
# the benchmark
: "${BENCH_STEPS:=30}" "${BENCH_WARMUP:=5}" "${BENCH_DL_STEPS:=10}" "${BENCH_REPEATS:=3}" "${BENCH_EAGER_ONLY:=0}"

START=$SECONDS
mkdir -p "$OUTDIR" "$WORK/logs"
LOG="$OUTDIR/run_log.txt"
: >"$LOG"
say() { echo "[gpu-run $(( SECONDS - START ))s] $*" | tee -a "$LOG" >&2; }
left() { echo $(( T_TOTAL - (SECONDS - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# part NAME LIMIT CMD...: run CMD under `timeout LIMIT` (its process group killed, -k 15 s later by SIGKILL),
# output to $WORK/logs/NAME.log; records the seconds and the exit status (124/137: out of time).
part() {
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 5 ]; then say "part $name: skipped, $limit s left"; return 99; fi
    say "part $name: start (limit $limit s): $*"
    if [ "$DRY" = 1 ]; then return 0; fi
    local t0=$SECONDS rc=0
    timeout -k 15 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
    say "part $name: end, $(( SECONDS - t0 )) s, exit $rc$( [ $rc = 124 ] || [ $rc = 137 ] && echo ' (OUT OF TIME)')"
    return $rc
}

say "settings: DEVICE=$DEVICE EPOCHS=$EPOCHS ITERATIONS=$ITERATIONS FOLDS=$FOLDS SPLITS='$SPLITS' PARALLEL=$PARALLEL" \
    "DA_WORKERS=$DA_WORKERS NP_PREP=$NP_PREP TARGET_SPACING='$TARGET_SPACING' T_TOTAL=$T_TOTAL T_STUDY=$T_STUDY" \
    "BENCH_STEPS=$BENCH_STEPS MODELS='$MODELS' DATA=$DATA WHL=$WHL"

# ---------------------------------------------------------------- 0. the machine
if [ "$DRY" != 1 ]; then
    { date -Is; uname -a; nproc; free -g; df -h /tmp; "$PY" -VV
      "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
      command -v nvidia-smi >/dev/null && nvidia-smi; } >"$WORK/logs/machine.log" 2>&1
fi

# ---------------------------------------------------------------- 1. install
has() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
if has install; then
    part install "$(min "$T_INSTALL" "$(left)")" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
if [ "$DRY" != 1 ] && ! "$PY" -c "import SimpleITK" 2>/dev/null; then
    export PYTHONPATH="$PYTHONPATH:$REPO/gpu/sitk_shim"
    say "SimpleITK is missing: NIfTI through gpu/sitk_shim (nibabel)"
fi
IMPORTS="import SimpleITK, nibabel, nnunetv2, medpy.metric.binary, blosc2, torch, nnunet_kd.experiments.study.cli, \
nnunet_kd.experiments.benchmark.cli, nnunetv2.run.run_training; print('SimpleITK', SimpleITK.__version__, \
'nibabel', nibabel.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if ! part imports "$(min 60 "$(left)")" "$PY" -c "$IMPORTS"; then
    say "imports failed (logs/imports.log): nothing else can run"
    PARTS=pack
fi
[ "$DRY" = 1 ] || cat "$WORK/logs/imports.log" >>"$LOG"

# ---------------------------------------------------------------- 2. the study, one process per fold, at once
STUDY_ARGS=(--real-brats "$DATA" --folds "$FOLDS" --epochs "$EPOCHS" --iterations "$ITERATIONS" --device "$DEVICE"
            --only $MODELS)
PLANS=nnUNetPlans
if [ -n "$TARGET_SPACING" ]; then
    STUDY_ARGS+=(--target-spacing $TARGET_SPACING)
    PLANS="nnUNetPlans_$(echo $TARGET_SPACING | sed 's/ /x/g')mm"
fi
if has study; then
    limit=$(min "$T_STUDY" "$(( $(left) - T_REPORT - T_BENCH_MIN - T_PACK ))")
    for f in $SPLITS; do
        part "study_fold$f" "$limit" env OMP_NUM_THREADS="$STUDY_OMP" nnUNet_n_proc_DA="$DA_WORKERS" \
            nnUNet_def_n_proc="$DA_WORKERS" nnUNet_compile=0 \
            "$PY" -m nnunet_kd.experiments.study "${STUDY_ARGS[@]}" --seeds "$f" --parallel "$PARALLEL" \
            -np "$NP_PREP" --workdir "$WORK/study_fold$f" $( [ "$RESUME" = 1 ] && echo --resume ) &
    done
    wait
fi

# ---------------------------------------------------------------- 3. one report over the folds
if has report; then
    part report "$(min "$T_REPORT" "$(( $(left) - T_PACK ))")" "$PY" -m nnunet_kd.experiments.study \
        "${STUDY_ARGS[@]}" --collect "$WORK"/study_fold* --workdir "$WORK/report" --markdown "$WORK/report/study.md"
fi

# ---------------------------------------------------------------- 4. the benchmark on fold 0's 2 mm plans
if has benchmark; then
    if [ -f "$WORK/study_fold0/fold0/prepared.done" ]; then
        P="$WORK/study_fold0/fold0"
        BENCH=(env nnUNet_raw="$P/raw" nnUNet_preprocessed="$P/preprocessed" "$PY" -m nnunet_kd.experiments.benchmark
               --dataset-id 600 --plans "$PLANS")
    else  # no prepared fold 0: the benchmark converts and plans the data itself
        BENCH=("$PY" -m nnunet_kd.experiments.benchmark --real-brats "$DATA" --num-processes 8)
    fi
    [ "$BENCH_EAGER_ONLY" = 1 ] && BENCH+=(--eager-only)
    . "$REPO/gpu/fresh_dir.sh"
    if fresh_dir "$WORK/bench"; then
        part benchmark "$(( $(left) - T_PACK ))" "${BENCH[@]}" --device "$DEVICE" --steps "$BENCH_STEPS" \
            --warmup "$BENCH_WARMUP" --data-loading-steps "$BENCH_DL_STEPS" --inference-repeats "$BENCH_REPEATS" \
            --work-dir "$WORK/bench" --keep-work-dir -o "$WORK/bench/benchmark.json"
    else
        say "part benchmark: skipped ($WORK/bench was not made by this script)"
    fi
fi

# ---------------------------------------------------------------- 5. pack (what finished, whatever failed)
say "packing"
[ "$DRY" = 1 ] && exit 0
cp "$WORK/bench/benchmark.json" "$OUTDIR/" 2>/dev/null ||
    say "no benchmark.json (logs/benchmark.log has each trainer's figures as measured; bench/measure_*_result.json)"
cp "$WORK/report/study.md" "$OUTDIR/" 2>/dev/null || say "no pooled study.md (see logs/report.log)"
cd "$WORK" || exit 1
# results.tar.gz: reports, scores, combination tables, test-case predictions, logs, learning curves, benchmark
# JSON; no weights, data, validation or combination predictions (the 15 combinations' NIfTI would be ~40 MB)
pack() {  # pack [EXTRA_EXCLUDE...]
    timeout "$T_PACK" tar -czf "$OUTDIR/results.tar.gz" --exclude='*.pth' --exclude='*.npz' --exclude='*.b2nd' \
        --exclude='*.pkl' --exclude='*/raw/*' --exclude='*/preprocessed/*' --exclude='*/train_src/*' \
        --exclude='*/test_src/*' --exclude='*/inputs_T1ce_numbered/*' --exclude='*/nnUNet_preprocessed/*' \
        --exclude='*/nnUNet_raw/*' --exclude='*/validation/*' --exclude='*/combinations_*/predictions/*' "$@" \
        $(ls -d logs report study_fold* bench 2>/dev/null) \
        2>>"$LOG"
}
pack
if [ "$(stat -c %s "$OUTDIR/results.tar.gz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
    say "results.tar.gz over 15 MB: packing again without predicted NIfTI files"
    pack --exclude='*.nii.gz'
fi
say "done: $(ls -l "$OUTDIR" | tail -n +2 | awk '{print $5, $9}' | tr '\n' ';')"
