"""Batch renormalization, ghost batch norm and warm-start running statistics.

Checked against the numbers of the issue (worked out by hand), an
independent float64 NumPy/JAX reference written here from the papers'
definitions, PyTorch (per-group batch norm autograd), and plain batch norm.
"""

import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jbn
import jbn.linen
import jbn.nnx

F32 = dict(rtol=2e-6, atol=2e-6)

# The renorm example: one feature.
X = np.array([[1.], [2.], [3.], [6.]], np.float32)
W = np.array([[1.], [-2.], [.5], [3.]], np.float32)
PARAMS = {"scale": jnp.array([1.5]), "bias": jnp.array([.5])}
STATE = {"mean": jnp.array([1.]), "var": jnp.array([4.])}


def _step(clip, params=PARAMS, state=STATE, x=X, **kw):
  """y, new state and (dparams, dx) of sum(W * y), under jit."""
  @jax.jit
  def run(params, x, clip):
    def loss(p, x):
      y, new = jbn.batch_norm(p, state, x, True, epsilon=1e-3, momentum=0.99,
                              renorm=clip, **kw)
      return jnp.sum(W * y), (y, new)
    (_, (y, new)), grads = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new, grads
  return run(params, jnp.asarray(x), clip)


# --------------------------------------------------------------------------
# Batch renorm: the acceptance numbers


def test_renorm_clip_1_0_is_bitwise_plain_batch_norm():
  plain = _step(None)
  same = _step(jbn.RenormClip(1.0, 0.0))
  chex.assert_trees_all_equal(plain, same)


def test_renorm_acceptance_rmax3_dmax5_equals_eval_with_old_statistics():
  y, new, (dp, dx) = _step(jbn.RenormClip(3.0, 5.0))
  np.testing.assert_allclose(
      y[:, 0], [0.5, 1.2499063, 1.9998125, 4.2495313], **F32)
  y_eval, _ = jbn.batch_norm(PARAMS, STATE, X, False, epsilon=1e-3)
  np.testing.assert_allclose(y, y_eval, **F32)
  np.testing.assert_allclose(
      dx[:, 0], [1.2451047, -1.4865591, -0.0937383, 0.3351927], **F32)
  np.testing.assert_allclose(dp["scale"], [6.9991252], **F32)
  np.testing.assert_allclose(dp["bias"], [2.5], **F32)
  np.testing.assert_allclose(new["mean"], [1.02], **F32)
  np.testing.assert_allclose(new["var"], [3.995], **F32)


def test_renorm_acceptance_dmax_half_clips_d():
  y, _, (dp, _) = _step(jbn.RenormClip(3.0, 0.5))
  np.testing.assert_allclose(
      y[:, 0], [-0.2498125, 0.5000937, 1.25, 3.4997188], **F32)
  np.testing.assert_allclose(dp["scale"], [5.7494376], **F32)


def _renorm_reference(x, scale, bias, mean, var, eps, rmax, dmax, rmin,
                      mask=None):
  """Ioffe (2017), Algorithm 1, float64, with r and d held constant.

  Returns (y, (dx, dscale, dbias) as a function of the cotangent).
  """
  with jax.enable_x64(True):
    x = jnp.asarray(x, jnp.float64)
    m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(
        jnp.asarray(mask), x.shape)

    def f(x, scale, bias):
      n = jnp.sum(m, 0)
      mu = jnp.sum(jnp.where(m, x, 0), 0) / n
      sb = jnp.sqrt(jnp.sum(jnp.where(m, (x - mu) ** 2, 0), 0) / n + eps)
      s = jnp.sqrt(jnp.asarray(var, jnp.float64) + eps)
      r = jax.lax.stop_gradient(jnp.clip(sb / s, rmin, rmax))
      d = jax.lax.stop_gradient(
          jnp.clip((mu - jnp.asarray(mean, jnp.float64)) / s, -dmax, dmax))
      return scale * (r * (x - mu) / sb + d) + bias

    args = tuple(jnp.asarray(a, jnp.float64) for a in (x, scale, bias))
    y, vjp = jax.vjp(f, *args)

    def grads(ct):
      with jax.enable_x64(True):
        return [np.asarray(g) for g in vjp(jnp.asarray(ct, jnp.float64))]
    return np.asarray(y), grads


def _jbn_fwd_bwd(params, state, x, ct, **mode):
  """jbn's train-mode ``(y, dparams, dx)`` for the cotangent ``ct``, jitted."""
  @jax.jit
  def run(p, x):
    y, vjp = jax.vjp(
        lambda p, x: jbn.batch_norm(p, state, x, True, **mode)[0], p, x)
    return (y, *vjp(jnp.asarray(ct)))
  return run(params, jnp.asarray(x))


