"""Runs an exported model (``<workdir>/model.jax``) on a test split.

    python examples/predict.py --model runs/digits-.../model.jax
    python examples/predict.py --model runs/mnist-.../model.jax --data-dir ~/mnist

The model is loaded with ``jax.export.deserialize``: no model code, no Flax,
no jbn is imported. Its contract: float32 images in [0, 1] of shape
``(batch, H, W, C)``, any batch size, to logits ``(batch, num_classes)``;
the input standardization and the folded batch norms are inside it. The
dataset is picked from the model's input shape (8x8x1: scikit-learn's
digits, 28x28x1: MNIST IDX files, 32x32x3: CIFAR-10) unless ``--dataset``
says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from examples import data as data_lib  # noqa: E402
from examples import errors  # noqa: E402

_BY_SHAPE = {(8, 8, 1): "digits", (28, 28, 1): "mnist", (32, 32, 3): "cifar10"}


def load_model(path: str) -> jax.export.Exported:
  """Deserializes an exported model, with a clear error if it is not one."""
  try:
    with open(path, "rb") as f:
      return jax.export.deserialize(bytearray(f.read()))
  except OSError as e:
    raise errors.UsageError(
        f"cannot read --model {path}: {e.strerror}. It is the model.jax an "
        f"example run writes in its --workdir.") from e
  except Exception as e:  # flatbuffers raises assorted errors on garbage
    raise errors.UsageError(f"--model {path} is not a jax.export model "
                            f"({type(e).__name__}: {e}).") from e


def load_test_split(name: str, data_dir: str | None
                    ) -> tuple[np.ndarray, np.ndarray]:
  if name == "digits":
    dataset = data_lib.load_digits()
  elif data_dir is None:
    raise errors.UsageError(f"the model takes {name} images: pass --data-dir "
                            f"with the dataset files.")
  elif name in ("mnist", "fashion_mnist"):
    dataset = data_lib.load_idx(data_dir, name=name)
  else:
    dataset = data_lib.load_cifar10(data_dir)
  return dataset.test_images, dataset.test_labels


def predict(exported: jax.export.Exported, images: np.ndarray, *,
            batch_size: int = 1000) -> np.ndarray:
  """Logits for ``images``, in batches; the last batch is padded so one
  compiled shape serves all."""
  call = jax.jit(exported.call)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    if n < batch_size and len(images) > batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,)
                                              + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(call(chunk))[:n])
  return np.concatenate(out)


def main(argv: Sequence[str] | None = None) -> float:
  """Prints the first predictions and the test accuracy; returns it."""
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="path to model.jax")
  parser.add_argument("--data-dir", default=None,
                      help="dataset files (MNIST IDX or CIFAR-10 batches); "
                           "not needed for the digits")
  parser.add_argument("--dataset", default=None,
                      choices=("digits", "mnist", "fashion_mnist", "cifar10"),
                      help="default: from the model's input shape")
  parser.add_argument("--show", type=int, default=10,
                      help="print this many predictions (%(default)s)")
  parser.add_argument("--batch-size", type=int, default=1000)
  args = parser.parse_args(argv)

  exported = load_model(args.model)
  (aval,) = exported.in_avals
  image_shape = tuple(aval.shape[1:])
  name = args.dataset or _BY_SHAPE.get(image_shape)
  if name is None:
    raise errors.UsageError(f"the model takes images of shape {image_shape}; "
                            f"pass --dataset to say which test split to use.")
  images, labels = load_test_split(name, args.data_dir)
  if images.shape[1:] != image_shape:
    raise errors.UsageError(f"the model takes {image_shape} images but the "
                            f"{name} test split has {images.shape[1:]}.")
  logits = predict(exported, images, batch_size=args.batch_size)
  predicted = logits.argmax(-1)
  print(f"model {args.model}: input float32 {aval.shape} in [0, 1] -> logits "
        f"{exported.out_avals[0].shape}; platforms {exported.platforms}")
  for i in range(min(args.show, len(images))):
    print(f"  test image {i:4d}: predicted {predicted[i]}  true {labels[i]}")
  accuracy = float(np.mean(predicted == labels))
  print(f"{name} test accuracy: {100 * accuracy:.2f}% "
        f"({int(np.sum(predicted == labels))}/{len(labels)})")
  return accuracy


if __name__ == "__main__":
  try:
    main()
  except errors.UsageError as e:  # DataError included; a bug keeps its trace
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
