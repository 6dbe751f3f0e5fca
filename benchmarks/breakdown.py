"""Where the time of jbn's forward + backward goes, on this machine.

Times, interleaved in one process, the pieces of one batch-norm training
step and the whole of it:

* ``x*c``: the bandwidth floor of ``bench.py`` (read x, write a fresh output);
* ``sum``: one plain reduction of x over the batch axes (read x, no output);
* ``stats``: jbn's batch statistics alone (two shifted reductions of x);
* ``fwd``: jbn's train-mode forward (statistics, then y);
* ``bwd``: jbn's backward alone, from saved statistics (two reductions of the
  cotangent, then dx);
* ``fwd+bwd``: the two in one program, as ``bench.py`` times it (``jax.vjp``);
* ``flax fwd+bwd``: the same for ``flax.linen.BatchNorm`` (default settings).

``fwd + bwd`` (the sum of the separately compiled halves) against the
``fwd+bwd`` program shows what running them together costs. The script runs
the measurement twice, each in a fresh process: once in the environment as
given, and once with glibc told never to return freed memory to the kernel
(``timing.KEEP_FREED_MEMORY``). The difference is the price of page-faulting
fresh output buffers, which depends on the allocator's history, not on the
formulation of batch norm; the page faults per call are counted too.

Usage (from the repository root)::

  python benchmarks/breakdown.py                       # ~1 min on 2 cores
  python benchmarks/breakdown.py --shapes 1024x4096 --dtypes bfloat16

Results go to stdout and to ``--out`` (default ``benchmarks/BREAKDOWN.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from benchmarks import cli  # noqa: E402
from benchmarks import contenders  # noqa: E402
from benchmarks import timing  # noqa: E402

PIECES = ("x*c", "sum", "stats", "fwd", "bwd", "fwd+bwd", "flax fwd+bwd")
DEFAULT_SHAPES = "64x32x32x64,1024x4096"


def measure(shape: tuple[int, ...], dtype_name: str, reps: int,
            warmup: int) -> dict[str, float]:
  """Median ms of each piece, interleaved (this process's environment), and
  ``'faults <piece>'``: the mean minor page faults per call."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp

  from jbn import _moments

  dtype = contenders.DTYPES[dtype_name]
  c = shape[-1]
  red = tuple(range(len(shape) - 1))
  kx, kd = jax.random.split(jax.random.key(0))
  x = (jax.random.normal(kx, shape, jnp.float32) + 3).astype(dtype)
  dy = jax.random.normal(kd, shape, jnp.float32).astype(dtype)
  params = {"scale": jnp.full((c,), 1.1, jnp.float32),
            "bias": jnp.full((c,), 0.2, jnp.float32)}
  state = {"mean": jnp.zeros((c,), jnp.float32),
           "var": jnp.ones((c,), jnp.float32)}
  # pylint: disable=protected-access
  def stats(x):
    return _moments.mean_var(_moments.local_moments(x, red))

  def fwd_residuals(p, x):
    # jbn's own backward: the vjp function of its forward, whose leaves are
    # the saved residuals (x and per-feature vectors).
    return jax.vjp(lambda p, x: contenders.jbn_apply(p, state, x, True,
                                                     None)[0], p, x)[1]

  def bwd(vjp, dy):
    return vjp(dy)
  # pylint: enable=protected-access

  def fwd_bwd(apply):
    def f(p, x, dy):
      y, vjp = jax.vjp(lambda p, x: apply(p, state, x, True, None)[0], p, x)
      return y, vjp(dy.astype(y.dtype))
    return f

  residuals = jax.jit(fwd_residuals)(params, x)
  programs = {
      "x*c": (lambda x: x * jnp.asarray(1.5, x.dtype), (x,)),
      "sum": (lambda x: jnp.sum(x.astype(jnp.float32), red), (x,)),
      "stats": (stats, (x,)),
      "fwd": (lambda p, x: contenders.jbn_apply(p, state, x, True, None),
              (params, x)),
      "bwd": (bwd, (residuals, dy)),
      "fwd+bwd": (fwd_bwd(contenders.jbn_apply), (params, x, dy)),
      "flax fwd+bwd": (fwd_bwd(contenders.APPLY["flax"]), (params, x, dy)),
  }
  thunks = {name: timing.jax_thunk(jax.jit(f).lower(*args).compile(), args)
            for name, (f, args) in programs.items()}
  timings = timing.run_round_robin(
      thunks, timing.Reps(fixed=reps, warmup=warmup))
  out = {name: s * 1e3 for name, s in timings.medians.items()}
  out.update({f"faults {name}": n for name, n in timings.faults.items()})
  return out


def child_main(args) -> int:
  if "JAX_PLATFORMS" not in os.environ:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cpu")
  out = {}
  for shape in args.shapes:
    for dtype_name in args.dtypes:
      key = f"{'x'.join(map(str, shape))} {dtype_name}"
      print(f"  {key}", file=sys.stderr, flush=True)
      out[key] = measure(shape, dtype_name, args.reps, args.warmup)
  json.dump(out, sys.stdout)
  return 0


def run_child(argv: Sequence[str], extra_env: dict[str, str]) -> dict:
  env = dict(os.environ, **extra_env)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                         *argv], env=env, stdout=subprocess.PIPE, check=False)
  if proc.returncode:
    raise SystemExit(f"breakdown: measuring process failed "
                     f"(exit {proc.returncode}); see its stderr above")
  return json.loads(proc.stdout)