@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.2), (3.0, 5.0), (1.01, 0.0)])
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask"])
def test_renorm_matches_float64_reference(rng, rmax, dmax, masked):
  c = 5
  x = (rng.normal(size=(24, c)) * rng.uniform(0.5, 3, c)
       + rng.normal(size=c) * 2).astype(np.float32)
  mask = rng.uniform(size=(24, 1)) < 0.7 if masked else None
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  state = {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.2, 4, c), jnp.float32)}
  ct = rng.normal(size=x.shape).astype(np.float32)
  clip = jbn.RenormClip(rmax, dmax)

  y, dp, dx = _jbn_fwd_bwd(params, state, x, ct, renorm=clip, mask=mask)
  y_ref, vjp_ref = _renorm_reference(
      x, params["scale"], params["bias"], state["mean"], state["var"], 1e-5,
      rmax, dmax, 1 / rmax, mask)
  dx_ref, ds_ref, db_ref = vjp_ref(ct)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dp["scale"], ds_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dp["bias"], db_ref, rtol=1e-5, atol=1e-5)


def test_renorm_traced_clip_does_not_recompile():
  traces = []

  @jax.jit
  def step(step_no):
    traces.append(1)
    return jbn.batch_norm(PARAMS, STATE, X, True, epsilon=1e-3,
                          renorm=jbn.renorm_clip(step_no, warmup_steps=2,
                                                 rmax_steps=10, dmax_steps=6))
  outs = [step(jnp.int32(s))[0] for s in (0, 2, 6, 10, 100)]
  assert len(traces) == 1
  # Plain batch norm during the warm-up, eval-like once d and r are free.
  plain, _ = jbn.batch_norm(PARAMS, STATE, X, True, epsilon=1e-3)
  np.testing.assert_allclose(outs[0], plain, **F32)
  np.testing.assert_allclose(outs[1], plain, **F32)
  assert not np.allclose(outs[3], plain)


