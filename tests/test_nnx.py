"""jbn.nnx.BatchNorm against flax.nnx.BatchNorm and jbn.linen.BatchNorm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

import jbn.linen
import jbn.nnx

# Random scale and bias, so that a wrapper dropping them cannot pass.
RAND = dict(scale_init=nnx.initializers.normal(1.0),
            bias_init=nnx.initializers.normal(1.0))
FlaxBN = functools.partial(nnx.BatchNorm, use_fast_variance=False, **RAND)
JbnBN = functools.partial(jbn.nnx.BatchNorm, **RAND)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32


def normal(shape, seed=0):
  """Standard normal float32 data (NumPy: no JAX random op to compile)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)
NAMES = ("mean", "var", "scale", "bias")


def assert_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float32), np.asarray(v, np.float32), **(tol or TOL)),
               a, b)


def variables(module):
  """{name: value} of a batch norm layer's variables (None where absent)."""
  return {name: None if getattr(module, name) is None
          else getattr(module, name)[...] for name in NAMES}


def specs(module):
  """{name: (Variable type, shape, dtype)}."""
  return {name: None if (v := getattr(module, name)) is None
          else (type(v), v[...].shape, v[...].dtype) for name in NAMES}


@pytest.fixture(scope="module")
def x():
  return 3.0 + 2.0 * normal((8, 5, 3))


# ---------------------------------------------------------------------------
# Variables


@pytest.mark.parametrize("kwargs", [
    {},
    {"use_scale": False},
    {"use_bias": False},
    {"param_dtype": jnp.bfloat16},
    {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16},
    {"scale_init": nnx.initializers.normal(1.0),
     "bias_init": nnx.initializers.normal(1.0)},
])
def test_variables_match_flax(kwargs):
  ours = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)
  theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)
  assert specs(ours) == specs(theirs)
  assert_close(variables(ours), variables(theirs), rtol=0, atol=0)
  assert specs(ours)["mean"][2] == jnp.float32  # whatever the dtypes


def test_state_tree_matches_flax_under_eval_shape():
  ours = nnx.eval_shape(lambda: jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  theirs = nnx.eval_shape(lambda: nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype),  # noqa: E731
                                  nnx.state(m))
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(
      nnx.state(theirs))
  assert shapes(ours) == shapes(theirs)
  assert isinstance(nnx.state(ours)["mean"].get_value(),
                    jax.ShapeDtypeStruct)


def test_metadata_reaches_the_params():
  bn = JbnBN(3, rngs=nnx.Rngs(0), scale_metadata={"tag": "gamma"},
             bias_metadata={"tag": "beta"})
  assert (bn.scale.get_metadata()["tag"], bn.bias.get_metadata()["tag"]) == (
      "gamma", "beta")


# ---------------------------------------------------------------------------
# Numbers


def test_train_then_eval_matches_flax_nnx(x):
  ours, theirs = (cls(3, momentum=0.9, rngs=nnx.Rngs(0))
                  for cls in (JbnBN, FlaxBN))
  for step in range(2):
    assert_close(ours(x + step), theirs(x + step))
    assert_close(variables(ours), variables(theirs))
  ours.eval()
  theirs.eval()
  assert_close(ours(x), theirs(x))
  assert_close(variables(ours), variables(theirs))


def test_train_matches_linen_module(x):
  ours = JbnBN(3, momentum=0.9, rngs=nnx.Rngs(0))
  linen = jbn.linen.BatchNorm(momentum=0.9)
  v = {"params": {"scale": ours.scale[...], "bias": ours.bias[...]},
       "batch_stats": {"mean": ours.mean[...], "var": ours.var[...]}}
  y_lin, upd = linen.apply(v, x, use_running_average=False,
                           mutable=["batch_stats"])
  assert_close(ours(x), y_lin, rtol=0, atol=0)
  assert_close((ours.mean[...], ours.var[...]),
               (upd["batch_stats"]["mean"], upd["batch_stats"]["var"]),
               rtol=0, atol=0)
  ours.eval()
  y_lin = linen.apply({**v, **upd}, x, use_running_average=True)
  assert_close(ours(x), y_lin, rtol=0, atol=0)


def test_mask_matches_flax(x):
  mask = np.random.default_rng(1).random(x.shape[:2]) < 0.5
  mask[0, 0] = True
  ours, theirs = (cls(3, rngs=nnx.Rngs(0)) for cls in (JbnBN, FlaxBN))
  assert_close(ours(x, mask=mask[..., None]), theirs(x, mask=mask[..., None]))
  assert_close(variables(ours), variables(theirs))


def test_nchw_axis_matches_flax(x):
  ours, theirs = (cls(5, axis=1, rngs=nnx.Rngs(0)) for cls in (JbnBN, FlaxBN))
  assert_close(ours(x), theirs(x))
  assert_close(variables(ours), variables(theirs))