FAULTS = ("fwd+bwd", "flax fwd+bwd")


def table(default: dict, kept: dict) -> str:
  head = ("| shape | dtype | malloc | " + " | ".join(PIECES)
          + " | fwd + bwd (sum of halves) | fwd+bwd / (fwd + bwd) "
          "| flax/jbn fwd+bwd | "
          + " | ".join(f"faults/call {p}" for p in FAULTS) + " |")
  lines = [head, "|" + "---|" * 3 + "--:|" * (len(PIECES) + 3 + len(FAULTS))]
  for key in default:
    shape, dtype_name = key.split()
    for label, res in (("as given", default[key]),
                       ("keeps freed memory", kept[key])):
      halves = res["fwd"] + res["bwd"]
      cells = [shape, dtype_name, label]
      cells += [f"{res[p]:.3f}" for p in PIECES]
      cells += [f"{halves:.3f}", f"{res['fwd+bwd'] / halves:.2f}",
                f"{res['flax fwd+bwd'] / res['fwd+bwd']:.2f}"]
      cells += [f"{res['faults ' + p]:.0f}" for p in FAULTS]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--shapes", default=DEFAULT_SHAPES,
                 help=f"comma-separated, e.g. {DEFAULT_SHAPES}")
  p.add_argument("--dtypes", default="float32",
                 help="comma-separated, from float32,bfloat16")
  p.add_argument("--reps", type=int, default=40,
                 help="timed repetitions per piece (default 40)")
  p.add_argument("--warmup", type=int, default=3,
                 help="untimed rounds first (default 3)")
  p.add_argument("--out", default=os.path.join("benchmarks", "BREAKDOWN.md"),
                 help="Markdown file to write (default benchmarks/BREAKDOWN.md)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  try:
    args.shapes = cli.parse_shapes(args.shapes)
    args.dtypes = cli.parse_dtypes(args.dtypes)
  except argparse.ArgumentTypeError as e:
    p.error(str(e))
  if args.reps < 1 or args.warmup < 0:
    p.error("--reps must be >= 1 and --warmup >= 0")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.child:
    return child_main(args)
  print("breakdown: environment as given", file=sys.stderr, flush=True)
  default = run_child(argv, {})
  print("breakdown: glibc keeping freed memory", file=sys.stderr, flush=True)
  kept = run_child(argv, timing.KEEP_FREED_MEMORY)
  when = datetime.datetime.now(datetime.timezone.utc)
  text = "\n".join([
      "# Where jbn's forward + backward time goes",
      "",
      f"- Date: {when:%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores",
      f"- Command: `python benchmarks/breakdown.py {' '.join(argv)}`".rstrip(),
      f"- Median ms of {args.reps} interleaved repetitions per piece, after "
      f"{args.warmup} warm-up rounds. `malloc`: the environment as given, or "
      "a fresh process with " + ", ".join(
          f"`{k}={v}`" for k, v in timing.KEEP_FREED_MEMORY.items())
      + " (glibc then recycles freed buffers instead of returning them to "
      "the kernel and page-faulting them in again on the next call). "
      "`faults/call`: mean minor page faults per call (all threads).",
      "",
      table(default, kept),
      "",
  ])
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
