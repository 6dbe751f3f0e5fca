"""jbn.recalibrate and jbn.nnx.recalibrate (PreciseBN).

Checked against the issue's numbers (worked out by hand), a float64 NumPy
reference of the models written here, PyTorch's ``update_bn`` (which weights
batches differently, on purpose), and the one-device result for the same
data split over 4 devices (``shard_map``, plain ``jit``) or 2 processes.
"""

import contextlib
import functools
import logging
import os
import re
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
import jbn.linen
import jbn.nnx
from recalibrate_worker import Net
from recalibrate_worker import apply_fn as net_apply

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(rtol=2e-5, atol=2e-5)  # float32 against float64
ESTIMATORS = ("pooled", "batch_mean")
TRAIN = {"train": True}

# The acceptance batches: one feature, 3 then 5 values.
B1 = np.array([[1.], [2.], [3.]], np.float32)
B2 = np.array([[10.], [11.], [12.], [13.], [14.]], np.float32)
ACCEPT = {"pooled": (8.25, 24.9375), "batch_mean": (8.25, 1.5)}


class OneBN(nn.Module):
  """A jbn.linen.BatchNorm directly on the inputs."""

  warm_start: bool = False

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    return jbn.linen.BatchNorm(use_running_average=not train,
                               warm_start=self.warm_start)(x, mask=mask)


class Shared(nn.Module):
  """One BatchNorm called on x and on 2 x + 1."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = jbn.linen.BatchNorm(use_running_average=not train)
    return bn(x) + bn(2 * x + 1)


def _init(model, x):
  return jax.jit(lambda x: model.init(jax.random.key(0), x))(x)


@contextlib.contextmanager
def _compiles(caplog):
  """Collects the names of the functions XLA compiles in the block."""
  names = []
  with jax.log_compiles(True), caplog.at_level(logging.WARNING,
                                               "jax._src.dispatch"):
    caplog.clear()
    yield names
  names.extend(re.findall(r"Finished XLA compilation of jit\((\w+)\)",
                          caplog.text))


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# --------------------------------------------------------------------------
# Float64 reference


def _estimate(parts, estimator):
  """Mean and variance of a layer that saw the valid values ``parts``."""
  parts = [np.asarray(p, np.float64) for p in parts]
  every = np.concatenate(parts)
  if estimator == "pooled":
    return every.mean(0), every.var(0)
  return every.mean(0), sum(len(p) * p.var(0) for p in parts if len(p)) / len(
      every)


def _bn_train(x, valid, p, eps=1e-5):
  mean, var = x[valid].mean(0), x[valid].var(0)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _net_reference(variables, batches, estimator):
  """Net's recalibrated statistics in float64 (see recalibrate_worker.Net)."""
  p = _np(variables["params"])
  seen = {"BatchNorm_0": [], "BatchNorm_1": []}
  for b in batches:
    x, valid = np.asarray(b["x"], np.float64), np.asarray(b["mask"], bool)
    h = _bn_train(x, valid, p["BatchNorm_0"]) @ p["Dense_0"]["kernel"] + (
        p["Dense_0"]["bias"])
    seen["BatchNorm_0"].append(x[valid])
    seen["BatchNorm_1"].append(h[valid])
  return {k: dict(zip(("mean", "var"), _estimate(v, estimator)))
          for k, v in seen.items()}


def _masked_batches(seed=0, valid=((1, 4, 0, 7), (3, 0, 8, 2)), block=8):
  """Batches of ``4 * block`` rows; block ``d`` has ``valid[b][d]`` valid rows.

  Masked-out rows hold 1e4: counted, they would wreck every statistic.
  """
  rng = np.random.default_rng(seed)
  out = []
  for counts in valid:
    x = (rng.normal(size=(4 * block, 3)) * [1, 2, .5] + [3, -1, 0]).astype(
        np.float32)
    mask = np.zeros(4 * block, bool)
    for d, n in enumerate(counts):
      mask[d * block:d * block + n] = True
    out.append({"x": np.where(mask[:, None], x, np.float32(1e4)),
                "mask": mask})
  return out