def test_renorm_clip_schedule():
  def at(s):
    c = jbn.renorm_clip(s, warmup_steps=10, rmax=3.0, dmax=5.0,
                        rmax_steps=30, dmax_steps=20)
    return float(c.rmax), float(c.dmax), float(c.rmin)
  assert at(0) == (1.0, 0.0, 1.0)
  assert at(10) == (1.0, 0.0, 1.0)
  np.testing.assert_allclose(at(15), (1.5, 2.5, 1 / 1.5), rtol=1e-6)
  np.testing.assert_allclose(at(20), (2.0, 5.0, 0.5), rtol=1e-6)
  np.testing.assert_allclose(at(30), (3.0, 5.0, 1 / 3), rtol=1e-6)
  np.testing.assert_allclose(at(10 ** 6), (3.0, 5.0, 1 / 3), rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rmax=0.5), "renorm_clip needs rmax >= 1 and dmax >= 0"),
    (dict(dmax=-1.0), "renorm_clip needs rmax >= 1 and dmax >= 0"),
    (dict(warmup_steps=10, rmax_steps=5), "warmup_steps <= rmax_steps"),
    (dict(warmup_steps=-1), "0 <= warmup_steps"),
])
def test_renorm_clip_bad_schedule(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    jbn.renorm_clip(0, **kwargs)


@pytest.mark.parametrize("clip,error,message", [
    ((3.0, 5.0), TypeError, "renorm must be None or a jbn.RenormClip"),
    (jbn.RenormClip(0.5, 1.0), ValueError, "renorm.rmax=0.5 must be >= 1"),
    (jbn.RenormClip(2.0, -1.0), ValueError, "renorm.dmax=-1.0 must be >= 0"),
    (jbn.RenormClip(2.0, 1.0, 1.5), ValueError,
     "renorm.rmin=1.5 must be in (0, 1]"),
])
def test_bad_renorm_argument(clip, error, message):
  with pytest.raises(error, match=re.escape(message)):
    jbn.batch_norm(PARAMS, STATE, X, True, renorm=clip)


def test_renorm_masked_out_feature_gets_r1_d0_and_keeps_state():
  x = np.array([[1., 5.], [2., 7.], [4., 9.]], np.float32)
  mask = np.array([[True, False]] * 3)
  state = {"mean": jnp.array([0., 100.]), "var": jnp.array([1., 50.])}
  params = {"scale": jnp.array([1., 2.]), "bias": jnp.array([0., 1.])}
  clip = jbn.RenormClip(3.0, 5.0)
  y, new = jbn.batch_norm(params, state, x, True, mask=mask, renorm=clip)
  y_plain, _ = jbn.batch_norm(params, state, x, True, mask=mask)
  np.testing.assert_array_equal(y[:, 1], y_plain[:, 1])  # r = 1, d = 0
  np.testing.assert_array_equal(new["mean"][1], 100.)
  np.testing.assert_array_equal(new["var"][1], 50.)


def test_renorm_with_damaged_running_statistics_falls_back_to_plain():
  state = {"mean": jnp.array([jnp.nan]), "var": jnp.array([-1.])}
  y, new = jbn.batch_norm(PARAMS, state, X, True, renorm=jbn.RenormClip(3, 5))
  y_plain, _ = jbn.batch_norm(PARAMS, state, X, True)
  np.testing.assert_array_equal(y, y_plain)
  assert np.all(np.isfinite(new["mean"])) and np.all(new["var"] > 0)


def test_renorm_forward_mode_matches_reverse_mode():
  clip = jbn.RenormClip(3.0, 5.0)
  f = lambda x: jbn.batch_norm(PARAMS, STATE, x, True, epsilon=1e-3,  # noqa
                               renorm=clip)[0]
  jac_fwd = jax.jacfwd(f)(jnp.asarray(X))
  jac_rev = jax.jacrev(f)(jnp.asarray(X))
  np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Ghost batch norm


XG = np.array([0, 1, 2, 3, 10, 11, 12, 13], np.float32)[:, None]


def test_ghost_acceptance():
  params, state = jbn.init(1)
  y, new = jbn.batch_norm(params, state, XG, True, momentum=0.9,
                          ghost_batch_size=4)
  group = [-1.341635, -0.447212, 0.447212, 1.341635]
  np.testing.assert_allclose(y[:, 0], group * 2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new["mean"], [0.65], **F32)
  np.testing.assert_allclose(new["var"], [1.025], **F32)


def test_ghost_gradients_equal_per_group_torch_batch_norm(rng):
  torch = pytest.importorskip("torch")
  c, g = 3, 4
  x = (rng.normal(size=(12, c)) * 2 + 1).astype(np.float32)
  ct = rng.normal(size=x.shape).astype(np.float32)
  scale = rng.uniform(0.5, 2, c).astype(np.float32)
  bias = rng.normal(size=c).astype(np.float32)
  params = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
  _, state = jbn.init(c)
  y, dp, dx = _jbn_fwd_bwd(params, state, x, ct, ghost_batch_size=g)

  xt = torch.tensor(x, requires_grad=True)
  st = torch.tensor(scale, requires_grad=True)
  bt = torch.tensor(bias, requires_grad=True)
  yt = torch.cat([torch.nn.functional.batch_norm(
      part, None, None, st, bt, training=True, eps=1e-5)
                  for part in torch.split(xt, g)])
  (yt * torch.tensor(ct)).sum().backward()
  np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dp["scale"], st.grad.numpy(), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(dp["bias"], bt.grad.numpy(), rtol=1e-5,
                             atol=1e-5)


def test_ghost_nhwc_groups_match_separate_calls(rng):
  x = jnp.asarray(rng.normal(size=(6, 3, 3, 4)) + 2, jnp.float32)
  params, state = jbn.init(4)
  y, new = jbn.batch_norm(params, state, x, True, ghost_batch_size=2,
                          momentum=0.5)
  parts = [jbn.batch_norm(params, state, x[i:i + 2], True, momentum=0.5)
           for i in (0, 2, 4)]
  np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts]),
                             rtol=1e-6, atol=1e-6)
  # One update: the mean over groups of their means and variances.
  batch_mean = np.mean([(p[1]["mean"] - 0.5 * 0) / 0.5 for p in parts], 0)
  batch_var = np.mean([(p[1]["var"] - 0.5 * 1) / 0.5 for p in parts], 0)
  np.testing.assert_allclose(new["mean"], 0.5 * batch_mean, rtol=1e-5)
  np.testing.assert_allclose(new["var"], 0.5 + 0.5 * batch_var, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e4, -3e5])
@pytest.mark.parametrize("g", [2, 8, 16])
def test_ghost_statistics_at_large_offsets(rng, offset, g):
  """Per-group variances stay exact to float32 far from zero.

  Groups of up to 15 values shift by ONE of their values (the pilot sample
  is at most 1/8 of a group): that value is within sqrt(g - 1) standard
  deviations of the group's mean, so the error stays ~g eps relative.
  """
  x = (offset + rng.normal(size=(128, 6)) * rng.uniform(0.1, 10, 6)).astype(
      np.float32)
  params, state = jbn.init(6)
  _, new = jbn.batch_norm(params, state, jnp.asarray(x), True, momentum=0.0,
                          ghost_batch_size=g)
  groups = x.astype(np.float64).reshape(-1, g, 6)
  # float32-level bounds with room for another CPU's summation order (a
  # zero shift is off by ~1 relative at 1e4, and by far more at 3e5).
  np.testing.assert_allclose(new["mean"], groups.mean(1).mean(0), rtol=1e-6,
                             atol=1e-5)
  np.testing.assert_allclose(new["var"], groups.var(1).mean(0), rtol=1e-5)