def test_num_features_mismatch_is_an_error(x):
  with pytest.raises(ValueError, match=r"num_features=4 but got x of shape "
                     r"\(8, 5, 3\) whose feature axis axis=-1 has size 3"):
    JbnBN(4, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_use_fast_variance_is_ignored_variance_is_always_accurate(
    use_fast_variance):
  x = 1e4 + normal((256, 16))
  bn = jbn.nnx.BatchNorm(16, use_fast_variance=use_fast_variance,
                         rngs=nnx.Rngs(0))
  np.testing.assert_allclose(jnp.std(bn(x), axis=0), 1.0, rtol=1e-3)


# ---------------------------------------------------------------------------
# Modes


def test_train_eval_view_and_set_attributes_switch_modes(x):
  bn = JbnBN(3, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False
  bn.eval()
  assert bn.use_running_average is True
  before = variables(bn)
  bn(x)
  assert_close(variables(bn), before, rtol=0, atol=0)  # eval: unchanged
  bn.train()
  assert bn.use_running_average is False
  bn(x)
  assert not np.allclose(bn.mean[...], before["mean"])

  view = nnx.view(bn, use_running_average=True)
  assert (view.use_running_average, bn.use_running_average) == (True, False)
  before = variables(bn)
  view(x)
  assert_close(variables(bn), before, rtol=0, atol=0)

  bn.set_attributes(use_running_average=True)
  assert bn.use_running_average is True
  bn(x, use_running_average=False)  # the call argument wins, as in Flax
  assert not np.allclose(bn.mean[...], before["mean"])


def test_use_running_average_none_everywhere_is_an_error(x):
  bn = JbnBN(3, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError,
                     match="No `use_running_average` argument was provided"):
    bn(x)


def test_traced_use_running_average_serves_both_modes(x):
  ours, ref = (JbnBN(3, rngs=nnx.Rngs(0)) for _ in range(2))

  @nnx.jit
  def f(bn, x, flag):
    return bn(x, use_running_average=flag)

  for flag in (False, True, False):
    assert_close(f(ours, x, jnp.asarray(flag)),
                 ref(x, use_running_average=flag))
    assert_close(variables(ours), variables(ref))


# ---------------------------------------------------------------------------
# Transforms and dtypes


def test_jit_and_grad_match_flax(x):
  def step(bn, x):
    def loss(bn):
      return jnp.sum(jnp.sin(bn(x)))
    return nnx.grad(loss)(bn)

  step = nnx.jit(step)
  ours, theirs = (cls(3, momentum=0.9, rngs=nnx.Rngs(0))
                  for cls in (JbnBN, FlaxBN))
  for _ in range(2):
    g_ours, g_theirs = step(ours, x), step(theirs, x)
    assert_close(nnx.state(g_ours), nnx.state(g_theirs), rtol=1e-4,
                 atol=1e-5)
    assert_close(variables(ours), variables(theirs))  # stats updated in place
  assert float(jnp.abs(g_ours["scale"][...]).max()) > 1e-3


def test_vmap_with_axis_name_matches_flax(x):
  @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="batch")
  def f(bn, x):
    return bn(x)

  ours, theirs = (cls(3, axis_name="batch", momentum=0.9, rngs=nnx.Rngs(0))
                  for cls in (JbnBN, FlaxBN))
  xs = x.reshape(4, 2, 5, 3)
  assert_close(f(ours, xs), f(theirs, xs))
  assert_close(variables(ours), variables(theirs))
  # Global statistics: as one layer seeing the whole batch.
  whole = JbnBN(3, momentum=0.9, rngs=nnx.Rngs(0))
  whole(x)
  assert_close(variables(ours), variables(whole))


def test_bfloat16_keeps_float32_running_stats_and_bfloat16_output(x):
  kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, momentum=0.5)
  ours, theirs = (cls(3, rngs=nnx.Rngs(0), **kw) for cls in (JbnBN, FlaxBN))
  xb = x.astype(jnp.bfloat16)
  y = ours(xb)
  assert y.dtype == jnp.bfloat16
  assert ours.mean[...].dtype == ours.var[...].dtype == jnp.float32
  assert ours.scale[...].dtype == jnp.bfloat16
  assert_close(y, theirs(xb), rtol=2e-2, atol=2e-2)
  assert_close((ours.mean[...], ours.var[...]),
               (theirs.mean[...], theirs.var[...]), rtol=1e-2, atol=1e-2)
  # Exact float32 statistics of the bfloat16 input.
  xf = np.asarray(xb, np.float64).reshape(-1, 3)
  np.testing.assert_allclose(ours.mean[...], 0.5 * xf.mean(0), rtol=1e-5)
  np.testing.assert_allclose(ours.var[...], 0.5 + 0.5 * xf.var(0), rtol=1e-5)


def test_promote_dtype_none_keeps_input_dtype_flax_promotion_on_request(x):
  xb = x.astype(jnp.bfloat16)
  assert JbnBN(3, rngs=nnx.Rngs(0))(xb).dtype == jnp.bfloat16
  promoted = JbnBN(3, promote_dtype=nnx_dtypes.promote_dtype,
                   rngs=nnx.Rngs(0))
  theirs = FlaxBN(3, rngs=nnx.Rngs(0))
  y, y_theirs = promoted(xb), theirs(xb)
  assert y.dtype == y_theirs.dtype == jnp.float32
  assert_close(y, y_theirs)
  assert_close(variables(promoted), variables(theirs))
