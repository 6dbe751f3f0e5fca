"""Cross-device behaviour of jbn.batch_norm on the 4 forced CPU devices.

Every mapped result is compared with the single-device result on the
concatenated batch (float64 reference for values, jbn itself for gradients).
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
import reference

N_DEV = 4
SYNCS = ["psum", "gather"]
STAT_TOL = dict(rtol=1e-5, atol=1e-6)
Y_TOL = dict(rtol=1e-5, atol=1e-5)


def _problem(rng, shape):
  """x with per-feature offsets; random params; running stats near the data."""
  c = shape[-1]
  x = jnp.asarray(rng.normal(size=c) * 2 + rng.normal(size=shape),
                  jnp.float32)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  state = {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}
  return x, params, state


def _per_device(tree):
  """Adds a leading axis so that out_specs=P('batch') returns every copy."""
  return jax.tree.map(lambda a: a[None], tree)


def _shard_map(f, mesh, in_specs, out_specs):
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                               out_specs=out_specs))


def _sharded_bn(mesh, *, masked=False, **kw):
  """shard_map'd train step: y sharded, the state of every device stacked."""
  def f(p, s, x, m):
    y, new_state = jbn.batch_norm(p, s, x, True, axis_name="batch",
                                  mask=m, **kw)
    return y, _per_device(new_state)
  in_specs = (P(), P(), P("batch"), P("batch") if masked else None)
  return _shard_map(f, mesh, in_specs, (P("batch"), P("batch")))


def _assert_every_device(new_state, ref):
  for d in range(N_DEV):
    np.testing.assert_allclose(new_state["mean"][d], ref.new_mean, **STAT_TOL)
    np.testing.assert_allclose(new_state["var"][d], ref.new_var, **STAT_TOL)


def _count(op, hlo):
  """Collectives of kind ``op`` in compiled HLO text (after XLA's passes)."""
  return len(re.findall(rf"\s{op}(?:-start)?\(", hlo))


def _count_issued(op, lowered):
  """Collectives of kind ``op`` jbn issued, before XLA combines any."""
  return len(re.findall(rf'"stablehlo\.{op.replace("-", "_")}"',
                        lowered.as_text()))


def _counts(op, lowered):
  return _count_issued(op, lowered), _count(op, lowered.compile().as_text())


# --------------------------------------------------------------------------
# Forward: mapped == single device on the concatenated batch


@pytest.mark.parametrize("sync", SYNCS)
def test_shard_map_matches_single_device(rng, mesh, sync):
  x, params, state = _problem(rng, (16, 2, 2, 5))  # 4 rows per device
  ref = reference.forward(x, params["scale"], params["bias"], state["mean"],
                          state["var"], momentum=0.9)
  y, new_state = _sharded_bn(mesh, momentum=0.9, sync=sync)(params, state, x,
                                                            None)
  np.testing.assert_allclose(y, ref.y, **Y_TOL)
  _assert_every_device(new_state, ref)


@pytest.mark.parametrize("sync", SYNCS)
def test_pmap_matches_single_device(rng, sync):
  x, params, state = _problem(rng, (16, 3))
  ref = reference.forward(x, params["scale"], params["bias"], state["mean"],
                          state["var"], momentum=0.9)
  y, new_state = jax.pmap(
      lambda x: jbn.batch_norm(params, state, x, True, axis_name="batch",
                               momentum=0.9, sync=sync),
      axis_name="batch")(x.reshape(N_DEV, 4, 3))
  np.testing.assert_allclose(y.reshape(16, 3), ref.y, **Y_TOL)
  _assert_every_device(new_state, ref)