def test_ghost_masked_group_contributes_nothing(rng):
  x = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  mask = np.array([True] * 4 + [False] * 4)
  params, state = jbn.init(2)
  y, new = jbn.batch_norm(params, state, x, True, ghost_batch_size=4,
                          mask=mask, momentum=0.0)
  y0, new0 = jbn.batch_norm(params, state, x[:4], True, momentum=0.0)
  np.testing.assert_allclose(y[:4], y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(new["mean"], new0["mean"], rtol=1e-6)
  np.testing.assert_allclose(new["var"], new0["var"], rtol=1e-6)
  assert np.all(np.isfinite(y))


def test_ghost_eval_ignores_ghost_batch_size(rng):
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  params, state = jbn.init(3)
  y, _ = jbn.batch_norm(params, state, x, False, ghost_batch_size=4)
  y_plain, _ = jbn.batch_norm(params, state, x, False)
  np.testing.assert_array_equal(y, y_plain)


def test_ghost_and_renorm_compose_per_group(rng):
  x = jnp.asarray(rng.normal(size=(8, 2)) * 2 + 1, jnp.float32)
  params, _ = jbn.init(2)
  state = {"mean": jnp.array([0.5, -1.]), "var": jnp.array([2., 0.5])}
  clip = jbn.RenormClip(2.0, 1.0)
  y, _ = jbn.batch_norm(params, state, x, True, ghost_batch_size=4,
                        renorm=clip)
  for i in (0, 4):
    yi, _ = jbn.batch_norm(params, state, x[i:i + 4], True, renorm=clip)
    np.testing.assert_allclose(y[i:i + 4], yi, rtol=1e-6, atol=1e-6)


def test_ghost_bfloat16_in_and_out(rng):
  x = jnp.asarray(rng.normal(size=(8, 3)) + 100, jnp.bfloat16)
  params, state = jbn.init(3)
  y, new = jbn.batch_norm(params, state, x, True, ghost_batch_size=4)
  assert y.dtype == jnp.bfloat16 and new["var"].dtype == jnp.float32
  _, (dx,) = jax.value_and_grad(lambda x: jnp.sum(jbn.batch_norm(
      params, state, x, True, ghost_batch_size=4)[0].astype(jnp.float32)
      * jnp.arange(3.)), argnums=(0,))(x)
  assert dx.dtype == jnp.bfloat16 and np.all(np.isfinite(
      np.asarray(dx, np.float32)))


@pytest.mark.parametrize("shape,g", [((36, 5), 6), ((24, 1, 3, 2), 2),
                                     ((32, 5), 16), ((16, 4, 4, 3), 8)],
                         ids=["2d", "4d-small-groups", "2d-16", "4d"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "mask"])
def test_ghost_gradients_match_float64_reference(rng, shape, g, masked):
  # Groups of 6 values (on CPU: folded sums and tiles, odd sizes and two
  # axes included) and of 16 and 128 (reductions and broadcasts).
  c = shape[-1]
  x = (rng.normal(size=shape) * rng.uniform(0.5, 3, c)
       + rng.normal(size=c) * 2).astype(np.float32)
  lead = (shape[0],) + (1,) * (len(shape) - 1)
  mask = np.arange(shape[0]).reshape(lead) % 4 > 0 if masked else None
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  _, state = jbn.init(c)
  ct = rng.normal(size=shape).astype(np.float32)

  y, dp, dx = _jbn_fwd_bwd(params, state, x, ct, mask=mask,
                           ghost_batch_size=g)

  y_ref, dx_ref = np.zeros(shape), np.zeros(shape)
  ds_ref, db_ref = np.zeros(c), np.zeros(c)
  for i in range(0, shape[0], g):
    part = slice(i, i + g)
    m = None if mask is None else np.broadcast_to(
        mask[part], (g,) + shape[1:-1] + (1,)).reshape(-1, 1)
    # Plain batch norm of the group (r = 1, d = 0), features last.
    yi, vjp_ref = _renorm_reference(
        x[part].reshape(-1, c), params["scale"], params["bias"],
        state["mean"], state["var"], 1e-5, 1.0, 0.0, 1.0, m)
    dxi, dsi, dbi = vjp_ref(ct[part].reshape(-1, c))
    y_ref[part] = yi.reshape((g,) + shape[1:])
    dx_ref[part] = dxi.reshape((g,) + shape[1:])
    ds_ref += dsi
    db_ref += dbi
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dp["scale"], ds_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dp["bias"], db_ref, rtol=1e-5, atol=1e-5)


