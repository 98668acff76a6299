"""Matplotlib figures for the reports: the file-only pyplot, PNG bytes, a base-2 axis."""

from __future__ import annotations

import io


def pyplot():
  """matplotlib's pyplot with the file-only Agg backend (imported on first use)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def png_bytes(fig) -> bytes:
  """The figure as PNG bytes (90 dpi, cropped, a 64-colour palette: about a quarter
  of the bytes of full colour for these line plots); the figure is closed."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (matplotlib's dependency)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  pyplot().close(fig)
  buf.seek(0)
  image = Image.open(buf).convert("RGB").quantize(colors=64)
  out = io.BytesIO()
  image.save(out, format="PNG", optimize=True)
  return out.getvalue()


def log2_x(ax) -> None:
  """A base-2 log x axis labelled with plain numbers."""
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  ax.set_xscale("log", base=2)
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
