"""examples/train.py: the optimizer, the steps, the fail-safe loop, the batch
norm modes (--bn) and what follows training (--weight-ema, --recalibrate)."""

import dataclasses
import functools
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import jbn
from examples import bn_modes
from examples import checkpoint
from examples import cifar
from examples import data
from examples import errors
from examples import failsafe
from examples import parallel
from examples import recalibration
from examples import reporting
from examples import train
from jbn.linen import BatchNorm
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


# --------------------------------------------------------------------------
# Batch norm modes (issue 10) and what happens after training (issue 11)


def _counting(monkeypatch_or_context, calls):
  """Replaces train.train_step by a wrapper that counts its traces."""
  original = train.train_step

  def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch_or_context.setattr(train, "train_step", counted)


# Two hidden layers: the second batch norm's input depends on the first's
# batch statistics (checked against NumPy below).
RENORM = dataclasses.replace(TINY_CONFIG, hidden=(16, 16), bn_mode="renorm",
                             weight_ema=0.9, recalibrate="pooled")


@pytest.fixture(scope="module")
def renorm_run(tmp_path_factory):
  """2 epochs of 11 steps on 4 devices: --bn renorm, --weight-ema 0.9,
  --recalibrate pooled; (workdir, result, train_step traces)."""
  workdir = str(tmp_path_factory.mktemp("renorm"))
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    _counting(mp, calls)
    result = train.train_and_evaluate(RENORM, workdir)
  return workdir, result, len(calls)


def test_renorm_trains_with_one_compiled_step(renorm_run):
  _, result, traces = renorm_run
  assert result.mesh.size == 4
  assert int(parallel.to_host(result.state.step)) == 22
  assert traces == 1  # 22 steps, the clip changing with the step: 1 trace
  assert all(np.isfinite(r["train_loss"]) for r in result.history)
  assert result.history[-1]["test_accuracy"] > 0.5


def test_renorm_clip_schedule_reaches_every_batch_norm(one_device_step,
                                                     monkeypatch):
  """Step 0 (warm-up: RenormClip(1, 0)) is bit-identical to plain batch
  norm; past the warm-up the step differs; one trace serves both steps."""
  state, p_plain, images, labels = one_device_step
  schedule = bn_modes.renorm_schedule(
      dataclasses.replace(TINY_CONFIG, bn_mode="renorm"), total_steps=20)
  assert schedule.keywords == dict(warmup_steps=2, rmax=3.0, dmax=5.0,
                                   rmax_steps=16, dmax_steps=10)
  calls = []
  _counting(monkeypatch, calls)
  steps = {"plain": p_plain, "renorm": parallel.shard_steps(
      functools.partial(train.train_step, global_batch=8, renorm=schedule),
      train.eval_step, parallel.make_mesh(1))[0]}
  rng = jnp.zeros((4,), jnp.uint32)

  def step(name, at):
    """The loss and the new state (its SGD momentum holds the gradients)."""
    start = state.replace(step=state.step + at)
    new, metrics = steps[name](jax.tree.map(jnp.copy, start), images, labels,
                               rng)
    return parallel.to_host((metrics["loss"], new.opt_state, new.batch_stats))

  plain = step("plain", 0)
  jax.tree.map(np.testing.assert_array_equal, step("renorm", 0), plain)
  loss, opt_state, _ = step("renorm", 20)  # rmax 3, dmax 5: r and d act
  assert abs(loss - plain[0]) > 1e-3
  gradients = lambda o: jax.tree.leaves(o)[:-1]  # noqa: E731  (not count)
  assert not all(np.allclose(a, b) for a, b in zip(gradients(opt_state),
                                                   gradients(plain[1])))
  assert len(calls) == 1  # renorm: one trace for steps 0 and 20

  # Every batch norm gets the clip, in the MLP and in the ResNet.
  seen = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and (
        context.method_name == "__call__"):
      seen.append((context.module.name, kwargs.get("renorm")))
    return next_fun(*args, **kwargs)

  clip = jbn.RenormClip(2.0, 1.0)
  resnet = train.create_model(
      dataclasses.replace(cifar.DEFAULTS, width=4, stage_sizes=(1, 1)),
      data.synthetic_images(train_size=2, test_size=2), axis_name=None)
  mlp = train.create_model(RENORM, data.load_dataset(RENORM), axis_name=None)
  for net, shape in ((mlp, (4, 8, 8, 1)), (resnet, (4, 32, 32, 3))):
    x = jnp.zeros(shape)
    variables = jax.eval_shape(functools.partial(net.init, train=False),
                               jax.random.key(0), x)
    seen.clear()
    with nn.intercept_methods(spy):
      jax.eval_shape(functools.partial(net.apply, train=True, renorm=clip,
                                       mutable=["batch_stats"]), variables, x)
    assert len(seen) == len(jax.tree.leaves(variables["batch_stats"])) // 2
    assert all(r is clip for _, r in seen), seen


