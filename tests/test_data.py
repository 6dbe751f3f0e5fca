"""The example data loaders, on tiny files written in the real formats."""

import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest

from examples import data
from tests.helpers import make_idx_dir, write_cifar, write_idx


# --------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [(), ("train-images-idx3-ubyte",),
                                tuple(data.MNIST_FILES.values())])
def test_load_idx_reads_plain_and_gzipped_files(tmp_path, rng, gz):
  arrays = make_idx_dir(str(tmp_path), rng, gz=gz)
  ds = data.load_idx(str(tmp_path), name="fashion_mnist")
  assert ds.name == "fashion_mnist" and ds.num_classes == 10
  assert ds.train_images.shape == (6, 5, 4, 1)
  assert ds.train_images.dtype == np.float32
  np.testing.assert_allclose(ds.train_images[..., 0],
                             arrays["train-images-idx3-ubyte"] / 255.0,
                             rtol=1e-6)
  np.testing.assert_array_equal(ds.test_labels,
                                arrays["t10k-labels-idx1-ubyte"])
  assert ds.test_images.shape == (4, 5, 4, 1)


def test_missing_idx_files_error_lists_files_and_sources(tmp_path, rng):
  make_idx_dir(str(tmp_path), rng)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  with pytest.raises(data.DataError, match=r"missing t10k-labels-idx1-ubyte"
                     r".*train-images-idx3-ubyte, train-labels-idx1-ubyte.*"
                     r"ossci-datasets.*fashion-mnist.*Nothing is downloaded"):
    data.load_idx(str(tmp_path))


def test_idx_bad_magic_number(tmp_path):
  path = str(tmp_path / "x")
  with open(path, "wb") as f:
    f.write(b"\x1f\x8b\x08\x00garbage")  # a gzip header, but no .gz suffix
  with pytest.raises(data.DataError, match="not an IDX file"):
    data.read_idx(path)


def test_idx_unsupported_type_code(tmp_path):
  path = str(tmp_path / "x")
  with open(path, "wb") as f:
    f.write(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0\0\0\0")
  with pytest.raises(data.DataError, match="type code 0x0d"):
    data.read_idx(path)


def test_idx_truncated_data(tmp_path):
  path = str(tmp_path / "x")
  with open(path, "wb") as f:
    f.write(bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 3, 4) + b"\0" * 11)
  with pytest.raises(data.DataError, match=r"11 bytes.*shape \(3, 4\)"):
    data.read_idx(path)


def test_idx_images_and_labels_disagree(tmp_path, rng):
  make_idx_dir(str(tmp_path), rng)
  write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(5))
  with pytest.raises(data.DataError, match="train: images of shape"):
    data.load_idx(str(tmp_path))


# --------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("layout", ["flat", "dir", "tar"])
def test_load_cifar10_layouts(tmp_path, rng, layout):
  batches = write_cifar(str(tmp_path), rng, layout=layout)
  ds = data.load_cifar10(str(tmp_path))
  assert ds.train_images.shape == (15, 32, 32, 3)
  assert ds.test_images.shape == (3, 32, 32, 3)
  # Rows are channel-major: 1024 red, 1024 green, 1024 blue values.
  row = batches["data_batch_2"][b"data"][1]
  y, x = 5, 7
  np.testing.assert_allclose(
      ds.train_images[4, y, x],
      [row[c * 1024 + y * 32 + x] / 255.0 for c in range(3)], rtol=1e-6)
  np.testing.assert_array_equal(ds.test_labels,
                                batches["test_batch"][b"labels"])


def test_missing_cifar_error_lists_files_and_source(tmp_path):
  with pytest.raises(data.DataError, match=r"data_batch_1.*test_batch.*"
                     r"cifar-10-batches-py.*cifar-10-python.tar.gz.*"
                     r"https://www.cs.toronto.edu/~kriz/cifar-10-python"):
    data.load_cifar10(str(tmp_path))


