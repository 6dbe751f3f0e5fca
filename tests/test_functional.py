"""Single-device behaviour of jbn.init / jbn.batch_norm.

Checked against the float64 reference in tests/reference.py and against
flax.linen.BatchNorm on the same variables.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jbn
import reference

# (shape, axis): 2-D, NHWC, NCHW, and two feature axes given two ways.
LAYOUTS = {
    "NC": ((16, 5), -1),
    "NHWC": ((4, 3, 3, 6), -1),
    "NCHW": ((4, 6, 3, 3), 1),
    "NHWC_axes(-2,-1)": ((4, 3, 2, 5), (-2, -1)),
    "NCHW_axes(1,3)": ((4, 3, 2, 5), (1, 3)),
}

# Tolerances on y (the output is rounded to the input dtype); statistics are
# float32 whatever the input dtype.
Y_TOL = {
    jnp.float32: dict(rtol=1e-5, atol=1e-5),
    jnp.bfloat16: dict(rtol=1e-2, atol=3e-2),
    jnp.float16: dict(rtol=2e-3, atol=3e-3),
}
STAT_TOL = dict(rtol=2e-6, atol=2e-6)


def _feature_shape(shape, axis):
  return tuple(shape[a] for a in reference.feature_axes(axis, len(shape)))


def _red_shape(shape, axis):
  feat = reference.feature_axes(axis, len(shape))
  return tuple(s for a, s in enumerate(shape) if a not in feat)


def _problem(rng, shape, axis, dtype=jnp.float32, param_dtype=jnp.float32):
  """Random x (per-feature offsets), params and non-trivial running stats."""
  fshape = _feature_shape(shape, axis)
  bshape = tuple(s if a in reference.feature_axes(axis, len(shape)) else 1
                 for a, s in enumerate(shape))
  offset = rng.normal(size=fshape).reshape(bshape) * 3
  x = jnp.asarray(offset + 2 * rng.normal(size=shape), dtype)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2, fshape), param_dtype),
            "bias": jnp.asarray(rng.normal(size=fshape), param_dtype)}
  state = {"mean": jnp.asarray(rng.normal(size=fshape), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2, fshape), jnp.float32)}
  return x, params, state


def _make_mask(rng, shape, axis, kind):
  if kind is None:
    return None
  mshape = shape if kind == "full" else _red_shape(shape, axis)
  if kind == "broadcast":  # one value per sample, broadcast over the rest
    mshape = mshape[:1] + (1,) * (len(mshape) - 1)
  mask = rng.uniform(size=mshape) < 0.7
  mask.reshape(-1)[0] = True  # at least one valid element
  return jnp.asarray(mask)


def _ref(x, params, state, **kw):
  return reference.forward(np.asarray(x, np.float64), params.get("scale"),
                           params.get("bias"), state["mean"], state["var"],
                           **kw)


def _assert_matches_reference(y, new_state, ref, dtype):
  assert y.dtype == dtype
  assert new_state["mean"].dtype == jnp.float32
  assert new_state["var"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), ref.y, **Y_TOL[dtype])
  np.testing.assert_allclose(new_state["mean"], ref.new_mean, **STAT_TOL)
  np.testing.assert_allclose(new_state["var"], ref.new_var, **STAT_TOL)


# jit of the public function; momentum and mask stay traced so that tests with
# the same shapes share one compilation.
_BN = jax.jit(jbn.batch_norm, static_argnums=3,
              static_argnames=("axis", "epsilon", "dtype"))


# --------------------------------------------------------------------------
# init


def test_init_matches_flax_variable_tree():
  params, state = jbn.init(5)
  v = jax.jit(nn.BatchNorm(use_running_average=False).init)(
      jax.random.key(0), jnp.ones((2, 5)))
  chex.assert_trees_all_equal(params, v["params"])
  chex.assert_trees_all_equal(state, v["batch_stats"])
  chex.assert_trees_all_equal_dtypes(params, v["params"])


def test_init_options():
  params, state = jbn.init((3, 4), dtype=jnp.bfloat16, use_scale=False)
  assert set(params) == {"bias"}
  assert params["bias"].shape == (3, 4)
  assert params["bias"].dtype == jnp.bfloat16
  assert state["mean"].dtype == state["var"].dtype == jnp.float32
  np.testing.assert_array_equal(state["mean"], np.zeros((3, 4)))
  np.testing.assert_array_equal(state["var"], np.ones((3, 4)))
  params, _ = jbn.init(3, use_scale=False, use_bias=False)
  assert params == {}


# --------------------------------------------------------------------------
# Forward against the float64 reference


FORWARD_VARIANTS = {
    "f32": (jnp.float32, None),
    "f32_reduced_mask": (jnp.float32, "reduced"),
    "f32_full_mask": (jnp.float32, "full"),
    "bf16": (jnp.bfloat16, None),
    "bf16_full_mask": (jnp.bfloat16, "full"),
    "f16_reduced_mask": (jnp.float16, "reduced"),
}
# Every layout in float32 with each kind of mask; low precision on two.
FORWARD_CASES = [(layout, variant) for layout in LAYOUTS
                 for variant in ("f32", "f32_reduced_mask", "f32_full_mask")]
FORWARD_CASES += [(layout, variant) for layout in ("NHWC", "NCHW_axes(1,3)")
                  for variant in ("bf16", "bf16_full_mask", "f16_reduced_mask")]


@pytest.mark.parametrize("layout,variant", FORWARD_CASES)
def test_forward_matches_reference(rng, layout, variant):
  shape, axis = LAYOUTS[layout]
  dtype, mask_kind = FORWARD_VARIANTS[variant]
  x, params, state = _problem(rng, shape, axis, dtype)
  mask = _make_mask(rng, shape, axis, mask_kind)
  ref = _ref(x, params, state, axis=axis, momentum=0.9, mask=mask)
  y, new_state = jax.jit(
      lambda p, s, x, m: jbn.batch_norm(p, s, x, True, axis=axis,
                                        momentum=0.9, mask=m))(
                                            params, state, x, mask)
  _assert_matches_reference(y, new_state, ref, dtype)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NCHW_axes(1,3)"])
def test_forward_with_broadcast_mask(rng, layout):
  """A (N, 1, 1) mask counts each valid sample H * W times."""
  shape, axis = LAYOUTS[layout]
  x, params, state = _problem(rng, shape, axis)
  mask = _make_mask(rng, shape, axis, "broadcast")
  ref = _ref(x, params, state, axis=axis, momentum=0.9, mask=mask)
  y, new_state = _BN(params, state, x, True, axis=axis, momentum=0.9,
                     mask=mask)
  _assert_matches_reference(y, new_state, ref, jnp.float32)


@pytest.mark.parametrize("layout,variant", [
    ("NHWC", "f32_full_mask"),
    ("NCHW", "bf16"),
])
def test_forward_without_jit_matches_reference(rng, layout, variant):
  shape, axis = LAYOUTS[layout]
  dtype, mask_kind = FORWARD_VARIANTS[variant]
  x, params, state = _problem(rng, shape, axis, dtype)
  mask = _make_mask(rng, shape, axis, mask_kind)
  ref = _ref(x, params, state, axis=axis, momentum=0.9, mask=mask)
  y, new_state = jbn.batch_norm(params, state, x, True, axis=axis,
                                momentum=0.9, mask=mask)
  _assert_matches_reference(y, new_state, ref, dtype)


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.99])
def test_momentum_is_decay_on_old_value(rng, momentum):
  x, params, state = _problem(rng, (32, 4), -1)
  ref = _ref(x, params, state, momentum=momentum)
  y, new_state = _BN(params, state, x, True, momentum=momentum)
  _assert_matches_reference(y, new_state, ref, jnp.float32)
  # new = m * old + (1 - m) * batch, spelled out.
  np.testing.assert_allclose(
      new_state["var"],
      momentum * np.asarray(state["var"]) + (1 - momentum) * ref.batch_var,
      rtol=1e-6)


def test_default_momentum_is_flax_default(rng):
  x, params, state = _problem(rng, (32, 4), -1)
  _, new_state = _BN(params, state, x, True)
  ref = _ref(x, params, state, momentum=0.99)
  np.testing.assert_allclose(new_state["var"], ref.new_var, **STAT_TOL)
  np.testing.assert_allclose(new_state["mean"], ref.new_mean, **STAT_TOL)


@pytest.mark.parametrize("x_dtype,out_dtype", [
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
])
def test_dtype_argument_sets_output_dtype(rng, x_dtype, out_dtype):
  x, params, state = _problem(rng, (16, 3, 5), -1, x_dtype)
  ref = _ref(x, params, state, momentum=0.9)
  y, new_state = _BN(params, state, x, True, momentum=0.9, dtype=out_dtype)
  # A float32 output of a low-precision input is float32-accurate: the
  # statistics and the normalization are computed in float32.
  _assert_matches_reference(y, new_state, ref, out_dtype)


def test_bf16_params_bf16_input_keep_float32_state(rng):
  x, params, state = _problem(rng, (16, 6), -1, jnp.bfloat16, jnp.bfloat16)
  y, new_state = _BN(params, state, x, True, momentum=0.9)
  _assert_matches_reference(y, new_state, _ref(x, params, state, momentum=0.9),
                            jnp.bfloat16)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NCHW_axes(1,3)"])
def test_eval_mode_uses_running_stats_and_returns_state(rng, layout):
  shape, axis = LAYOUTS[layout]
  x, params, state = _problem(rng, shape, axis)
  ref = _ref(x, params, state, axis=axis, train=False)
  y_jit, new_state = _BN(params, state, x, False, axis=axis)
  np.testing.assert_allclose(y_jit, ref.y, **Y_TOL[jnp.float32])
  chex.assert_trees_all_equal(new_state, state)
  if layout == "NHWC":  # without jit: the very same state object comes back
    y, same = jbn.batch_norm(params, state, x, False, axis=axis)
    assert same is state
    np.testing.assert_allclose(y, ref.y, **Y_TOL[jnp.float32])


def test_eval_mode_ignores_mask(rng):
  x, params, state = _problem(rng, (8, 3), -1)
  y, _ = _BN(params, state, x, False, mask=jnp.zeros((8,), bool))
  np.testing.assert_allclose(y, _ref(x, params, state, train=False).y,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_traced_train_matches_python_bool(rng, train):
  shape = (4, 3, 3, 6)
  x, params, state = _problem(rng, shape, -1)
  mask = _make_mask(rng, shape, -1, "reduced")
  traced = jax.jit(jbn.batch_norm)  # train is a traced boolean scalar
  for m in (None, mask):
    y_traced, s_traced = traced(params, state, x, jnp.asarray(train),
                                momentum=0.9, mask=m)
    ref = _ref(x, params, state, train=train, momentum=0.9, mask=m)
    _assert_matches_reference(y_traced, s_traced, ref, jnp.float32)
  y_bool, s_bool = _BN(params, state, x, train, momentum=0.9, mask=mask)
  np.testing.assert_allclose(y_traced, y_bool, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(s_traced, s_bool, rtol=1e-6, atol=1e-6)
  if not train:
    chex.assert_trees_all_equal(s_traced, state)


def test_numpy_bool_train_is_accepted(rng):
  x, params, state = _problem(rng, (8, 3), -1)
  y, s = jbn.batch_norm(params, state, x, np.bool_(False))
  assert s is state
  np.testing.assert_allclose(y, _ref(x, params, state, train=False).y,
                             rtol=1e-5, atol=1e-5)


def test_one_value_per_feature_is_fine_in_eval(rng):
  x, params, state = _problem(rng, (1, 4), -1)
  y, s = jbn.batch_norm(params, state, x, False)
  assert s is state
  np.testing.assert_allclose(y, _ref(x, params, state, train=False).y,
                             rtol=1e-5, atol=1e-5)


def test_state_with_extra_keys_is_carried_through(rng):
  x, params, state = _problem(rng, (8, 3), -1)
  state = {**state, "step": jnp.int32(7)}  # 'count' is warm start's key
  _, new_state = _BN(params, state, x, True)
  assert set(new_state) == {"mean", "var", "step"}
  assert new_state["step"] == 7


# --------------------------------------------------------------------------
# Parity with flax.linen.BatchNorm on the same variables


def _flax_parity(variables, x, *, axis, momentum, mask=None):
  """(jbn, flax) outputs and new statistics, from one jitted function."""
  model = nn.BatchNorm(use_running_average=False, use_fast_variance=False,
                       momentum=momentum, axis=axis)

  @jax.jit
  def both(variables, x, mask):
    y_flax, upd = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y, new_state = jbn.batch_norm(variables["params"],
                                  variables["batch_stats"], x, True,
                                  axis=axis, momentum=momentum, mask=mask)
    return (y, new_state), (y_flax, upd["batch_stats"])

  return model, both(variables, x, mask)


@pytest.mark.parametrize("layout,momentum", [
    ("NC", 0.0), ("NC", 0.9), ("NC", 0.99), ("NHWC", 0.9), ("NCHW", 0.9),
    ("NCHW_axes(1,3)", 0.99)])
def test_flax_parity_train(rng, layout, momentum):
  shape, axis = LAYOUTS[layout]
  x, params, state = _problem(rng, shape, axis)
  variables = {"params": params, "batch_stats": state}
  model, (ours, theirs) = _flax_parity(variables, x, axis=axis,
                                       momentum=momentum)
  # Flax creates exactly the tree jbn.init creates.
  fresh = jax.eval_shape(model.init, jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(fresh, variables)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flax_parity_train_with_mask(rng):
  shape, axis = (6, 4, 5), -1
  x, params, state = _problem(rng, shape, axis)
  variables = {"params": params, "batch_stats": state}
  mask = _make_mask(rng, shape, axis, "full")
  _, (ours, theirs) = _flax_parity(variables, x, axis=axis, momentum=0.9,
                                   mask=mask)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_flax_parity_eval(rng, layout):
  shape, axis = LAYOUTS[layout]
  x, params, state = _problem(rng, shape, axis)
  variables = {"params": params, "batch_stats": state}
  model = nn.BatchNorm(use_running_average=True, axis=axis)
  y_flax, y = jax.jit(lambda v, x: (
      model.apply(v, x),
      jbn.batch_norm(v["params"], v["batch_stats"], x, False, axis=axis)[0]))(
          variables, x)
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Numerics: large mean, small variance (the headline)


def _large_offset_batch(seed, shape=(256, 16)):
  rng = np.random.default_rng(seed)
  return (1e4 + rng.standard_normal(shape)).astype(np.float32)


def _rel_var_err(var, x):
  true = np.var(np.asarray(x, np.float64), axis=0)
  return float(np.max(np.abs(np.asarray(var, np.float64) - true) / true))


def _max_std_err(y):
  return float(np.max(np.abs(np.std(np.asarray(y, np.float64), axis=0) - 1)))


def test_variance_accurate_at_first_step_large_mean():
  x = _large_offset_batch(0)
  params, state = jbn.init(16)  # fresh state: running mean 0, far from data
  # momentum=0: the new running variance IS the batch variance.
  for y, new_state in (jbn.batch_norm(params, state, x, True, momentum=0.0),
                       _BN(params, state, x, True, momentum=0.0)):
    assert _rel_var_err(new_state["var"], x) < 1e-4
    assert _max_std_err(y) < 1e-3


def test_variance_accurate_over_several_steps_large_mean():
  params, state = jbn.init(16)
  for seed in range(1, 6):
    x = _large_offset_batch(seed)
    y, state = _BN(params, state, x, True, momentum=0.0)
    assert _rel_var_err(state["var"], x) < 1e-4
    assert _max_std_err(y) < 1e-3


def test_flax_fast_variance_fails_large_mean():
  """The regression jbn beats: flax's default E[x^2] - E[x]^2 cancels."""
  x = _large_offset_batch(0)
  model = nn.BatchNorm(use_running_average=False, momentum=0.0)  # defaults
  params, state = jbn.init(16)
  y, updates = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(
      {"params": params, "batch_stats": state}, x)
  assert _rel_var_err(updates["batch_stats"]["var"], x) > 1.0
  assert _max_std_err(y) > 1.0


