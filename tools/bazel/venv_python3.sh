#!/usr/bin/env bash
# Python interpreter of the Bazel toolchain (//tools/bazel:venv_python_toolchain):
# runs the repository's .venv python. Bazel calls this script through a symlink in
# the test's runfiles, so resolve that back to tools/bazel/ in the source tree.
set -euo pipefail
here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
repo="$(cd "$here/../.." && pwd)"
python="$repo/.venv/bin/python3"
if [[ ! -x $python ]]; then
  echo "error: $python not found; run 'make venv' (or 'make test') in $repo first." >&2
  exit 1
fi
exec "$python" "$@"