def _compiled_fwd_bwd(shape, dtype, **mode):
  """jbn's train-mode fwd+bwd (jax.vjp) compiled for this CPU, the state an
  argument as in training."""
  params, state = jbn.init(shape[-1])
  x = jax.ShapeDtypeStruct(shape, dtype)

  def fwd_bwd(p, s, x, dy):
    y, vjp = jax.vjp(
        lambda p, x: jbn.batch_norm(p, s, x, True, **mode)[0], p, x)
    return y, vjp(dy)

  return jax.jit(fwd_bwd).lower(params, state, x, x).compile()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 8, 8, 16), (256, 128)],
                         ids=["4d", "2d"])
def test_ghost_fwd_bwd_compiles_without_activation_sized_temporary(shape,
                                                                    dtype):
  """Compiled temporary memory of ghost fwd+bwd (jax.vjp), groups of 8.

  XLA:CPU used to merge the backward's per-group sums of the cotangent into
  dbias's sum and fuse them into dx's loop, materializing x-sized arrays
  (x's bytes times: 4-D 0.01 f32, 2.0 bf16; 2-D 1.6 f32, 5.3 bf16), and
  later halves of the backward's tiles (2-D 0.6 f32, 1.3 bf16). Now: 2-D
  0.38 f32, 0.75 bf16 (three per-group float32 vectors of 1/8 of x); 4-D
  0.13 f32, 0.26 bf16 (two float32 partial sums of 1/16 of x,
  _cpu.reduce_sum's partial fold, which made 4-D ghost steps 1.2-1.5x
  faster; 0.25 and 0.5 with 3 halvings instead of 4).
  """
  f32_bytes = int(np.prod(shape)) * 4
  temp = _compiled_fwd_bwd(shape, dtype, ghost_batch_size=8).memory_analysis(
  ).temp_size_in_bytes
  bound = f32_bytes // 10 * (4 if len(shape) == 2 else 2)
  assert temp < bound, (temp, f32_bytes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_renorm_clips_are_computed_once_per_feature_on_cpu(dtype):
  """Renorm's per-feature clips and selects stay out of the activation-sized
  loops of the compiled train step (XLA:CPU used to redo them for every
  element of y and dx: renorm fwd+bwd cost 1.13x plain batch norm, 1.3x in
  bf16; now ~1.0x, see README)."""
  shape = (32, 16, 16, 32)  # (XLA fuses all of a tiny program regardless)
  hlo = _compiled_fwd_bwd(shape, dtype,
                          renorm=jbn.RenormClip(3.0, 5.0)).as_text()
  big = ",".join(map(str, shape))
  loops = [c for c in hlo.split("\n\n") if f"[{big}]" in c
           and not c.lstrip().startswith("ENTRY")]
  assert loops, hlo
  assert not [c.splitlines()[0] for c in loops if "clamp(" in c]


def test_ghost_bf16_reductions_read_the_input_in_place_on_cpu():
  """Every reduction of a bfloat16 ghost step reads a bitcast of its input.

  With the ghost view taken after the CPU barriers, XLA:CPU converted x (and
  the cotangent) to float32 in their own shape and reshaped that inside each
  reduction fusion, a form YNNPACK reduces 2-6x slower (bf16 ghost fwd+bwd
  was 2.3-4.2x plain batch norm on 4-D inputs; now ~1.0x).
  """
  shape = (32, 16, 16, 32)
  hlo = _compiled_fwd_bwd(shape, jnp.bfloat16, ghost_batch_size=8).as_text()
  whole = "f32[" + ",".join(map(str, shape)) + "]"
  reductions = [c for c in hlo.split("\n\n")
                if " reduce(" in c and "ENTRY" not in c]
  assert reductions, hlo
  assert not [c.splitlines()[0] for c in reductions if whole in c]


@pytest.mark.parametrize("batch,size,message", [
    (8, 3, "ghost_batch_size=3 must divide the batch size 8"),
    (4, 8, "It is larger than the batch"),
    (4, 0, "ghost_batch_size must be None or an int >= 1, got 0"),
    (4, 2.0, "ghost_batch_size must be None or an int >= 1, got 2.0"),
])
def test_ghost_bad_sizes(batch, size, message):
  params, state = jbn.init(2)
  with pytest.raises(ValueError, match=re.escape(message)):
    jbn.batch_norm(params, state, jnp.ones((batch, 2)), True,
                   ghost_batch_size=size)


def test_ghost_needs_the_batch_on_axis_0():
  params, state = jbn.init(4)
  with pytest.raises(ValueError, match="axis 0 is a feature axis"):
    jbn.batch_norm(params, state, jnp.ones((4, 3)), True, axis=0,
                   ghost_batch_size=2)


def test_ghost_of_one_value_is_the_one_value_error():
  params, state = jbn.init(2)
  with pytest.raises(ValueError, match="got 1 value.s. per ghost batch"):
    jbn.batch_norm(params, state, jnp.ones((4, 2)), True, ghost_batch_size=1)


def _collectives(text):
  """(kind, operand element count) of every all-reduce/all-gather issued."""
  out = []
  for m in re.finditer(r'"stablehlo\.(all_reduce|all_gather)"\((%[^)]*)\)'
                       r'.*?: \(([^)]*)\)', text, re.S):
    shapes = re.findall(r"tensor<([0-9x]*)x?f32>", m.group(3))
    size = max((int(np.prod([int(d) for d in s.split("x") if d]))
                for s in shapes), default=1)
    out.append((m.group(1), size))
  return out


def test_ghost_under_shard_map_keeps_groups_local(rng, mesh):
  """No collective touches x: one all-reduce of 3C values forward, one of
  the parameters' cotangents (C values each) backward; the state is the
  same on every device and equals one device's call on the whole batch
  (same groups)."""
  c = 3
  x = jnp.asarray(rng.normal(size=(16, c)) * 2 + 1, jnp.float32)
  params, state = jbn.init(c)

  def step(p, x):
    def loss(p, x):
      y, new = jbn.batch_norm(p, state, x, True, axis_name="batch",
                              ghost_batch_size=2)
      return jnp.sum(y * jnp.arange(1., c + 1)), new
    (g, new) = jax.grad(loss, argnums=0, has_aux=True)(p, x)
    return g, jax.tree.map(lambda a: a[None], new)

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")),
                            out_specs=(P(), P("batch"))))
  g, new = f(params, x)
  g1, new1 = jax.grad(lambda p: (lambda y, s: (jnp.sum(
      y * jnp.arange(1., c + 1)), s))(*jbn.batch_norm(
          p, state, x, True, ghost_batch_size=2)), has_aux=True)(params)
  for d in range(4):
    np.testing.assert_allclose(new["mean"][d], new1["mean"], rtol=1e-6)
    np.testing.assert_allclose(new["var"][d], new1["var"], rtol=1e-6)
  chex.assert_trees_all_close(g, g1, rtol=1e-5, atol=1e-5)
  text = f.lower(params, x).as_text()
  sizes = [size for _, size in _collectives(text)]
  assert sizes and max(sizes) <= 3 * c, sizes  # nothing of x's size