def test_constant_feature_gives_bias_not_nan(rng):
  x = rng.normal(size=(32, 3)).astype(np.float32)
  x[:, 1] = 1e4  # a constant feature, far from 0
  params = {"scale": jnp.asarray([1.0, 2.0, 3.0]),
            "bias": jnp.asarray([0.5, -0.25, 4.0])}
  _, state = jbn.init(3)
  y, new_state = _BN(params, state, x, True, momentum=0.0)
  np.testing.assert_array_equal(y[:, 1], np.full(32, -0.25, np.float32))
  assert new_state["var"][1] == 0.0
  assert new_state["mean"][1] == 1e4
  assert np.all(np.isfinite(y))
  dx = jax.grad(lambda x: jnp.sum(_BN(params, state, x, True)[0] ** 2))(x)
  assert np.all(np.isfinite(dx))


def test_all_false_mask_keeps_state_and_no_nan(rng):
  x, params, state = _problem(rng, (8, 3, 4), -1)
  mask = jnp.zeros((8, 3), bool)
  y, new_state = _BN(params, state, x, True, mask=mask)
  chex.assert_trees_all_equal(new_state, state)
  assert np.all(np.isfinite(y))
  grads = jax.jit(jax.grad(
      lambda p, x: jnp.sum(jbn.batch_norm(p, state, x, True, mask=mask)[0]),
      argnums=(0, 1)))(params, x)
  chex.assert_tree_all_finite(grads)


