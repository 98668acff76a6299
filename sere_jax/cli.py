"""What every command-line script of `sere_jax.scripts` shares.

    def run() -> None:
      cli.run(main)              # the console-script and `python -m` entry point

`run(main)` runs `main(argv)` under `absl.app.run`, with three differences:
`--help` / `--helpshort` / `-h` / `-?` print the script's documentation and its own
flags (`--helpfull`: every flag) and exit 0; third-party INFO logging (absl, Orbax's
checkpoint chatter, JAX's backend probing) stays off unless `--verbosity` is given; and
an `app.UsageError` prints one line, not the whole usage. `check_outputs` refuses, before
any long work, output paths that cannot be written or would replace existing files
without `--overwrite`; `progress` and `Counter` draw the scripts' progress bars;
`expert_mesh` reads an `--expert_devices` flag.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from typing import Callable, Iterable, TypeVar

from absl import app
from absl import flags
from absl import logging
import tqdm

from sere_jax import expert_parallel
from sere_jax import fileio

T = TypeVar("T")

HELP_ARGS = frozenset({"-?", "-h", "-help", "--help", "-helpshort", "--helpshort"})
FULL_HELP_ARGS = frozenset({"-helpfull", "--helpfull"})
# Python loggers kept at WARNING unless --verbosity is given.
QUIET_LOGGERS = ("absl", "orbax", "jax")


def run(main: Callable[[list[str]], object]) -> None:
  """Runs `main(argv)` as a script (see the module docstring); does not return."""
  args = sys.argv[1:]
  if "--" in args:
    args = args[:args.index("--")]
  if HELP_ARGS.intersection(args) or FULL_HELP_ARGS.intersection(args):
    sys.stdout.write(usage(main, full=bool(FULL_HELP_ARGS.intersection(args))))
    sys.exit(0)
  app.run(_one_line_usage_errors(main), flags_parser=_parse_flags)


def usage(main: Callable[..., object], *, full: bool = False) -> str:
  """The help text of the script defining `main`: its docstring and its flags (every
  flag with `full`)."""
  module = sys.modules[main.__module__]
  doc = (module.__doc__ or f"USAGE: {os.path.basename(sys.argv[0])} [flags]\n").strip("\n")
  # absl files the flags of the `python -m` main module under its path.
  key = sys.argv[0] if module.__name__ == "__main__" else module.__name__
  listing = flags.FLAGS.get_help() if full else flags.FLAGS.module_help(key)
  footer = ("Third-party INFO logging is off; --verbosity=0 shows it." +
            ("" if full else " --helpfull lists every flag."))
  return f"{doc}\n\nflags:\n{listing}\n\n{footer}\n"


def _parse_flags(argv: list[str]) -> list[str]:
  rest = app.parse_flags_with_usage(argv)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # app.run would raise it to INFO
    for name in QUIET_LOGGERS:
      pylogging.getLogger(name).setLevel(pylogging.WARNING)
  return rest


def _one_line_usage_errors(main: Callable[[list[str]], object]
                           ) -> Callable[[list[str]], object]:
  def wrapped(argv: list[str]) -> object:
    try:
      return main(argv)
    except app.UsageError as e:
      sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {e}\n"
                       "Pass --help for usage.\n")
      sys.exit(e.exitcode)
  return wrapped


def check_outputs(paths: Iterable[str | None], *, overwrite: bool,
                  directory: bool = False, flag: str = "output path") -> None:
  """`fileio.check_writable` of every path given (None: skipped), as an
  `app.UsageError` naming the path (and `flag`, the option that sets it); call it
  before any long work."""
  for path in paths:
    if not path:
      continue
    try:
      fileio.check_writable(path, overwrite=overwrite, directory=directory)
    except FileExistsError as e:
      raise app.UsageError(f"{e}; pass --overwrite to replace it, or choose another "
                           f"{flag}") from None
    except OSError as e:
      raise app.UsageError(str(e)) from None


def progress(iterable: Iterable[T] | None = None, *, total: float | None = None,
             desc: str, unit: str = "it", leave: bool = True) -> tqdm.tqdm:
  """A progress bar on stderr with rate and ETA; redrawn at most every 10 s when stderr
  is not a terminal (a log file)."""
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave,
                   file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)


class Counter:
  """A `progress(done, total)` callback (e.g. `calibration.calibrate`'s) drawing a
  progress bar; `done` is the last count reported."""

  def __init__(self, desc: str, unit: str):
    self.desc, self.unit = desc, unit
    self.done = 0
    self._bar: tqdm.tqdm | None = None

  def __call__(self, done: int, total: int) -> None:
    if self._bar is None:
      self._bar = progress(total=total, desc=self.desc, unit=self.unit)
    self._bar.update(done - self._bar.n)
    self.done = done

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def expert_mesh(num_devices: int, flag: str = "--expert_devices"):
  """The mesh of `num_devices` expert-parallel devices (`expert_parallel.expert_mesh`),
  None for one device; an `app.UsageError` naming `flag` otherwise."""
  if num_devices == 1:
    return None
  try:
    return expert_parallel.expert_mesh(num_devices)
  except ValueError as e:
    raise app.UsageError(f"{flag}: {e}") from None
