#!/usr/bin/env bash
# Decode A/B of source trees on one GPU machine: one benchmark process per tree, back to
# back, then `tools/decode_ab.py` of the first tree against each other one.
#
#   tools/decode_ab_trees.sh OUT MODEL BATCHES POLICIES TREE...
#   tools/decode_ab_trees.sh /tmp/ab deepseek_v2_lite 1,16,64 none,sere:2:0 ab/base .
#
# A TREE is a directory holding sere_jax/, pallas_kernels/, models/ and scripts/: this
# checkout (`.`) or a commit exported beside it
# (`git archive REV sere_jax pallas_kernels models scripts | tar -x -C ab/base`).
# Writes OUT/<i>.json and .md per tree (i = 0, 1, ...; with --profile_dir profiles, so
# the comparison has GPU busy time and kernels per step) and OUT/ab_0_<i>.json.
# BENCHMARK_FLAGS adds flags to every benchmark run (e.g. `--scale=tiny` on a CPU).
set -euo pipefail
if (( $# < 6 )); then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
out=$1 model=$2 batches=$3 policies=$4
shift 4
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
i=0
for tree in "$@"; do
  echo "== tree $i: $tree" >&2
  PYTHONSAFEPATH=1 PYTHONPATH=$("$here/device_pythonpath.sh" "$tree") python -m \
    sere_jax.scripts.benchmark --suite=decode --model="$model" --batch="$batches" \
    --policies="$policies" --hf_peer=false --repeats=2 --profile_dir="$out/prof_$i" \
    --out="$out/$i" --overwrite ${BENCHMARK_FLAGS:-}
  i=$((i + 1))
done
for ((j = 1; j < i; j++)); do
  echo "== tree 0 -> tree $j" >&2
  PYTHONSAFEPATH=1 PYTHONPATH=$("$here/device_pythonpath.sh") python "$here/decode_ab.py" \
    "$out/0.json" "$out/$j.json" "$out/ab_0_$j.json"
done
