"""`benchmarking.versions`: two versions' decode results at equal distinct experts, and
`tools/decode_ab.py` around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sere_jax.benchmarking import versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(batch, label, distinct, ms, busy=None):
  row = dict(batch=batch, label=label, distinct_experts=distinct, ms_per_token=ms)
  if busy is not None:
    row["profile"] = dict(gpu_busy_us=busy)
  return row


def _result(rows, model="qwen3_30b_a3b"):
  return dict(suite="decode", model=model, scale="full", rows=rows)


OLD = _result([_row(16, "none", 30.0, 4.0, 4000.0), _row(16, "sere:2:0", 10.0, 2.0, 2000.0),
               _row(16, "sere:1:0", 20.0, 3.0, 3000.0), _row(1, "none", 8.0, 5.0)])


def test_new_rows_against_the_old_line_at_their_distinct_experts():
  new = _result([_row(16, "sere:2:0", 25.0, 3.5 * 1.02, 3500.0 * 0.99),
                 _row(1, "none", 8.0, 4.0), _row(64, "none", 100.0, 9.0)])
  rows = versions.compare_decode(OLD, new)
  assert [(r["batch"], r["label"]) for r in rows] == [(16, "sere:2:0"), (1, "none")]
  b16, b1 = rows
  assert b16["old_ms_at_distinct"] == pytest.approx(3.5)
  assert b16["ms_change"] == pytest.approx(0.02)
  assert b16["old_busy_at_distinct"] == pytest.approx(3500.0)
  assert b16["busy_change"] == pytest.approx(-0.01)
  # One old row at B = 1, at the same distinct count: compared directly; no profiles.
  assert b1["ms_change"] == pytest.approx(-0.2)
  assert b1["gpu_busy_us"] is None and b1["busy_change"] is None
  table = versions.markdown(rows)
  assert "| 16 | sere:2:0 | 25.0 | 3.570 | 3.500 | +2.0 % | 3465 | 3500 | -1.0 % |" in table


def test_profiles_without_gpu_time_compare_ms_only():
  """A CPU run's profiles have no GPU events: busy time is missing, not zero."""
  old = _result([_row(2, "none", 4.0, 2.0, 0.0)])
  (row,) = versions.compare_decode(old, _result([_row(2, "none", 4.0, 1.8, 0.0)]))
  assert row["ms_change"] == pytest.approx(-0.1)
  assert row["gpu_busy_us"] is None and row["busy_change"] is None


def test_one_old_row_at_another_distinct_count_has_no_line():
  new = _result([_row(1, "none", 6.0, 4.0)])
  (row,) = versions.compare_decode(OLD, new)
  assert row["old_ms_at_distinct"] is None and row["ms_change"] is None


@pytest.mark.parametrize("new, message", [
    (_result([_row(16, "none", 30.0, 4.0)], model="deepseek_v2_lite"), "different models"),
    (_result([_row(64, "none", 30.0, 4.0)]), "share no batch size"),
    (dict(suite="kernels", rows=[]), "new file is not a decode-suite result"),
])
def test_rejects_results_that_cannot_be_compared(new, message):
  with pytest.raises(ValueError, match=message):
    versions.compare_decode(OLD, new)


def test_tool_prints_the_table_and_writes_the_rows(tmp_path):
  if not os.path.exists(os.path.join(REPO, "tools", "decode_ab.py")):
    pytest.skip("tools/decode_ab.py is not in this tree (only a checkout has tools/)")
  old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
  old_path.write_text(json.dumps(OLD))
  new_path.write_text(json.dumps(_result([_row(16, "none", 30.0, 4.4, 4000.0)])))
  out = tmp_path / "ab.json"
  run = lambda *args: subprocess.run([sys.executable, "tools/decode_ab.py", *map(str, args)],
                                     cwd=REPO, capture_output=True, text=True, check=False)
  done = run(old_path, new_path, out)
  assert done.returncode == 0, done.stderr
  assert "| 16 | none | 30.0 | 4.400 | 4.000 | +10.0 % |" in done.stdout
  assert json.loads(out.read_text())["rows"][0]["busy_change"] == pytest.approx(0.0)
  bad = run(old_path, old_path.with_name("missing.json"))
  assert bad.returncode == 1 and bad.stderr.startswith("decode_ab: ")
  assert "missing.json" in bad.stderr and "Traceback" not in bad.stderr
  assert run(old_path).returncode == 2