def test_cifar_archive_missing_member(tmp_path, rng):
  write_cifar(str(tmp_path), rng, layout="tar")
  path = tmp_path / data.CIFAR10_ARCHIVE
  with tarfile.open(path, "r:gz") as tar:
    members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
  with tarfile.open(path, "w:gz") as tar:
    for m, raw in members:
      if not m.name.endswith("test_batch"):
        tar.addfile(m, io.BytesIO(raw))
  with pytest.raises(data.DataError, match="lacks test_batch"):
    data.load_cifar10(str(tmp_path))


def test_cifar_batch_without_labels(tmp_path, rng):
  write_cifar(str(tmp_path), rng, layout="flat")
  with open(tmp_path / "data_batch_3", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
  with pytest.raises(data.DataError, match=r"data_batch_3 is not a CIFAR-10 "
                     r"python batch: expected a dict with keys b'data' and "
                     r"b'labels'"):
    data.load_cifar10(str(tmp_path))


def test_cifar_batch_of_wrong_row_size(tmp_path, rng):
  write_cifar(str(tmp_path), rng, layout="flat")
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(data.DataError, match=r"\(2, 100\).*\(N, 3072\)"):
    data.load_cifar10(str(tmp_path))


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_cifar_loader_refuses_pickles_that_run_code(tmp_path, rng):
  write_cifar(str(tmp_path), rng, layout="flat")
  with open(tmp_path / "data_batch_1", "wb") as f:
    pickle.dump({b"data": _Evil(), b"labels": []}, f)
  with pytest.raises(data.DataError, match="refusing to unpickle"):
    data.load_cifar10(str(tmp_path))


# --------------------------------------------------------------------------
# digits, synthetic, batching


def test_load_digits_is_a_fixed_stratified_split():
  a, b = data.load_digits(), data.load_digits()
  assert a.train_images.shape == (1437, 8, 8, 1)
  assert a.test_images.shape == (360, 8, 8, 1)
  assert 0.0 <= a.train_images.min() and a.train_images.max() <= 1.0
  np.testing.assert_array_equal(a.test_images, b.test_images)
  assert np.bincount(a.test_labels).min() >= 35  # every class is in test
  assert "scikit-learn" in a.source


def test_synthetic_images_shape_and_range():
  ds = data.synthetic_images(image_shape=(6, 6, 3), train_size=20,
                             test_size=8)
  assert ds.train_images.shape == (20, 6, 6, 3)
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
  assert "SYNTHETIC" in ds.source


def test_epoch_order_is_a_function_of_seed_and_epoch():
  p = data.epoch_permutation(50, seed=1, epoch=3)
  np.testing.assert_array_equal(p, data.epoch_permutation(50, seed=1, epoch=3))
  assert not np.array_equal(p, data.epoch_permutation(50, seed=1, epoch=4))
  assert not np.array_equal(p, data.epoch_permutation(50, seed=2, epoch=3))


def test_process_shards_make_up_the_single_process_batches():
  images = np.arange(23, dtype=np.float32).reshape(23, 1, 1, 1)
  labels = np.arange(23)
  whole = list(data.train_batches(images, labels, batch_size=8, seed=0,
                                  epoch=1))
  assert len(whole) == 2  # the last partial batch is dropped
  parts = [list(data.train_batches(images, labels, batch_size=8, seed=0,
                                   epoch=1, process_index=p, process_count=2))
           for p in range(2)]
  for i, (x, y) in enumerate(whole):
    np.testing.assert_array_equal(
        y, np.concatenate([parts[0][i][1], parts[1][i][1]]))
    np.testing.assert_array_equal(
        x, np.concatenate([parts[0][i][0], parts[1][i][0]]))


def test_eval_batches_cover_every_example_once_with_padding():
  images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  labels = np.arange(10)
  seen = []
  for p in range(2):
    for x, y, w in data.eval_batches(images, labels, batch_size=4,
                                     process_index=p, process_count=2):
      assert x.shape == (2, 1, 1, 1)
      seen += list(y[w > 0])
  assert sorted(seen) == list(range(10))
