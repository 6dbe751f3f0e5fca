"""jbn.linen.BatchNorm as a drop-in for flax.linen.BatchNorm.

Every comparison is against the installed Flax module with
``use_fast_variance=False`` (its accurate two-pass variance), on the same
variables and inputs.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import PartitionSpec as P

import jbn
import jbn.linen

# Random scale and bias, so that a wrapper dropping them cannot pass.
RAND = dict(scale_init=nn.initializers.normal(1.0),
            bias_init=nn.initializers.normal(1.0))
FlaxBN = functools.partial(nn.BatchNorm, use_fast_variance=False, **RAND)
JbnBN = functools.partial(jbn.linen.BatchNorm, **RAND)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32


def normal(shape, seed=0):
  """Standard normal float32 data (NumPy: no JAX random op to compile)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(
      lambda u, v: float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32)
                                         - jnp.asarray(v, jnp.float32)))),
      a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def jinit(model, x, key=0, method="init", **kwargs):
  """``model.init`` (or ``init_with_output``) under jit: eager is slower."""
  fn = getattr(model, method)
  return jax.jit(lambda x: fn(jax.random.key(key), x, **kwargs))(x)


def japply(model, variables, x, **kwargs):
  """``model.apply`` under jit."""
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def bn_variables(feature_shape, *, param_dtype=jnp.float32,
                 stats_dtype=jnp.float32, seed=0):
  """BatchNorm variables with random values (no init to compile)."""
  r = np.random.default_rng(seed)
  p = lambda a: jnp.asarray(a, param_dtype)  # noqa: E731
  s = lambda a: jnp.asarray(a, stats_dtype)  # noqa: E731
  return {"params": {"scale": p(r.uniform(0.5, 1.5, feature_shape)),
                     "bias": p(r.normal(size=feature_shape))},
          "batch_stats": {"mean": s(r.normal(size=feature_shape)),
                          "var": s(r.uniform(0.5, 2.0, feature_shape))}}


def specs(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


def assert_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float32), np.asarray(v, np.float32), **(tol or TOL)),
               a, b)


class CNN(nn.Module):
  """Conv -> BatchNorm -> relu, twice, then Dense; the BN class a field."""

  bn: Any

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (4, 8):
      x = nn.Conv(features, (3, 3))(x)
      x = self.bn(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def images():
  return 2.0 + 3.0 * normal((8, 6, 6, 2))


@functools.cache
def cnn(kind: str):
  """Jitted init / eval / train / SGD step of the CNN with one BN, cached."""
  model = CNN({"flax": FlaxBN, "jbn": JbnBN}[kind])
  target = jnp.arange(3.0)

  def loss(params, variables, x):
    y, upd = model.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.mean((y - target) ** 2), upd

  def sgd_step(variables, x, lr=0.1):
    grads, upd = jax.grad(loss, has_aux=True)(variables["params"], variables,
                                               x)
    params = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
    return {"params": params, **upd}, grads

  return dict(
      shapes=lambda x: jax.eval_shape(  # init's tree, nothing compiled
          lambda x: model.init(jax.random.key(0), x, train=False), x),
      eval=jax.jit(lambda v, x: model.apply(v, x, train=False)),
      train=jax.jit(lambda v, x: model.apply(v, x, train=True,
                                             mutable=["batch_stats"])),
      step=jax.jit(sgd_step))


def train(kind, variables, x, steps=3):
  """A few SGD steps; returns the variables and the first step's grads."""
  first_grads = None
  for _ in range(steps):
    variables, grads = cnn(kind)["step"](variables, x)
    first_grads = grads if first_grads is None else first_grads
  return variables, first_grads


@pytest.fixture(scope="module")
def cnn_variables(images):
  """Flax's CNN variables, filled with random values (stats included).

  NumPy fills them: compiling the CNN's random initializers would cost more
  than all the comparisons below; single-layer tests check init values.
  """
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    low_high = {"var": (0.5, 2.0), "scale": (0.5, 1.5)}.get(name)
    value = (rng.uniform(*low_high, leaf.shape) if low_high
             else rng.normal(0.0, 0.5, leaf.shape))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, cnn("flax")["shapes"](images))


@pytest.fixture(scope="module")
def trained(images, cnn_variables):
  """Both models trained from the same Flax-initialized variables."""
  return {kind: train(kind, cnn_variables, images) for kind in ("flax", "jbn")}