@functools.lru_cache(maxsize=None)
def _net_variables():
  x = jnp.asarray(_masked_batches()[0]["x"][:4])
  variables = _init(Net(), x)
  return jax.tree.map(np.asarray, variables)


@functools.lru_cache(maxsize=None)
def _one_device(estimator):
  """Net recalibrated on one device: what every split must reproduce."""
  return jbn.recalibrate(net_apply(Net()), _net_variables(), _masked_batches(),
                         estimator=estimator, apply_kwargs=TRAIN)


def _assert_stats(got, want, tol=TOL):
  for layer, stats in want.items():
    for k, v in stats.items():
      np.testing.assert_allclose(np.asarray(got[layer][k], np.float64), v,
                                 err_msg=f"{layer}/{k}", **tol)


# --------------------------------------------------------------------------
# The numbers; PyTorch


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_acceptance_numbers_linen(estimator):
  variables = _init(OneBN(), B1)
  stats = jbn.recalibrate(OneBN().apply, variables, [B1, B2],
                          estimator=estimator, apply_kwargs=TRAIN)
  mean, var = ACCEPT[estimator]
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], [mean], rtol=1e-6)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], [var], rtol=1e-6)
  assert stats["BatchNorm_0"]["mean"].dtype == jnp.float32


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_acceptance_numbers_nnx(estimator):
  bn = jbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
  jbn.nnx.recalibrate(bn, [B1, B2], estimator=estimator)
  np.testing.assert_allclose(bn.mean[...], [ACCEPT[estimator][0]], rtol=1e-6)
  np.testing.assert_allclose(bn.var[...], [ACCEPT[estimator][1]], rtol=1e-6)


def _torch_update_bn(batches):
  torch = pytest.importorskip("torch")
  bn = torch.nn.BatchNorm1d(1)
  torch.optim.swa_utils.update_bn([torch.tensor(b) for b in batches], bn)
  return bn.running_mean.numpy()[0], bn.running_var.numpy()[0]


def test_torch_update_bn_weights_batches_equally_and_unbiases():
  mean, var = _torch_update_bn([B1, B2])
  np.testing.assert_allclose([mean, var], [7.0, 1.75], rtol=1e-6)
  # What it computes: the plain mean of the batch means (2 and 12) and of
  # the unbiased batch variances (1 and 2.5); jbn weights by count, biased.
  np.testing.assert_allclose(
      [mean, var], [np.mean([B1.mean(), B2.mean()]),
                    np.mean([B1.var(ddof=1), B2.var(ddof=1)])], rtol=1e-6)


def test_torch_update_bn_is_batch_mean_unbiased_for_equal_batches():
  batches = [np.random.default_rng(s).normal(3, 2, (6, 1)).astype(np.float32)
             for s in range(3)]
  mean, var = _torch_update_bn(batches)
  variables = _init(OneBN(), batches[0])
  stats = jbn.recalibrate(OneBN().apply, variables, batches,
                          estimator="batch_mean", apply_kwargs=TRAIN)
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], [mean], rtol=1e-5)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"] * 6 / 5, [var],
                             rtol=1e-5)


# --------------------------------------------------------------------------
# Against the float64 reference, on one device


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masked_two_layer_model_matches_float64_reference(estimator):
  batches = _masked_batches()
  batches.append(_masked_batches(seed=1, valid=((2, 1, 0, 0),), block=2)[0])
  variables = _net_variables()
  stats = jbn.recalibrate(net_apply(Net()), variables,
                          (b for b in batches),  # any iterable
                          estimator=estimator, apply_kwargs=TRAIN)
  _assert_stats(stats, _net_reference(variables, batches, estimator))
  assert (jax.tree.structure(stats)
          == jax.tree.structure(variables["batch_stats"]))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shared_layer_merges_all_calls(estimator):
  x = [np.random.default_rng(s).normal(size=(5, 2)).astype(np.float32)
       for s in range(2)]
  variables = _init(Shared(), x[0])
  stats = jbn.recalibrate(Shared().apply, variables, x, estimator=estimator,
                          apply_kwargs=TRAIN)
  calls = [v for b in x for v in (b, 2 * b + 1)]  # each call is a batch
  _assert_stats(stats, {"BatchNorm_0": dict(zip(
      ("mean", "var"), _estimate(calls, estimator)))})


