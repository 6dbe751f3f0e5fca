"""The public moments API: jbn.moments, jbn.merge_moments, jbn.moments_mean_var.

Checked against float64 NumPy on the concatenated data.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jbn


def _var64(*batches):
  return np.concatenate(batches).astype(np.float64).var(0)


def test_issue_acceptance_four_batches_at_1e4_merge_within_1e_6():
  worst = 0.0
  for seed in range(10):
    r = np.random.default_rng(seed)
    batches = [(1e4 + r.normal(size=(256, 8))).astype(np.float32)
               for _ in range(4)]
    acc = jbn.Moments.empty(8)
    for b in batches:
      acc = jbn.merge_moments(acc, jbn.moments(jnp.asarray(b)))
    _, var = jbn.moments_mean_var(acc)
    ref = _var64(*batches)
    worst = max(worst, float(np.max(np.abs(np.asarray(var, float) - ref)
                                    / ref)))
    # What an unshifted float32 textbook variance gives on the same data.
    allx = jnp.asarray(np.concatenate(batches))
    naive = jnp.mean(allx ** 2, 0) - jnp.mean(allx, 0) ** 2
    assert np.max(np.abs(np.asarray(naive, float) - ref) / ref) > 1e-2
  assert worst <= 1e-6, worst


def test_lax_scan_over_batches_under_jit(rng):
  xs = jnp.asarray(rng.normal(size=(5, 32, 3)) * 2 + 7, jnp.float32)

  @jax.jit
  def run(xs):
    def body(acc, x):
      return jbn.merge_moments(acc, jbn.moments(x)), None
    acc, _ = jax.lax.scan(body, jbn.Moments.empty(3), xs)
    return jbn.moments_mean_var(acc)

  mean, var = run(xs)
  flat = np.asarray(xs, np.float64).reshape(-1, 3)
  np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, flat.var(0), rtol=1e-5)


def test_empty_is_neutral_and_order_does_not_matter(rng):
  a = jbn.moments(jnp.asarray(rng.normal(size=(7, 2)) + 3, jnp.float32))
  b = jbn.moments(jnp.asarray(rng.normal(size=(30, 2)) - 1, jnp.float32))
  empty = jbn.Moments.empty(2)
  for got in (jbn.merge_moments(empty, a), jbn.merge_moments(a, empty)):
    np.testing.assert_allclose(jbn.moments_mean_var(got),
                               jbn.moments_mean_var(a), rtol=1e-7)
  ab = jbn.moments_mean_var(jbn.merge_moments(a, b))
  ba = jbn.moments_mean_var(jbn.merge_moments(b, a))
  np.testing.assert_allclose(ab, ba, rtol=1e-6)


def test_masks_and_feature_axes(rng):
  x = (rng.normal(size=(6, 3, 4)) + 100).astype(np.float32)
  mask = rng.uniform(size=(6, 3)) < 0.6  # per (sample, feature)
  mask[0, 0] = True
  m = jbn.moments(jnp.asarray(x), axis=1, mask=jnp.asarray(mask)[..., None])
  assert m.count.shape == (3,)
  for c in range(3):
    vals = x[:, c, :][mask[:, c]].astype(np.float64).ravel()
    np.testing.assert_allclose(m.count[c], vals.size)
    mean, var = jbn.moments_mean_var(m)
    np.testing.assert_allclose(mean[c], vals.mean(), rtol=1e-6)
    np.testing.assert_allclose(var[c], vals.var(), rtol=1e-5, atol=1e-6)


def test_moments_are_differentiable(rng):
  x = jnp.asarray(rng.normal(size=(9, 2)) * 3 + 5, jnp.float32)

  def var_of(x):
    return jbn.moments_mean_var(jbn.moments(x))[1].sum()

  with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    ref = jax.grad(lambda x: jnp.var(x, 0).sum())(x64)
  np.testing.assert_allclose(jax.grad(var_of)(x), ref, rtol=1e-5, atol=1e-5)


def test_across_devices_with_unequal_masks_equals_one_device(rng, mesh):
  x = jnp.asarray(rng.normal(size=(16, 3)) * 2 + 1e3, jnp.float32)
  mask = jnp.asarray(np.isin(np.arange(16), [0, 4, 5, 6, 7, 15]))

  def f(x, m):
    return jax.tree.map(lambda a: a[None], jbn.moments(
        x, mask=m, axis_name="batch"))
  parts = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("batch"),
                                                        P("batch")),
                                out_specs=P("batch")))(x, mask)
  one = jbn.moments_mean_var(jbn.moments(x, mask=mask))
  for d in range(4):
    got = jbn.moments_mean_var(jax.tree.map(lambda a: a[d], parts))
    np.testing.assert_allclose(got, one, rtol=1e-6)
  ref = np.asarray(x, np.float64)[np.asarray(mask)]
  np.testing.assert_allclose(one[1], ref.var(0), rtol=1e-5)


@pytest.mark.parametrize("call,error,message", [
    (lambda: jbn.moments(jnp.arange(4)), TypeError,
     "moments expects a floating-point x, got dtype int32"),
    (lambda: jbn.moments(jnp.ones((3, 2)), axis=2), ValueError,
     "axis=2 is out of range for an input of rank 2"),
    (lambda: jbn.moments(jnp.ones((3, 2)), mask=jnp.ones(4, bool)),
     ValueError, "mask of shape (4,) is not broadcastable"),
    (lambda: jbn.moments(jnp.ones((3, 2)), axis_name="nope"), NameError,
     "nope"),
])
def test_moments_errors(call, error, message):
  with pytest.raises(error, match=re.escape(message)):
    call()


@pytest.mark.parametrize("shape,rows,per_group", [
    ((4, 8, 3), [0], True), ((4, 16, 3), [0, 8], True),
    ((64, 3), range(0, 64, 8), True), ((512, 3), range(0, 512, 32), True),
    ((64, 3), range(0, 64, 4), False), ((8, 3), range(8), False)])
def test_pilot_sample(rng, shape, rows, per_group):
  """The shift is the mean of a strided sample of 16 values; per group
  (ghost batches), of at most 1/8 of them: a group of 8 rows, its first.

  A sample of 16 values read every value of a ghost batch of 8: a whole
  extra pass over x (2-D ghost fwd+bwd was 1.2-1.8x plain batch norm).
  """
  from jbn import _moments
  x = rng.normal(size=shape).astype(np.float32) + 100
  axis = len(shape) - 2  # the group's rows (the ghost view's axis 1)
  shift = np.asarray(_moments.pilot_shift(jnp.asarray(x), (axis,),
                                          per_group=per_group))
  picked = np.take(x, list(rows), axis=axis).astype(np.float64)
  np.testing.assert_allclose(shift, picked.mean(axis, keepdims=True),
                             rtol=1e-6)
