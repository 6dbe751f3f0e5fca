"""The example entry points end to end (4 CPU devices): mnist.py, cifar.py,
predict.py, ablation.py, small_batch.py, the exported model, the command
line's errors.

Tiny runs: the digits with a small MLP for one or two short epochs, a
ResNet of width 4 on tiny CIFAR files.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import ablation
from examples import cifar
from examples import cli
from examples import data
from examples import errors
from examples import mnist
from examples import models
from examples import parallel
from examples import predict
from examples import small_batch
from examples import train
from tests import helpers
from tests.helpers import ROOT, TINY, TINY_CONFIG


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
  """One tiny `examples/mnist.py` run on all 4 devices, shared by tests;
  recalibrated (the default) so the export holds recalibrated statistics."""
  workdir = str(tmp_path_factory.mktemp("mnist"))
  result = mnist.main(TINY + ["--recalibrate", "pooled", "--plot",
                              "--workdir", workdir])
  return workdir, result


def test_mnist_smoke_writes_everything(mnist_run, capsys):
  workdir, result = mnist_run
  assert result.mesh.size == 4
  for name in ("metrics.jsonl", "curves.png", "model.jax"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    (record,) = [json.loads(line) for line in f]
  for key in ("epoch", "train_loss", "test_loss", "test_accuracy",
              "examples_per_sec", "recalibrated_test_loss",
              "recalibrated_test_accuracy", "final_test_loss",
              "final_test_accuracy"):  # --recalibrate pooled by default
    assert np.isfinite(record[key]), key
  assert "ema_test_accuracy" not in record  # no --weight-ema
  assert record["epoch"] == 1
  assert record["test_accuracy"] > 0.5  # 5 steps: far above chance (0.1)
  assert not helpers.stray_files(workdir)


def _manual_eval_logits(variables, model, images):
  """The MLP in evaluation mode, by hand in float64 NumPy: the running
  statistics, not the batch's, normalize every hidden layer."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  s = jax.tree.map(lambda a: np.asarray(a, np.float64),
                   variables["batch_stats"])
  x = (np.asarray(images, np.float64) - np.asarray(model.mean)) / np.asarray(
      model.std)
  x = x.reshape(len(x), -1)
  eps = model.norm.epsilon
  for i in range(len(model.hidden)):
    name = f"hidden{i}"
    z = x @ p[name]["layer"]["kernel"]
    bn, st = p[name]["bn"], s[name]["bn"]
    z = bn["scale"] * (z - st["mean"]) / np.sqrt(st["var"] + eps) + bn["bias"]
    x = np.maximum(z, 0)
  return x @ p["head"]["kernel"] + p["head"]["bias"]