@pytest.mark.parametrize("sync", SYNCS)
def test_vmap_axis_name_matches_single_device(rng, sync):
  x, params, state = _problem(rng, (16, 3))
  ref = reference.forward(x, params["scale"], params["bias"], state["mean"],
                          state["var"], momentum=0.9)
  y, new_state = jax.jit(jax.vmap(
      lambda x: jbn.batch_norm(params, state, x, True, axis_name="batch",
                               momentum=0.9, sync=sync),
      axis_name="batch"))(x.reshape(N_DEV, 4, 3))
  np.testing.assert_allclose(y.reshape(16, 3), ref.y, **Y_TOL)
  _assert_every_device(new_state, ref)


def test_jit_with_batch_sharded_input_needs_no_axis_name(rng, mesh):
  x, params, state = _problem(rng, (16, 2, 5))
  f = jax.jit(lambda p, s, x: jbn.batch_norm(p, s, x, True, momentum=0.9))
  y_ref, s_ref = f(params, state, x)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
  y, new_state = f(params, state, x_sharded)
  assert y.sharding.is_equivalent_to(x_sharded.sharding, y.ndim)
  np.testing.assert_allclose(y, y_ref, **Y_TOL)
  chex.assert_trees_all_close(new_state, s_ref, **STAT_TOL)
  ref = reference.forward(x, params["scale"], params["bias"], state["mean"],
                          state["var"], momentum=0.9)
  np.testing.assert_allclose(new_state["var"], ref.new_var, **STAT_TOL)
  # The partitioner made the reductions global with collectives.
  hlo = f.lower(params, state, x_sharded).compile().as_text()
  assert _count("all-reduce", hlo) >= 1


@pytest.mark.parametrize("sync", SYNCS)
def test_axis_index_groups_under_pmap(rng, sync):
  x, params, state = _problem(rng, (16, 3))
  groups = [[0, 1], [2, 3]]
  y, new_state = jax.pmap(
      lambda x: jbn.batch_norm(params, state, x, True, axis_name="batch",
                               axis_index_groups=groups, momentum=0.9,
                               sync=sync),
      axis_name="batch")(x.reshape(N_DEV, 4, 3))
  for g, members in enumerate(groups):
    rows = slice(8 * g, 8 * g + 8)  # the rows of the group's two devices
    ref = reference.forward(x[rows], params["scale"], params["bias"],
                            state["mean"], state["var"], momentum=0.9)
    for d in members:
      np.testing.assert_allclose(y[d], ref.y[4 * (d % 2):4 * (d % 2) + 4],
                                 **Y_TOL)
      np.testing.assert_allclose(new_state["mean"][d], ref.new_mean,
                                 **STAT_TOL)
      np.testing.assert_allclose(new_state["var"][d], ref.new_var, **STAT_TOL)


def test_axis_index_groups_under_shard_map_is_refused(rng, mesh):
  """JAX does not implement groups under shard_map: it must fail, loudly."""
  x, params, state = _problem(rng, (16, 3))
  f = _sharded_bn(mesh, axis_index_groups=[[0, 1], [2, 3]])
  with pytest.raises(NotImplementedError):
    f(params, state, x, None)


# --------------------------------------------------------------------------
# Masks: sums and counts are reduced together (not a mean of device means)


@pytest.mark.parametrize("mask_kind", ["rows", "full"])
@pytest.mark.parametrize("sync", SYNCS)
def test_mask_with_unequal_valid_counts_per_device(rng, mesh, sync,
                                                   mask_kind):
  x, params, state = _problem(rng, (16, 3))  # 4 rows per device
  rows = np.zeros(16, bool)
  rows[0] = True  # device 0: 1 valid row
  rows[4:8] = True  # device 1: 4 valid rows; devices 2 and 3: none
  mask = rows if mask_kind == "rows" else np.broadcast_to(rows[:, None],
                                                          (16, 3))
  valid = np.asarray(x, np.float64)[rows]
  y, new_state = _sharded_bn(mesh, masked=True, momentum=0.0, sync=sync)(
      params, state, x, jnp.asarray(mask))
  for d in range(N_DEV):
    np.testing.assert_allclose(new_state["mean"][d], valid.mean(0),
                               **STAT_TOL)
    np.testing.assert_allclose(new_state["var"][d], valid.var(0), **STAT_TOL)
  # Single device, same mask: same numbers.
  ref = reference.forward(x, params["scale"], params["bias"], state["mean"],
                          state["var"], momentum=0.0, mask=mask)
  np.testing.assert_allclose(y, ref.y, **Y_TOL)