@functools.lru_cache(maxsize=None)
def _one_bn_variables(features):
  return _init(OneBN(), np.zeros((2, features), np.float32))


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_batch_counts_match_float64(data):
  """Batches holding 0 to 8 valid rows: the float64 statistics, in float32.

  Batches of one shape (one compile per example); the mask sets how many
  values each holds, as a short or padded batch would.
  """
  offset = data.draw(st.sampled_from([0., 100., -3e3]), "offset")
  scale = data.draw(st.sampled_from([1e-2, 1., 30.]), "scale")
  fill = data.draw(st.lists(st.floats(0, 1), min_size=3, max_size=3), "fill")
  estimator = data.draw(st.sampled_from(ESTIMATORS), "estimator")
  rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), "seed"))
  x = (offset + scale * rng.normal(size=(3, 8, 2))).astype(np.float32)
  keep = rng.random((3, 8)) < np.array(fill)[:, None]
  keep[rng.integers(3), rng.integers(8)] = True
  batches = list(zip(x, keep))
  stats = jbn.recalibrate(
      lambda v, b, **kw: OneBN().apply(v, b[0], b[1][:, None], **kw),
      _one_bn_variables(2), batches, estimator=estimator,
      apply_kwargs=TRAIN)
  mean, var = _estimate([b[m] for b, m in batches], estimator)
  ulp = np.spacing(np.float32(abs(offset) + 4 * scale))
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], mean, rtol=0,
                             atol=4 * ulp)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], var, rtol=2e-5,
                             atol=4 * ulp * (ulp + scale))


def test_params_untouched_and_ema_writes_discarded():
  variables = _init(OneBN(), B1)
  before = jax.tree.map(np.array, variables)
  stats = jbn.recalibrate(OneBN().apply, variables, [B1, B2],
                          apply_kwargs=TRAIN)
  jax.tree.map(np.testing.assert_array_equal, variables, before)
  assert set(stats) == {"BatchNorm_0"}
  # An EMA at momentum 0.99 from (0, 1) would be near 0 and 1.
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], [24.9375],
                             rtol=1e-6)


def test_feature_without_valid_values_keeps_its_statistics():
  x = np.array([[1., 5.], [3., 6.]], np.float32)
  mask = np.array([[True, False], [True, False]])
  variables = _init(OneBN(), x)
  old = {"mean": jnp.array([0., 7.]), "var": jnp.array([1., 2.])}
  variables = {**variables, "batch_stats": {"BatchNorm_0": old}}
  stats = jbn.recalibrate(
      lambda v, b, **kw: OneBN().apply(v, b, mask=mask, **kw), variables,
      [x], apply_kwargs=TRAIN)
  np.testing.assert_array_equal(stats["BatchNorm_0"]["mean"], [2., 7.])
  np.testing.assert_array_equal(stats["BatchNorm_0"]["var"], [1., 2.])


def test_warm_start_count_saturates_where_values_were_seen():
  x = np.array([[1., 5.], [3., 6.]], np.float32)
  mask = np.array([[True, False], [True, False]])
  model = OneBN(warm_start=True)
  variables = _init(model, x)
  stats = jbn.recalibrate(
      lambda v, b, **kw: model.apply(v, b, mask=mask, **kw), variables, [x],
      apply_kwargs=TRAIN)
  count = stats["BatchNorm_0"]["count"]
  assert count.dtype == jnp.int32
  np.testing.assert_array_equal(count, [jbn._running.SATURATED, 0])


def test_compiles_once_for_batches_of_one_shape(caplog):
  traces = []

  def apply_fn(v, b, **kw):
    traces.append(b.shape)
    return OneBN().apply(v, b, **kw)

  batches = [np.full((4, 1), i, np.float32) for i in range(5)]
  variables = _init(OneBN(), batches[0])
  with _compiles(caplog) as compiled:
    jbn.recalibrate(apply_fn, variables, batches, apply_kwargs=TRAIN)
  assert traces == [(4, 1)]
  assert compiled.count("local_step") == 1
  traces.clear()
  jbn.recalibrate(apply_fn, variables, batches + [B1], apply_kwargs=TRAIN)
  assert traces == [(4, 1), (3, 1)]  # a short last batch: one more