def test_feature_with_no_valid_element_keeps_its_stats(rng):
  x, params, state = _problem(rng, (8, 4), -1)
  mask = np.ones((8, 4), bool)
  mask[:, 2] = False  # feature 2 has no valid element
  mask[::2, 0] = False  # feature 0 has half
  ref = _ref(x, params, state, momentum=0.9, mask=mask)
  y, new_state = _BN(params, state, x, True, momentum=0.9,
                     mask=jnp.asarray(mask))
  assert new_state["mean"][2] == state["mean"][2]
  assert new_state["var"][2] == state["var"][2]
  np.testing.assert_allclose(new_state["mean"], ref.new_mean, **STAT_TOL)
  np.testing.assert_allclose(new_state["var"], ref.new_var, **STAT_TOL)
  assert np.all(np.isfinite(y))
  # The features that have valid elements are normalized as the reference.
  keep = np.array([0, 1, 3])
  np.testing.assert_allclose(np.asarray(y)[:, keep], ref.y[:, keep],
                             rtol=1e-5, atol=1e-5)


def test_masked_out_elements_are_normalized_not_counted(rng):
  x, params, state = _problem(rng, (10, 3), -1)
  mask = jnp.asarray(np.arange(10) < 6)
  y, new_state = _BN(params, state, x, True, mask=mask, momentum=0.0)
  valid = np.asarray(x, np.float64)[:6]
  np.testing.assert_allclose(new_state["mean"], valid.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new_state["var"], valid.var(0), rtol=1e-5)
  # Rows 6..9 are normalized with the statistics of rows 0..5.
  expected = ((np.asarray(x[6:], np.float64) - valid.mean(0))
              / np.sqrt(valid.var(0) + 1e-5) * params["scale"]
              + params["bias"])
  np.testing.assert_allclose(y[6:], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Gradients


GRAD_CASES = {
    "NC": ((16, 5), -1, None, jnp.float32),
    "NHWC_full_mask": ((4, 3, 3, 6), -1, "full", jnp.float32),
    "NCHW_reduced_mask": ((4, 6, 3, 3), 1, "reduced", jnp.float32),
    "two_feature_axes": ((4, 3, 2, 5), (1, 3), None, jnp.float32),
    "bf16": ((8, 3, 3, 6), -1, None, jnp.bfloat16),
    "bf16_masked": ((8, 3, 3, 6), -1, "reduced", jnp.bfloat16),
}


def _assert_grads_match(dparams, dx, ref_grads, dtype):
  rdx, rds, rdb = ref_grads
  assert dx.dtype == dtype
  if dtype == jnp.float32:
    tol, ptol = 1e-4, 1e-4
  else:  # dx is rounded to bf16; parameter grads are float32 sums.
    tol, ptol = 2e-2, 1e-3
  np.testing.assert_allclose(np.asarray(dx, np.float64), rdx, rtol=tol,
                             atol=tol * np.max(np.abs(rdx)))
  for got, want in ((dparams.get("scale"), rds), (dparams.get("bias"), rdb)):
    if want is not None:
      assert got.dtype == jnp.float32
      np.testing.assert_allclose(got, want, rtol=ptol,
                                 atol=ptol * np.max(np.abs(want)))


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_grads_match_reference(rng, case):
  shape, axis, mask_kind, dtype = GRAD_CASES[case]
  x, params, state = _problem(rng, shape, axis, dtype)
  mask = _make_mask(rng, shape, axis, mask_kind)
  ct = jnp.asarray(rng.normal(size=shape), dtype)

  def vjp(p, x, m, ct):
    def f(p, x):
      return jbn.batch_norm(p, state, x, True, axis=axis, mask=m)[0]
    return jax.vjp(f, p, x)[1](ct)

  dparams, dx = jax.jit(vjp)(params, x, mask, ct)
  ref_grads = reference.grads(np.asarray(x, np.float64), params["scale"],
                              params["bias"], np.asarray(ct, np.float64),
                              axis=axis, mask=mask)
  _assert_grads_match(dparams, dx, ref_grads, dtype)
  if case == "NHWC_full_mask":  # and once without jit
    dparams, dx = vjp(params, x, mask, ct)
    _assert_grads_match(dparams, dx, ref_grads, dtype)


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False),
                                                (False, False)])
