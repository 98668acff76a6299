#!/usr/bin/env bash
# Prints a PYTHONPATH under which `sere_jax.*` imports work without installing the
# package (for machines without network or pip, e.g. the benchmark GPU machine):
#   export PYTHONPATH=$(tools/device_pythonpath.sh)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=$(mktemp -d)
mkdir -p "$root/sere_jax"
cp -r "$repo"/sere_jax/. "$root/sere_jax/"
cp -r "$repo/pallas_kernels" "$root/sere_jax/kernels"
cp -r "$repo/models" "$root/sere_jax/models"
cp -r "$repo/scripts" "$root/sere_jax/scripts"
echo "$root"
