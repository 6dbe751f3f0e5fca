"""Datasets for the examples: read from local files, never downloaded.

Every loader returns a :class:`Dataset`: float32 images in ``[0, 1]`` of shape
``(N, H, W, C)`` and int32 labels, for a train and a test split.

* :func:`load_digits`: scikit-learn's bundled handwritten digits (1797 8x8
  grey images, shipped inside scikit-learn: real data, no download), split
  into train/test with a fixed seed.
* :func:`load_idx`: MNIST or Fashion-MNIST from their IDX files.
* :func:`load_cifar10`: CIFAR-10 from its python pickle batches, in a
  ``cifar-10-batches-py`` directory or the ``cifar-10-python.tar.gz`` archive.
* :func:`synthetic_images`: class-dependent random images, for smoke tests.

:func:`load_dataset` picks one from a training config. This module imports
neither JAX, Flax nor jbn nor any model code: ``predict.py`` uses it to
evaluate an exported model on its own.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Iterator

import numpy as np

from examples import errors

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_SOURCES = (
    "MNIST: https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of "
    "http://yann.lecun.com/exdb/mnist/); Fashion-MNIST (same file names): "
    "https://github.com/zalandoresearch/fashion-mnist "
    "(http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/)")
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

_IDX_UBYTE = 0x08


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train and a test split of images in [0, 1] and integer labels.

  Attributes:
    name: a short name for messages ("digits", "mnist", "cifar10", ...).
    train_images: float32 ``(N, H, W, C)`` in [0, 1].
    train_labels: int32 ``(N,)``.
    test_images: float32 ``(M, H, W, C)`` in [0, 1].
    test_labels: int32 ``(M,)``.
    num_classes: number of classes.
    source: where the data came from, for the logs.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str = ""

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training images (float32, ``(C,)``)."""
    x = self.train_images.astype(np.float64)
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


class DataError(errors.UsageError):
  """Dataset files are missing or not in the expected format."""


def load_dataset(config) -> Dataset:
  """The dataset named by ``config.dataset``, from local files only.

  Reads ``config.dataset``, ``config.data_dir`` and, for ``synthetic``,
  ``config.synthetic_size`` and ``config.seed``.

  Raises:
    DataError: an unknown name, no ``data_dir`` where files are needed, or
      files missing or malformed.
  """
  if config.dataset == "digits":
    return load_digits(seed=0)
  if config.dataset == "synthetic":
    train_size, test_size = config.synthetic_size
    return synthetic_images(train_size=train_size, test_size=test_size,
                            seed=config.seed)
  if config.dataset not in ("mnist", "fashion_mnist", "cifar10"):
    raise DataError(f"unknown dataset {config.dataset!r}; expected digits, "
                    f"mnist, fashion_mnist, cifar10 or synthetic.")
  if config.data_dir is None:
    raise DataError(
        f"dataset {config.dataset!r} is read from local files: pass "
        f"--data-dir. Nothing is ever downloaded.")
  if config.dataset == "cifar10":
    return load_cifar10(config.data_dir)
  return load_idx(config.data_dir, name=config.dataset)


def _dataset(name, train_x, train_y, test_x, test_y, num_classes,
             source) -> Dataset:
  return Dataset(name=name, source=source,
                 train_images=np.ascontiguousarray(train_x, np.float32),
                 train_labels=np.asarray(train_y, np.int32),
                 test_images=np.ascontiguousarray(test_x, np.float32),
                 test_labels=np.asarray(test_y, np.int32),
                 num_classes=num_classes)


# ---------------------------------------------------------------------------
# scikit-learn digits


def load_digits(*, test_size: int = 360, seed: int = 0) -> Dataset:
  """scikit-learn's handwritten digits, split into train and test.

  The 1797 8x8 images (values 0..16) ship inside scikit-learn. The split is
  stratified by class and fixed by ``seed``: with the defaults, 1437 train and
  360 test images, the same split on every machine.
  """
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = (digits.images / 16.0)[..., None]
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, digits.target, test_size=test_size, random_state=seed,
      stratify=digits.target)
  return _dataset("digits", train_x, train_y, test_x, test_y, 10,
                  "scikit-learn's bundled handwritten digits "
                  "(sklearn.datasets.load_digits; real 8x8 scans, fixed "
                  f"stratified split, seed {seed}); pass --data-dir for MNIST")


