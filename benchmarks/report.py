"""The Markdown report: header, tables, summaries."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
from collections.abc import Sequence

import flax
import jax
import jaxlib

import jbn
from benchmarks import timing
from benchmarks.contenders import (AXIS, JAX_CONTENDERS, LABELS, N_DEVICES,
                                   WORKS, Row)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> str:
  try:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "unknown"


def fmt_shape(shape) -> str:
  return "x".join(map(str, shape))


def fmt(v: float, spec: str) -> str:
  return "-" if math.isnan(v) else format(v, spec)


def nanmedian(values) -> float:
  values = [v for v in values if not math.isnan(v)]
  return statistics.median(values) if values else math.nan


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
             left: int = 3) -> str:
  """A Markdown table; the first ``left`` columns left-aligned, others right."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < left else "--:"
                          for i in range(len(header))) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def row_key(r: Row) -> list[str]:
  mark = (" †" if r.per_device_nbytes >= timing.MMAP_THRESHOLD
          and not timing.keeping_freed_memory() else "")
  return [fmt_shape(r.shape) + mark, r.dtype, AXIS if r.axis else "-",
          f"{r.nbytes / 1e6:.2f}"]


def time_table(rows: Sequence[Row], work: str, names: Sequence[str]) -> str:
  others = [n for n in names if n != "jbn"]
  header = ["shape", "dtype", "axis_name", "x MB", "reps", "floor ms"]
  header += [f"{LABELS[n]} ms" for n in names]
  header += [f"{LABELS[n]}/jbn" for n in others]
  header += [f"{LABELS[n]} ×floor" for n in names]
  body = []
  for r in rows:
    cells = row_key(r) + [str(r.reps), f"{r.floor * 1e3:.3f}"]
    cells += [fmt(r.t(work, n) * 1e3, ".3f") for n in names]
    cells += [fmt(r.ratio(work, n), ".2f") for n in others]
    cells += [fmt(r.floor_multiple(work, n), ".2f") for n in names]
    body.append(cells)
  return md_table(header, body)


