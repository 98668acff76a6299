#!/usr/bin/env bash
# Prints a PYTHONPATH under which `sere_jax.*` imports work without installing the
# package (for machines without network or pip, e.g. the benchmark GPU machine):
#   export PYTHONPATH=$(tools/device_pythonpath.sh)       # this checkout
#   export PYTHONPATH=$(tools/device_pythonpath.sh DIR)   # the source tree in DIR
# DIR lets one process compare versions on a machine without git: export a commit
# beside the checkout first (`mkdir -p ab/x && git archive REV | tar -x -C ab/x`; an
# untracked, unignored directory travels to the device with the working tree). Run
# with PYTHONSAFEPATH=1 when the current directory holds a source tree, or Python
# imports its unmapped `sere_jax/` first.
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
for part in sere_jax pallas_kernels models scripts; do
  [[ -d "$repo/$part" ]] || { echo "device_pythonpath.sh: no $part/ in $repo" >&2; exit 1; }
done
root=$(mktemp -d)
mkdir -p "$root/sere_jax"
cp -r "$repo"/sere_jax/. "$root/sere_jax/"
cp -r "$repo/pallas_kernels" "$root/sere_jax/kernels"
cp -r "$repo/models" "$root/sere_jax/models"
cp -r "$repo/scripts" "$root/sere_jax/scripts"
echo "$root"