# --------------------------------------------------------------------------
# Across devices and processes


def _sharded(batches, mesh):
  sharding = NamedSharding(mesh, P("batch"))
  return [jax.device_put(b, sharding) for b in batches]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shard_map_unequal_masks_matches_one_device(mesh, caplog, estimator):
  batches, variables = _masked_batches(), _net_variables()
  one = _one_device(estimator)
  with _compiles(caplog) as compiled:
    four = jbn.recalibrate(net_apply(Net(axis_name="batch")), variables,
                           _sharded(batches, mesh), estimator=estimator,
                           apply_kwargs=TRAIN, axis_name="batch")
  assert compiled.count("sharded_step") == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), four, one)
  _assert_stats(four, _net_reference(variables, batches, estimator))
  assert four["BatchNorm_0"]["mean"].sharding.is_fully_replicated


@pytest.mark.parametrize("estimator,traced", [("pooled", 1),
                                               ("batch_mean", 2)])
def test_shard_map_merges_participants_once(mesh, monkeypatch, estimator,
                                            traced):
  """pooled: one merge, at the end; batch_mean: one more, in the step."""
  calls = []
  all_moments = jbn._moments.all_moments

  def counting(*args):
    calls.append(args[1])
    return all_moments(*args)

  monkeypatch.setattr(jbn._moments, "all_moments", counting)
  batches = _masked_batches(valid=((1, 4, 0, 7), (3, 0, 8, 2), (8, 8, 1, 0)))
  model = OneBN()  # no axis_name of its own: no collective in the forward
  variables = _init(model, batches[0]["x"][:2])
  apply_fn = lambda v, b, **kw: model.apply(  # noqa: E731
      v, b["x"], b["mask"][:, None], **kw)
  stats = jbn.recalibrate(apply_fn, variables, _sharded(batches, mesh),
                          estimator=estimator, apply_kwargs=TRAIN,
                          axis_name="batch")
  assert calls == ["batch"] * traced  # traced once, whatever the batches
  want = _estimate([b["x"][b["mask"]] for b in batches], estimator)
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], want[0], **TOL)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], want[1], **TOL)


def test_plain_jit_with_sharded_batches_matches_one_device(mesh, caplog):
  batches, variables = _masked_batches(), _net_variables()
  one = _one_device("pooled")
  with _compiles(caplog) as compiled:
    four = jbn.recalibrate(net_apply(Net()), variables,
                           _sharded(batches, mesh), apply_kwargs=TRAIN)
  assert compiled.count("local_step") == 1  # regression: acc layout changed
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), four, one)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
  batches, variables = _masked_batches(), _net_variables()
  data = str(tmp_path / "data.npz")
  np.savez(data, x=np.stack([b["x"] for b in batches]),
           mask=np.stack([b["mask"] for b in batches]))
  with open(data + ".variables", "wb") as f:
    f.write(serialization.msgpack_serialize(variables))
  out = str(tmp_path / "out.npz")
  address = f"127.0.0.1:{_free_port()}"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "recalibrate_worker.py"),
       address, str(i), data, out], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=60)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, text) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{text}"
  assert "4 devices in 2 processes" in outputs[0]
  got = np.load(out)
  for estimator in ESTIMATORS:
    for layer, stats in _one_device(estimator).items():
      for k, v in stats.items():
        np.testing.assert_allclose(got[f"{estimator}/{layer}/{k}"], v, **TOL)


# --------------------------------------------------------------------------
# NNX


NNX_TRACES = []


class NnxNet(nnx.Module):
  """BatchNorm, Linear, BatchNorm (as Net), called on ``{'x', 'mask'}``."""

  def __init__(self, rngs):
    init = nnx.initializers.normal(1.0)
    self.bn0 = jbn.nnx.BatchNorm(3, scale_init=init, bias_init=init,
                                 rngs=rngs)
    self.dense = nnx.Linear(3, 2, rngs=rngs)
    self.bn1 = jbn.nnx.BatchNorm(2, scale_init=init, bias_init=init,
                                 rngs=rngs)

  def __call__(self, batch):
    NNX_TRACES.append(batch["x"].shape)  # a trace of the jitted step
    mask = batch["mask"][:, None]
    return self.bn1(self.dense(self.bn0(batch["x"], mask=mask)), mask=mask)