def test_no_scale_or_no_bias(rng, use_scale, use_bias):
  x, full_params, state = _problem(rng, (12, 4), -1)
  params = {k: v for k, v in full_params.items()
            if (k == "scale" and use_scale) or (k == "bias" and use_bias)}
  ct = rng.normal(size=(12, 4)).astype(np.float32)

  @jax.jit
  def fwd_bwd(p, x):
    y, vjp = jax.vjp(lambda p, x: jbn.batch_norm(p, state, x, True)[0], p, x)
    return y, vjp(ct)

  y, (dparams, dx) = fwd_bwd(params, x)
  np.testing.assert_allclose(y, _ref(x, params, state).y, rtol=1e-5, atol=1e-5)
  assert set(dparams) == set(params)
  _assert_grads_match(dparams, dx, reference.grads(
      x, params.get("scale"), params.get("bias"), ct), jnp.float32)


def test_check_grads_numerical_float32(rng):
  x, params, state = _problem(rng, (6, 4), -1)
  mask = jnp.asarray(np.arange(6) != 2)
  f = jax.jit(lambda x, scale, bias: jbn.batch_norm(
      {"scale": scale, "bias": bias}, state, x, True, mask=mask)[0])
  check_grads(f, (x, params["scale"], params["bias"]), order=1,
              modes=["rev"], eps=1e-2, atol=2e-3, rtol=2e-3)

  # The same check sees a backward pass that is 10% off in dx.
  @jax.custom_vjp
  def wrong(x, scale, bias):
    return f(x, scale, bias)

  def wrong_bwd(vjp, g):
    dx, dscale, dbias = vjp(g)
    return dx * 1.1, dscale, dbias

  wrong.defvjp(lambda *a: jax.vjp(f, *a), wrong_bwd)
  with pytest.raises(AssertionError):
    check_grads(wrong, (x, params["scale"], params["bias"]), order=1,
                modes=["rev"], eps=1e-2, atol=2e-3, rtol=2e-3)


