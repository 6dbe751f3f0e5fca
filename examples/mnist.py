"""MNIST-style digits with an MLP (Dense -> BatchNorm -> relu), jbn's BN.

    python examples/mnist.py                       # scikit-learn's digits
    python examples/mnist.py --data-dir ~/mnist    # MNIST IDX files
    python examples/mnist.py --data-dir ~/fashion --dataset fashion_mnist

Without ``--data-dir`` it trains on the handwritten digits that ship inside
scikit-learn (1797 real 8x8 images; fixed split: 1437 train, 360 test).
Nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import data as data_lib  # noqa: E402
from examples import train  # noqa: E402

DEFAULTS = train.Config(
    dataset="digits", model="mlp", hidden=(512, 512), optimizer="sgd",
    learning_rate=0.1, weight_decay=5e-4, warmup_epochs=1.0, epochs=20,
    batch_size=64)


def parse_flags(argv: Sequence[str] | None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = parser.add_argument_group("data")
  g.add_argument("--data-dir", default=None,
                 help="directory with the four MNIST/Fashion-MNIST IDX files "
                      f"({', '.join(data_lib.MNIST_FILES.values())}, .gz or "
                      "not). Default: scikit-learn's bundled digits.")
  g.add_argument("--dataset", choices=("digits", "mnist", "fashion_mnist"),
                 default=None,
                 help="name of the data (default: digits, or mnist with "
                      "--data-dir); fashion_mnist reads the same file names")
  g = parser.add_argument_group("model")
  g.add_argument("--hidden", default=",".join(map(str, DEFAULTS.hidden)),
                 help="hidden layer widths, comma-separated (%(default)s)")
  train.add_flags(parser, DEFAULTS)
  args = parser.parse_args(argv)
  dataset = args.dataset or ("mnist" if args.data_dir else "digits")
  if dataset == "digits" and args.data_dir:
    parser.error("--dataset digits is bundled with scikit-learn: drop "
                 "--data-dir, or use --dataset mnist / fashion_mnist.")
  if dataset != "digits" and not args.data_dir:
    parser.error(f"--dataset {dataset} reads IDX files: pass --data-dir "
                 f"({data_lib.MNIST_SOURCES}).")
  try:
    hidden = tuple(int(w) for w in args.hidden.split(","))
  except ValueError:
    parser.error(f"--hidden {args.hidden!r}: expected comma-separated "
                 f"integers, e.g. 256,256.")
  return args, train.config_from_flags(args, dataset=dataset, model="mlp",
                                       hidden=hidden)


def main(argv: Sequence[str] | None = None) -> train.TrainResult:
  """Parses ``argv`` (default: ``sys.argv[1:]``), trains, exports."""
  args, config = parse_flags(argv)
  return train.run_and_export(config, args)


if __name__ == "__main__":
  train.cli(main)
