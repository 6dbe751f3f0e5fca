"""Small batches: plain batch norm vs batch renorm vs ghost batch norm vs none.

    python examples/small_batch.py       # about 2.5 minutes on a 2-core CPU

Trains the MNIST example's MLP (512-512) on scikit-learn's digits with the
trainer of ``mnist.py`` (one device, so a ghost batch is a slice of the
global batch) for each row and seed, then writes a Markdown table of the
test accuracy, mean +- sample std over the seeds, with the running
statistics of the run and after ``--recalibrate pooled`` (the trainer's
default), and the mean training loss of the last epoch (train-mode batch
norm, the loss the optimizer saw), to ``<workdir>/small_batch.md`` (with
the command and the runtime), prints it, and writes every run's numbers to
``<workdir>/small_batch.json``.

A row is ``BATCH:MODE``: ``batchnorm``, ``renorm`` (``jbn.renorm_clip``'s
schedule at the trainer's defaults: plain for the first 10% of the steps,
``rmax`` 3 reached at 80%, ``dmax`` 5 at 50%), ``ghostN`` (ghost batches of N
examples) or ``none`` (no batch norm: the layers get biases). Every run sees
the same number of examples (``--epochs``) with the learning rate scaled
linearly with the batch (``--learning-rate`` is the one at batch 64). Ghost
batch norm is meant for large batches split into small ghost batches, so the
default rows compare ghost 8 at batch 64 with plain batch norm at 8 and at
64; ghost 4 at batch 8 is there to show that ghost batches do not help a
batch that is already small.

Runs share their compiled steps through JAX's persistent compilation cache
in ``<workdir>/jax-cache`` (``--no-cache``: none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from examples import errors  # noqa: E402
from examples import mnist  # noqa: E402
from examples import reporting  # noqa: E402
from examples import train  # noqa: E402

ROWS = ("4:batchnorm,4:renorm,4:none,8:batchnorm,8:renorm,8:ghost4,8:none,"
        "64:batchnorm,64:ghost8,64:none")
TABLE = "small_batch.md"


@dataclasses.dataclass(frozen=True)
class Row:
  batch: int
  mode: str  # batchnorm, renorm, ghost, none
  ghost: int | None = None

  @property
  def label(self) -> str:
    return {"batchnorm": "batch norm", "renorm": "batch renorm",
            "ghost": f"ghost batch norm, ghost batch {self.ghost}",
            "none": "no batch norm"}[self.mode]


def parse_rows(text: str) -> list[Row]:
  """``'4:batchnorm,64:ghost8,...'`` -> rows."""
  rows = []
  for item in text.split(","):
    batch, _, mode = item.partition(":")
    ghost = None
    if mode.startswith("ghost") and mode[5:].isdigit():
      mode, ghost = "ghost", int(mode[5:])
    if not batch.isdigit() or mode not in ("batchnorm", "renorm", "none") + (
        ("ghost",) if ghost else ()):
      raise errors.UsageError(
          f"--rows: {item!r} is not BATCH:MODE with MODE batchnorm, renorm, "
          f"ghostN or none (e.g. 64:ghost8).")
    rows.append(Row(int(batch), mode, ghost))
  return rows


def config_of(row: Row, seed: int, args) -> "train.configs.Config":
  return dataclasses.replace(
      mnist.DEFAULTS, batch_size=row.batch, seed=seed, epochs=args.epochs,
      learning_rate=args.learning_rate * row.batch / 64,
      hidden=tuple(int(w) for w in args.hidden.split(",")),
      use_bn=row.mode != "none",
      bn_mode=row.mode if row.mode in ("renorm", "ghost") else "batchnorm",
      ghost_batch_size=row.ghost, devices=1, checkpoint_every=1e9,
      progress=False, quiet=True)


def mean_std(values: Sequence[float]) -> str:
  """``'97.41 ± 0.32'`` (percent; sample std), or ``'-'``."""
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return "-"
  std = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return f"{100 * np.mean(values):.2f} ± {100 * std:.2f}"


def format_table(rows: list[dict]) -> str:
  """One Markdown line per row: accuracy with the running statistics of
  the run and after recalibration, mean ± std over the seeds."""
  lines = ["| global batch | normalization | learning rate | test accuracy % "
           "(running statistics) | after recalibration (pooled) | train "
           "loss, last epoch | runs |",
           "|--:|---|--:|--:|--:|--:|--:|"]
  for r in rows:
    runs = r["runs"]
    diverged = sum(x["diverged"] for x in runs)
    count = f"{len(runs)}" + (f" ({diverged} diverged)" if diverged else "")
    lines.append(
        f"| {r['batch']} | {r['label']} | {r['learning_rate']:g} | "
        f"{mean_std([x['test_accuracy'] for x in runs])} | "
        f"{mean_std([x['recalibrated_test_accuracy'] for x in runs])} | "
        f"{np.nanmean([x['train_loss'] for x in runs]):.4f} | {count} |")
  return "\n".join(lines)


def run_one(config, workdir: str) -> dict:
  """One training run's final numbers (NaN where it diverged)."""
  try:
    last = train.train_and_evaluate(config, workdir).history[-1]
    diverged = False
  except errors.TrainingStopped:  # a non-finite loss: diverged
    last, diverged = {}, True
  return {"seed": config.seed, "diverged": diverged,
          "test_accuracy": last.get("test_accuracy", math.nan),
          "recalibrated_test_accuracy": last.get("recalibrated_test_accuracy"),
          "train_loss": last.get("train_loss", math.nan)}


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Runs every row and seed, writes and prints the table; returns the rows."""
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default=ROWS, help="(%(default)s)")
  parser.add_argument("--seeds", type=int, default=5, help="(%(default)s)")
  parser.add_argument("--epochs", type=int, default=6, help="(%(default)s)")
  parser.add_argument("--learning-rate", type=float, default=0.1,
                      help="peak learning rate at batch 64, scaled linearly "
                           "with the batch (%(default)s)")
  parser.add_argument("--hidden",
                      default=",".join(map(str, mnist.DEFAULTS.hidden)),
                      help="(%(default)s)")
  parser.add_argument("--workdir", default=None,
                      help="default: a new runs/small_batch-<time>")
  parser.add_argument("--no-cache", action="store_true",
                      help="no persistent compilation cache")
  args = parser.parse_args(argv)
  rows = parse_rows(args.rows)
  workdir = args.workdir or reporting.default_workdir("small_batch")
  os.makedirs(workdir, exist_ok=True)
  if not args.no_cache:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(workdir), "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  t0 = time.perf_counter()
  results = []
  for row in rows:
    runs = []
    for seed in range(args.seeds):
      config = config_of(row, seed, args)
      name = f"b{row.batch}-{row.mode}{row.ghost or ''}-seed{seed}"
      runs.append(run_one(config, os.path.join(workdir, name)))
    results.append({"batch": row.batch, "mode": row.mode, "ghost": row.ghost,
                    "label": row.label,
                    "learning_rate": config.learning_rate, "runs": runs})
    print(f"batch {row.batch:3d} {row.label:<36} test accuracy "
          f"{mean_std([x['test_accuracy'] for x in runs])}%, recalibrated "
          f"{mean_std([x['recalibrated_test_accuracy'] for x in runs])}%",
          flush=True)
  seconds = time.perf_counter() - t0

  command = "python examples/small_batch.py" + "".join(
      f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
  text = (f"digits, MLP {args.hidden}, {args.epochs} epochs, SGD + "
          f"warmup/cosine, peak learning rate {args.learning_rate:g} x "
          f"batch / 64, one device, seeds 0-{args.seeds - 1} (mean ± sample "
          f"std); {seconds:.0f} s for {len(rows) * args.seeds} runs.\n\n"
          f"    {command}\n\n{format_table(results)}\n")
  reporting.atomic_write(os.path.join(workdir, TABLE), text.encode())
  with open(os.path.join(workdir, "small_batch.json"), "w") as f:
    json.dump({"command": command, "seconds": seconds, "rows": results}, f,
              indent=1)
  print(f"\n{text}\nwrote {os.path.join(workdir, TABLE)} and "
        f"small_batch.json")
  return results


if __name__ == "__main__":
  try:
    main()
  except errors.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
