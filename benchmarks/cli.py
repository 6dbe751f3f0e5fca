"""The benchmark's command line: flags, environment, the run, the report.

``python benchmarks/bench.py`` runs :func:`main`. The environment it needs
(4 forced CPU devices, CPU only, passive OpenMP threads for PyTorch) is set
in :func:`main`, before anything initializes a JAX backend or imports torch,
not when this module is imported.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from benchmarks import contenders
from benchmarks import e2e
from benchmarks import report
from benchmarks import timing
from benchmarks.contenders import AXIS, CONTENDERS, DTYPES, JAX_CONTENDERS
from benchmarks.contenders import N_DEVICES

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
DEFAULT_SHAPES = ((256, 1024), (1024, 4096), (64, 32, 32, 64),
                  (32, 56, 56, 64), (128, 16, 16, 256))
QUICK_SHAPES = ((256, 1024), (64, 32, 32, 64))


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def set_environment() -> None:
  """4 forced CPU devices for the axis-name rows, the CPU backend unless
  JAX_PLATFORMS says otherwise, and passive OpenMP threads: PyTorch's would
  otherwise spin for a while after each call and steal the cores from
  whichever contender runs next. Must run before a JAX backend starts."""
  if "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={N_DEVICES}").strip()
  if "JAX_PLATFORMS" not in os.environ:
    os.environ["JAX_PLATFORMS"] = "cpu"  # for the --keep-freed-memory rerun
    jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
  shapes = []
  for item in text.split(","):
    try:
      shape = tuple(int(s) for s in item.strip().lower().split("x"))
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"bad shape {item!r}: expected e.g. 256x1024 or 64x32x32x64"
      ) from None
    if len(shape) not in (2, 4) or min(shape) < 1:
      raise argparse.ArgumentTypeError(
          f"shape {item!r} must be 2-D (N, C) or 4-D NHWC (N, H, W, C)")
    shapes.append(shape)
  return tuple(shapes)


def parse_dtypes(text: str) -> tuple[str, ...]:
  names = tuple(s.strip() for s in text.split(","))
  bad = [n for n in names if n not in DTYPES]
  if bad:
    raise argparse.ArgumentTypeError(
        f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
  return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description="jbn vs flax.linen.BatchNorm (and PyTorch CPU), side by "
      "side; see benchmarks/bench.py.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="two shapes, 5 repetitions (smoke test)")
  p.add_argument("--reps", type=int, default=None,
                 help="timed repetitions per row (default: as many as fit "
                      "in --row-seconds, between 20 and 200; 5 with --quick)")
  p.add_argument("--row-seconds", type=float, default=15.0,
                 help="time budget per row for the default repetitions")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed rounds first (default 3; 1 with --quick)")
  p.add_argument("--shapes", type=parse_shapes, default=None,
                 help="comma-separated shapes, e.g. 256x1024,64x32x32x64 "
                      "(2-D: MLP (N, C); 4-D: CNN NHWC)")
  p.add_argument("--dtypes", type=parse_dtypes, default=tuple(DTYPES),
                 help="comma-separated, from float32,bfloat16")
  p.add_argument("--no-torch", action="store_true",
                 help="leave PyTorch out even where it is installed")
  p.add_argument("--no-axis-name", action="store_true",
                 help="skip the shard_map rows with an axis name")
  p.add_argument("--e2e", action="store_true",
                 help="also time training steps of a small residual CNN, "
                      "jbn.linen vs flax.linen BatchNorm")
  p.add_argument("--e2e-batch", type=int, default=None,
                 help="batch size of the end-to-end run (default 128; 16 "
                      "with --quick)")
  p.add_argument("--e2e-reps", type=int, default=None,
                 help="timed steps per model (default 30; 3 with --quick)")
  p.add_argument("--keep-freed-memory", action="store_true",
                 help="run with glibc told never to return freed memory to "
                      "the kernel (" + " ".join(
                          f"{k}={v}"
                          for k, v in timing.KEEP_FREED_MEMORY.items())
                      + "), so that fresh output buffers are recycled "
                      "instead of page-faulted in on every call")
  p.add_argument("--out", default=os.path.join("benchmarks", "RESULTS.md"),
                 help="Markdown file to write (default benchmarks/RESULTS.md)")
  args = p.parse_args(argv)
  q = args.quick
  reps = args.reps if args.reps is not None else (5 if q else None)
  warmup = args.warmup if args.warmup is not None else (1 if q else 3)
  e2e_reps = args.e2e_reps if args.e2e_reps is not None else (3 if q else 30)
  if (reps is not None and reps < 1) or e2e_reps < 1 or warmup < 0:
    p.error("--reps and --e2e-reps must be >= 1, --warmup >= 0")
  if args.row_seconds <= 0:
    p.error("--row-seconds must be > 0")
  args.argv = list(argv)
  args.reps = timing.Reps(fixed=reps, seconds=args.row_seconds, warmup=warmup)
  args.e2e_reps = timing.Reps(fixed=e2e_reps, warmup=max(warmup, 1))
  args.shapes = args.shapes or (QUICK_SHAPES if q else DEFAULT_SHAPES)
  args.e2e_batch = args.e2e_batch or (16 if q else 128)
  return args


def import_torch(no_torch: bool):
  if no_torch:
    return None
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    log("torch is not installed: PyTorch column left out")
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def rerun_keeping_freed_memory(argv: Sequence[str]) -> int | None:
  """Runs this script again with timing.KEEP_FREED_MEMORY set (glibc reads it at
  process start); None if it is already set."""
  if timing.keeping_freed_memory():
    return None
  log("--keep-freed-memory: running again with " + " ".join(
      f"{k}={v}" for k, v in timing.KEEP_FREED_MEMORY.items()))
  env = dict(os.environ, **timing.KEEP_FREED_MEMORY)
  return subprocess.run([sys.executable, BENCH, *argv],
                        env=env, check=False).returncode



def main(argv: Sequence[str] | None = None) -> int:
  start = time.perf_counter()
  load = report.load_average()
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.keep_freed_memory:
    code = rerun_keeping_freed_memory(argv)
    if code is not None:
      return code
  set_environment()
  torch = import_torch(args.no_torch)
  mesh_ok = jax.device_count() >= N_DEVICES
  axes = [False]
  if not args.no_axis_name:
    if mesh_ok:
      axes.append(True)
    else:
      log(f"only {jax.device_count()} devices (a JAX backend started before "
          "XLA_FLAGS was set): axis-name rows skipped")
  mesh = (Mesh(np.array(jax.devices()[:N_DEVICES]), (AXIS,)) if mesh_ok
          else None)

  configs = []
  for shape in args.shapes:
    for dtype_name in args.dtypes:
      for axis in axes:
        if axis and shape[0] % N_DEVICES:
          log(f"{report.fmt_shape(shape)}: batch not divisible by "
              f"{N_DEVICES}, axis-name row skipped")
          continue
        configs.append((shape, dtype_name, axis))

  rows = []
  for i, (shape, dtype_name, axis) in enumerate(configs, 1):
    t0 = time.perf_counter()
    log(f"[{i}/{len(configs)}] {report.fmt_shape(shape)} {dtype_name} "
        f"{'axis_name=' + AXIS if axis else 'no axis_name'} ...")
    r = contenders.bench_row(shape, dtype_name, axis, reps=args.reps,
                             torch=torch, mesh=mesh)
    rows.append(r)
    log(f"    {time.perf_counter() - t0:.1f} s, {r.reps} reps; fwd+bwd ms: "
        + ", ".join(f"{n} {r.t('fwd+bwd', n) * 1e3:.2f}" for n in CONTENDERS
                    if not math.isnan(r.t("fwd+bwd", n))))

  names = JAX_CONTENDERS + (("torch",) if torch is not None else ())
  parts = [report.header(args, torch, mesh_ok, load), ""]
  parts += report.body(rows, names)
  if args.e2e:
    log(f"e2e: residual CNN, batch {args.e2e_batch}, "
        f"{args.e2e_reps.fixed} steps per model ...")
    parts += report.e2e_section(
        args.e2e_batch, e2e.bench_e2e(args.e2e_batch, args.e2e_reps),
        e2e.DESCRIPTION)

  total = time.perf_counter() - start
  parts.append(f"Total wall time of this run: {total:.0f} s; load average at "
               f"the end: {report.load_average()}.")
  text = "\n".join(parts) + "\n"
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
    log(f"wrote {args.out} ({total:.0f} s)")
  return 0