def faults_table(rows: Sequence[Row], names: Sequence[str]) -> str:
  """Mean minor page faults per call, per contender (and the floor)."""
  works = ("fwd+bwd", "train fwd")
  header = ["shape", "dtype", "axis_name", "x MB", "x pages", "floor"]
  header += [f"{w}: {LABELS[n]}" for w in works for n in names]
  body = []
  for r in rows:
    cells = row_key(r) + [str(r.per_device_nbytes // 4096),
                          fmt(r.faults.get(("floor", "floor"), math.nan),
                              ".0f")]
    cells += [fmt(r.faults.get((w, n), math.nan), ".0f") for w in works
              for n in names]
    body.append(cells)
  return md_table(header, body)


def x_units(r: Row, temp: int) -> float:
  """A temporary size in units of (per-device) x."""
  return temp / r.per_device_nbytes


def memory_table(rows: Sequence[Row]) -> str:
  header = ["shape", "dtype", "axis_name", "x MB"]
  header += [f"{form}: {LABELS[n]} MB (×x)" for form in ("vjp", "grad")
             for n in JAX_CONTENDERS]
  body = []
  for r in rows:
    cells = row_key(r)
    for temps in (r.temp_vjp, r.temp_grad):
      cells += [f"{temps[n] / 1e6:.2f} ({x_units(r, temps[n]):.2f})"
                for n in JAX_CONTENDERS]
    body.append(cells)
  return md_table(header, body)


def speed_summary(rows: Sequence[Row], names: Sequence[str]) -> str:
  others = [n for n in names if n != "jbn"]
  header = (["work"] + [f"{LABELS[n]}/jbn" for n in others]
            + ["flax/jbn, no axis_name", "flax/jbn, axis_name",
               "rows where jbn < flax"])
  body = []
  for work in WORKS:
    cells = [work]
    for n in others:
      ratios = [v for v in (r.ratio(work, n) for r in rows)
                if not math.isnan(v)]
      cells.append(f"{fmt(nanmedian(ratios), '.2f')} "
                   f"[{min(ratios):.2f}-{max(ratios):.2f}]" if ratios else "-")
    for axis in (False, True):
      cells.append(fmt(nanmedian(r.ratio(work, "flax") for r in rows
                                 if r.axis == axis), ".2f"))
    slower = sum(r.ratio(work, "flax") < 1 for r in rows)
    cells.append(f"{slower}/{len(rows)}")
    body.append(cells)
  return md_table(header, body, left=1)


def memory_summary(rows: Sequence[Row]) -> str:
  lines = []
  for form, attr in (("vjp", "temp_vjp"), ("grad", "temp_grad")):
    med = {n: nanmedian(x_units(r, getattr(r, attr)[n]) for r in rows)
           for n in JAX_CONTENDERS}
    units = ", ".join(f"{LABELS[n]} {v:.2f}" for n, v in med.items())
    extra = nanmedian(
        x_units(r, getattr(r, attr)["flax"] - getattr(r, attr)["jbn"])
        for r in rows)
    # A ratio only means something where jbn's temporary is not ~0.
    sized = [r for r in rows if x_units(r, getattr(r, attr)["jbn"]) >= 0.01]
    ratio = nanmedian(getattr(r, attr)["flax"] / getattr(r, attr)["jbn"]
                      for r in sized)
    lines.append(
        f"- {form} form: median temporary in units of x: {units}; flax needs "
        f"{extra:.2f} x more than jbn (median over rows). flax/jbn ratio: "
        + (f"{ratio:.2f} (median over rows)" if len(sized) == len(rows) else
           f"unbounded in {len(rows) - len(sized)}/{len(rows)} rows, where "
           "jbn's temporary is below 1% of x"
           + (f"; {ratio:.2f} (median) over the others" if sized else ""))
        + ".")
  return "\n".join(lines)


def floor_summary(rows: Sequence[Row]) -> str:
  lines = []
  cnn = [r for r in rows if r.kind == "CNN" and r.dtype == "float32"]
  for axis in (False, True):
    sel = [r for r in cnn if r.axis == axis]
    if not sel:
      continue
    per = ", ".join(f"{fmt_shape(r.shape)}: "
                    f"{r.floor_multiple('fwd+bwd', 'jbn'):.2f}" for r in sel)
    med = {n: nanmedian(r.floor_multiple("fwd+bwd", n) for r in sel)
           for n in JAX_CONTENDERS}
    lines.append(
        f"- CNN float32 fwd+bwd, {'with' if axis else 'no'} axis_name: jbn "
        f"median {med['jbn']:.2f}× the floor ({per}); flax "
        f"{med['flax']:.2f}×, flax slow-var {med['flax-sv']:.2f}×.")
  return "\n".join(lines)


def slower_rows(rows: Sequence[Row]) -> str:
  slower = sorted(((r.ratio(w, "flax"), w, r) for w in WORKS for r in rows
                   if r.ratio(w, "flax") < 1), key=lambda t: t[0])
  if not slower:
    return "jbn is at least as fast as flax (default) on every row."
  return "\n".join(
      f"- {w}: {fmt_shape(r.shape)} {r.dtype} "
      f"{'axis_name' if r.axis else 'no axis_name'}: flax/jbn {ratio:.2f} "
      f"(jbn {r.t(w, 'jbn') * 1e3:.3f} ms, flax {r.t(w, 'flax') * 1e3:.3f} ms)"
      for ratio, w, r in slower)


def header(args, torch, mesh_ok: bool, load: str) -> str:
  versions = [f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}",
              f"flax {flax.__version__}", f"jbn {jbn.__version__}"]
  versions.append(f"torch {torch.__version__} ({torch.get_num_threads()} "
                  "threads)" if torch is not None else "torch: not used")
  now = datetime.datetime.now(datetime.timezone.utc)
  lines = [
      "# jbn benchmarks: jbn.batch_norm vs flax.linen.BatchNorm",
      "",
      f"- Date: {now:%Y-%m-%d %H:%M} UTC",
      f"- CPU: {cpu_model()}, {os.cpu_count()} cores; "
      f"{jax.device_count()} forced XLA CPU devices; load average (1 / 5 / "
      f"15 min) at the start: {load}",
      f"- Versions: python {platform.python_version()}, " + ", ".join(versions),
      f"- Command: `{' '.join(['python benchmarks/bench.py'] + args.argv)}`",
      f"- Timing: median of {args.reps.describe()}, after "
      f"{args.reps.warmup} warm-up rounds; contenders interleaved round "
      "robin, each repetition in a fresh random order; time.perf_counter "
      "around each call and its block_until_ready; inputs pre-generated, "
      "nothing donated.",
      "- Memory allocator: " + (
          "glibc told never to return freed memory to the kernel ("
          + ", ".join(f"`{k}={v}`" for k, v in timing.KEEP_FREED_MEMORY.items())
          + "): fresh output buffers are recycled, not page-faulted in."
          if timing.keeping_freed_memory() else
          "glibc as configured by the environment (" + (", ".join(
              f"`{k}={os.environ[k]}`" for k in sorted(os.environ)
              if k.startswith("MALLOC_")) or "defaults") + "); see the page "
          "faults table."),
      "",
      "Notes:",
      "",
      "- `flax` = `flax.linen.BatchNorm` with default settings "
      "(`use_fast_variance=True`: one-pass E[x²]-E[x]², which cancels "
      "catastrophically when |mean| >> std); `flax slow-var` = "
      "`use_fast_variance=False` (two-pass variance). Both with their default "
      "`dtype=None`, which returns float32 for bfloat16 input (jbn returns "
      "bfloat16); their fwd+bwd cotangent is then float32. Momentum 0.99, "
      "epsilon 1e-5 everywhere.",
      "- `torch` = `torch.nn.functional.batch_norm` on CPU, in NCHW (its "
      "native layout; the JAX contenders are NHWC), float32 weight and "
      "running statistics; forward+backward is autograd w.r.t. x, weight and "
      "bias with a fixed output gradient. No axis-name variant. "
      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (the script "
      "sets PASSIVE unless told otherwise: spinning OpenMP threads would "
      "steal the cores from the next contender).",
      "- `floor` = a jitted elementwise `x * 1.5` over the same tensor (same "
      "dtype, same sharding) in the same run. `×floor` = time / (passes × "
      "floor) with passes = 3 (train fwd), 8 (fwd+bwd), 2 (eval). These "
      "pass counts are the tensor-sized memory streams the work needs at "
      "least (train fwd: read x for the statistics, read x, write y; "
      "fwd+bwd: those 3, then read dy and x for the sums, read dy and x and "
      "write dx; eval: read x, write y), while `x * 1.5` is itself two "
      "streams (read x, write): the bandwidth bound is at ×floor = 0.5. "
      "Tensors of a few MB sit in cache, so there the floor is not a "
      "bandwidth figure.",
  ]
  if mesh_ok and not args.no_axis_name:
    lines.append(
        f"- `axis_name={AXIS}` rows: `jax.shard_map` over a Mesh of "
        f"{N_DEVICES} forced CPU devices, x split on the batch axis, the "
        "contenders given the axis name. The devices share "
        f"{os.cpu_count()} cores, so these rows measure collective and "
        "partitioning overhead, not a speedup.")
  if not timing.keeping_freed_memory():
    lines.append(
        "- † marks tensors whose (per-device) buffer is at or above glibc's "
        "32 MiB mmap threshold: every fresh output buffer pays page faults "
        "(the floor's too).")
  return "\n".join(lines)


TITLES = {"fwd+bwd": "Forward + backward (jax.vjp; y, dx, dscale, dbias)",
          "train fwd": "Train-mode forward (y and new running statistics)",
          "eval": "Eval-mode forward"}


def body(rows: Sequence[Row], names: Sequence[str]) -> list[str]:
  """The tables and summaries of the per-row measurements."""
  parts = []
  for work in WORKS:
    parts += [f"## {TITLES[work]}", "", time_table(rows, work, names), ""]
  parts += [
      "## Compiled temporary memory of forward + backward", "",
      "`temp_size_in_bytes` of the compiled function, in MB and in units of "
      "x's size (per device for axis-name rows). vjp: the timed fwd+bwd "
      "above. grad: `jax.grad(lambda p, x: jnp.sum(y ** 2), argnums=(0, 1))`.",
      "", memory_table(rows), "",
      "## Minor page faults per call", "",
      "Mean over the timed calls of the process's minor page faults "
      "(`getrusage`, all threads), per contender; `x pages` is the (per "
      "device) size of x in 4 KiB pages. A fresh output buffer that glibc "
      "has handed back to the kernel costs one fault per page (about a "
      "microsecond each on this VM); who pays them depends on which buffers "
      "the calls before freed, so they move times between contenders from "
      "run to run. `--keep-freed-memory` removes them.", "",
      faults_table(rows, names), ""]
  parts += [
      "## Summary", "",
      "Speed: median over rows of other/jbn time (> 1: jbn faster), "
      "[min-max].", "", speed_summary(rows, names), "",
      "Compiled temporary memory of forward + backward:", "",
      memory_summary(rows), "",
      "Distance to the bandwidth floor (time / (8 × elementwise pass); "
      "the bound is at 0.5, see the notes):", "",
      floor_summary(rows), "",
      "Rows where jbn is slower than flax (default settings), slowest first:",
      "", slower_rows(rows), ""]
  return parts


def e2e_section(batch: int, timings, description: str) -> list[str]:
  """The end-to-end table (``timings``: median seconds per step)."""
  med, steps = timings.medians, timings.reps
  ex = {k: batch / v for k, v in med.items()}
  return [
      "## End to end: training step of a small residual CNN", "",
      f"{description} Batch {batch}, float32, SGD with Nesterov momentum "
      "(optax) under jit, one step per call (train state carried over); "
      f"median of {steps} interleaved steps per model.", "",
      md_table(["BatchNorm", "ms / step", "examples / s"],
               [["jbn.linen.BatchNorm", f"{med['jbn'] * 1e3:.1f}",
                 f"{ex['jbn']:.0f}"],
                ["flax.linen.BatchNorm", f"{med['flax'] * 1e3:.1f}",
                 f"{ex['flax']:.0f}"]], left=1),
      "",
      f"Throughput jbn / flax: {ex['jbn'] / ex['flax']:.3f}.", ""]