@pytest.mark.parametrize("sync", SYNCS)
def test_all_masked_across_devices_keeps_state(rng, mesh, sync):
  x, params, state = _problem(rng, (16, 3))
  y, new_state = _sharded_bn(mesh, masked=True, sync=sync)(
      params, state, x, jnp.zeros(16, bool))
  for d in range(N_DEV):
    np.testing.assert_array_equal(new_state["mean"][d], state["mean"])
    np.testing.assert_array_equal(new_state["var"][d], state["var"])
  assert np.all(np.isfinite(y))


# --------------------------------------------------------------------------
# Gradients


def _single_device_grads(params, state, x, ct):
  return jax.jit(jax.grad(
      lambda p, x: jnp.sum(ct * jbn.batch_norm(p, state, x, True)[0]),
      argnums=(0, 1)))(params, x)


def _sharded_grad_fn(mesh, state, sync):
  def grads(p, x, ct):
    return jax.grad(lambda p, x: jnp.sum(ct * jbn.batch_norm(
        p, state, x, True, axis_name="batch", sync=sync)[0]),
                    argnums=(0, 1))(p, x)
  return _shard_map(grads, mesh, (P(), P("batch"), P("batch")),
                    (P(), P("batch")))


def test_shard_map_grads_match_single_device(rng, mesh):
  x, params, state = _problem(rng, (16, 2, 5))
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  want = _single_device_grads(params, state, x, ct)
  # Replicated (P()) params: their gradient comes out summed over devices,
  # i.e. the gradient of the total loss.
  got = _sharded_grad_fn(mesh, state, "psum")(params, x, ct)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  ref = reference.grads(x, params["scale"], params["bias"], ct)
  np.testing.assert_allclose(got[1], ref[0], rtol=1e-4, atol=1e-4)


def test_sync_gather_grads_under_shard_map(rng, mesh):
  """Bug: the VJP of sync='gather' returns a device-varying scale cotangent.

  With the all_gather result typed as varying, ``jax.grad`` under
  ``jax.shard_map`` fails with "Custom VJP bwd rule must produce an output
  with the same type as the args tuple" for a replicated ``scale``.
  """
  x, params, state = _problem(rng, (16, 2, 5))
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  want = _single_device_grads(params, state, x, ct)
  f = _sharded_grad_fn(mesh, state, "gather")
  got = f(params, x, ct)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  lowered = f.lower(params, x, ct)
  # One collective gathers the moments (forward), one all-reduce backward.
  assert _counts("all-gather", lowered) == (0, 0)
  assert _counts("all-reduce", lowered) == (2, 2)