def test_eval_mode_uses_running_statistics(mnist_run):
  _, result = mnist_run
  variables = helpers.host_variables(result)
  model = result.model.clone(norm=dataclasses.replace(result.model.norm,
                                                      axis_name=None))
  images = result.dataset.test_images[:16]
  # The running statistics moved away from their initial values.
  assert not np.allclose(variables["batch_stats"]["hidden0"]["bn"]["var"], 1)

  alone = model.apply(variables, images[:1], train=False)
  in_batch = model.apply(variables, images, train=False)
  np.testing.assert_allclose(alone[0], in_batch[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(alone, _manual_eval_logits(variables, model,
                                                        images[:1]),
                             rtol=1e-4, atol=1e-4)
  train_mode, _ = model.apply(variables, images, train=True,
                              mutable=["batch_stats"])
  assert np.max(np.abs(train_mode[0] - in_batch[0])) > 1e-3


def test_one_value_per_feature_in_training_is_an_error(mnist_run):
  _, result = mnist_run
  variables = helpers.host_variables(result)
  model = result.model.clone(norm=dataclasses.replace(result.model.norm,
                                                      axis_name=None))
  with pytest.raises(ValueError, match="more than 1 value per feature"):
    model.apply(variables, result.dataset.test_images[:1], train=True,
                mutable=["batch_stats"])


def test_exported_model_matches_unfolded_model(mnist_run):
  workdir, result = mnist_run
  with open(os.path.join(workdir, "model.jax"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert str(exported.in_avals[0].shape) == "(b, 8, 8, 1)"
  assert exported.in_avals[0].dtype == jnp.float32
  assert "cpu" in exported.platforms
  variables = helpers.host_variables(result)
  model = result.model.clone(norm=dataclasses.replace(result.model.norm,
                                                      axis_name=None))
  for n in (1, 7, 360):  # any batch size: the batch dimension is symbolic
    images = result.dataset.test_images[:n]
    folded = exported.call(images)
    assert folded.shape == (n, 10)
    unfolded = model.apply(variables, images, train=False)
    np.testing.assert_allclose(folded, unfolded, rtol=0, atol=1e-4)


def test_predict_reports_the_run_accuracy(mnist_run, capsys):
  workdir, result = mnist_run
  accuracy = predict.main(["--model", os.path.join(workdir, "model.jax"),
                           "--show", "2"])
  assert accuracy == pytest.approx(result.history[-1]["final_test_accuracy"],
                                   abs=1 / 360)
  out = capsys.readouterr().out
  assert "test image    1: predicted" in out
  assert "digits test accuracy" in out


def test_predict_imports_no_model_code(mnist_run):
  workdir, _ = mnist_run
  code = (
      "import runpy, sys\n"
      f"sys.argv = ['predict.py', '--model', {workdir + '/model.jax'!r}]\n"
      "runpy.run_path('examples/predict.py', run_name='__main__')\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
      "('flax', 'jbn', 'optax') or m in ('examples.models', 'examples.train'))\n"
      "assert not bad, bad\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       env=helpers.subprocess_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "digits test accuracy" in out.stdout


def test_predict_rejects_a_file_that_is_not_a_model(tmp_path):
  path = tmp_path / "model.jax"
  path.write_bytes(b"not a model")
  with pytest.raises(errors.UsageError, match="is not a jax.export model"):
    predict.main(["--model", str(path)])
  with pytest.raises(errors.UsageError, match="cannot read --model"):
    predict.main(["--model", str(tmp_path / "missing.jax")])


def test_four_devices_match_one_device(tmp_path):
  runs = {n: train.train_and_evaluate(
      dataclasses.replace(TINY_CONFIG, devices=n), str(tmp_path / str(n)))
          for n in (1, 4)}
  assert runs[1].mesh.size == 1 and runs[4].mesh.size == 4
  one, four = (helpers.host_variables(runs[1]),
               helpers.host_variables(runs[4]))
  # 2 epochs x 11 steps of synced BN: same parameters and running statistics.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), one, four)
  assert not np.allclose(one["batch_stats"]["hidden0"]["bn"]["mean"], 0)
  for a, b in zip(runs[1].history, runs[4].history):
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.01
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_batch_stats_identical_on_every_device(mnist_run):
  _, result = mnist_run
  for leaf in jax.tree.leaves(result.state.batch_stats):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 4
    for s in shards[1:]:
      np.testing.assert_array_equal(s, shards[0])


def test_global_batch_must_split_over_devices(tmp_path):
  with pytest.raises(errors.UsageError,
                     match=r"--batch-size 10 is the global batch: "
                     r"it must be divisible by the 4 devices"):
    train.train_and_evaluate(dataclasses.replace(TINY_CONFIG, batch_size=10),
                             str(tmp_path))


def test_devices_flag_beyond_what_exists(tmp_path):
  with pytest.raises(errors.UsageError,
                     match=r"--devices 5: this process has 4 "
                     r"device\(s\).*xla_force_host_platform_device_count"):
    train.train_and_evaluate(dataclasses.replace(TINY_CONFIG, devices=5),
                             str(tmp_path))


def test_distributed_flags_go_together():
  with pytest.raises(errors.UsageError, match="go together"):
    parallel.initialize(dataclasses.replace(
        TINY_CONFIG, coordinator_address="127.0.0.1:1234", process_id=0))


def test_mnist_flag_errors(tmp_path, capsys):
  with pytest.raises(SystemExit):
    mnist.main(["--dataset", "mnist"])
  assert "reads IDX files: pass --data-dir" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mnist.main(["--dataset", "digits", "--data-dir", str(tmp_path)])
  assert "bundled with scikit-learn" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mnist.main(["--hidden", "a,b"])
  assert "comma-separated integers" in capsys.readouterr().err


def test_mnist_with_missing_idx_files(tmp_path):
  with pytest.raises(data.DataError, match="missing train-images"):
    mnist.main(TINY + ["--data-dir", str(tmp_path), "--workdir",
                       str(tmp_path / "w")])


def test_cli_prints_user_errors_without_traceback(tmp_path):
  out = subprocess.run(
      [sys.executable, "examples/mnist.py", "--data-dir", str(tmp_path),
       "--workdir", str(tmp_path / "w")], cwd=ROOT,
      env=helpers.subprocess_env(), capture_output=True, text=True,
      timeout=120)
  assert out.returncode == 2
  assert out.stderr.startswith("error: mnist: missing train-images")
  assert "Traceback" not in out.stderr


def test_cli_keeps_the_traceback_of_a_bug(capsys):
  def buggy(argv):
    raise ValueError("a bug, not a usage error")
  with pytest.raises(ValueError, match="a bug"):
    cli.main(buggy)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(lambda argv: (_ for _ in ()).throw(errors.UsageError("bad")))
  assert exit_info.value.code == errors.EXIT_USAGE
  assert capsys.readouterr().err == "error: bad\n"


def test_mnist_idx_files_and_predict(tmp_path, rng):
  # IDX files with 28x28 images: the real MNIST shapes, 64 train, 16 test.
  data_dir = tmp_path / "mnist"
  data_dir.mkdir()
  for prefix, n in (("train", 64), ("t10k", 16)):
    helpers.write_idx(str(data_dir / f"{prefix}-images-idx3-ubyte.gz"),
                      rng.integers(0, 256, (n, 28, 28)))
    helpers.write_idx(str(data_dir / f"{prefix}-labels-idx1-ubyte"),
                      rng.integers(0, 10, n))
  workdir = str(tmp_path / "w")
  result = mnist.main(["--data-dir", str(data_dir), "--epochs", "1",
                       "--batch-size", "32", "--hidden", "16",
                       "--recalibrate", "none", "--no-progress", "--workdir",
                       workdir])
  assert result.dataset.name == "mnist"
  accuracy = predict.main(["--model", os.path.join(workdir, "model.jax"),
                           "--data-dir", str(data_dir)])
  assert accuracy == pytest.approx(result.history[-1]["final_test_accuracy"],
                                   abs=1 / 16)


def test_cifar_from_files_and_predict(tmp_path, rng):
  data_dir = str(tmp_path / "cifar")
  os.makedirs(data_dir)
  helpers.write_cifar(data_dir, rng, layout="tar", n=8)
  workdir = str(tmp_path / "w")
  result = cifar.main(["--data-dir", data_dir, "--epochs", "1", "--width",
                       "4", "--stage-sizes", "1,1", "--batch-size", "8",
                       "--recalibrate", "none", "--no-progress", "--workdir",
                       workdir])
  assert result.dataset.train_images.shape == (40, 32, 32, 3)
  assert os.path.getsize(os.path.join(workdir, "model.jax")) > 0
  accuracy = predict.main(["--model", os.path.join(workdir, "model.jax"),
                           "--data-dir", data_dir])
  assert accuracy == pytest.approx(result.history[-1]["final_test_accuracy"],
                                   abs=1 / 8)


def test_cifar_resnet_fold_matches_unfolded(rng):
  # Conv (HWIO, no bias) + BN pairs, shortcuts included, after some training
  # of the running statistics.
  config = dataclasses.replace(cifar.DEFAULTS, width=4, stage_sizes=(1, 1),
                               dataset="synthetic")
  ds = data.synthetic_images(image_shape=(32, 32, 3), train_size=8,
                             test_size=8)
  model = train.create_model(config, ds, axis_name=None)
  x = jnp.asarray(ds.train_images)

  @jax.jit
  def check(key):
    variables = model.init(key, x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    folded_model, folded_params = models.fold(model, variables)
    assert "bn" not in folded_params["stage1_block0"]["shortcut"]
    return (folded_model.apply({"params": folded_params}, x, train=False),
            model.apply(variables, x, train=False),
            variables["batch_stats"]["stem"]["bn"]["var"])

  folded, unfolded, var = check(jax.random.key(0, impl=train.PRNG_IMPL))
  assert not np.allclose(var, 1.0)  # the running statistics did move
  np.testing.assert_allclose(folded, unfolded, rtol=0, atol=1e-4)


def test_cifar_needs_data_or_synthetic(capsys):
  with pytest.raises(SystemExit):
    cifar.main([])
  assert ("pass --data-dir with the CIFAR-10 python batches"
          in capsys.readouterr().err)


def test_cifar_synthetic_smoke(tmp_path):
  result = cifar.main(["--synthetic", "--synthetic-size", "40,8", "--epochs",
                       "1", "--width", "4", "--stage-sizes", "1",
                       "--batch-size", "16", "--no-progress", "--no-augment",
                       "--workdir", str(tmp_path)])
  assert result.dataset.name == "synthetic"
  assert np.isfinite(result.history[-1]["train_loss"])
  # The ResNet recalibrates too: one mask flag per image, over H, W, C.
  assert 0 <= result.history[-1]["recalibrated_test_accuracy"] <= 1


def test_ablation_tiny(tmp_path, capsys):
  rows = ablation.main(["--learning-rates", "0.1", "--epochs", "1",
                        "--hidden", "16", "--batch-size", "256",
                        "--workdir", str(tmp_path)])
  assert [r["use_bn"] for r in rows] == [True, False]
  out = capsys.readouterr().out
  assert "BN: epochs to" in out and "no BN: epochs to" in out
  assert os.path.getsize(tmp_path / "ablation.png") > 0
  assert ablation.epochs_to([{"epoch": 1, "test_accuracy": 0.5},
                             {"epoch": 2, "test_accuracy": 0.96}], 0.95) == 2


def test_small_batch_tiny(tmp_path, capsys):
  rows = small_batch.main(["--rows", "32:ghost8", "--seeds", "1",
                           "--epochs", "1", "--hidden", "16", "--no-cache",
                           "--workdir", str(tmp_path)])
  ((row),) = rows
  assert (row["batch"], row["mode"], row["ghost"]) == (32, "ghost", 8)
  assert [r["seed"] for r in row["runs"]] == [0]
  assert all(0.1 < r["recalibrated_test_accuracy"] <= 1 for r in row["runs"])
  table = (tmp_path / "small_batch.md").read_text()
  assert "    python examples/small_batch.py --rows 32:ghost8 " in table
  assert "| 32 | ghost batch norm, ghost batch 8 | 0.05 | " in table
  assert table in capsys.readouterr().out
  assert [(r.batch, r.mode, r.ghost) for r in small_batch.parse_rows(
      small_batch.ROWS)][-3:] == [(64, "batchnorm", None), (64, "ghost", 8),
                                  (64, "none", None)]
  with pytest.raises(errors.UsageError, match="'8:ghost' is not BATCH:MODE"):
    small_batch.parse_rows("8:ghost")
  assert small_batch.mean_std([0.9, 0.92, float("nan")]) == "91.00 ± 1.41"


@pytest.mark.parametrize("value,match", [
    ("imagenet", "unknown dataset 'imagenet'"),
    ("cifar10", "'cifar10' is read from local files: pass --data-dir"),
])
def test_load_dataset_errors(value, match):
  with pytest.raises(data.DataError, match=match):
    data.load_dataset(dataclasses.replace(TINY_CONFIG, dataset=value))


def test_unknown_model_and_optimizer():
  ds = data.synthetic_images(train_size=4, test_size=4)
  with pytest.raises(errors.UsageError, match="unknown model 'vit'"):
    train.create_model(dataclasses.replace(TINY_CONFIG, model="vit"), ds)
  with pytest.raises(errors.UsageError, match="unknown optimizer 'lamb'"):
    train.create_optimizer(dataclasses.replace(TINY_CONFIG, optimizer="lamb"),
                           10)


def _export_dummy(path, shape):
  def f(images):
    return images.reshape(images.shape[0], -1)[:, :10]
  spec = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape("b, " + ", ".join(map(str, shape))),
      jnp.float32)
  with open(path, "wb") as f_out:
    f_out.write(jax.export.export(jax.jit(f))(spec).serialize())


def test_predict_dataset_errors(tmp_path):
  odd, mnist_like = str(tmp_path / "odd.jax"), str(tmp_path / "mnist.jax")
  _export_dummy(odd, (5, 5, 2))
  _export_dummy(mnist_like, (28, 28, 1))
  with pytest.raises(errors.UsageError,
                     match=r"images of shape \(5, 5, 2\); pass "
                     r"--dataset"):
    predict.main(["--model", odd])
  with pytest.raises(errors.UsageError,
                     match=r"the model takes \(5, 5, 2\) images "
                     r"but the digits test split has \(8, 8, 1\)"):
    predict.main(["--model", odd, "--dataset", "digits"])
  with pytest.raises(errors.UsageError,
                     match="takes mnist images: pass --data-dir"):
    predict.main(["--model", mnist_like])


def test_cifar_bad_stage_sizes(capsys):
  with pytest.raises(SystemExit):
    cifar.main(["--synthetic", "--stage-sizes", "1,x"])
  assert "comma-separated integers" in capsys.readouterr().err
