"""Smoke tests of benchmarks/bench.py and breakdown.py: they run and write
their tables.

No timed assertions: only that every section and row is produced and that
the cells hold numbers.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from benchmarks import cli
from benchmarks import e2e
from benchmarks import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench.py")


def _table_rows(text, title):
  """Data rows (dicts keyed by header) of the first table after ``title``."""
  lines = text.split(title, 1)[1].splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("|"))
  end = next((i for i, l in enumerate(lines[start:], start)
              if not l.startswith("|")), len(lines))
  lines = lines[start:end]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = []
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header), line
    rows.append(dict(zip(header, cells)))
  return rows


def _number(cell):
  assert re.fullmatch(r"\d+(\.\d+)?", cell), cell
  return float(cell)


def test_quick_run_writes_every_table(tmp_path):
  out = tmp_path / "RESULTS.md"
  cmd = [sys.executable, SCRIPT, "--quick", "--shapes", "8x4x4x8",
         "--dtypes", "float32", "--reps", "2", "--warmup", "1",
         "--e2e", "--e2e-batch", "8", "--e2e-reps", "1", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert text.strip() in proc.stdout  # the same report on stdout
  assert "[1/2] 8x4x4x8 float32 no axis_name" in proc.stderr  # progress
  assert "[2/2] 8x4x4x8 float32 axis_name=batch" in proc.stderr
  for field in ("- Date: ", "- CPU: ", "- Versions: ", "- Command: "):
    assert field in text
  torch_installed = importlib.util.find_spec("torch") is not None

  for title in ("## Forward + backward", "## Train-mode forward",
                "## Eval-mode forward"):
    rows = _table_rows(text, title)
    assert [(r["shape"], r["axis_name"]) for r in rows] == [
        ("8x4x4x8", "-"), ("8x4x4x8", "batch")]
    for row in rows:
      assert _number(row["jbn ms"]) > 0
      assert _number(row["flax ms"]) > 0
      _number(row["flax/jbn"])
      _number(row["jbn ×floor"])
    assert ("torch ms" in rows[0]) == torch_installed
    if torch_installed:
      _number(rows[0]["torch ms"])
      assert rows[1]["torch ms"] == "-"  # no axis-name variant for torch

  mem = _table_rows(text, "## Compiled temporary memory")
  assert len(mem) == 2
  for row in mem:
    for key in ("vjp: jbn MB (×x)", "grad: flax MB (×x)"):
      mb, units = re.fullmatch(r"(\S+) \((\S+)\)", row[key]).groups()
      _number(mb), _number(units)

  faults = _table_rows(text, "## Minor page faults per call")
  assert [r["shape"] for r in faults] == ["8x4x4x8", "8x4x4x8"]
  for row in faults:
    for key in ("floor", "fwd+bwd: jbn", "fwd+bwd: flax", "train fwd: jbn"):
      _number(row[key])
  assert "- Memory allocator: glibc as configured by the environment" in text

  summary = _table_rows(text, "## Summary")
  assert [r["work"] for r in summary] == ["fwd+bwd", "train fwd", "eval"]
  assert "- CNN float32 fwd+bwd, no axis_name: jbn median " in text
  assert "- CNN float32 fwd+bwd, with axis_name: jbn median " in text

  e2e = _table_rows(text, "## End to end")
  assert [r["BatchNorm"] for r in e2e] == ["jbn.linen.BatchNorm",
                                           "flax.linen.BatchNorm"]
  assert all(_number(r["examples / s"]) > 0 for r in e2e)


def test_keep_freed_memory_reruns_with_the_malloc_settings(tmp_path):
  out = tmp_path / "RESULTS.md"
  cmd = [sys.executable, SCRIPT, "--quick", "--shapes", "16x8", "--dtypes",
         "float32", "--reps", "2", "--warmup", "0", "--no-torch",
         "--no-axis-name", "--keep-freed-memory", "--out", str(out)]
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--keep-freed-memory: running again with MALLOC_ARENA_MAX=1" in (
      proc.stderr)
  text = out.read_text()
  assert ("- Memory allocator: glibc told never to return freed memory to "
          "the kernel (" + ", ".join(
              f"`{k}={v}`" for k, v in timing.KEEP_FREED_MEMORY.items())
          + ")") in text
  assert "--keep-freed-memory" in text  # in the recorded command
  assert "† marks" not in text


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "8x"], "bad shape '8x'"),
    (["--shapes", "8x4x4"], "must be 2-D"),
    (["--dtypes", "float16"], "unknown dtype"),
    (["--reps", "0"], "must be >= 1"),
    (["--row-seconds", "0"], "--row-seconds must be > 0"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    cli.parse_args(argv)
  assert message in capsys.readouterr().err


def test_e2e_without_jbn_linen_says_so(monkeypatch):
  monkeypatch.setitem(sys.modules, "jbn.linen", None)  # import fails
  with pytest.raises(SystemExit, match="--e2e needs jbn.linen.BatchNorm"):
    e2e.bench_e2e(batch=2, reps=timing.Reps(fixed=1))


def test_importing_the_benchmarks_sets_no_environment():
  code = ("import os; before = dict(os.environ); "
          "import benchmarks.bench, benchmarks.breakdown; "
          "assert dict(os.environ) == before")
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_WAIT_POLICY")}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr


BREAKDOWN = os.path.join(ROOT, "benchmarks", "breakdown.py")


def test_breakdown_runs_in_both_malloc_settings(tmp_path):
  out = tmp_path / "BREAKDOWN.md"
  cmd = [sys.executable, BREAKDOWN, "--shapes", "8x4x4x8,16x8",
         "--dtypes", "float32", "--reps", "2", "--warmup", "1",
         "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert text.strip() in proc.stdout
  assert "environment as given" in proc.stderr  # progress
  assert "glibc keeping freed memory" in proc.stderr
  rows = _table_rows(text, "# Where jbn's forward + backward time goes")
  assert [(r["shape"], r["malloc"]) for r in rows] == [
      ("8x4x4x8", "as given"), ("8x4x4x8", "keeps freed memory"),
      ("16x8", "as given"), ("16x8", "keeps freed memory")]
  for row in rows:
    for key in ("x*c", "sum", "stats", "fwd", "bwd", "fwd+bwd",
                "flax fwd+bwd", "fwd + bwd (sum of halves)"):
      assert _number(row[key]) > 0
    halves = _number(row["fwd + bwd (sum of halves)"])
    assert halves == pytest.approx(_number(row["fwd"]) + _number(row["bwd"]),
                                   abs=2e-3)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "8x"], "bad shape '8x'"),
    (["--dtypes", "float16"], "unknown dtype"),
    (["--reps", "0"], "--reps must be >= 1"),
])
def test_breakdown_bad_arguments_are_refused(argv, message):
  proc = subprocess.run([sys.executable, BREAKDOWN, *argv], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 2
  assert message in proc.stderr
