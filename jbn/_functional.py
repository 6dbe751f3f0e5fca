"""The functional core: ``init`` and ``batch_norm``.

``batch_norm`` validates its arguments, asks :mod:`jbn._moments` for the batch
statistics (train mode), normalizes, and updates the running statistics. Its
backward pass is a closed-form ``jax.custom_vjp``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbn import _moments

Array = jax.Array
Axes = int | Sequence[int]


def init(feature_shape: int | Sequence[int], *, dtype: Any = jnp.float32,
         use_scale: bool = True, use_bias: bool = True):
  """Creates the parameters and running statistics of a batch norm layer.

  The trees match ``flax.linen.BatchNorm``'s variables: ``params`` holds
  ``'scale'`` (ones) and ``'bias'`` (zeros) in ``dtype``; ``state`` holds the
  running ``'mean'`` (zeros) and ``'var'`` (ones), always float32.

  Args:
    feature_shape: size of the feature axis, or a tuple of sizes when several
      axes are feature axes (e.g. ``(C,)`` for NHWC with ``axis=-1``).
    dtype: dtype of ``scale`` and ``bias`` (Flax's ``param_dtype``).
    use_scale: include a learned ``'scale'`` (gamma).
    use_bias: include a learned ``'bias'`` (beta).

  Returns:
    ``(params, state)``, two dicts.

  Example:
    >>> import jbn
    >>> params, state = jbn.init(3)
    >>> params
    {'scale': Array([1., 1., 1.], dtype=float32), 'bias': Array([0., 0., 0.], dtype=float32)}
    >>> state['var']
    Array([1., 1., 1.], dtype=float32)
  """
  shape = _as_shape(feature_shape, "feature_shape")
  params = {}
  if use_scale:
    params["scale"] = jnp.ones(shape, dtype)
  if use_bias:
    params["bias"] = jnp.zeros(shape, dtype)
  state = {"mean": jnp.zeros(shape, jnp.float32),
           "var": jnp.ones(shape, jnp.float32)}
  return params, state


def batch_norm(params: Mapping[str, Array], state: Mapping[str, Array],
               x: Array, train: bool | Array, *, axis: Axes = -1,
               momentum: float | Array = 0.99, epsilon: float = 1e-5,
               axis_name: Any = None, axis_index_groups: Any = None,
               mask: Array | None = None, dtype: Any = None,
               sync: str = "psum"):
  r"""Batch normalization, with its running statistics threaded explicitly.

  In training (``train=True``), with :math:`\mu, \sigma^2` the mean and the
  biased (population) variance of ``x`` over every axis but ``axis`` (and
  across ``axis_name``, and only where ``mask`` is set):

  .. math::
     y = \mathrm{scale} \cdot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}
         + \mathrm{bias}, \qquad
     \mathrm{mean}' = m \cdot \mathrm{mean} + (1 - m)\,\mu, \qquad
     \mathrm{var}' = m \cdot \mathrm{var} + (1 - m)\,\sigma^2

  with :math:`m` = ``momentum``, the decay kept on the old value (the
  Flax/Keras convention: PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here).
  The running variance is the *biased* batch variance, as in Flax (PyTorch
  stores the unbiased one). In evaluation (``train=False``) ``state['mean']``
  and ``state['var']`` replace :math:`\mu, \sigma^2` and ``state`` comes back
  unchanged.

  Numerics: statistics are computed in at least float32 whatever the input
  dtype, with shifted sums that do not cancel (see :mod:`jbn._moments`); the
  output has ``x.dtype`` (or ``dtype``); ``state`` keeps its dtype (float32).
  A feature with no valid element under ``mask`` keeps its running
  statistics; no NaN is ever written into ``state``.

  Cost: one read of ``x`` for the statistics and one for the output; with
  ``axis_name``, one collective in the forward and one all-reduce in the
  backward. The backward is closed form (a ``jax.custom_vjp``) and keeps only
  ``x`` and per-feature vectors as residuals. The running-statistics update
  carries no gradient.

  Args:
    params: mapping with ``'scale'`` and/or ``'bias'``, each of the feature
      shape; a missing key means no scale (1) / no bias (0).
    state: mapping with ``'mean'`` and ``'var'`` of the feature shape.
    x: input, any floating dtype.
    train: Python bool or boolean scalar (may be traced): use and update batch
      statistics (True) or use the running ones (False).
    axis: feature axis or axes, kept; statistics reduce over all the others.
      NHWC: ``-1``; NCHW: ``1``.
    momentum: decay of the running statistics, in [0, 1].
    epsilon: added to the variance, > 0.
    axis_name: name of a mapped axis (``jax.shard_map``, ``jax.pmap``,
      ``jax.vmap(axis_name=...)``) across which statistics are global (synced
      batch norm). Not needed under plain ``jax.jit`` with sharded arrays.
    axis_index_groups: groups of device indices along ``axis_name`` that
      share statistics (as in ``jax.lax.psum``; pmap only in current JAX).
    mask: boolean array broadcastable to ``x``, or to ``x`` without its
      feature axes; False elements do not count in the statistics (across
      devices too: sums and counts are reduced together).
    dtype: output dtype; default ``x.dtype``.
    sync: with ``axis_name``: ``"psum"`` (default) issues ONE all-reduce of
      sums shifted by the running mean: as accurate as a two-pass variance
      once the running mean is within a few batch standard deviations of
      the data (the running statistics must then be the same on all devices,
      as synced batch norm keeps them). ``"gather"`` all-gathers per-device
      ``(count, shift, mean - shift, M2)`` (4 x devices x C values, one
      collective) and merges them with Chan's formula: accurate whatever the
      running statistics are.

  Returns:
    ``(y, new_state)``: the normalized output and the updated running
    statistics (``state`` itself when ``train`` is False).

  Raises:
    TypeError: ``x`` is not floating point, or ``train`` is not a bool.
    ValueError: an axis is out of range or repeated; params/state do not
      have the feature shape of ``x``; ``momentum`` is outside [0, 1];
      ``epsilon`` <= 0; a single value per feature in training; a bad
      ``mask`` shape; an unknown ``sync``.
    NameError: ``axis_name`` is not bound by any enclosing mapped transform.

  Example:
    >>> import jax, jax.numpy as jnp, jbn
    >>> x = jnp.array([[1., 10.], [3., 30.]])
    >>> params, state = jbn.init(2)
    >>> y, state = jbn.batch_norm(params, state, x, train=True, momentum=0.9)
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> state['mean'], state['var']
    (Array([0.2, 2. ], dtype=float32), Array([  1. , 10.9], dtype=float32))
    >>> y_eval, same = jbn.batch_norm(params, state, x, train=False)
    >>> same is state
    True
  """
  cfg, x, mask, local_count = _validate(params, state, x, train, axis=axis,
                           momentum=momentum, epsilon=epsilon,
                           axis_name=axis_name,
                           axis_index_groups=axis_index_groups, mask=mask,
                           dtype=dtype, sync=sync)
  scale, bias = params.get("scale"), params.get("bias")
  mean, var = state["mean"], state["var"]

  def eval_branch():
    y = _apply(x, scale, bias, mean.reshape(cfg.bshape).astype(cfg.sdt),
               lax.rsqrt(var.reshape(cfg.bshape).astype(cfg.sdt)
                         + cfg.epsilon), cfg.out_dtype)
    return y, {**state}

  def train_branch():
    _check_bound(cfg, local_count)
    shift = mean.reshape(cfg.bshape)
    y, bmean, bvar, count = _train(cfg, x, scale, bias, shift, mask)
    bmean, bvar, count = (lax.stop_gradient(v).reshape(cfg.feature_shape)
                          for v in (bmean, bvar, jnp.broadcast_to(
                              count, bmean.shape)))
    keep = count > 0
    new_state = dict(state)
    for key, old, new in (("mean", mean, bmean), ("var", var, bvar)):
      upd = momentum * old + (1 - momentum) * new
      new_state[key] = jnp.where(keep, upd, old).astype(old.dtype)
    return y, new_state

  if isinstance(train, (bool, np.bool_)):
    if train:
      return train_branch()
    y, _ = eval_branch()
    return y, state
  return lax.cond(train, train_branch, eval_branch)


# --------------------------------------------------------------------------
# Validation


class _Config(NamedTuple):
  """Static description of one call (hashable: a custom_vjp nondiff arg)."""

  red_axes: tuple[int, ...]
  bshape: tuple[int, ...]  # feature sizes at feature axes, 1 elsewhere
  feature_shape: tuple[int, ...]
  epsilon: float
  axis_name: Any
  axis_index_groups: Any
  sync: str
  sdt: Any
  out_dtype: Any


def _as_shape(value, name) -> tuple[int, ...]:
  if isinstance(value, numbers.Integral):
    shape = (value,)
  elif isinstance(value, (tuple, list)):
    shape = tuple(value)
  else:
    shape = (value,)  # rejected below, with the value in the message
  if not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape):
    raise ValueError(f"{name} must be an int or a tuple of non-negative ints, "
                     f"got {value!r}.")
  return tuple(int(s) for s in shape)


def _canonical_axes(axis, ndim) -> tuple[int, ...]:
  axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  out = []
  for a in axes:
    if not isinstance(a, numbers.Integral) or not -ndim <= a < ndim:
      raise ValueError(
          f"axis={axis!r} is out of range for an input of rank {ndim}: each "
          f"feature axis must be an int in [{-ndim}, {ndim - 1}] (NHWC: "
          f"axis=-1; NCHW: axis=1).")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"axis={axis!r} names the same axis twice.")
  return tuple(sorted(out))


def _concrete(value):
  """``value`` as a Python number if it is known at trace time, else None."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def _validate(params, state, x, train, *, axis, momentum, epsilon, axis_name,
              axis_index_groups, mask, dtype, sync):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"batch_norm expects a floating-point x, got dtype {x.dtype}; cast it "
        f"first, e.g. x.astype(jnp.float32).")
  if not (isinstance(train, (bool, np.bool_))
          or (hasattr(train, "dtype") and jnp.ndim(train) == 0
              and jnp.issubdtype(train.dtype, jnp.bool_))):
    raise TypeError(f"train must be a Python bool or a boolean scalar array, "
                    f"got {train!r}.")
  if x.ndim == 0:
    raise ValueError("batch_norm expects x of rank >= 1, got a scalar.")
  feat_axes = _canonical_axes(axis, x.ndim)
  red_axes = tuple(a for a in range(x.ndim) if a not in feat_axes)
  feature_shape = tuple(x.shape[a] for a in feat_axes)
  bshape = tuple(x.shape[a] if a in feat_axes else 1 for a in range(x.ndim))

  if not isinstance(params, Mapping) or not isinstance(state, Mapping):
    raise TypeError("params and state must be mappings (dicts), as returned "
                    "by jbn.init.")
  unknown = set(params) - {"scale", "bias"}
  if unknown:
    raise ValueError(f"params has unexpected keys {sorted(unknown)}; expected "
                     f"'scale' and/or 'bias'.")
  missing = {"mean", "var"} - set(state)
  if missing:
    raise ValueError(f"state is missing {sorted(missing)}; expected 'mean' and "
                     f"'var' (see jbn.init).")
  for tree, name, keys in ((params, "params", ("scale", "bias")),
                           (state, "state", ("mean", "var"))):
    for key in keys:
      if key in tree and tuple(jnp.shape(tree[key])) != feature_shape:
        raise ValueError(
            f"{name}['{key}'] has shape {tuple(jnp.shape(tree[key]))} but x of "
            f"shape {x.shape} with axis={axis!r} has feature shape "
            f"{feature_shape}. Create them with jbn.init({feature_shape}), or "
            f"pass the axis your features are on.")

  m = _concrete(momentum)
  if m is not None and not 0.0 <= m <= 1.0:
    raise ValueError(
        f"momentum={momentum!r} must be in [0, 1]: it is the decay kept on the "
        f"old running value (Flax convention). PyTorch's momentum=p is "
        f"momentum=1 - p here.")
  eps = _concrete(epsilon)
  if eps is None or not eps > 0:
    raise ValueError(f"epsilon={epsilon!r} must be a Python number > 0.")
  if sync not in _moments.SYNC_MODES:
    raise ValueError(f"sync={sync!r}; expected one of {_moments.SYNC_MODES}.")
  if axis_index_groups is not None:
    if axis_name is None:
      raise ValueError("axis_index_groups needs an axis_name.")
    axis_index_groups = tuple(tuple(int(i) for i in g)
                              for g in axis_index_groups)
    if len({len(g) for g in axis_index_groups}) != 1:
      raise ValueError(f"axis_index_groups={axis_index_groups!r} must be groups "
                       f"of equal size.")

  if mask is not None:
    mask = jnp.asarray(mask)
    given_shape = mask.shape
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be boolean, got dtype {mask.dtype}.")
    if mask.ndim == x.ndim - len(feat_axes) and mask.ndim != x.ndim:
      mask = jnp.expand_dims(mask, feat_axes)
    ok = mask.ndim == x.ndim and all(
        m in (1, s) for m, s in zip(mask.shape, x.shape))
    if not ok:
      raise ValueError(
          f"mask of shape {given_shape} is not broadcastable to x of shape "
          f"{x.shape} nor to x without its feature axes "
          f"{tuple(x.shape[a] for a in red_axes)}.")
  local_count = None if mask is not None else math.prod(
      x.shape[a] for a in red_axes)
  if axis_name is None and local_count == 1 and not (
      isinstance(train, (bool, np.bool_)) and not train):
    raise ValueError(_ONE_VALUE.format(
        n=1, shape=f"for input of shape {x.shape} with axis={axis!r}"))

  sdt = _moments.stat_dtype(x.dtype)
  out_dtype = jnp.dtype(dtype) if dtype is not None else x.dtype
  cfg = _Config(red_axes=red_axes, bshape=bshape, feature_shape=feature_shape,
                epsilon=float(eps), axis_name=axis_name,
                axis_index_groups=axis_index_groups, sync=sync, sdt=sdt,
                out_dtype=out_dtype)
  return cfg, x, mask, local_count


