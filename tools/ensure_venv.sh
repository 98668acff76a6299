#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs the package with its test and plot
# extras. Does nothing when .venv is already up to date with pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed
if [[ -f $stamp && $stamp -nt pyproject.toml && -x .venv/bin/python ]]; then
  exit 0
fi

is_py312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

python=""
for candidate in "${PYTHON:-}" python3.12 python3 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  [[ -n $candidate ]] || continue
  if command -v "$candidate" >/dev/null 2>&1 && is_py312 "$candidate"; then
    python=$candidate
    break
  fi
done
if [[ -z $python ]]; then
  echo "error: sere-jax needs Python 3.12 (jax 0.11 requires it) and none was found." >&2
  echo "Install python3.12 (e.g. 'pyenv install 3.12.1') or set PYTHON=/path/to/python3.12." >&2
  exit 1
fi

echo "Setting up .venv with $($python --version) ..."
rm -rf .venv
"$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,plot]'
touch "$stamp"
