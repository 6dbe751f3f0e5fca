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
--stage-sizes.
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
    dataset="cifar10", model="resnet", width=16, stage_sizes=(1, 1, 1),
    optimizer="sgd", learning_rate=0.1, weight_decay=5e-4, warmup_epochs=1.0,
    epochs=30, batch_size=128, augment=True)


def parse_flags(argv: Sequence[str] | None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = parser.add_argument_group("data")
  g.add_argument("--data-dir", default=None,
                 help=f"directory with {data_lib.CIFAR10_ARCHIVE} or "
                      f"{data_lib.CIFAR10_DIR}/ (required unless --synthetic)")
  g.add_argument("--synthetic", action="store_true",
                 help="random class-coloured 32x32 images (smoke test only; "
                      "the accuracy is meaningless)")
  g.add_argument("--synthetic-size", default="512,128",
                 help="train,test sizes with --synthetic (%(default)s)")
  g = parser.add_argument_group("model")
  g.add_argument("--width", type=int, default=DEFAULTS.width,
                 help="channels of the first stage, doubled at each next "
                      "stage (%(default)s)")
  g.add_argument("--stage-sizes",
                 default=",".join(map(str, DEFAULTS.stage_sizes)),
                 help="residual blocks per stage (%(default)s)")
  g.add_argument("--no-augment", dest="augment", action="store_false",
                 help="no random crops and flips")
  train.add_flags(parser, DEFAULTS)
  args = parser.parse_args(argv)
  if args.synthetic == (args.data_dir is not None):
    parser.error(
        "pass --data-dir with the CIFAR-10 python batches (from "
        f"{data_lib.CIFAR10_SOURCE}; nothing is downloaded), or --synthetic "
        "for a smoke test; not both, not neither.")
  try:
    stage_sizes = tuple(int(s) for s in args.stage_sizes.split(","))
    sizes = tuple(int(s) for s in args.synthetic_size.split(","))
    if len(sizes) != 2:
      raise ValueError
  except ValueError:
    parser.error("--stage-sizes and --synthetic-size take comma-separated "
                 "integers (--synthetic-size: exactly two, train,test).")
  return args, train.config_from_flags(
      args, dataset="synthetic" if args.synthetic else "cifar10",
      model="resnet", width=args.width, stage_sizes=stage_sizes,
      augment=args.augment, synthetic_size=sizes)


def main(argv: Sequence[str] | None = None) -> train.TrainResult:
  """Parses ``argv`` (default: ``sys.argv[1:]``), trains, exports."""
  args, config = parse_flags(argv)
  return train.run_and_export(config, args)


if __name__ == "__main__":
  train.cli(main)