def _check_bound(cfg: _Config, local_count: int | None):
  """Fails early, and clearly, on an unbound axis_name or a 1-value batch."""
  if cfg.axis_name is None:
    return
  try:
    size = _moments.axis_size(cfg.axis_name, cfg.axis_index_groups)
  except NameError as e:
    raise NameError(
        f"batch_norm got axis_name={cfg.axis_name!r}, but no enclosing "
        f"transform binds that axis name ({e}). Call it inside jax.shard_map, "
        f"jax.pmap or jax.vmap with axis_name={cfg.axis_name!r}; under plain "
        f"jax.jit with a batch-sharded array pass axis_name=None, the "
        f"statistics are already global.") from None
  if local_count is not None and local_count * size == 1:
    raise ValueError(_ONE_VALUE.format(shape="per device", n=1))


_ONE_VALUE = (
    "Expected more than 1 value per feature when training, got {n} value(s) "
    "{shape}: every batch statistic would come from one value (output = "
    "bias, variance -> 0). Use a larger batch, train=False, or an axis_name "
    "to share statistics across devices.")


# --------------------------------------------------------------------------
# Normalization and its closed-form backward


def _apply(x, scale, bias, mean, inv, out_dtype):
  """y = (x - mean) * (inv * scale) + bias, in the stat dtype, cast once."""
  a = inv if scale is None else inv * scale.reshape(inv.shape).astype(inv.dtype)
  y = (x.astype(inv.dtype) - mean) * a
  if bias is not None:
    y = y + bias.reshape(inv.shape).astype(inv.dtype)
  return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(cfg, x, scale, bias, shift, mask):
  """Train-mode forward: ``(y, batch_mean, batch_var, count)``, keepdims."""
  out, _ = _train_fwd(cfg, x, scale, bias, shift, mask)
  return out