def test_ghost_batch_norm_trains(tmp_path):
  config = dataclasses.replace(TINY_CONFIG, epochs=1, bn_mode="ghost",
                               ghost_batch_size=8)  # 4 ghost batches/device
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.model.norm.ghost_batch_size == 8
  assert np.isfinite(result.history[-1]["train_loss"])
  assert result.history[-1]["test_accuracy"] > 0.3


@pytest.mark.parametrize("fields, match", [
    (dict(bn_mode="ghost"), r"--bn ghost needs --ghost-batch-size N: .* "
     r"\(32 = --batch-size 128 / 4 device\(s\)\)"),
    (dict(bn_mode="ghost", ghost_batch_size=5), r"--ghost-batch-size 5 must "
     r"divide the per-device batch 32 \(--batch-size 128 over 4 device"),
    (dict(bn_mode="ghost", ghost_batch_size=64), "must divide the per-device "
     "batch 32"),
    (dict(bn_mode="ghost", ghost_batch_size=1), "one value per feature"),
    (dict(ghost_batch_size=8), "--ghost-batch-size is for --bn ghost"),
    (dict(bn_mode="renorm", use_bn=False), "--bn renorm needs batch norm: "
     "drop --no-bn"),
    (dict(renorm_rmax=2.0), "--renorm-rmax: for --bn renorm"),
    (dict(bn_mode="renorm", renorm_warmup_steps=20, renorm_dmax_steps=10),
     r"--renorm-warmup-steps 20 must be >= 0 and at most --renorm-rmax-steps "
     r"\(20\) and --renorm-dmax-steps \(10\)"),
    (dict(bn_mode="renorm", renorm_rmax=0.5), "--renorm-rmax 0.5 must be >= 1"),
    (dict(weight_ema=1.0), r"--weight-ema 1.0: a decay in \[0, 1\)"),
])
def test_bad_batch_norm_settings_are_usage_errors(tmp_path, fields, match):
  with pytest.raises(errors.UsageError, match=match):
    train.train_and_evaluate(dataclasses.replace(TINY_CONFIG, **fields),
                             str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


def _pooled(values):
  values = np.concatenate(values)
  return values.mean(0), values.var(0)


def _bn_inputs_float64(variables, model, images, batch_size, epsilon):
  """Each hidden layer's batch-norm inputs over ``images``, in float64, as
  recalibration computes them: batches of ``batch_size`` in order, each
  normalized with its own statistics (train mode; the last batch short)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x = (np.asarray(images, np.float64) - np.asarray(model.mean)) / np.asarray(
      model.std)
  x = x.reshape(len(x), -1)
  inputs = {f"hidden{i}": [] for i in range(len(model.hidden))}
  for start in range(0, len(x), batch_size):
    h = x[start:start + batch_size]
    for i in range(len(model.hidden)):
      name = f"hidden{i}"
      z = h @ p[name]["layer"]["kernel"]
      inputs[name].append(z)
      bn = p[name]["bn"]
      z = bn["scale"] * (z - z.mean(0)) / np.sqrt(z.var(0) + epsilon) + bn[
          "bias"]
      h = np.maximum(z, 0)
  return inputs


def test_recalibration_gives_the_exact_pooled_statistics(renorm_run):
  """pooled = mean and biased variance of every training example's
  batch-norm input, the weight EMA's parameters, 4 devices (the last batch
  of 29 examples padded to 128 and masked)."""
  _, result, _ = renorm_run
  variables = helpers.host_variables(result)
  ema = parallel.to_host(result.state.ema_params)
  jax.tree.map(np.testing.assert_array_equal, variables["params"], ema)
  inputs = _bn_inputs_float64(variables, result.model,
                              result.dataset.train_images, 128,
                              RENORM.bn_epsilon)
  assert len(inputs["hidden1"]) == 12 and len(inputs["hidden1"][-1]) == 29
  run = parallel.to_host(result.state.batch_stats)
  for name in ("hidden0", "hidden1"):
    mean, var = _pooled(inputs[name])
    got = variables["batch_stats"][name]["bn"]
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["var"], var, rtol=1e-5)
    assert not np.allclose(run[name]["bn"]["var"], var, rtol=1e-2)

  # batch_mean: the count-weighted mean of the per-batch variances.
  stats = parallel.to_host(recalibration.recalibrate(
      result.model, result.variables, result.dataset, result.mesh,
      batch_size=128, estimator="batch_mean"))
  counts = np.array([len(z) for z in inputs["hidden0"]])
  within = sum(n * z.var(0) for n, z in zip(counts, inputs["hidden0"]))
  np.testing.assert_allclose(stats["hidden0"]["bn"]["var"],
                             within / counts.sum(), rtol=1e-5)


def test_final_record_reports_before_and_after(renorm_run):
  workdir, result, _ = renorm_run
  records = reporting.read_metrics(workdir)
  assert records == result.history
  first, last = records
  keys = {"ema_test_loss", "ema_test_accuracy", "recalibrated_test_loss",
          "recalibrated_test_accuracy", "recalibrate_seconds",
          "final_test_loss", "final_test_accuracy"}
  assert keys <= set(last) and not keys & set(first)
  assert last["final_test_accuracy"] == last["recalibrated_test_accuracy"]
  assert last["final_test_loss"] == last["recalibrated_test_loss"]
  # The exported variables score what the record says.
  variables = helpers.host_variables(result)
  model = result.model.clone(norm=dataclasses.replace(result.model.norm,
                                                      axis_name=None))
  logits = model.apply(variables, result.dataset.test_images, train=False)
  accuracy = np.mean(np.argmax(logits, -1) == result.dataset.test_labels)
  assert accuracy == pytest.approx(last["recalibrated_test_accuracy"],
                                   abs=1e-6)
  state = result.state.replace(params=result.state.ema_params)
  _, p_eval = parallel.shard_steps(train.train_step, train.eval_step,
                                   result.mesh)
  assert train.evaluate(state, result.dataset, p_eval, result.mesh, 512)[
      "test_accuracy"] == pytest.approx(last["ema_test_accuracy"])


def test_resume_after_recalibration_recomputes_it(renorm_run):
  """Recalibration is not checkpointed: a resume of the finished run runs no
  epoch, writes no checkpoint, and recalibrates to the same values."""
  workdir, result, _ = renorm_run
  before = helpers.snapshot(os.path.join(workdir, "checkpoints"))
  again = train.train_and_evaluate(dataclasses.replace(RENORM, resume=True),
                                   workdir)
  assert helpers.snapshot(os.path.join(workdir, "checkpoints")) == before
  jax.tree.map(np.testing.assert_array_equal, helpers.host_variables(again),
               helpers.host_variables(result))
  drop = lambda r: {k: v for k, v in r.items()  # noqa: E731
                    if k not in ("recalibrate_seconds", "epoch_seconds",
                                 "examples_per_sec")}
  assert [drop(r) for r in reporting.read_metrics(workdir)] == [
      drop(r) for r in result.history]


def test_state_problems_include_the_weight_ema(one_device_step):
  state = one_device_step[0]
  ema = jax.tree.map(jnp.copy, state.params)
  ema["hidden0"]["bn"]["scale"] = ema["hidden0"]["bn"]["scale"].at[3].set(
      jnp.inf)
  bad = state.replace(ema_params=ema)
  assert failsafe.state_problems(bad) == [
      "ema_params/hidden0/bn/scale (1 of 32 values not finite)"]
  assert not bool(jax.jit(failsafe.state_ok)(bad)["ema_params"])


def test_checkpoint_from_before_the_weight_ema_restores(one_device_step,
                                                        tmp_path):
  """A TrainState without `ema_params` (checkpoints written before
  --weight-ema existed) restores into today's state, `ema_params` empty."""
  class OldTrainState(train_state.TrainState):
    batch_stats: dict = None

  state = one_device_step[0]
  old = OldTrainState(step=state.step, apply_fn=state.apply_fn,
                      params=state.params, tx=state.tx,
                      opt_state=state.opt_state, batch_stats=state.batch_stats)
  rng = jnp.zeros((4,), jnp.uint32)
  config = dataclasses.replace(TINY_CONFIG, batch_size=8)
  ckpts = checkpoint.Checkpoints(str(tmp_path), config)
  ckpts.save(1, old, rng, [], 0)
  ckpts.wait()
  restored = ckpts.restore(state, rng)
  ckpts.close()
  assert isinstance(restored.state, train.TrainState)
  assert restored.state.ema_params == {}
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(
      restored.state.params), parallel.to_host(state.params))