def _as_linen(model):
  return {"params": {
      "BatchNorm_0": {"scale": model.bn0.scale[...],
                      "bias": model.bn0.bias[...]},
      "Dense_0": {"kernel": model.dense.kernel[...],
                  "bias": model.dense.bias[...]}}}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_nnx_matches_float64_reference_in_place(caplog, estimator):
  model = NnxNet(nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  params = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  batches = _masked_batches()
  NNX_TRACES.clear()
  with _compiles(caplog) as compiled:
    jbn.nnx.recalibrate(model, batches, estimator=estimator)
  assert NNX_TRACES == [(32, 3)]  # one nnx.jit trace for 2 batches
  assert compiled.count("step") == 1
  want = _net_reference(_as_linen(model), batches, estimator)
  for name, layer in (("BatchNorm_0", model.bn0), ("BatchNorm_1", model.bn1)):
    np.testing.assert_allclose(layer.mean[...], want[name]["mean"], **TOL)
    np.testing.assert_allclose(layer.var[...], want[name]["var"], **TOL)
    assert layer.use_running_average is True  # restored
    assert not hasattr(layer, "batch_moments")
  assert nnx.graphdef(model) == graphdef  # the state tree is unchanged
  assert (jax.tree.structure(nnx.state(model))
          == jax.tree.structure(state))
  jax.tree.map(np.testing.assert_array_equal,
               nnx.state(model, nnx.Param), params)


def test_nnx_sharded_batches_compile_once(mesh, caplog):
  model = NnxNet(nnx.Rngs(0))
  batches = _masked_batches()
  with _compiles(caplog) as compiled:
    jbn.nnx.recalibrate(model, _sharded(batches, mesh))
  assert compiled.count("step") == 1  # regression: the state's layout moved
  want = _net_reference(_as_linen(model), batches, "pooled")
  for name, layer in (("BatchNorm_0", model.bn0), ("BatchNorm_1", model.bn1)):
    np.testing.assert_allclose(layer.mean[...], want[name]["mean"], **TOL)
    np.testing.assert_allclose(layer.var[...], want[name]["var"], **TOL)
  assert model.dense.kernel[...].sharding.is_fully_replicated


def test_nnx_shared_layer_and_warm_start():
  class Twice(nnx.Module):
    def __init__(self):
      self.bn = jbn.nnx.BatchNorm(2, warm_start=True, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.bn(x) + self.bn(2 * x + 1)

  x = [np.random.default_rng(s).normal(size=(5, 2)).astype(np.float32)
       for s in range(2)]
  model = Twice()
  jbn.nnx.recalibrate(model, x, estimator="batch_mean")
  mean, var = _estimate([v for b in x for v in (b, 2 * b + 1)], "batch_mean")
  np.testing.assert_allclose(model.bn.mean[...], mean, **TOL)
  np.testing.assert_allclose(model.bn.var[...], var, **TOL)
  np.testing.assert_array_equal(model.bn.count[...],
                                [jbn._running.SATURATED] * 2)


def test_nnx_failure_leaves_the_model_as_it_was():
  class EvalCaller(nnx.Module):
    def __init__(self):
      self.a = jbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
      self.b = jbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.b(self.a(x), use_running_average=True)

  model = EvalCaller()
  state = jax.tree.map(np.array, nnx.state(model))
  with pytest.raises(ValueError, match=r"layers \['b'\] did not run in "
                     r"training mode.*use_running_average=True"):
    jbn.nnx.recalibrate(model, [B1, B2])
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), state)
  assert not hasattr(model.a, "batch_moments")
  assert model.a.use_running_average is False


# --------------------------------------------------------------------------
# Errors


def test_error_unknown_estimator():
  variables = _init(OneBN(), B1)
  with pytest.raises(ValueError, match=r"estimator must be one of \('pooled', "
                     r"'batch_mean'\), got 'mean'"):
    jbn.recalibrate(OneBN().apply, variables, [B1], estimator="mean")
  with pytest.raises(ValueError, match="estimator must be one of"):
    jbn.nnx.recalibrate(jbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0)), [B1],
                        estimator="mean")