# ---------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


def _find(data_dir: str, name: str) -> str | None:
  for candidate in (name, name + ".gz"):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  return None


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (``.gz`` or not) into a uint8 array.

  Format: two zero bytes, the type code ``0x08`` (unsigned byte), the number
  of dimensions ``d``, ``d`` big-endian int32 sizes, then the data.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read IDX file {path}: {e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DataError(f"{path} is not an IDX file (bad magic number "
                    f"{raw[:4].hex() or 'empty'}).")
  if raw[2] != _IDX_UBYTE:
    raise DataError(f"{path}: IDX type code 0x{raw[2]:02x} is not supported; "
                    f"expected 0x08 (unsigned byte) as in MNIST.")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path} is truncated (no room for its {ndim} sizes).")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  size = int(np.prod(shape))
  if len(raw) - header != size:
    raise DataError(f"{path} holds {len(raw) - header} bytes of data, but its "
                    f"header announces shape {shape} ({size} bytes).")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_idx(data_dir: str, *, name: str = "mnist") -> Dataset:
  """MNIST or Fashion-MNIST from the four IDX files in ``data_dir``.

  Each file may be plain or gzipped (``.gz``).

  Raises:
    DataError: a file is missing (the message lists the files expected and
      where they come from) or is not a valid IDX file.
  """
  paths = {key: _find(data_dir, fname) for key, fname in MNIST_FILES.items()}
  missing = [MNIST_FILES[k] for k, p in paths.items() if p is None]
  if missing:
    raise DataError(
        f"{name}: missing {', '.join(missing)} in {data_dir!r}. Expected the "
        f"four IDX files {', '.join(MNIST_FILES.values())} (each optionally "
        f"gzipped, '.gz'). They come from {MNIST_SOURCES}. Nothing is "
        f"downloaded: fetch them yourself and pass --data-dir.")
  arrays = {key: read_idx(path) for key, path in paths.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise DataError(
          f"{name} {split}: images of shape {images.shape} and labels of "
          f"shape {labels.shape} do not match; expected (N, H, W) and (N,).")
  return _dataset(name,
                  arrays["train_images"][..., None] / 255.0,
                  arrays["train_labels"],
                  arrays["test_images"][..., None] / 255.0,
                  arrays["test_labels"], 10, f"IDX files in {data_dir}")


# ---------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain containers and NumPy arrays, nothing else.

  The CIFAR batches are pickles; refusing every other global keeps a
  tampered file from running code.
  """

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.numeric", "_frombuffer"),
      ("numpy._core.numeric", "_frombuffer"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
      ("_codecs", "encode"),  # bytes in protocol-2 pickles from Python 3
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to unpickle {module}.{name}: a CIFAR batch holds only "
          f"a dict of bytes, lists and NumPy arrays.")
    return super().find_class(module, name)


def _read_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # pickle raises many different types
    raise DataError(f"{source} is not a CIFAR-10 python batch: {e}") from e
  if not isinstance(batch, dict) or b"data" not in batch or (
      b"labels" not in batch):
    raise DataError(f"{source} is not a CIFAR-10 python batch: expected a dict "
                    f"with keys b'data' and b'labels'.")
  data = np.asarray(batch[b"data"], np.uint8)
  labels = np.asarray(batch[b"labels"], np.int64)
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or (
      len(data) != len(labels)):
    raise DataError(f"{source}: b'data' has shape {data.shape} for "
                    f"{len(labels)} labels; expected (N, 3072) uint8 rows.")
  # Rows are channel-major (1024 red, 1024 green, 1024 blue): -> NHWC.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10(data_dir: str) -> Dataset:
  """CIFAR-10 from its python pickle batches.

  Looks, in order, for ``data_dir`` itself holding ``data_batch_1`` ..
  ``data_batch_5`` and ``test_batch``, for ``data_dir/cifar-10-batches-py/``,
  and for ``data_dir/cifar-10-python.tar.gz`` (read in place, not extracted).

  Raises:
    DataError: no batches found (the message lists the files expected and
      where they come from) or a batch is not in the CIFAR-10 format.
  """
  names = CIFAR10_TRAIN + (CIFAR10_TEST,)
  raws = None
  for folder in (data_dir, os.path.join(data_dir, CIFAR10_DIR)):
    if all(os.path.isfile(os.path.join(folder, n)) for n in names):
      raws = {}
      for n in names:
        with open(os.path.join(folder, n), "rb") as f:
          raws[n] = (f.read(), os.path.join(folder, n))
      break
  archive = os.path.join(data_dir, CIFAR10_ARCHIVE)
  if raws is None and os.path.isfile(archive):
    raws = {}
    try:
      with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
          base = os.path.basename(member.name)
          if member.isfile() and base in names:
            raws[base] = (tar.extractfile(member).read(),
                          f"{archive}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DataError(f"cannot read {archive}: {e}") from e
    absent = [n for n in names if n not in raws]
    if absent:
      raise DataError(f"{archive} lacks {', '.join(absent)}.")
  if raws is None:
    raise DataError(
        f"cifar10: no CIFAR-10 batches in {data_dir!r}. Expected "
        f"{', '.join(names)} in {data_dir!r} or in {data_dir!r}/{CIFAR10_DIR}/, "
        f"or the archive {data_dir!r}/{CIFAR10_ARCHIVE}, from {CIFAR10_SOURCE} "
        f"(the 'python version'). Nothing is downloaded: fetch it yourself "
        f"and pass --data-dir.")
  train = [_read_cifar_batch(*raws[n]) for n in CIFAR10_TRAIN]
  test_x, test_y = _read_cifar_batch(*raws[CIFAR10_TEST])
  train_x = np.concatenate([x for x, _ in train])
  train_y = np.concatenate([y for _, y in train])
  return _dataset("cifar10", train_x / 255.0, train_y, test_x / 255.0, test_y,
                  10, f"CIFAR-10 python batches in {data_dir}")


# ---------------------------------------------------------------------------
# Synthetic


def synthetic_images(*, image_shape=(32, 32, 3), num_classes: int = 10,
                     train_size: int = 512, test_size: int = 128,
                     seed: int = 0) -> Dataset:
  """Random images whose class sets their mean colour, plus pixel noise.

  Learnable, so a smoke test sees the loss fall, but meaningless as a
  benchmark: use it to check that the code runs, nothing else.
  """
  rng = np.random.default_rng(seed)
  colours = rng.uniform(0.2, 0.8, (num_classes, 1, 1, image_shape[-1]))
  prototypes = np.broadcast_to(colours, (num_classes,) + tuple(image_shape))

  def make(n):
    labels = rng.integers(0, num_classes, n)
    noise = rng.normal(0, 0.15, (n,) + tuple(image_shape))
    return np.clip(prototypes[labels] + noise, 0, 1), labels

  train_x, train_y = make(train_size)
  test_x, test_y = make(test_size)
  return _dataset("synthetic", train_x, train_y, test_x, test_y, num_classes,
                  "SYNTHETIC random images (smoke test only, meaningless "
                  "accuracy)")


# ---------------------------------------------------------------------------
# Batching


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The order of the training examples in ``epoch``: a function of
  ``(seed, epoch)`` only, so a resumed run sees the same batches."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                  seed: int, epoch: int, process_index: int = 0,
                  process_count: int = 1
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's part of each global training batch of ``epoch``.

  The epoch's order comes from :func:`epoch_permutation`; the last partial
  batch is dropped. Of each global batch of ``batch_size`` examples, process
  ``p`` gets rows ``[p * b, (p + 1) * b)`` with ``b = batch_size /
  process_count``: together the processes see exactly the batches a single
  process would.
  """
  order = epoch_permutation(len(images), seed=seed, epoch=epoch)
  local = batch_size // process_count
  for start in range(0, len(order) - batch_size + 1, batch_size):
    idx = order[start + process_index * local:start + (process_index + 1) * local]
    yield images[idx], labels[idx]


def eval_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """This process's part of each global evaluation batch, padded.

  Every example is seen once: the last batch is padded to ``batch_size``
  with weight 0. Yields ``(images, labels, weights)``.
  """
  n = len(images)
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    idx = np.arange(start + process_index * local,
                    start + (process_index + 1) * local)
    weights = (idx < n).astype(np.float32)
    idx = np.minimum(idx, n - 1)
    yield images[idx], labels[idx], weights
