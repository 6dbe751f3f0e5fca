"""CIFAR-10 with a small ResNet (Conv -> BatchNorm -> relu, residual blocks).

    python examples/cifar.py --data-dir ~/cifar      # the real data
    python examples/cifar.py --synthetic --epochs 1  # smoke test, no files

``--data-dir`` holds the CIFAR-10 "python version" (from
https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz): either the archive
``cifar-10-python.tar.gz`` itself (read in place) or its extracted
``cifar-10-batches-py/`` (data_batch_1..5, test_batch). Nothing is ever
downloaded. ``--synthetic`` trains on class-coloured random images instead:
it checks that the code runs, its accuracy means nothing.

On a 2-core CPU the default network trains about 300 images/s (an epoch of
CIFAR-10 in about 3 minutes); use an accelerator, or a smaller --width /
--stage-sizes. The flags come from ``examples/configs``; the defaults from
``examples/configs/cifar.py``.
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
from examples.configs import cifar as cifar_config  # noqa: E402

DEFAULTS = cifar_config.get_config()


def parse_flags(argv: Sequence[str] | None
                ) -> tuple[configs.Config, str | None]:
  """The run's config and ``--workdir`` from the command line."""
  parser = configs.make_parser(DEFAULTS, description=__doc__,
                               choices={"dataset": cifar_config.DATASETS})
  parser.add_argument_group("data").add_argument(
      "--synthetic", action="store_true",
      help="same as --dataset synthetic: random class-coloured 32x32 images "
           "(smoke test only; the accuracy is meaningless)")
  args = parser.parse_args(argv)
  given = configs.given(args)
  synthetic = args.synthetic or given.get("dataset") == "synthetic"
  if synthetic == ("data_dir" in given):
    parser.error(
        "pass --data-dir with the CIFAR-10 python batches (from "
        f"{data_lib.CIFAR10_SOURCE}; nothing is downloaded), or --synthetic "
        "for a smoke test; not both, not neither.")
  return configs.from_args(
      args, DEFAULTS, dataset="synthetic" if synthetic else "cifar10"
  ), args.workdir


def main(argv: Sequence[str] | None = None):
  """Parses ``argv`` (default: ``sys.argv[1:]``), trains, exports; returns
  the ``train.TrainResult``."""
  return cli.run(*parse_flags(argv))


if __name__ == "__main__":
  cli.main(main)