def test_error_mutable_in_apply_kwargs():
  variables = _init(OneBN(), B1)
  with pytest.raises(ValueError, match="apply_kwargs must not contain "
                     "'mutable'"):
    jbn.recalibrate(OneBN().apply, variables, [B1],
                    apply_kwargs={"train": True, "mutable": True})


def test_error_variables_without_batch_stats():
  variables = _init(OneBN(), B1)
  with pytest.raises(ValueError, match="variables has no batch-norm "
                     "statistics"):
    jbn.recalibrate(OneBN().apply, {"params": variables["params"]}, [B1],
                    apply_kwargs=TRAIN)


def test_error_no_batches():
  variables = _init(OneBN(), B1)
  with pytest.raises(ValueError, match="batches is empty"):
    jbn.recalibrate(OneBN().apply, variables, [], apply_kwargs=TRAIN)
  with pytest.raises(ValueError, match="batches is empty"):
    jbn.nnx.recalibrate(jbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0)), iter(()))


def test_error_not_in_training_mode():
  variables = _init(OneBN(), B1)
  with pytest.raises(ValueError, match=r"no jbn.linen.BatchNorm running in "
                     r"training mode.*apply_kwargs=\{'train': True\}"):
    jbn.recalibrate(OneBN().apply, variables, [B1])


def test_error_flax_batch_norm_reports_nothing():
  class FlaxBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.BatchNorm(use_running_average=not train)(x)

  variables = _init(FlaxBN(), B1)
  with pytest.raises(ValueError, match="found no jbn.linen.BatchNorm"):
    jbn.recalibrate(FlaxBN().apply, variables, [B1], apply_kwargs=TRAIN)


def test_error_mixed_flax_and_jbn_batch_norms():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = jbn.linen.BatchNorm(use_running_average=not train)(x)
      return nn.BatchNorm(use_running_average=not train, name="flax_bn")(x)

  variables = _init(Mixed(), B1)
  with pytest.raises(ValueError, match=r"layers \['flax_bn'\] reported no "
                     r"moments"):
    jbn.recalibrate(Mixed().apply, variables, [B1], apply_kwargs=TRAIN)


def test_error_batch_stats_of_another_model():
  variables = _init(Net(), _masked_batches()[0]["x"][:4])
  stats = dict(variables["batch_stats"])
  del stats["BatchNorm_1"]
  with pytest.raises(ValueError, match=r"layers \['BatchNorm_1'\] reported "
                     r"moments but variables\['batch_stats'\] has no"):
    jbn.recalibrate(net_apply(Net()), {**variables, "batch_stats": stats},
                    _masked_batches(), apply_kwargs=TRAIN)


def test_error_axis_name_without_named_sharding():
  variables = _net_variables()
  with pytest.raises(ValueError, match=r"axis_name='batch'\) takes its mesh "
                     r"from the batches.*got shardings \['NoneType'\]"):
    jbn.recalibrate(net_apply(Net(axis_name="batch")), variables,
                    _masked_batches(), apply_kwargs=TRAIN, axis_name="batch")


def test_error_axis_name_not_in_mesh(mesh):
  variables = _net_variables()
  with pytest.raises(ValueError, match=r"axis_name='data' is not an axis of "
                     r"the batches' mesh, whose axes are \('batch',\)"):
    jbn.recalibrate(net_apply(Net(axis_name="data")), variables,
                    _sharded(_masked_batches(), mesh), apply_kwargs=TRAIN,
                    axis_name="data")


def test_error_nnx_model_without_jbn_batch_norm():
  with pytest.raises(ValueError, match="the model holds no jbn.nnx.BatchNorm "
                     r"\(got a Linear\)"):
    jbn.nnx.recalibrate(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), [B1])


def test_error_nnx_flax_batch_norm_is_refused():
  class Mixed(nnx.Module):
    def __init__(self):
      self.ours = jbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
      self.theirs = nnx.BatchNorm(1, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match=r"flax.nnx.BatchNorm layers "
                     r"\['theirs'\].*use jbn.nnx.BatchNorm there"):
    jbn.nnx.recalibrate(Mixed(), [B1])
