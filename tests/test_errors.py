"""Every error jbn.init / jbn.batch_norm raises, with its message.

One test per raise in jbn/_functional.py (_as_shape, _canonical_axes,
_validate, _check_bound), plus the cases that must NOT raise next to them.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jbn
import reference

X = jnp.ones((8, 3), jnp.float32)
PARAMS, STATE = jbn.init(3)


def bn(x=X, params=None, state=None, train=True, **kw):
  return jbn.batch_norm(PARAMS if params is None else params,
                        STATE if state is None else state, x, train, **kw)


# --------------------------------------------------------------------------
# jbn.init


@pytest.mark.parametrize("feature_shape", [-1, (3, -2), (2.5,), ("a",)])
def test_init_rejects_bad_feature_shape(feature_shape):
  with pytest.raises(ValueError, match=re.escape(
      f"feature_shape must be an int or a tuple of non-negative ints, got "
      f"{feature_shape!r}")):
    jbn.init(feature_shape)


def test_init_float_feature_shape_gets_the_clear_error():
  """Bug: jbn.init(3.0) raised a bare "'float' object is not iterable"."""
  with pytest.raises(ValueError, match=re.escape(
      "feature_shape must be an int or a tuple of non-negative ints, got "
      "3.0")):
    jbn.init(3.0)


@pytest.mark.parametrize("feature_shape,shape", [
    (3, (3,)), ((2, 3), (2, 3)), (np.int64(4), (4,)), ((), ())])
def test_init_accepts_ints_and_tuples(feature_shape, shape):
  params, state = jbn.init(feature_shape)
  assert params["scale"].shape == state["var"].shape == shape


# --------------------------------------------------------------------------
# x and train


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_non_floating_x(dtype):
  with pytest.raises(TypeError, match=re.escape(
      f"batch_norm expects a floating-point x, got dtype "
      f"{jnp.dtype(dtype)}; cast it first")):
    bn(x=jnp.ones((8, 3), dtype))


@pytest.mark.parametrize("train", [1, 0, "yes", None, jnp.float32(1.0),
                                   jnp.array([True, False])])
def test_bad_train(train):
  with pytest.raises(TypeError,
                     match="train must be a Python bool or a boolean scalar"):
    bn(train=train)


def test_bad_train_traced_non_bool():
  with pytest.raises(TypeError,
                     match="train must be a Python bool or a boolean scalar"):
    jax.jit(lambda t: bn(train=t))(jnp.int32(1))


def test_scalar_x():
  with pytest.raises(ValueError, match="expects x of rank >= 1, got a scalar"):
    bn(x=jnp.float32(1.0), params={}, state={"mean": jnp.zeros(()),
                                             "var": jnp.ones(())})


# --------------------------------------------------------------------------
# axis


@pytest.mark.parametrize("axis", [2, -3, (0, 5), (1.0,)])
def test_axis_out_of_range(axis):
  with pytest.raises(ValueError, match=re.escape(
      f"axis={axis!r} is out of range for an input of rank 2: each feature "
      f"axis must be an int in [-2, 1] (NHWC: axis=-1; NCHW: axis=1)")):
    bn(axis=axis)


def test_float_axis_gets_the_clear_error():
  """Bug: axis=1.0 raised a bare "'float' object is not iterable"."""
  with pytest.raises(ValueError, match=re.escape(
      "axis=1.0 is out of range for an input of rank 2: each feature axis "
      "must be an int in [-2, 1]")):
    bn(axis=1.0)


@pytest.mark.parametrize("axis", [(1, 1), (1, -1), (0, -2)])
def test_duplicate_axes(axis):
  with pytest.raises(ValueError,
                     match=re.escape(f"axis={axis!r} names the same axis "
                                     f"twice")):
    bn(axis=axis)


# --------------------------------------------------------------------------
# params and state


@pytest.mark.parametrize("params,state", [
    ([1.0, 0.0], STATE), (PARAMS, None), (PARAMS, (jnp.zeros(3),
                                                  jnp.ones(3)))])
def test_params_and_state_must_be_mappings(params, state):
  with pytest.raises(TypeError,
                     match="params and state must be mappings .dicts., as "
                     "returned by jbn.init"):
    jbn.batch_norm(params, state, X, True)


def test_unexpected_params_key():
  with pytest.raises(ValueError, match=re.escape(
      "params has unexpected keys ['beta', 'gamma']; expected 'scale' and/or "
      "'bias'")):
    bn(params={"gamma": jnp.ones(3), "beta": jnp.zeros(3)})


@pytest.mark.parametrize("missing", [["var"], ["mean"], ["mean", "var"]])
def test_missing_state_key(missing):
  state = {k: v for k, v in STATE.items() if k not in missing}
  with pytest.raises(ValueError, match=re.escape(
      f"state is missing {missing}; expected 'mean' and 'var' (see "
      f"jbn.init)")):
    bn(state=state)


@pytest.mark.parametrize("tree,key", [("params", "scale"), ("params", "bias"),
                                      ("state", "mean"), ("state", "var")])
def test_feature_shape_mismatch(tree, key):
  params, state = dict(PARAMS), dict(STATE)
  (params if tree == "params" else state)[key] = jnp.ones(4)
  with pytest.raises(ValueError, match=re.escape(
      f"{tree}['{key}'] has shape (4,) but x of shape (8, 3) with axis=-1 "
      f"has feature shape (3,). Create them with jbn.init((3,)), or pass the "
      f"axis your features are on")):
    jbn.batch_norm(params, state, X, True)


def test_feature_shape_mismatch_names_the_axis_for_nchw():
  x = jnp.ones((2, 3, 4, 4))  # NCHW with the default axis=-1
  with pytest.raises(ValueError, match=re.escape(
      "params['scale'] has shape (3,) but x of shape (2, 3, 4, 4) with "
      "axis=-1 has feature shape (4,)")):
    bn(x=x)
  jax.eval_shape(lambda: bn(x=x, axis=1))  # the fix the message suggests


# --------------------------------------------------------------------------
# momentum, epsilon, sync


@pytest.mark.parametrize("momentum", [1.5, -0.1, 10])
def test_momentum_outside_unit_interval(momentum):
  with pytest.raises(ValueError, match=re.escape(
      f"momentum={momentum!r} must be in [0, 1]: it is the decay kept on the "
      f"old running value (Flax convention). PyTorch's momentum=p is "
      f"momentum=") + r".?1 - p"):
    bn(momentum=momentum)


def test_momentum_bounds_are_allowed():
  for momentum in (0.0, 1.0, 0.1, jnp.float32(0.5)):
    jax.eval_shape(lambda: bn(momentum=momentum))


@pytest.mark.parametrize("epsilon", [0.0, -1e-5, 0])
def test_epsilon_must_be_positive(epsilon):
  with pytest.raises(ValueError, match=re.escape(
      f"epsilon={epsilon!r} must be a Python number > 0")):
    bn(epsilon=epsilon)


def test_epsilon_must_be_static():
  with pytest.raises(ValueError, match="must be a Python number > 0"):
    jax.jit(lambda e: bn(epsilon=e))(jnp.float32(1e-5))


@pytest.mark.parametrize("sync", ["allgather", "PSUM", None])
def test_unknown_sync(sync):
  with pytest.raises(ValueError, match=re.escape(
      f"sync={sync!r}; expected one of ('psum', 'gather')")):
    bn(sync=sync)


# --------------------------------------------------------------------------
# axis_index_groups


def test_axis_index_groups_need_axis_name():
  with pytest.raises(ValueError, match="axis_index_groups needs an axis_name"):
    bn(axis_index_groups=[[0, 1], [2, 3]])


def test_axis_index_groups_of_unequal_size():
  with pytest.raises(ValueError, match=re.escape(
      "axis_index_groups=((0, 1, 2), (3,)) must be groups of equal size")):
    jax.pmap(lambda x: bn(x=x, axis_name="batch",
                          axis_index_groups=[[0, 1, 2], [3]]),
             axis_name="batch")(jnp.ones((4, 2, 3)))


# --------------------------------------------------------------------------
# mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_mask_must_be_boolean(dtype):
  with pytest.raises(TypeError, match=re.escape(
      f"mask must be boolean, got dtype {jnp.dtype(dtype)}")):
    bn(mask=jnp.ones(8, dtype))


@pytest.mark.parametrize("shape", [(8, 2), (2, 8, 3), (8, 3, 1)])
def test_bad_mask_shape(shape):
  with pytest.raises(ValueError, match=re.escape(
      f"mask of shape {shape} is not broadcastable to x of shape (8, 3) nor "
      f"to x without its feature axes (8,)")):
    bn(mask=jnp.ones(shape, bool))


@pytest.mark.parametrize("shape", [(5,), (3,)])
def test_bad_mask_shape_message_shows_the_shape_passed(shape):
  """Bug: a 1-D mask was reported with the feature axis added: (5, 1)."""
  with pytest.raises(ValueError, match=re.escape(
      f"mask of shape {shape} is not broadcastable to x of shape (8, 3) nor "
      f"to x without its feature axes (8,)")):
    bn(mask=jnp.ones(shape, bool))


@pytest.mark.parametrize("shape", [(8,), (8, 3), (8, 1), (1, 3), (1,)])
def test_good_mask_shapes(shape):
  jax.eval_shape(lambda: bn(mask=jnp.ones(shape, bool)))


# --------------------------------------------------------------------------
# One value per feature in training


@pytest.mark.parametrize("shape,axis", [((1, 3), -1), ((1, 3, 1, 1), 1)])
def test_one_value_per_feature_in_training(shape, axis):
  with pytest.raises(ValueError, match=re.escape(
      f"Expected more than 1 value per feature when training, got 1 value(s) "
      f"for input of shape {shape} with axis={axis!r}")):
    bn(x=jnp.ones(shape), axis=axis)


def test_one_value_per_feature_is_fine_in_eval():
  y, state = bn(x=jnp.ones((1, 3)), train=False)
  assert state is STATE
  np.testing.assert_allclose(y, np.full((1, 3), 1 / np.sqrt(1 + 1e-5)),
                             rtol=1e-6)


def test_one_value_per_device_is_fine_across_devices():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  y, new_state = jax.pmap(
      lambda x: bn(x=x, axis_name="batch", momentum=0.0),
      axis_name="batch")(x.reshape(4, 1, 3))
  ref = reference.forward(x, momentum=0.0)
  np.testing.assert_allclose(y.reshape(4, 3), ref.y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state["var"][0], ref.new_var, rtol=1e-5)


def test_one_value_on_a_single_device_axis():
  with pytest.raises(ValueError, match=re.escape(
      "Expected more than 1 value per feature when training, got 1 value(s) "
      "per device")):
    jax.vmap(lambda x: bn(x=x, axis_name="b"), axis_name="b")(
        jnp.ones((1, 1, 3)))


# --------------------------------------------------------------------------
# axis_name outside a mapped context


_UNBOUND = re.escape(
    "batch_norm got axis_name='batch', but no enclosing transform binds that "
    "axis name") + ".*" + re.escape(
        "Call it inside jax.shard_map, jax.pmap or jax.vmap with "
        "axis_name='batch'; under plain jax.jit with a batch-sharded array "
        "pass axis_name=None")


def test_axis_name_outside_mapped_context():
  with pytest.raises(NameError, match=_UNBOUND):
    bn(axis_name="batch")


def test_axis_name_under_plain_jit():
  with pytest.raises(NameError, match=_UNBOUND):
    jax.jit(lambda x: bn(x=x, axis_name="batch"))(X)


def test_axis_name_under_a_differently_named_map(mesh):
  with pytest.raises(NameError, match=_UNBOUND):
    jax.vmap(lambda x: bn(x=x, axis_name="batch"), axis_name="other")(
        jnp.ones((2, 8, 3)))
  with pytest.raises(NameError, match=_UNBOUND):
    jax.jit(jax.shard_map(lambda x: bn(x=x, axis_name="batch")[0],
                          mesh=jax.sharding.Mesh(mesh.devices, ("data",)),
                          in_specs=P("data"), out_specs=P("data")))(
                              jnp.ones((8, 3)))


def test_axis_name_is_not_checked_in_eval():
  y, state = bn(axis_name="batch", train=False)
  assert state is STATE
  assert y.shape == X.shape