# ---------------------------------------------------------------------------
# Variables


@pytest.mark.parametrize("kwargs, shape", [
    ({}, (4, 5, 3)),
    ({"axis": 1}, (4, 5, 3)),
    ({"axis": (1, 2)}, (4, 5, 3)),
    ({"use_scale": False}, (6, 3)),
    ({"use_bias": False}, (6, 3)),
    ({"use_scale": False, "use_bias": False}, (6, 3)),
    ({"param_dtype": jnp.bfloat16}, (6, 3)),
    ({"param_dtype": jnp.bfloat16, "force_float32_reductions": False}, (6, 3)),
])
def test_variables_have_flax_names_shapes_dtypes(kwargs, shape):
  x = jnp.ones(shape)
  v_flax = jinit(nn.BatchNorm(use_running_average=False, **kwargs), x)
  v_jbn = jinit(jbn.linen.BatchNorm(use_running_average=False, **kwargs), x)
  assert specs(v_jbn) == specs(v_flax)
  assert_close(v_jbn, v_flax, rtol=0, atol=0)


def test_random_initializers_get_the_same_rngs_as_flax():
  kw = dict(scale_init=nn.initializers.normal(1.0),
            bias_init=nn.initializers.normal(1.0), use_running_average=True)
  x = jnp.ones((2, 5))
  v_flax = jinit(nn.BatchNorm(**kw), x, key=3)
  v_jbn = jinit(JbnBN(**kw), x, key=3)
  assert_close(v_jbn, v_flax, rtol=0, atol=0)


def test_cnn_variable_trees_are_identical(images, cnn_variables):
  v_flax, v_jbn = (cnn(kind)["shapes"](images) for kind in ("flax", "jbn"))
  assert jax.tree.structure(v_jbn) == jax.tree.structure(v_flax)
  assert specs(v_jbn) == specs(v_flax)


# ---------------------------------------------------------------------------
# Checkpoints and numbers: the drop-in proof


@pytest.mark.parametrize("trained_with", ["flax", "jbn"])
def test_checkpoints_load_into_the_other_and_give_flax_numbers(
    images, cnn_variables, trained, trained_with):
  other = "jbn" if trained_with == "flax" else "flax"
  checkpoint, _ = trained[trained_with]
  # Serialize with one, restore into the other's freshly built template.
  template = cnn(other)["shapes"](images)
  restored = serialization.from_bytes(template,
                                      serialization.to_bytes(checkpoint))
  assert specs(restored) == specs(checkpoint)
  assert_close(restored, checkpoint, rtol=0, atol=0)
  # The checkpoint really was trained: its statistics moved.
  assert max_abs_diff(restored["batch_stats"],
                      cnn_variables["batch_stats"]) > 0.1

  for mode in ("eval", "train"):
    out = {kind: cnn(kind)[mode](restored, images) for kind in ("flax", "jbn")}
    assert_close(out["jbn"], out["flax"])


def test_training_matches_flax_step_by_step(trained):
  (v_flax, _), (v_jbn, _) = trained["flax"], trained["jbn"]
  assert_close(v_jbn, v_flax, rtol=1e-4, atol=1e-5)


def test_gradients_match_flax(trained):
  (_, g_flax), (_, g_jbn) = trained["flax"], trained["jbn"]
  assert_close(g_jbn, g_flax, rtol=1e-4, atol=1e-6)
  assert max_abs_diff(g_jbn, jax.tree.map(jnp.zeros_like, g_jbn)) > 1e-3


# ---------------------------------------------------------------------------
# Flax's conventions


def test_use_running_average_given_nowhere_is_an_error():
  with pytest.raises(ValueError, match='"use_running_average" must be passed '
                     "to the constructor or at call time"):
    JbnBN().init(jax.random.key(0), jnp.ones((4, 3)))


def test_use_running_average_given_twice_is_an_error():
  with pytest.raises(ValueError, match="Should be passed just once"):
    JbnBN(use_running_average=True).init(jax.random.key(0), jnp.ones((4, 3)),
                                         use_running_average=False)


def test_use_running_average_bad_array_is_an_error():
  with pytest.raises(TypeError, match="use_running_average must be a Python "
                     "bool or a boolean scalar array"):
    JbnBN().init(jax.random.key(0), jnp.ones((4, 3)),
                 use_running_average=jnp.zeros(()))