def test_running_stats_carry_no_gradient(rng):
  x, params, state = _problem(rng, (12, 4), -1)

  def stats(x, s):
    new_state = jbn.batch_norm(params, s, x, True)[1]
    return jnp.sum(new_state["mean"]) + jnp.sum(new_state["var"])

  def out(s):
    return jnp.sum(jbn.batch_norm(params, s, x, True)[0] ** 2)

  @jax.jit
  def grads(x, s):
    return jax.grad(stats)(x, s), jax.grad(out)(s)

  dx, ds = grads(x, state)
  np.testing.assert_array_equal(dx, np.zeros_like(x))
  # ... and in training y does not depend on the running statistics.
  chex.assert_trees_all_equal(ds, jax.tree.map(jnp.zeros_like, state))


def test_eval_mode_grads_are_the_affine_map(rng):
  x, params, state = _problem(rng, (12, 4), -1)
  dx = jax.jit(jax.grad(lambda x: jnp.sum(
      jbn.batch_norm(params, state, x, False)[0])))(x)
  expected = np.asarray(params["scale"]) / np.sqrt(
      np.asarray(state["var"]) + 1e-5)
  np.testing.assert_allclose(dx, np.broadcast_to(expected, x.shape),
                             rtol=1e-6)


# --------------------------------------------------------------------------
# Transforms


