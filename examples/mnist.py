"""MNIST-style digits with an MLP (Dense -> BatchNorm -> relu), jbn's BN.

    python examples/mnist.py                       # scikit-learn's digits
    python examples/mnist.py --data-dir ~/mnist    # MNIST IDX files
    python examples/mnist.py --data-dir ~/fashion --dataset fashion_mnist

Without ``--data-dir`` it trains on the handwritten digits that ship inside
scikit-learn (1797 real 8x8 images; fixed split: 1437 train, 360 test).
Nothing is ever downloaded. The flags come from ``examples/configs``; the
defaults from ``examples/configs/mnist.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import cli  # noqa: E402
from examples import configs  # noqa: E402
from examples import data as data_lib  # noqa: E402
from examples.configs import mnist as mnist_config  # noqa: E402

DEFAULTS = mnist_config.get_config()


def parse_flags(argv: Sequence[str] | None
                ) -> tuple[configs.Config, str | None]:
  """The run's config and ``--workdir`` from the command line."""
  parser = configs.make_parser(DEFAULTS, description=__doc__,
                               choices={"dataset": mnist_config.DATASETS})
  args = parser.parse_args(argv)
  given = configs.given(args)
  data_dir = given.get("data_dir")
  dataset = given.get("dataset") or ("mnist" if data_dir else "digits")
  if dataset == "digits" and data_dir:
    parser.error("--dataset digits is bundled with scikit-learn: drop "
                 "--data-dir, or use --dataset mnist / fashion_mnist.")
  if dataset != "digits" and not data_dir:
    parser.error(f"--dataset {dataset} reads IDX files: pass --data-dir "
                 f"({data_lib.MNIST_SOURCES}).")
  return configs.from_args(args, DEFAULTS, dataset=dataset), args.workdir


def main(argv: Sequence[str] | None = None):
  """Parses ``argv`` (default: ``sys.argv[1:]``), trains, exports; returns
  the ``train.TrainResult``."""
  return cli.run(*parse_flags(argv))


if __name__ == "__main__":
  cli.main(main)