def test_init_does_not_update_batch_stats_and_is_repeatable():
  class Twice(nn.Module):
    bn: Any

    @nn.compact
    def __call__(self, x):
      layer = self.bn(use_running_average=False, axis_name="unbound",
                      name="bn")
      return layer(x), layer(x)

  x = 5.0 + normal((6, 3))
  # axis_name is not bound during init, as Flax allows.
  (y1, y2), v = jinit(Twice(JbnBN), x, method="init_with_output")
  (f1, _), _ = jinit(Twice(FlaxBN), x, method="init_with_output")
  np.testing.assert_array_equal(y1, y2)
  assert_close(y1, f1)  # batch statistics, as Flax's init output
  np.testing.assert_array_equal(v["batch_stats"]["bn"]["mean"], 0.0)
  np.testing.assert_array_equal(v["batch_stats"]["bn"]["var"], 1.0)


def test_init_with_one_value_per_feature_works():
  # Common pattern: model.init(key, x[:1]) with a Dense -> BatchNorm model.
  x = jnp.arange(3.0)[None]
  y, v = jinit(jbn.linen.BatchNorm(use_running_average=False), x,
               method="init_with_output")
  assert specs(v) == specs(jinit(nn.BatchNorm(use_running_average=False), x))
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_apply_with_one_value_per_feature_raises():
  x = jnp.arange(3.0)[None]
  v = jinit(JbnBN(use_running_average=False), x)
  with pytest.raises(ValueError, match="Expected more than 1 value"):
    japply(JbnBN(use_running_average=False), v, x, mutable=["batch_stats"])


def test_eval_needs_no_mutable_batch_stats_and_changes_nothing(images):
  bn = JbnBN(use_running_average=True)
  v = jinit(bn, images)
  y, upd = japply(bn, v, images, mutable=["batch_stats"])
  assert_close(upd, {"batch_stats": v["batch_stats"]}, rtol=0, atol=0)
  assert_close(japply(bn, v, images), y, rtol=0, atol=0)


def test_train_needs_mutable_batch_stats_as_flax(images):
  bn = JbnBN(use_running_average=False)
  v = jinit(bn, images)
  with pytest.raises(Exception, match='collection "batch_stats" is immutable'):
    japply(bn, v, images)


# ---------------------------------------------------------------------------
# Fields


def test_dtype_none_keeps_bfloat16_where_flax_promotes():
  x = jnp.tile(jnp.arange(4.0)[:, None], (1, 3)).astype(jnp.bfloat16)
  v = bn_variables(3)
  y_jbn, upd_jbn = japply(JbnBN(use_running_average=False), v, x,
                          mutable=["batch_stats"])
  y_flax, upd_flax = japply(FlaxBN(use_running_average=False), v, x,
                            mutable=["batch_stats"])
  assert y_jbn.dtype == jnp.bfloat16  # the one deliberate difference
  assert y_flax.dtype == jnp.float32
  assert_close(y_jbn, y_flax, rtol=1e-2, atol=1e-2)
  assert_close(upd_jbn, upd_flax)
  y32, _ = japply(JbnBN(use_running_average=False, dtype=jnp.float32), v, x,
                  mutable=["batch_stats"])
  assert y32.dtype == jnp.float32
  assert_close(y32, y_flax)