# --------------------------------------------------------------------------
# Warm start


def _run_means(batches, momentum, state):
  params = {}
  for b in batches:
    _, state = jbn.batch_norm(params, state, jnp.asarray(b, jnp.float32),
                              True, momentum=momentum)
  return state


def test_warm_start_acceptance_mean():
  # Batches whose means are 1, 2, 3, 4 (each symmetric around its mean).
  batches = [np.array([[m - 1.], [m + 1.]]) for m in (1, 2, 3, 4)]
  _, warm = jbn.init(1, warm_start=True)
  warm = _run_means(batches, 0.9, warm)
  np.testing.assert_allclose(warm["mean"], [2.5], **F32)
  assert warm["count"].dtype == jnp.int32 and int(warm["count"][0]) == 4
  plain = _run_means(batches, 0.9, jbn.init(1)[1])
  np.testing.assert_allclose(plain["mean"], [0.9049], rtol=1e-5)


def test_warm_start_acceptance_var():
  batches = [np.array([[-1.], [1.]]) * np.sqrt(2)] * 4  # variance 2
  warm = _run_means(batches, 0.9, jbn.init(1, warm_start=True)[1])
  np.testing.assert_allclose(warm["var"], [2.0], **F32)
  plain = _run_means(batches, 0.9, jbn.init(1)[1])
  np.testing.assert_allclose(plain["var"], [1.3439], rtol=1e-5)