def test_vmap_over_independent_problems(rng):
  shape = (3, 16, 4)  # 3 independent problems of (16, 4)
  x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
  params, state = _problem(rng, (16, 4), -1)[1:]
  ct = rng.normal(size=shape).astype(np.float32)
  p3 = jax.tree.map(lambda a: jnp.stack([a] * 3), params)
  s3 = jax.tree.map(lambda a: jnp.stack([a] * 3), state)

  @jax.jit
  def run(x, p3):
    # Shared params and state, batched x.
    y, new_state = jax.vmap(
        lambda x: jbn.batch_norm(params, state, x, True, momentum=0.9))(x)
    # Batched everything, with gradients.
    def loss(p, x):
      ys = jax.vmap(lambda p, s, x: jbn.batch_norm(p, s, x, True)[0])(p, s3, x)
      return jnp.sum(ct * ys)
    return y, new_state, jax.grad(loss, argnums=(0, 1))(p3, x)

  y, new_state, (dp, dx) = run(x, p3)
  assert new_state["mean"].shape == (3, 4)
  for i in range(3):
    ref = _ref(x[i], params, state, momentum=0.9)
    np.testing.assert_allclose(y[i], ref.y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state["mean"][i], ref.new_mean, **STAT_TOL)
    np.testing.assert_allclose(new_state["var"][i], ref.new_var, **STAT_TOL)
    _assert_grads_match(
        jax.tree.map(lambda a: a[i], dp), dx[i],
        reference.grads(x[i], params["scale"], params["bias"], ct[i]),
        jnp.float32)


