"""Batch norm on and off, across learning rates, on scikit-learn's digits.

    python examples/ablation.py                # a few minutes on a 2-core CPU

Trains the MNIST example's MLP (Dense -> BN -> relu) and the same MLP
without batch norm (Dense with bias -> relu; same initialization scheme,
optimizer, schedule and data order) at each learning rate, then prints a
table of the first epoch reaching the target test accuracy and the final
test accuracy ("diverged" where the trainer stopped on a non-finite loss),
and writes ``<workdir>/ablation.png`` (test accuracy per
epoch) and ``<workdir>/ablation.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import errors  # noqa: E402
from examples import mnist  # noqa: E402
from examples import reporting  # noqa: E402
from examples import train  # noqa: E402


def epochs_to(history, target: float) -> int | None:
  """First epoch whose test accuracy reaches ``target``, or None."""
  for record in history:
    if record["test_accuracy"] >= target:
      return record["epoch"]
  return None


def format_table(rows, target: float) -> str:
  """The results as a fixed-width text table."""
  head = (f"{'learning rate':>13} | {'BN: epochs to':>13} {'final acc':>9} | "
          f"{'no BN: epochs to':>16} {'final acc':>9}")
  sub = (f"{'':>13} | {f'{100 * target:.0f}%':>13} {'':>9} | "
         f"{f'{100 * target:.0f}%':>16} {'':>9}")
  lines = [head, sub, "-" * len(head)]

  def cell(row, width):
    e = row["epochs_to_target"]
    acc = row["final_accuracy"]
    acc = "diverged" if math.isnan(row["final_loss"]) else f"{100 * acc:.2f}%"
    return f"{e if e is not None else 'never':>{width}} {acc:>9}"

  for lr in sorted({r["learning_rate"] for r in rows}):
    bn = next(r for r in rows if r["learning_rate"] == lr and r["use_bn"])
    plain = next(r for r in rows if r["learning_rate"] == lr
                 and not r["use_bn"])
    lines.append(f"{lr:>13g} | {cell(bn, 13)} | {cell(plain, 16)}")
  return "\n".join(lines)


def plot(path: str, rows, target: float) -> None:
  """Test accuracy per epoch, one panel per learning rate."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  lrs = sorted({r["learning_rate"] for r in rows})
  fig, axes = plt.subplots(1, len(lrs), figsize=(3.2 * len(lrs), 3.2),
                           sharey=True, squeeze=False)
  for ax, lr in zip(axes[0], lrs):
    for r in rows:
      if r["learning_rate"] == lr:
        h = r["history"]
        ax.plot([x["epoch"] for x in h],
                [100 * x["test_accuracy"] for x in h],
                label="BN" if r["use_bn"] else "no BN")
    ax.axhline(100 * target, color="grey", lw=0.5, ls="--")
    ax.set(title=f"lr {lr:g}", xlabel="epoch", ylim=(0, 100))
  axes[0][0].set_ylabel("test accuracy (%)")
  axes[0][0].legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Runs the grid, prints the table; returns one row per run."""
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--learning-rates", default="0.01,0.03,0.1,0.3,1",
                      help="comma-separated peak learning rates (%(default)s)")
  parser.add_argument("--epochs", type=int, default=15, help="(%(default)s)")
  parser.add_argument("--batch-size", type=int,
                      default=mnist.DEFAULTS.batch_size, help="(%(default)s)")
  parser.add_argument("--hidden",
                      default=",".join(map(str, mnist.DEFAULTS.hidden)),
                      help="(%(default)s)")
  parser.add_argument("--target", type=float, default=0.95,
                      help="test accuracy to reach (%(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="(%(default)s)")
  parser.add_argument("--workdir", default=None,
                      help="default: a new runs/ablation-<time>")
  args = parser.parse_args(argv)
  lrs = [float(x) for x in args.learning_rates.split(",")]
  workdir = args.workdir or reporting.default_workdir("ablation")

  rows = []
  for use_bn in (True, False):
    for lr in lrs:
      config = dataclasses.replace(
          mnist.DEFAULTS, use_bn=use_bn, learning_rate=lr, epochs=args.epochs,
          batch_size=args.batch_size, seed=args.seed,
          hidden=tuple(int(w) for w in args.hidden.split(",")),
          recalibrate="none",  # the table reads the run's own test accuracy
          progress=False, quiet=True)
      run_dir = os.path.join(workdir, f"{'bn' if use_bn else 'nobn'}-lr{lr:g}")
      try:
        history = train.train_and_evaluate(config, run_dir).history
        diverged = False
      except errors.TrainingStopped:  # the loss went non-finite: diverged
        history, diverged = reporting.read_metrics(run_dir), True
      last = history[-1] if history else {}
      rows.append({
          "use_bn": use_bn, "learning_rate": lr,
          "epochs_to_target": epochs_to(history, args.target),
          "final_accuracy": last.get("test_accuracy", math.nan),
          "final_loss": math.nan if diverged else last["test_loss"],
          "history": history})
      result = (f"diverged in epoch {len(history) + 1}" if diverged else
                f"final test accuracy {100 * last['test_accuracy']:.2f}%")
      print(f"{'BN   ' if use_bn else 'no BN'} lr {lr:<6g} {result}",
            flush=True)

  print(f"\ndigits, MLP {args.hidden}, {args.epochs} epochs, batch "
        f"{args.batch_size}, SGD + warmup/cosine, seed {args.seed}:\n")
  print(format_table(rows, args.target))
  plot(os.path.join(workdir, "ablation.png"), rows, args.target)
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"\nwrote {os.path.join(workdir, 'ablation.png')} and ablation.json")
  return rows


if __name__ == "__main__":
  main()