def test_warm_start_is_the_plain_ema_from_step_11_at_momentum_0_9(rng):
  batches = [rng.normal(size=(6, 2)) + 3 for _ in range(14)]
  warm = _run_means(batches[:10], 0.9, jbn.init(2, warm_start=True)[1])
  np.testing.assert_allclose(warm["mean"], np.mean(
      [b.mean(0) for b in batches[:10]], 0), rtol=1e-5)  # exact average
  plain = {"mean": warm["mean"], "var": warm["var"]}
  for b in batches[10:]:
    warm = _run_means([b], 0.9, warm)
    plain = _run_means([b], 0.9, plain)
    np.testing.assert_array_equal(warm["mean"], plain["mean"])
    np.testing.assert_array_equal(warm["var"], plain["var"])


def test_warm_start_count_does_not_move_for_a_masked_out_feature():
  params, state = jbn.init(2, warm_start=True)
  x = jnp.array([[1., 2.], [3., 4.]])
  mask = jnp.array([[True, False], [True, False]])
  _, new = jbn.batch_norm(params, state, x, True, mask=mask)
  np.testing.assert_array_equal(new["count"], [1, 0])
  np.testing.assert_array_equal(new["mean"][1], 0.)
  np.testing.assert_array_equal(new["var"][1], 1.)


def test_warm_start_state_is_identical_across_devices(rng, mesh):
  x = jnp.asarray(rng.normal(size=(16, 3)) + 2, jnp.float32)
  mask = jnp.asarray(np.arange(16) < 5)  # unequal counts, two empty devices
  params, state = jbn.init(3, warm_start=True)

  def step(x, m):
    _, new = jbn.batch_norm(params, state, x, True, axis_name="batch",
                            mask=m, sync="gather")
    return jax.tree.map(lambda a: a[None], new)
  new = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("batch"),
                                                         P("batch")),
                              out_specs=P("batch")))(x, mask)
  _, one = jbn.batch_norm(params, state, x, True, mask=mask)
  for d in range(4):
    np.testing.assert_array_equal(new["count"][d], one["count"])
    np.testing.assert_allclose(new["mean"][d], one["mean"], rtol=1e-6)


def test_upgrade_state():
  _, state = jbn.init(3)
  up = jbn.upgrade_state(state)
  assert up["count"].dtype == jnp.int32
  assert set(up) == {"mean", "var", "count"}
  x = jnp.array([[1., 2., 3.], [3., 4., 5.]])
  # "Already warm": the update is the plain EMA.
  _, a = jbn.batch_norm({}, up, x, True, momentum=0.9)
  _, b = jbn.batch_norm({}, state, x, True, momentum=0.9)
  np.testing.assert_array_equal(a["mean"], b["mean"])
  # count=0: the next update replaces the statistics.
  _, c = jbn.batch_norm({}, jbn.upgrade_state(state, count=0), x, True)
  np.testing.assert_allclose(c["mean"], [2., 3., 4.])


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(count=-1), ValueError, "count must be >= 0"),
    (dict(count=1.5), TypeError, "count must be an int or an int array"),
    (dict(count=np.zeros(2, np.int32)), ValueError, "count has shape (2,)"),
])
def test_upgrade_state_errors(kwargs, error, message):
  _, state = jbn.init(3)
  with pytest.raises(error, match=re.escape(message)):
    jbn.upgrade_state(state, **kwargs)


def test_upgrade_state_refuses_warm_state():
  _, state = jbn.init(3, warm_start=True)
  with pytest.raises(ValueError, match="has a 'count' already"):
    jbn.upgrade_state(state)


def test_float_count_in_state_is_a_type_error():
  _, state = jbn.init(2)
  state = {**state, "count": jnp.zeros(2)}
  with pytest.raises(TypeError, match=re.escape(
      "state['count'] has dtype float32")):
    jbn.batch_norm({}, state, jnp.ones((3, 2)), True)


# --------------------------------------------------------------------------
# The Flax modules


def test_linen_fields_and_per_call_renorm_override():
  x = jnp.asarray(X)
  bn = jbn.linen.BatchNorm(use_running_average=False, epsilon=1e-3,
                           momentum=0.99, warm_start=True)
  v = bn.init(jax.random.key(0), x)
  assert v["batch_stats"]["count"].dtype == jnp.int32
  v = {"params": PARAMS, "batch_stats": {**STATE, "count": jnp.array([5])}}
  y_plain, _ = bn.apply(v, x, mutable=["batch_stats"])
  y_renorm, upd = bn.apply(v, x, mutable=["batch_stats"],
                           renorm=jbn.RenormClip(3.0, 5.0))
  np.testing.assert_allclose(
      y_renorm[:, 0], [0.5, 1.2499063, 1.9998125, 4.2495313], **F32)
  assert not np.allclose(y_plain, y_renorm)
  assert int(upd["batch_stats"]["count"][0]) == 6
  field = jbn.linen.BatchNorm(use_running_average=False, epsilon=1e-3,
                              renorm=jbn.RenormClip(3.0, 5.0))
  y_field, _ = field.apply({"params": PARAMS, "batch_stats": STATE}, x,
                           mutable=["batch_stats"])
  np.testing.assert_allclose(y_field, y_renorm, **F32)