def test_checkpoint_gives_same_values_and_grads(rng):
  x, params, state = _problem(rng, (8, 3, 5), -1)

  def loss(p, x, bn):
    y, _ = bn(p, state, x, True)
    return jnp.sum(jnp.sin(y))

  remat_bn = jax.checkpoint(jbn.batch_norm, static_argnums=3)
  plain, remat = jax.jit(lambda p, x: (
      jax.value_and_grad(loss, argnums=(0, 1))(p, x, jbn.batch_norm),
      jax.value_and_grad(loss, argnums=(0, 1))(p, x, remat_bn)))(params, x)
  chex.assert_trees_all_close(plain, remat, rtol=1e-5, atol=1e-6)


def test_scan_over_stacked_layers(rng):
  n_layers, c = 3, 4
  x = jnp.asarray(rng.normal(size=(16, c)) * 3 + 2, jnp.float32)
  layers = [_problem(rng, (16, c), -1)[1:] for _ in range(n_layers)]
  stacked_p = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in layers])
  stacked_s = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in layers])

  def scanned(ps, ss, x):
    def body(h, layer):
      y, new_s = jbn.batch_norm(layer[0], layer[1], h, True, momentum=0.9)
      return jnp.tanh(y), new_s
    return jax.lax.scan(body, x, (ps, ss))

  def looped(ps, ss, x):
    h, outs = x, []
    for i in range(n_layers):
      y, new_s = jbn.batch_norm(jax.tree.map(lambda a: a[i], ps),
                                jax.tree.map(lambda a: a[i], ss), h, True,
                                momentum=0.9)
      h = jnp.tanh(y)
      outs.append(new_s)
    return h, jax.tree.map(lambda *a: jnp.stack(a), *outs)

  @jax.jit
  def both(ps, ss, x):
    results = []
    for fn in (scanned, looped):
      out = fn(ps, ss, x)
      g = jax.grad(lambda p, x: jnp.sum(fn(p, ss, x)[0] ** 3),
                   argnums=(0, 1))(ps, x)
      results.append((out, g))
    return results

  (out_scan, g_scan), (out_loop, g_loop) = both(stacked_p, stacked_s, x)
  chex.assert_trees_all_close(out_scan, out_loop, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g_scan, g_loop, rtol=1e-4, atol=1e-5)
  # The scanned running statistics are those of each layer's input.
  h = x
  for i in range(n_layers):
    p_i, s_i = layers[i]
    ref = _ref(h, p_i, s_i, momentum=0.9)
    np.testing.assert_allclose(out_scan[1]["var"][i], ref.new_var, rtol=1e-5)
    h = np.tanh(ref.y)


