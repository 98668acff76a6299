#!/usr/bin/env bash
# Trains the quality-study models on one GPU, then runs the quality study on them, one
# process per model and batch size in parallel, within one 10-minute window:
#   tools/quality_study_gpu.sh CORPUS_TAR OUT_DIR [FG_S DENSE_S UPCYCLED_S TOTAL_S]
# CORPUS_TAR: a tar.xz of a `build_corpus` directory (the GPU machine has no network).
# FG_S / UPCYCLED_S: seconds of MoE training (the steps are planned to fill them);
# DENSE_S: seconds of the upcycled recipe's dense phase; TOTAL_S: the study stops in time
# for the whole script to end within it. Environment: RECIPES (default "fine_grained
# upcycled"; two recipes train side by side), STUDY_BATCHES (default "8 16 32 64").
# Writes OUT_DIR/models/<name>/ (HF layout), OUT_DIR/results/b<B>/quality_*.{json,md,png}
# (merge them with `quality_study --report_only --merge=...`) and OUT_DIR/logs/. For a
# CPU check at small scale: RECIPE_PREFIX=smoke_ and extra flags in TRAIN_FLAGS /
# STUDY_FLAGS (last wins).
set -uo pipefail
corpus_tar=$1; out=$2; fg_s=${3:-270}; dense_s=${4:-60}; up_s=${5:-200}; total_s=${6:-570}
recipes=(${RECIPES:-fine_grained upcycled}); batches=(${STUDY_BATCHES:-8 16 32 64})
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
export PYTHONPATH=$("$here/tools/device_pythonpath.sh" "$here") PYTHONUNBUFFERED=1
tar -xJf "$corpus_tar" -C "$work"
corpus=$(find "$work" -maxdepth 2 -name corpus.json -printf '%h\n' | head -1)
mkdir -p "$out/models" "$out/results" "$out/logs"
common=(--corpus_dir="$corpus" --steps=0 --batch_size=128 --seq_len=256 --log_every=100
        --checkpoint_every=100000 --mixture=python=0.55,shakespeare=0.15,tasks=0.3
        ${TRAIN_FLAGS:-})
prefix=${RECIPE_PREFIX:-}
# The training runs share the GPU's memory.
fraction=$(python -c "print(round(0.9 / ${#recipes[@]}, 2))")
for recipe in "${recipes[@]}"; do
  case $recipe in
    fine_grained) extra=(--time_budget_s="$fg_s") ;;
    upcycled) extra=(--dense_steps=0 --dense_time_budget_s="$dense_s"
                     --time_budget_s="$up_s") ;;
    *) echo "unknown recipe $recipe" >&2; exit 2 ;;
  esac
  XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction python -m sere_jax.scripts.train_moe \
      --recipe="$prefix$recipe" "${common[@]}" --workdir="$work/wd_$recipe" \
      --out_dir="$out/models/${recipe}_moe" "${extra[@]}" \
      > "$out/logs/train_$recipe.log" 2>&1 &
done
wait
left=$((total_s - SECONDS))
echo "training done after ${SECONDS} s; ${left} s left for the study"
jobs=$(( ${#recipes[@]} * ${#batches[@]} ))
threads=$(( $(nproc) / jobs > 1 ? $(nproc) / jobs : 1 ))
for recipe in "${recipes[@]}"; do
  m=${recipe}_moe
  [[ -d "$out/models/$m" ]] || continue
  for b in "${batches[@]}"; do
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$left" python -m \
        sere_jax.scripts.quality_study --model_dir="$out/models/$m" \
        --heldout_dir="$corpus/test" --calibration_dir="$corpus/validation" \
        --out_dir="$out/results/b$b" --batch_sizes="$b" --compile_threads="$threads" \
        ${STUDY_FLAGS:-} > "$out/logs/study_${m}_b$b.log" 2>&1 &
  done
done
wait
echo "done after ${SECONDS} s"