def test_linen_ghost_batch_size_field():
  bn = jbn.linen.BatchNorm(use_running_average=False, momentum=0.9,
                           ghost_batch_size=4)
  v = bn.init(jax.random.key(0), XG)
  y, upd = bn.apply(v, XG, mutable=["batch_stats"])
  np.testing.assert_allclose(y[:4, 0], y[4:, 0], rtol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], [0.65], **F32)


def test_nnx_fields_renorm_ghost_warm_start():
  bn = jbn.nnx.BatchNorm(1, epsilon=1e-3, momentum=0.99, warm_start=True,
                         rngs=nnx.Rngs(0))
  assert isinstance(bn.count, nnx.BatchStat)
  bn.scale[...], bn.bias[...] = PARAMS["scale"], PARAMS["bias"]
  bn.mean[...], bn.var[...] = STATE["mean"], STATE["var"]
  bn.count[...] = jnp.array([5], jnp.int32)
  y = bn(jnp.asarray(X), renorm=jbn.RenormClip(3.0, 5.0))
  np.testing.assert_allclose(
      y[:, 0], [0.5, 1.2499063, 1.9998125, 4.2495313], **F32)
  assert int(bn.count[...][0]) == 6
  ghost = jbn.nnx.BatchNorm(1, momentum=0.9, ghost_batch_size=4,
                            rngs=nnx.Rngs(0))
  ghost(jnp.asarray(XG))
  np.testing.assert_allclose(ghost.mean[...], [0.65], **F32)


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(32, 16, rngs=rngs)
    self.bn = jbn.nnx.BatchNorm(16, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.dense(x)))


def test_nnx_tabulate_with_a_batch_of_one_works_as_with_flax():
  model = _MLP(nnx.Rngs(0))
  with pytest.warns(UserWarning, match="Expected more than 1 value"):
    table = nnx.tabulate(model, jnp.ones((1, 32)))
  assert "BatchNorm" in table
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert jax.eval_shape(model, jnp.ones((1, 32))).shape == (1, 16)
    y = model(jnp.ones((1, 32)))  # a forward probe: running statistics
  assert y.shape == (1, 16)
  np.testing.assert_array_equal(model.bn.var[...], np.ones(16))  # unchanged


def test_nnx_training_step_with_one_value_per_feature_fails_loudly():
  model = _MLP(nnx.Rngs(0))

  @nnx.jit
  def train_step(model, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match="Expected more than 1 value per "
                       "feature when training, got 1 value"):
      train_step(model, jnp.ones((1, 32)))
  np.testing.assert_array_equal(model.bn.var[...], np.ones(16))
  train_step(model, jnp.ones((2, 32)))  # a real batch trains


@pytest.mark.parametrize("sync", ["psum", "gather"])
def test_renorm_under_shard_map_equals_one_device_with_one_collective_each_way(
    rng, mesh, sync):
  c = 3
  x = jnp.asarray(rng.normal(size=(16, c)) * 2 + 1, jnp.float32)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  state = {"mean": jnp.asarray([0.5, 1., 1.5]), "var": jnp.asarray([1., 4.,
                                                                    .5])}
  clip = jbn.RenormClip(2.0, 0.5)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def loss(p, x, w, **kw):
    y, new = jbn.batch_norm(p, state, x, True, renorm=clip, **kw)
    return jnp.sum(w * y), new

  def step(p, x, w):
    (g, new) = jax.grad(loss, has_aux=True)(p, x, w, axis_name="batch",
                                            sync=sync)
    return g, jax.tree.map(lambda a: a[None], new)

  f = jax.jit(jax.shard_map(step, mesh=mesh,
                            in_specs=(P(), P("batch"), P("batch")),
                            out_specs=(P(), P("batch"))))
  g, new = f(params, x, w)
  g1, new1 = jax.grad(loss, has_aux=True)(params, x, w)
  chex.assert_trees_all_close(g, g1, rtol=1e-5, atol=1e-5)
  for d in range(4):
    np.testing.assert_allclose(new["mean"][d], new1["mean"], rtol=1e-6)
  issued = _collectives(f.lower(params, x, w).as_text())
  assert len(issued) == 2, issued  # statistics forward, cotangents backward
