#!/usr/bin/env bash
# Trains the two quality-study models side by side on one GPU, then runs the quality
# study on both, within one 10-minute window:
#   tools/quality_study_gpu.sh CORPUS_TAR OUT_DIR [FG_S DENSE_S UPCYCLED_S TOTAL_S]
# CORPUS_TAR: a tar.xz of a `build_corpus` directory (the GPU machine has no network).
# FG_S / UPCYCLED_S: seconds of MoE training (the steps are planned to fill them);
# DENSE_S: seconds of the upcycled recipe's dense phase; TOTAL_S: the study stops in time
# for the whole script to end within it. Writes OUT_DIR/models/<name>/ (HF layout),
# OUT_DIR/results/quality_*.{json,md,png} and OUT_DIR/logs/. For a CPU check at small
# scale: RECIPE_PREFIX=smoke_ and extra flags in TRAIN_FLAGS / STUDY_FLAGS (last wins).
set -uo pipefail
corpus_tar=$1; out=$2; fg_s=${3:-270}; dense_s=${4:-60}; up_s=${5:-200}; total_s=${6:-570}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
export PYTHONPATH=$("$here/tools/device_pythonpath.sh" "$here") PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # two processes share the GPU
tar -xJf "$corpus_tar" -C "$work"
corpus=$(find "$work" -maxdepth 2 -name corpus.json -printf '%h\n' | head -1)
mkdir -p "$out/models" "$out/results" "$out/logs"
common=(--corpus_dir="$corpus" --steps=0 --batch_size=128 --seq_len=256 --log_every=100
        --checkpoint_every=100000 --mixture=python=0.55,shakespeare=0.15,tasks=0.3
        ${TRAIN_FLAGS:-})
prefix=${RECIPE_PREFIX:-}
python -m sere_jax.scripts.train_moe --recipe="${prefix}fine_grained" "${common[@]}" \
    --workdir="$work/wd_fg" --out_dir="$out/models/fine_grained_moe" \
    --time_budget_s="$fg_s" > "$out/logs/train_fine_grained.log" 2>&1 &
python -m sere_jax.scripts.train_moe --recipe="${prefix}upcycled" "${common[@]}" \
    --workdir="$work/wd_up" --out_dir="$out/models/upcycled_moe" --dense_steps=0 \
    --dense_time_budget_s="$dense_s" --time_budget_s="$up_s" \
    > "$out/logs/train_upcycled.log" 2>&1 &
wait
left=$((total_s - SECONDS))
echo "training done after ${SECONDS} s; ${left} s left for the study"
for m in fine_grained_moe upcycled_moe; do
  [[ -d "$out/models/$m" ]] || continue
  timeout "$left" python -m sere_jax.scripts.quality_study --model_dir="$out/models/$m" \
      --heldout_dir="$corpus/test" --out_dir="$out/results" --compile_threads=8 \
      ${STUDY_FLAGS:-} \
      > "$out/logs/study_$m.log" 2>&1 &
done
wait
echo "done after ${SECONDS} s"