def test_no_retrace_on_second_call(rng):
  x, params, state = _problem(rng, (8, 3, 5), -1)
  traces = []

  def loss(p, s, x):
    y, new_s = jbn.batch_norm(p, s, x, True)
    return jnp.sum(y ** 2), new_s

  @jax.jit
  def step(p, s, x):
    traces.append(1)  # runs at trace time only
    g, new_s = jax.grad(loss, has_aux=True)(p, s, x)
    return g, new_s

  _, state2 = step(params, state, x)
  step(params, state2, x + 1.0)
  assert len(traces) == 1

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(p, s, x, t):
    return jbn.batch_norm(p, s, x, t)

  fwd(params, state, x, jnp.asarray(True))
  fwd(params, state2, x * 2, jnp.asarray(False))  # traced train: no retrace


# --------------------------------------------------------------------------
# Memory of the backward pass (residuals): x plus O(C) vectors


def test_vjp_residuals_are_x_and_per_feature_vectors(rng):
  x, params, state = _problem(rng, (16, 4, 4, 8), -1)
  # The leaves of the function jax.vjp returns are the saved residuals.
  _, vjp = jax.vjp(lambda p, x: _BN(p, state, x, True)[0], params, x)
  residuals = jax.tree.leaves(vjp)
  big = [r for r in residuals if r.size > 8]
  assert len(big) == 1, [r.shape for r in residuals]
  np.testing.assert_array_equal(big[0], x)  # x itself, nothing derived
  # flax.linen keeps a second activation-sized array.
  model = nn.BatchNorm(use_running_average=False)
  flax_bn = jax.jit(lambda p, x: model.apply(
      {"params": p, "batch_stats": state}, x, mutable=["batch_stats"])[0])
  _, vjp = jax.vjp(flax_bn, params, x)
  assert sum(r.size == x.size for r in jax.tree.leaves(vjp)) == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_fwd_bwd_compiles_without_activation_sized_temporary(dtype):
  """Compiled temporary memory of jit(grad) on (64, 32, 32, 64), no mask.

  flax.linen needs two float32 activations of temporaries (33.6 MB); jbn
  keeps only x and per-feature vectors as residuals, and its reductions read
  x in place (768 bytes of temporaries measured, for f32 and bf16 alike).
  """
  shape = (64, 32, 32, 64)
  x = jax.ShapeDtypeStruct(shape, dtype)
  x_bytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  params, state = jbn.init(64)

  def temp_bytes(loss):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes

  def jbn_loss(p, x):
    y, _ = jbn.batch_norm(p, state, x, True)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  jbn_temp = temp_bytes(jbn_loss)
  # Far below one activation: no x-sized buffer (nor a float32 copy of x).
  assert jbn_temp <= x_bytes // 16, (jbn_temp, x_bytes)
  if dtype == jnp.float32:
    model = nn.BatchNorm(use_running_average=False)

    def flax_loss(p, x):
      y, _ = model.apply({"params": p, "batch_stats": state}, x,
                         mutable=["batch_stats"])
      return jnp.sum(y ** 2)

    flax_temp = temp_bytes(flax_loss)
    assert flax_temp >= x_bytes  # what jbn beats
    assert jbn_temp * 1.9 <= flax_temp, (jbn_temp, flax_temp)