def test_shard_map_without_axis_name_grads_are_summed_per_shard(rng, mesh):
  """Bug: per-device statistics (no axis_name) under shard_map.

  The VJP returned a device-varying cotangent for a replicated ``scale``, so
  ``jax.grad`` failed with "Custom VJP bwd rule must produce an output with
  the same type as the args tuple". The gradient of a replicated parameter
  is the sum over shards of each shard's own (local-statistics) gradient.
  """
  x, params, state = _problem(rng, (16, 2, 5))
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def grads(p, x, ct):
    return jax.grad(lambda p, x: jnp.sum(ct * jbn.batch_norm(
        p, state, x, True)[0]), argnums=(0, 1))(p, x)
  got_p, got_x = _shard_map(grads, mesh, (P(), P("batch"), P("batch")),
                            (P(), P("batch")))(params, x, ct)
  shards = [_single_device_grads(params, state, xs, cs) for xs, cs in
            zip(jnp.split(x, N_DEV), jnp.split(ct, N_DEV))]
  want_p = jax.tree.map(lambda *g: sum(g), *[g[0] for g in shards])
  want_x = jnp.concatenate([g[1] for g in shards])
  chex.assert_trees_all_close(got_p, want_p, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
  for i, (xs, cs) in enumerate(zip(jnp.split(x, N_DEV), jnp.split(ct, N_DEV))):
    ref = reference.grads(xs, params["scale"], params["bias"], cs)
    np.testing.assert_allclose(got_x[4 * i:4 * (i + 1)], ref[0], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("sync", SYNCS)
def test_pmap_grads_are_per_device_and_sum_to_single_device(rng, sync):
  x, params, state = _problem(rng, (16, 3))
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  want_p, want_x = _single_device_grads(params, state, x, ct)
  replicated = jax.tree.map(lambda a: jnp.stack([a] * N_DEV), params)
  got_p, got_x = jax.pmap(
      jax.grad(lambda p, x, ct: jnp.sum(ct * jbn.batch_norm(
          p, state, x, True, axis_name="batch", sync=sync)[0]),
               argnums=(0, 1)),
      axis_name="batch")(replicated, x.reshape(N_DEV, 4, 3),
                         ct.reshape(N_DEV, 4, 3))
  np.testing.assert_allclose(got_x.reshape(x.shape), want_x, rtol=1e-5,
                             atol=1e-5)
  # Each device gets the gradient of its own share of the loss (as with any
  # pmap'd loss); their sum is the single-device gradient.
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.sum(0), got_p), want_p,
                              rtol=1e-5, atol=1e-5)
  assert not np.allclose(got_p["scale"][0], want_p["scale"])


@pytest.mark.parametrize("sync", SYNCS)
def test_vmap_axis_name_grads_sum_to_single_device(rng, sync):
  x, params, state = _problem(rng, (16, 3))
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  want_p, want_x = _single_device_grads(params, state, x, ct)
  got_p, got_x = jax.jit(jax.vmap(
      jax.grad(lambda p, x, ct: jnp.sum(ct * jbn.batch_norm(
          p, state, x, True, axis_name="batch", sync=sync)[0]),
               argnums=(0, 1)),
      in_axes=(None, 0, 0), axis_name="batch"))(
          params, x.reshape(N_DEV, 4, 3), ct.reshape(N_DEV, 4, 3))
  np.testing.assert_allclose(got_x.reshape(x.shape), want_x, rtol=1e-5,
                             atol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.sum(0), got_p), want_p,
                              rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Cost: the number of collectives in the compiled program


@pytest.mark.parametrize("masked", [False, True])
def test_psum_forward_is_one_all_reduce_and_backward_one_more(rng, mesh,
                                                              masked):
  x, params, state = _problem(rng, (16, 2, 5))
  mask = jnp.asarray(rng.uniform(size=(16, 2)) < 0.5) if masked else None
  fwd = _sharded_bn(mesh, masked=masked).lower(params, state, x, mask)
  assert _counts("all-reduce", fwd) == (1, 1)
  assert _counts("all-gather", fwd) == (0, 0)

  def grads(p, x, m):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(jbn.batch_norm(
        p, state, x, True, axis_name="batch", mask=m)[0])),
                    argnums=(0, 1))(p, x)
  fwd_bwd = _shard_map(grads, mesh,
                       (P(), P("batch"), P("batch") if masked else None),
                       (P(), P("batch"))).lower(params, x, mask)
  assert _counts("all-reduce", fwd_bwd) == (2, 2)


def test_gather_forward_is_one_collective(rng, mesh):
  """sync='gather' gathers per-device moments with ONE all-reduce of rows."""
  x, params, state = _problem(rng, (16, 2, 5))
  fwd = _sharded_bn(mesh, sync="gather").lower(params, state, x, None)
  assert _counts("all-gather", fwd) == (0, 0)
  assert _counts("all-reduce", fwd) == (1, 1)


