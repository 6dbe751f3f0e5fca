"""examples/train.py: the optimizer, the steps, and the fail-safe loop."""

import dataclasses
import functools
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples import data
from examples import errors
from examples import failsafe
from examples import parallel
from examples import train
from tests import helpers
from tests.helpers import ROOT, TINY, TINY_CONFIG


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_skips_batch_norm_parameters(optimizer):
  config = dataclasses.replace(TINY_CONFIG, optimizer=optimizer)
  model = train.create_model(config, data.load_dataset(config),
                             axis_name=None)
  params = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl=train.PRNG_IMPL), jnp.zeros((2, 8, 8, 1)))[
          "params"]
  tx = train.create_optimizer(config, steps_per_epoch=10)
  opt_state = tx.init(params)
  new = params
  for _ in range(3):  # zero gradients: only weight decay moves anything
    updates, opt_state = tx.update(jax.tree.map(jnp.zeros_like, new),
                                   opt_state, new)
    new = optax.apply_updates(new, updates)
  bn = params["hidden0"]["bn"]
  np.testing.assert_array_equal(new["hidden0"]["bn"]["scale"], bn["scale"])
  np.testing.assert_array_equal(new["hidden0"]["bn"]["bias"], bn["bias"])
  assert np.all(np.abs(new["hidden0"]["layer"]["kernel"])
                < np.abs(params["hidden0"]["layer"]["kernel"]) + 1e-12)
  assert not np.allclose(new["head"]["kernel"], params["head"]["kernel"])


def test_augmentation_does_not_depend_on_the_device_split():
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 6, 6, 1)),
                       jnp.float32)
  key = jax.random.key(3, impl=train.PRNG_IMPL)
  augment = jax.jit(functools.partial(train.augment_images, global_batch=8,
                                      pad=2))
  whole = augment(key, images, 0)
  halves = [augment(key, images[i:i + 4], i) for i in (0, 4)]
  np.testing.assert_array_equal(whole, jnp.concatenate(halves))
  assert not np.array_equal(whole, images)


@pytest.fixture(scope="module")
def one_device_step():
  """A fresh state and the sharded train step on a 1-device mesh."""
  config = dataclasses.replace(TINY_CONFIG, batch_size=8)
  dataset = data.load_dataset(config)
  mesh = parallel.make_mesh(1)
  model = train.create_model(config, dataset)
  tx = train.create_optimizer(config, steps_per_epoch=10)
  state = jax.jit(functools.partial(
      train.create_train_state, model, tx, dataset.image_shape))(
          jax.random.key(0, impl=train.PRNG_IMPL))
  p_train, _ = parallel.shard_steps(
      functools.partial(train.train_step, global_batch=8), train.eval_step,
      mesh)
  images, labels = dataset.train_images[:8], dataset.train_labels[:8]
  return state, p_train, images, labels


def test_a_non_finite_step_is_not_applied(one_device_step):
  state, p_train, images, labels = one_device_step
  rng = jnp.zeros((4,), jnp.uint32)
  good, metrics = p_train(jax.tree.map(jnp.copy, state), images, labels, rng)
  assert all(bool(v) for v in metrics["ok"].values())
  assert int(good.step) == 1
  bad_images = images.copy()
  bad_images[3, 2, 2, 0] = np.nan  # one NaN pixel: NaN loss, NaN everything
  new, metrics = p_train(jax.tree.map(jnp.copy, state), bad_images, labels,
                         rng)
  # NaN everything, but no weight EMA here: nothing to be wrong there.
  assert {k: bool(v) for k, v in metrics["ok"].items()} == {
      "loss": False, "params": False, "batch_stats": False,
      "ema_params": True, "opt_state": False}
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(new),
               parallel.to_host(state))  # the old state, step count included


def test_state_problems_names_the_bad_leaves(one_device_step):
  state = one_device_step[0]
  assert failsafe.state_problems(state) == []
  stats = state.batch_stats
  var = stats["hidden0"]["bn"]["var"]
  bad = state.replace(batch_stats={"hidden0": {"bn": {
      "mean": stats["hidden0"]["bn"]["mean"].at[0].set(jnp.nan),
      "var": var.at[:2].set(-1.0)}}})
  assert failsafe.state_problems(bad) == [
      "batch_stats/hidden0/bn/mean (1 of 32 values not finite)",
      "batch_stats/hidden0/bn/var (2 negative variances)"]
  assert not bool(jax.jit(failsafe.state_ok)(bad)["batch_stats"])
  assert bool(jax.jit(failsafe.state_ok)(bad)["params"])


def _nan_pixel_in_step_5(monkeypatch):
  """Training batches with one NaN pixel in the 5th batch of every epoch."""
  original = data.train_batches

  def train_batches(*args, **kwargs):
    for step, (images, labels) in enumerate(original(*args, **kwargs)):
      if step == 4:
        images = images.copy()
        images[0, 3, 3, 0] = np.nan
      yield images, labels

  monkeypatch.setattr(data, "train_batches", train_batches)


def test_a_bad_step_stops_the_run_and_keeps_the_checkpoint(tmp_path,
                                                           monkeypatch):
  workdir = str(tmp_path)
  config = dataclasses.replace(TINY_CONFIG, devices=1, epochs=3)
  train.train_and_evaluate(dataclasses.replace(config, stop_after=1), workdir)
  before = helpers.snapshot(os.path.join(workdir, "checkpoints"))
  assert list(before) and all(p.startswith("1/") for p in before)
  _nan_pixel_in_step_5(monkeypatch)
  with pytest.raises(errors.TrainingStopped,
                     match=r"training stopped at epoch 2, step 5/11: loss, "
                     r"params, batch_stats, opt_state not finite.*The last "
                     r"good checkpoint, .*checkpoints/1, is kept; nothing was "
                     r"exported"):
    train.train_and_evaluate(dataclasses.replace(config, resume=True),
                             workdir)
  assert helpers.snapshot(os.path.join(workdir, "checkpoints")) == before
  assert not os.path.exists(os.path.join(workdir, "model.jax"))


def test_max_bad_steps_skips_them(tmp_path, monkeypatch):
  _nan_pixel_in_step_5(monkeypatch)
  result = train.train_and_evaluate(
      dataclasses.replace(TINY_CONFIG, devices=1, max_bad_steps=2),
      str(tmp_path))
  assert [r["skipped_steps"] for r in result.history] == [1, 1]
  assert failsafe.state_problems(result.state) == []
  assert np.isfinite(result.history[-1]["train_loss"])
  assert result.history[-1]["test_accuracy"] > 0.5


def test_learning_rate_1e30_stops_with_exit_3_and_writes_nothing(tmp_path):
  workdir = str(tmp_path / "w")
  t0 = time.perf_counter()
  out = subprocess.run(
      [sys.executable, "examples/mnist.py", *TINY, "--epochs", "3",
       "--learning-rate", "1e30", "--workdir", workdir], cwd=ROOT,
      env=helpers.subprocess_env(), capture_output=True, text=True,
      timeout=120)
  seconds = time.perf_counter() - t0
  assert out.returncode == errors.EXIT_STOPPED, out.stderr
  assert "error: training stopped at epoch 1, step " in out.stderr
  assert "No checkpoint had been written yet" in out.stderr
  assert "Traceback" not in out.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints")) == []
  assert not os.path.exists(os.path.join(workdir, "model.jax"))
  print(f"lr 1e30: exit {out.returncode} after {seconds:.1f} s")
