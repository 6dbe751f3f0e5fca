"""Helpers shared by the tests of the examples: tiny configs, subprocess
environments, dataset files written in the real formats."""

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import tarfile

import numpy as np

from examples import data
from examples import mnist
from examples import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, quick run: 11 steps of 128 (32 per device on 4 devices), no
# recalibration after training (its own tests, and `mnist_run`, ask for it).
TINY = ["--epochs", "1", "--batch-size", "128", "--hidden", "32",
        "--warmup-epochs", "0.2", "--no-progress", "--recalibrate", "none"]
TINY_CONFIG = dataclasses.replace(
    mnist.DEFAULTS, hidden=(32,), batch_size=128, epochs=2, progress=False,
    quiet=True, checkpoint_every=0, recalibrate="none")


def subprocess_env():
  """The environment for a subprocess: one CPU device (the test session's
  4-device XLA_FLAGS dropped)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def host_variables(result):
  """``{'params', 'batch_stats'}`` of a TrainResult (what its export holds:
  recalibrated statistics, weight EMA), as NumPy arrays."""
  return parallel.to_host(result.variables)


def snapshot(directory):
  """Every file under ``directory`` with the SHA-256 of its bytes."""
  out = {}
  for d, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


def stray_files(workdir):
  """Temporary files or directories anywhere under ``workdir``."""
  return [os.path.join(d, n) for d, dirs, files in os.walk(workdir)
          for n in dirs + files if ".tmp" in n or "orbax-checkpoint-tmp" in n]


def write_idx(path, array):
  """An IDX file of unsigned bytes: 0, 0, 0x08, ndim, big-endian sizes."""
  array = np.asarray(array, np.uint8)
  raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape) + array.tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(raw)


def make_idx_dir(root, rng, *, gz=("train-images-idx3-ubyte",)):
  """The four MNIST files (some gzipped), 6 train and 4 test 5x4 images."""
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (6, 5, 4)),
      "train-labels-idx1-ubyte": rng.integers(0, 10, 6),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 5, 4)),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4),
  }
  for name, array in arrays.items():
    write_idx(os.path.join(root, name + (".gz" if name in gz else "")), array)
  return arrays


def cifar_batch(rng, n):
  return {b"batch_label": b"x", b"labels": rng.integers(0, 10, n).tolist(),
          b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
          b"filenames": [b"f"] * n}


def write_cifar(root, rng, *, layout, n=3):
  """CIFAR-10 python batches: 'flat' in root, 'dir' in
  root/cifar-10-batches-py, or 'tar' as root/cifar-10-python.tar.gz."""
  batches = {name: cifar_batch(rng, n)
             for name in data.CIFAR10_TRAIN + (data.CIFAR10_TEST,)}
  if layout == "tar":
    with tarfile.open(os.path.join(root, data.CIFAR10_ARCHIVE), "w:gz") as tar:
      for name, batch in batches.items():
        raw = pickle.dumps(batch, protocol=2)
        info = tarfile.TarInfo(f"{data.CIFAR10_DIR}/{name}")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return batches
  folder = root if layout == "flat" else os.path.join(root, data.CIFAR10_DIR)
  os.makedirs(folder, exist_ok=True)
  for name, batch in batches.items():
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump(batch, f)
  return batches