def test_collective_counter_sees_flax_two_all_reduces(rng, mesh):
  """The counter above is not vacuous: flax's two-pass variance needs 2."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x, params, state = _problem(rng, (16, 2, 5))
  model = nn.BatchNorm(use_running_average=False, use_fast_variance=False,
                       axis_name="batch")
  f = _shard_map(lambda v, x: model.apply(v, x, mutable=["batch_stats"])[0],
                 mesh, (P(), P("batch")), P("batch"))
  lowered = f.lower({"params": params, "batch_stats": state}, x)
  assert _counts("all-reduce", lowered) == (2, 2)


# --------------------------------------------------------------------------
# Accuracy across devices: 1e4 + N(0, 1), float32


def _large_offset_batch(seed):
  rng = np.random.default_rng(seed)
  return (1e4 + rng.standard_normal((256, 16))).astype(np.float32)


def _rel_var_err(var, x):
  true = np.var(np.asarray(x, np.float64), axis=0)
  return float(np.max(np.abs(np.asarray(var, np.float64) - true) / true))


def test_psum_accurate_when_running_mean_is_near_the_data(mesh):
  x = _large_offset_batch(0)
  xd = np.asarray(x, np.float64)
  params, _ = jbn.init(16)
  # A running mean two batch standard deviations away from the batch mean.
  state = {"mean": jnp.asarray(xd.mean(0) + 2 * xd.std(0), jnp.float32),
           "var": jnp.ones(16)}
  y, new_state = _sharded_bn(mesh, momentum=0.0)(params, state, x, None)
  assert _rel_var_err(new_state["var"][0], x) < 1e-4
  assert np.max(np.abs(np.std(np.asarray(y, np.float64), axis=0) - 1)) < 1e-3


def test_psum_inaccurate_with_fresh_state_far_from_the_data(mesh):
  """Documents the limit of sync='psum': the shift is the running mean."""
  x = _large_offset_batch(0)
  params, state = jbn.init(16)  # running mean 0, data at 1e4
  _, new_state = _sharded_bn(mesh, momentum=0.0)(params, state, x, None)
  assert _rel_var_err(new_state["var"][0], x) > 1e-3


def test_sync_gather_accurate_with_fresh_state(mesh):
  """Bug: sync='gather' merges absolute float32 device means (Chan's formula).

  Rounding each device mean at 1e4 (ulp ~1e-3) costs 6e-5 relative variance
  error typically and 1.6e-4 at worst over 20 seeds, against 7e-7 on one
  device. Gathering each device's shift and its mean relative to it, and
  merging the differences of the shifts, gives 6e-7.
  """
  params, state = jbn.init(16)  # running mean 0, data at 1e4
  f = _sharded_bn(mesh, momentum=0.0, sync="gather")
  for seed in range(5):
    x = _large_offset_batch(seed)
    _, new_state = f(params, state, x, None)
    assert _rel_var_err(new_state["var"][0], x) < 1e-5, seed
    # Single-device accuracy on the same batch, for the record.
    _, one = jbn.batch_norm(params, state, x, True, momentum=0.0)
    assert _rel_var_err(one["var"], x) < 1e-5


def test_sync_gather_state_is_replicated_under_shard_map(rng, mesh):
  """Bug: with sync='gather' new_state cannot leave shard_map as P().

  The all_gather result is typed as device-varying, so out_specs=P() for the
  state (what synced batch norm users write) fails the replication check.
  """
  x, params, state = _problem(rng, (16, 3))
  f = _shard_map(
      lambda p, s, x: jbn.batch_norm(p, s, x, True, axis_name="batch",
                                     sync="gather", momentum=0.9),
      mesh, (P(), P(), P("batch")), (P("batch"), P()))
  _, new_state = f(params, state, x)
  ref = reference.forward(x, params["scale"], params["bias"], state["mean"],
                          state["var"], momentum=0.9)
  np.testing.assert_allclose(new_state["var"], ref.new_var, **STAT_TOL)