def _train_fwd(cfg, x, scale, bias, shift, mask):
  mean, var, count = _moments.moments(
      x, cfg.red_axes, mask=mask, shift=shift, axis_name=cfg.axis_name,
      axis_index_groups=cfg.axis_index_groups, sync=cfg.sync)
  inv = lax.rsqrt(var + cfg.epsilon)
  y = _apply(x, scale, bias, mean, inv, cfg.out_dtype)
  residuals = (x, scale, bias, mean, inv, count, mask)
  return (y, mean, var, count), residuals


def _train_bwd(cfg, residuals, cts):
  x, scale, bias, mean, inv, count, mask = residuals
  sdt = inv.dtype
  ct = cts[0]  # the cotangents of the statistics are ignored
  # Two reductions, sum(gy) and sum(gy * (x - mean)), each on private
  # operands so that XLA fuses converts and products into them.
  (ct1, _, _), (ct2, x2, mean2) = _moments.independent((ct, x, mean), 2)
  sg = jnp.sum(ct1.astype(sdt), axis=cfg.red_axes, keepdims=True)
  sgx = jnp.sum(ct2.astype(sdt) * (x2.astype(sdt) - mean2),
                axis=cfg.red_axes, keepdims=True)
  # dx needs the sums over the whole (global) batch: ONE all-reduce.
  sg_all, sgx_all = _moments.all_reduce_sum([sg, sgx], cfg.axis_name,
                                            cfg.axis_index_groups)
  a = inv if scale is None else inv * scale.reshape(inv.shape).astype(inv.dtype)
  k = a / jnp.maximum(count, 1)
  k1 = k * sg_all
  k2 = k * inv * inv * sgx_all
  # dx = a * gy - mask * (k1 + k2 * (x - mean)), one elementwise pass.
  gy, xc = ct.astype(sdt), x.astype(sdt) - mean
  if mask is None:
    dx = a * gy - (k1 + k2 * xc)
  else:
    dx = a * gy - jnp.where(mask, k1 + k2 * xc, 0)
  dx = dx.astype(x.dtype)

  def param_ct(primal, local, total):
    # Under shard_map, a parameter replicated over a mesh axis along which x
    # varies needs its cotangent summed over that axis (the transpose of the
    # implicit broadcast). Over axis_name the all-reduce above already made
    # that sum; any other such axis (per-device statistics, no axis_name)
    # gets a psum here. A per-device parameter (pmap, vmap, varying) keeps
    # its own share.
    if primal is None:
      return None
    if cfg.axis_name is not None:
      names = cfg.axis_name if isinstance(cfg.axis_name, tuple) else (
          cfg.axis_name,)
      if (set(names) & _moments.varying_axes(x)
          and not set(names) & _moments.varying_axes(primal)):
        local = total
    extra = _moments.varying_axes(local) - _moments.varying_axes(primal)
    if extra:
      local = lax.psum(local, tuple(sorted(extra)))
    return local.reshape(primal.shape).astype(primal.dtype)

  dscale = param_ct(scale, sgx * inv, sgx_all * inv)
  dbias = param_ct(bias, sg, sg_all)
  return dx, dscale, dbias, None, None


_train.defvjp(_train_fwd, _train_bwd)