def test_force_float32_reductions_false_stores_stats_in_param_dtype():
  kw = dict(use_running_average=False, param_dtype=jnp.bfloat16,
            force_float32_reductions=False, momentum=0.5)
  x = normal((16, 3)).astype(jnp.bfloat16)
  v = bn_variables(3, param_dtype=jnp.bfloat16, stats_dtype=jnp.bfloat16)
  _, upd = japply(JbnBN(**kw), v, x, mutable=["batch_stats"])
  _, upd_flax = japply(nn.BatchNorm(**kw, use_fast_variance=False), v, x,
                       mutable=["batch_stats"])
  assert specs(upd) == specs(upd_flax)
  assert upd["batch_stats"]["mean"].dtype == jnp.bfloat16
  assert_close(upd, upd_flax, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_use_fast_variance_is_ignored_variance_is_always_accurate(
    use_fast_variance):
  # Flax's fast formula loses everything here (ANCHORS.md: output std 263).
  x = 1e4 + normal((256, 16))
  bn = JbnBN(use_running_average=False, use_fast_variance=use_fast_variance)
  v = bn_variables(16)
  y, upd = japply(bn, v, x, mutable=["batch_stats"])
  p = v["params"]
  np.testing.assert_allclose(jnp.std((y - p["bias"]) / p["scale"], axis=0),
                             1.0, rtol=1e-3)
  ref_var = np.var(np.asarray(x, np.float64), axis=0)
  np.testing.assert_allclose(
      upd["batch_stats"]["var"],
      0.99 * v["batch_stats"]["var"] + 0.01 * ref_var, rtol=1e-5)


@pytest.mark.parametrize("axis, shape", [(1, (4, 3, 5)), ((1, 2), (4, 3, 5))])
def test_feature_axes_match_flax(axis, shape):
  x = normal(shape) + 1.0
  kw = dict(use_running_average=False, axis=axis, momentum=0.8)
  v = bn_variables(shape[1:3] if axis == (1, 2) else shape[1])
  out_jbn = japply(JbnBN(**kw), v, x, mutable=["batch_stats"])
  out_flax = japply(FlaxBN(**kw), v, x, mutable=["batch_stats"])
  assert_close(out_jbn, out_flax)


def test_out_of_range_axis_is_the_core_error():
  with pytest.raises(ValueError, match="axis=3 is out of range"):
    JbnBN(use_running_average=False, axis=3).init(jax.random.key(0),
                                                  jnp.ones((4, 3)))


@pytest.mark.parametrize("mask_shape", [(6, 5, 3), (6, 5, 1), (5, 3)])
def test_mask_matches_flax_on_one_device(mask_shape):
  x = normal((6, 5, 3)) + 2.0
  mask = np.random.default_rng(1).random(mask_shape) < 0.6
  mask[(0,) * len(mask_shape)] = True
  kw = dict(use_running_average=False, momentum=0.7)
  v = bn_variables(3)
  out_jbn = japply(JbnBN(**kw), v, x, mask=mask, mutable=["batch_stats"])
  out_flax = japply(FlaxBN(**kw), v, x, mask=mask, mutable=["batch_stats"])
  assert_close(out_jbn, out_flax)
  if mask_shape == x.shape:  # A 0/1 integer mask means the same, as in Flax.
    out_int = japply(JbnBN(**kw), v, x, mask=mask.astype(np.int32),
                     mutable=["batch_stats"])
    assert_close(out_int, out_jbn, rtol=0, atol=0)


def test_all_false_mask_keeps_batch_stats_where_flax_writes_nan():
  x = normal((6, 3))
  mask = jnp.zeros((6, 3), bool)
  kw = dict(use_running_average=False)
  v = bn_variables(3)
  _, upd = japply(JbnBN(**kw), v, x, mask=mask, mutable=["batch_stats"])
  assert_close(upd["batch_stats"], v["batch_stats"], rtol=0, atol=0)


def test_traced_use_running_average_serves_both_modes(images):
  bn = JbnBN(momentum=0.9)
  v = jinit(bn, images, use_running_average=False)

  @jax.jit
  def f(v, flag):
    return bn.apply(v, images, use_running_average=flag,
                    mutable=["batch_stats"])

  for flag in (True, False):
    expected = japply(bn, v, images, use_running_average=flag,
                      mutable=["batch_stats"])
    assert_close(f(v, jnp.asarray(flag)), expected)


def test_sync_is_passed_through():
  x = normal((4, 5, 3)) * 2 + 50.0
  with pytest.raises(ValueError, match="sync='nope'"):
    JbnBN(use_running_average=False, sync="nope").init(jax.random.key(0), x)

  def run(sync):
    vbn = nn.vmap(JbnBN, variable_axes={"params": None, "batch_stats": None},
                  split_rngs={"params": False}, axis_name="batch")
    m = vbn(use_running_average=False, axis_name="batch", sync=sync)
    return japply(m, jinit(m, x), x, mutable=["batch_stats"])

  assert_close(run("gather"), run("psum"), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Transforms


def test_nn_vmap_with_axis_name_matches_flax():
  x = 3.0 + normal((4, 5, 3))

  def run(bn):
    vbn = nn.vmap(bn, variable_axes={"params": None, "batch_stats": None},
                  split_rngs={"params": False}, axis_name="batch")
    m = vbn(use_running_average=False, axis_name="batch", momentum=0.9)
    v = jinit(m, x)
    y, upd = japply(m, v, x, mutable=["batch_stats"])
    y_eval = japply(m.clone(use_running_average=True), {**v, **upd}, x)
    return v, y, upd, y_eval

  v_jbn, *out_jbn = run(JbnBN)
  v_flax, *out_flax = run(FlaxBN)
  assert specs(v_jbn) == specs(v_flax)
  assert_close(out_jbn, out_flax)
  # Statistics are global over the mapped axis: the whole batch's.
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(out_jbn[1]["batch_stats"]["mean"],
                             0.1 * flat.mean(0), rtol=1e-5)


def test_shard_map_with_axis_name_matches_flax(mesh):
  x = 1.0 + normal((8, 5, 3))

  def run(bn):
    m = bn(use_running_average=False, axis_name="batch", momentum=0.9)
    v = jinit(m, x)  # axis not bound during init

    def step(v, x):
      def loss(params):
        y, upd = m.apply({**v, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd)
      g, (y, upd) = jax.grad(loss, has_aux=True)(v["params"])
      return y, upd, g

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")),
                              out_specs=(P("batch"), P(), P())))
    return f(v, x)

  out_jbn, out_flax = run(JbnBN), run(FlaxBN)
  assert_close(out_jbn, out_flax, rtol=1e-4, atol=1e-5)
  # Same as one device seeing the whole batch.
  m = JbnBN(use_running_average=False, momentum=0.9)
  y, upd = japply(m, jinit(m, x), x, mutable=["batch_stats"])
  assert_close(out_jbn[:2], (y, upd))


class _Block(nn.Module):
  bn: Any

  @nn.compact
  def __call__(self, x, _=None):
    # No Dense bias: before a batch norm its gradient is zero in exact
    # arithmetic, so comparing it compares rounding noise.
    x = nn.relu(self.bn(use_running_average=False, momentum=0.9)(
        nn.Dense(3, use_bias=False)(x)))
    return x, None


def test_nn_scan_over_layers_matches_flax():
  x = normal((6, 3))

  def run(bn):
    stack = nn.scan(_Block, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, length=3)(bn)
    v = jinit(stack, x)
    (y, _), upd = japply(stack, v, x, mutable=["batch_stats"])
    return v, y, upd

  v_jbn, *out_jbn = run(JbnBN)
  v_flax, *out_flax = run(FlaxBN)
  assert specs(v_jbn) == specs(v_flax)
  assert {a.shape for a in jax.tree.leaves(v_jbn)} == {(3, 3), (3, 3, 3)}
  assert_close(out_jbn, out_flax)


def test_nn_remat_matches_flax():
  # 16 rows: with 6, a relu'd batch-norm input is so ill-conditioned that
  # float32 rounding moves the first layer's gradient by 3e-4.
  x = normal((16, 3))

  class Net(nn.Module):
    bn: Any

    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x, _ = nn.remat(_Block)(self.bn)(x)
      return x

  def run(bn):
    v = jinit(Net(bn), x)

    def loss(params):
      y, upd = Net(bn).apply({**v, "params": params}, x,
                             mutable=["batch_stats"])
      # Not sum(y**2): after a batch norm that is nearly constant, and its
      # gradient is amplified rounding (implementations differ by 1e-4).
      return jnp.sum(jnp.sin(3 * y)), upd
    return jax.jit(jax.grad(loss, has_aux=True))(v["params"])

  # atol: a relu output within rounding of 0 is alive in one implementation
  # and dead in the other; its gradient share is ~1e-5 here.
  assert_close(run(JbnBN), run(FlaxBN), rtol=1e-4, atol=3e-5)


def test_axis_index_groups_under_pmap_match_flax():
  x = 1.0 + normal((4, 3, 2))
  groups = [[0, 1], [2, 3]]

  def run(bn):
    m = bn(use_running_average=False, axis_name="i", axis_index_groups=groups,
           momentum=0.5)
    v = jinit(m, x[0])  # neither the axis nor the groups exist during init
    return jax.pmap(lambda v, x: m.apply(v, x, mutable=["batch_stats"]),
                    axis_name="i", in_axes=(None, 0))(v, x)

  out_jbn = run(JbnBN)
  assert_close(out_jbn, run(FlaxBN))
  mean = out_jbn[1]["batch_stats"]["mean"]
  np.testing.assert_allclose(mean[0], 0.5 * x[:2].mean((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(mean[3], 0.5 * x[2:].mean((0, 1)), rtol=1e-5)
