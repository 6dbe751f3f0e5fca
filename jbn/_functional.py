"""The functional core: ``init`` and ``batch_norm``.

``batch_norm`` checks its arguments, then, in training::

    x -> batch moments (jbn._moments)  -> coefficients (jbn._modes)
      -> y = (x - c) * a + b           -> running statistics (jbn._running)

The normalization has a closed-form derivative written as a ``jax.custom_jvp``
whose tangent map is linear in the tangents: forward mode (``jax.jvp``,
``jacfwd``) evaluates it, reverse mode (``jax.grad``) is JAX's transpose of
it. Both read ``x`` and per-feature vectors only (the tangent map is
rematerialized, never saved), issue one all-reduce with an ``axis_name``,
and leave no activation-sized temporary.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jbn import _cpu
from jbn import _layout
from jbn import _modes
from jbn import _moments
from jbn import _parallel
from jbn import _running

Array = jax.Array
Axes = int | Sequence[int]


def init(feature_shape: int | Sequence[int], *, dtype: Any = jnp.float32,
         use_scale: bool = True, use_bias: bool = True,
         warm_start: bool = False):
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
    warm_start: add an int32 ``'count'`` of updates per feature to
      ``state``: the running statistics are then the exact average of the
      batches seen until ``1 / (1 - momentum)`` updates, and the usual EMA
      after (see :func:`batch_norm`). Without it the state is exactly
      Flax's.

  Returns:
    ``(params, state)``, two dicts.

  Example:
    >>> import jbn
    >>> params, state = jbn.init(3)
    >>> params
    {'scale': Array([1., 1., 1.], dtype=float32), 'bias': Array([0., 0., 0.], dtype=float32)}
    >>> state['var']
    Array([1., 1., 1.], dtype=float32)
    >>> jbn.init(2, warm_start=True)[1]['count']
    Array([0, 0], dtype=int32)
  """
  shape = _layout.as_shape(feature_shape, "feature_shape")
  params = {}
  if use_scale:
    params["scale"] = jnp.ones(shape, dtype)
  if use_bias:
    params["bias"] = jnp.zeros(shape, dtype)
  state = {"mean": jnp.zeros(shape, jnp.float32),
           "var": jnp.ones(shape, jnp.float32)}
  if warm_start:
    state["count"] = jnp.zeros(shape, jnp.int32)
  return params, state


def batch_norm(params: Mapping[str, Array], state: Mapping[str, Array],
               x: Array, train: bool | Array, *, axis: Axes = -1,
               momentum: float | Array = 0.99, epsilon: float = 1e-5,
               axis_name: Any = None, axis_index_groups: Any = None,
               mask: Array | None = None, dtype: Any = None,
               sync: str = "psum", renorm: _modes.RenormClip | None = None,
               ghost_batch_size: int | None = None):
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

  Modes (may be combined):

  * **Batch renormalization** (``renorm=jbn.RenormClip(rmax, dmax)``, Ioffe
    2017): :math:`y = \mathrm{scale}\,(r\,(x - \mu) / \sigma_B + d) +
    \mathrm{bias}` with :math:`\sigma_B = \sqrt{\sigma^2 + \epsilon}`,
    :math:`\sigma = \sqrt{\mathrm{var} + \epsilon}` from the running
    variance, :math:`r = \mathrm{clip}(\sigma_B / \sigma, r_{min}, r_{max})`,
    :math:`d = \mathrm{clip}((\mu - \mathrm{mean}) / \sigma, -d_{max},
    d_{max})`, both held constant in differentiation. The running statistics
    are the usual EMA of the batch mean and variance (Keras 3 averages the
    standard deviation instead). ``RenormClip(1, 0)`` is plain batch norm;
    :func:`jbn.renorm_clip` gives the paper's warm-up schedule.
  * **Ghost batch norm** (``ghost_batch_size=g``): the leading axis of ``x``
    (this device's batch) is split into contiguous groups of ``g``, each
    normalized with its own statistics (no collective touches ``x``, even
    with ``axis_name``). The running statistics get ONE update per call:
    the count-weighted mean over groups (and devices, one all-reduce of
    ``3C`` values) of their means and biased variances.
  * **Warm start** (``state`` made by ``jbn.init(..., warm_start=True)``, or
    :func:`jbn.upgrade_state`): the ``t``-th update of a feature uses the
    rate :math:`\max(1/t, 1 - m)` instead of :math:`1 - m`, so the running
    statistics are the exact average of the batches seen so far until
    :math:`t = 1/(1 - m)`, and the plain EMA after; ``state['count']``
    advances only where the (global, masked) count is positive.

  Numerics: statistics are computed in at least float32 whatever the input
  dtype, with sums shifted by a pilot mean that do not cancel (see
  :mod:`jbn._moments`); the output has ``x.dtype`` (or ``dtype``); ``state``
  keeps its dtype (float32). Masked-out values never reach the statistics,
  the running statistics or the gradients, even when they are NaN or inf
  (their outputs are computed, and are NaN where they are NaN). A feature
  with no valid value keeps its running statistics. Where the stored running
  mean or variance is not finite, or the variance negative (a damaged
  checkpoint), the update takes the batch's value, so a step on finite data
  always writes finite statistics. NaN or inf in *valid* values reach the
  statistics of their features, as in Flax and PyTorch.

  Cost: one read of ``x`` for the statistics and one for the output; with
  ``axis_name``, one collective in the forward and one all-reduce in the
  backward. The derivative is closed form (``jax.custom_jvp``, linear in the
  tangents: forward and reverse mode) and needs only ``x`` and per-feature
  vectors. The running-statistics update carries no gradient.

  Args:
    params: mapping with ``'scale'`` and/or ``'bias'``, each of the feature
      shape; a missing key means no scale (1) / no bias (0).
    state: mapping with ``'mean'`` and ``'var'`` of the feature shape (and an
      int ``'count'`` for warm start); other keys are carried through.
    x: input, any real floating dtype.
    train: Python bool or boolean scalar (may be traced): use and update batch
      statistics (True) or use the running ones (False).
    axis: feature axis or axes, kept; statistics reduce over all the others.
      NHWC: ``-1``; NCHW: ``1``.
    momentum: decay of the running statistics, in [0, 1].
    epsilon: added to the variance; a Python number at least the smallest
      normal number of the statistics dtype (``1.2e-38`` for float32).
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
      as synced batch norm keeps them). ``"gather"`` gathers per-device
      ``(count, shift, mean - shift, M2)`` (4 x devices x C values, one
      collective) and merges them with Chan's formula: accurate whatever the
      running statistics are.
    renorm: ``None`` or a :class:`jbn.RenormClip`: batch renormalization.
    ghost_batch_size: ``None`` or an int dividing the leading axis of ``x``:
      ghost batch norm.

  Returns:
    ``(y, new_state)``: the normalized output and the updated running
    statistics (``state`` itself when ``train`` is False).

  Raises:
    TypeError: ``x`` is not real floating point, ``train`` is not a bool,
      ``state`` holds integer statistics, ``renorm`` is not a RenormClip.
    ValueError: an axis is out of range or repeated; params/state do not
      have the feature shape of ``x``; ``momentum`` is outside [0, 1];
      ``epsilon`` is not a number >= the smallest normal number; a single
      value per feature in training; a bad ``mask`` shape; an unknown
      ``sync``; a ``ghost_batch_size`` that does not divide the batch.
    NameError: ``axis_name`` is not bound by any enclosing mapped transform.

  Example:
    >>> import jax, jax.numpy as jnp, jbn
    >>> x = jnp.array([[1., 10.], [3., 30.]])
    >>> params, state = jbn.init(2)
    >>> y, state = jbn.batch_norm(params, state, x, train=True, momentum=0.9)
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> state['mean'].round(4), state['var'].round(4)
    (Array([0.2, 2. ], dtype=float32), Array([ 1. , 10.9], dtype=float32))
    >>> y_eval, same = jbn.batch_norm(params, state, x, train=False)
    >>> same is state
    True
  """
  call = _prepare(params, state, x, train, axis=axis, momentum=momentum,
                  epsilon=epsilon, axis_name=axis_name,
                  axis_index_groups=axis_index_groups, mask=mask, dtype=dtype,
                  sync=sync, renorm=renorm, ghost_batch_size=ghost_batch_size)
  lay, cfg = call.layout, call.cfg
  sdt = cfg.sdt
  scale = _per_feature(params.get("scale"), lay.bshape, sdt)
  bias = _per_feature(params.get("bias"), lay.bshape, sdt)
  mean = _per_feature(state["mean"], lay.bshape, sdt)
  var = _per_feature(state["var"], lay.bshape, sdt)

  def eval_branch():
    a = lax.rsqrt(var + cfg.epsilon)
    a = a if scale is None else a * scale
    return _apply(call.x, mean, a, bias, cfg.out_dtype), {**state}

  def train_branch():
    _check_one_value(call, axis_name, axis_index_groups)
    x, msk = call.x, call.mask
    view_shape = lay.bshape if call.ghost is None else (1,) + lay.bshape
    # The running mean shifts the psum-synced sums: the one per-feature
    # value every device holds without talking (finite even if damaged).
    shift = jnp.where(jnp.isfinite(mean), mean, 0).reshape(view_shape)
    aux = {"shift": shift if cfg.sync_shift else None,
           "clip": call.renorm,
           "running": ((mean.reshape(view_shape), var.reshape(view_shape))
                       if call.renorm is not None else None)}
    fit = (lambda v: None if v is None else v.reshape(view_shape))
    y, bmean, bvar, count = _train(cfg, x, fit(scale), fit(bias), msk, aux)
    bmean, bvar, count = (lax.stop_gradient(v) for v in (bmean, bvar, count))
    if call.ghost is not None:
      bmean, bvar, count = _modes.combine_groups(
          bmean, bvar, count, axis_name, call.groups)
    new_state = _running.update(
        state, *(v.reshape(lay.feature_shape) for v in (bmean, bvar, count)),
        momentum)
    return y, new_state

  if isinstance(train, (bool, np.bool_)):
    if train:
      return train_branch()
    y, _ = eval_branch()
    return y, state
  return lax.cond(train, train_branch, eval_branch)


def _per_feature(value, bshape, sdt):
  """A per-feature array reshaped to broadcast against ``x``, in ``sdt``."""
  if value is None:
    return None
  return jnp.asarray(value).astype(sdt).reshape(bshape)


def _apply(x, center, a, b, out_dtype):
  """y = (x - center) * a + b, in the statistics dtype, cast once."""
  y = (x.astype(a.dtype) - center) * a
  if b is not None:
    y = y + b
  return y.astype(out_dtype)


# --------------------------------------------------------------------------
# Arguments


class _Config(NamedTuple):
  """Static description of the train-mode normalization (hashable)."""

  red_axes: tuple[int, ...]  # of the (ghost) view of x
  epsilon: float
  axis_name: Any  # for the statistics: None for ghost batches (local)
  axis_index_groups: Any
  sync: str
  sync_shift: bool  # the statistics shift by the running mean (psum sync)
  sdt: Any
  out_dtype: Any
  ghost: int | None  # ghost batch size: x is split into groups (a view)


class _Call(NamedTuple):
  cfg: _Config
  layout: _layout.Layout
  x: Array
  mask: Array | None
  ghost: int | None
  renorm: _modes.RenormClip | None
  groups: Any  # axis_index_groups, normalized
  axis: Any  # as the caller gave it (for messages)


def _concrete(value):
  """``value`` as a Python number if it is known at trace time, else None."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def _check_train(train):
  if not (isinstance(train, (bool, np.bool_))
          or (hasattr(train, "dtype") and jnp.ndim(train) == 0
              and jnp.issubdtype(train.dtype, jnp.bool_))):
    raise TypeError(f"train must be a Python bool or a boolean scalar array, "
                    f"got {train!r}.")


def _check_trees(params, state, x, lay, axis):
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
                           (state, "state", ("mean", "var", "count"))):
    for key in keys:
      if key in tree and tuple(jnp.shape(tree[key])) != lay.feature_shape:
        raise ValueError(
            f"{name}['{key}'] has shape {tuple(jnp.shape(tree[key]))} but x of "
            f"shape {x.shape} with axis={axis!r} has feature shape "
            f"{lay.feature_shape}. Create them with "
            f"jbn.init({lay.feature_shape}), or pass the axis your features "
            f"are on.")
  for key in ("mean", "var"):
    dt = jnp.result_type(state[key])
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(
          f"state['{key}'] has dtype {dt}: running statistics must be "
          f"floating point (float32, as jbn.init makes them); an integer "
          f"state would silently truncate every update.")
  if "count" in state and not jnp.issubdtype(jnp.result_type(state["count"]),
                                             jnp.integer):
    raise TypeError(
        f"state['count'] has dtype {jnp.result_type(state['count'])}: the "
        f"warm-start count must be an integer array (see jbn.upgrade_state).")


def _check_hyper(momentum, epsilon, sync, axis_name, axis_index_groups, sdt):
  m = _concrete(momentum)
  if m is not None and not 0.0 <= m <= 1.0:
    raise ValueError(
        f"momentum={momentum!r} must be in [0, 1]: it is the decay kept on the "
        f"old running value (Flax convention). PyTorch's momentum=p is "
        f"momentum=1 - p here.")
  eps = _concrete(epsilon)
  if eps is None or not eps > 0:
    raise ValueError(f"epsilon={epsilon!r} must be a Python number > 0.")
  tiny = float(jnp.finfo(sdt).tiny)
  if eps < tiny:
    raise ValueError(
        f"epsilon={epsilon!r} is below the smallest normal {jnp.dtype(sdt)} "
        f"({tiny:.3g}): XLA flushes such denormals to zero on CPU, and a "
        f"constant feature would divide by zero. Use epsilon >= {tiny:.3g} "
        f"(1e-5 is the usual value).")
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
  return eps, axis_index_groups


def _prepare(params, state, x, train, *, axis, momentum, epsilon, axis_name,
             axis_index_groups, mask, dtype, sync, renorm,
             ghost_batch_size) -> _Call:
  """Checks every argument (at trace time) and builds the call's config."""
  x = _layout.check_x(x, "batch_norm")
  _check_train(train)
  lay = _layout.layout(x.shape, axis)
  _check_trees(params, state, x, lay, axis)
  sdt = _moments.stat_dtype(x.dtype)
  eps, groups = _check_hyper(momentum, epsilon, sync, axis_name,
                             axis_index_groups, sdt)
  mask = _layout.prepare_mask(mask, x.shape, lay)
  # Evaluation ignores ghost batches: any batch size works there.
  evaluating = isinstance(train, (bool, np.bool_)) and not train
  ghost = None if evaluating else _modes.check_ghost(
      ghost_batch_size, x.shape, lay, axis_name)
  renorm = _modes.check_renorm(renorm)
  local = ghost is not None  # ghost batches: statistics local to each device
  cfg = _Config(
      red_axes=(_modes.ghost_red_axes(lay.red_axes) if local
                else lay.red_axes),
      epsilon=float(eps), axis_name=None if local else axis_name,
      axis_index_groups=None if local else groups, sync=sync,
      sync_shift=not local and axis_name is not None and sync == "psum",
      sdt=sdt, out_dtype=jnp.dtype(dtype) if dtype is not None else x.dtype,
      ghost=ghost)
  return _Call(cfg=cfg, layout=lay, x=x, mask=mask, ghost=ghost,
               renorm=renorm, groups=groups, axis=axis)


# --------------------------------------------------------------------------
# One value per feature


ONE_VALUE = (
    "Expected more than 1 value per feature when training, got {n} value(s) "
    "{where}: every batch statistic would come from one value (output = "
    "bias, variance -> 0). Use a larger batch, train=False, or an axis_name "
    "to share statistics across devices.")


def values_per_feature(shape, axis, *, mask=None, ghost_batch_size=None):
  """Values behind each feature of one device's statistics, or None.

  None when a mask makes the count data-dependent. The one rule behind the
  one-value-per-feature error, shared by :func:`batch_norm` and the Flax
  wrappers (which fall back to the running statistics during shape-only
  calls).
  """
  if mask is not None:
    return None
  lay = _layout.layout(tuple(shape), axis)
  n = _layout.reduced_count(tuple(shape), lay)
  if ghost_batch_size and shape[0]:
    n = n // (shape[0] // ghost_batch_size)
  return n


def _check_one_value(call: _Call, axis_name, axis_index_groups):
  """Fails, at trace time, on one value per feature (NameError if unbound)."""
  n = values_per_feature(call.x.shape, call.layout.feat_axes,
                         mask=call.mask, ghost_batch_size=call.ghost)
  size = 1
  if axis_name is not None:
    try:
      size = _parallel.axis_size(axis_name, axis_index_groups)
    except NameError as e:
      raise NameError(
          f"batch_norm got axis_name={axis_name!r}, but no enclosing "
          f"transform binds that axis name ({e}). Call it inside "
          f"jax.shard_map, jax.pmap or jax.vmap with "
          f"axis_name={axis_name!r}; under plain jax.jit with a batch-sharded "
          f"array pass axis_name=None, the statistics are already "
          f"global.") from None
  if call.ghost is not None:
    size = 1  # ghost batches are local to each device
  if n == 1 and size == 1:
    where = ("per ghost batch" if call.ghost is not None else
             "per device" if axis_name is not None else
             f"for input of shape {call.x.shape} with "
             f"axis={call.axis!r}")
    raise ValueError(ONE_VALUE.format(n=1, where=where))


# --------------------------------------------------------------------------
# The train-mode normalization and its closed-form derivative


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train(cfg, x, scale, bias, mask, aux):
  """``(y, batch_mean, batch_var, count)``, all but ``y`` keepdims."""
  out, _ = _train_primal(cfg, x, scale, bias, mask, aux)
  return out


def _view(cfg):
  """The view the statistics are taken on: ghost groups, or None (``x``).

  Applied to the input (``x``, the mask) BEFORE the CPU barriers, so that
  what crosses a barrier is already the view: a reshape of the input is then
  a bitcast of a parameter, which every fusion reads in place. Applied after
  them, to a bfloat16 ``x``, XLA:CPU moves the reshape behind the float32
  convert (``bitcast(convert(x))``) in each consumer, and a reduction fusion
  (YNNPACK) over that is 2-6x slower than over ``convert(bitcast(x))``.
  """
  if cfg.ghost is None:
    return None
  return functools.partial(_modes.ghost_split, ghost_batch_size=cfg.ghost)


def _same(a):
  return a


def _train_primal(cfg, x, scale, bias, mask, aux):
  view = _view(cfg)
  m = _moments.batch_moments(
      x, cfg.red_axes, mask=mask, axis_name=cfg.axis_name,
      axis_index_groups=cfg.axis_index_groups, sync=cfg.sync,
      common_shift=aux["shift"], view=view)
  mean, var = _moments.mean_var(m)
  coef = _modes.coefficients(mean, var, m.count, scale, bias,
                             epsilon=cfg.epsilon, renorm=aux["clip"],
                             running=aux["running"])
  y = _apply((view or _same)(x), coef.center, coef.a, coef.b, cfg.out_dtype)
  return (y.reshape(x.shape), mean, var, m.count), coef


def _nonzero(tangent):
  return None if tangent is None or isinstance(tangent, SymbolicZero) else (
      tangent)


def _train_jvp(cfg, primals, tangents):
  x, scale, bias, mask, aux = primals
  tx, tscale, tbias = (_nonzero(t) for t in tangents[:3])
  out, coef = _train_primal(cfg, x, scale, bias, mask, aux)
  count = out[3]
  # Rematerialized: reverse mode saves x and per-feature vectors, never an
  # activation-sized product of them.
  tangent = jax.checkpoint(functools.partial(_tangent, cfg), prevent_cse=False)
  ty, tmean, tvar = tangent(x, mask, coef, count, tx, tscale, tbias)
  return out, (ty, tmean, tvar, jnp.zeros_like(count))


_train.defjvp(_train_jvp, symbolic_zeros=True)


def _tangent(cfg, x, mask, coef, count, tx, tscale, tbias):
  r"""The tangent of ``y = (x - c) a + b`` (linear in the tangents).

  With ``xc = x - c``, ``n`` the count and, over valid values (and devices),
  ``R1 = sum(t)`` and ``R2 = sum(t * xc)``: ``dc = R1 / n``,
  ``d inv = -inv^3 R2 / n``, so::

      dy = a * t + xc * u + v
      u  = -a * inv^2 * R2 / n + dscale * gain
      v  = -sum(a * t) / n + dbias + dscale * offset

  Transposed (reverse mode) this is the classic closed form: two reductions
  of the cotangent, ``sum(g)`` and ``sum(g * xc)``, one all-reduce of both
  with an ``axis_name``, and one elementwise pass for ``dx``.
  """
  sdt = cfg.sdt
  view = _view(cfg) or _same
  n = jnp.maximum(count, 1)
  shape, x, mask = x.shape, view(x), view(mask)
  xc_r, xc_q = _cpu.private_map(lambda x, c: x.astype(sdt) - c,
                                (x, coef.center), 2)
  zeros = jnp.zeros_like(coef.center)
  tmean = tvar = zeros
  du = dv = None
  terms = []
  if tx is not None:
    t = view(tx).astype(sdt)
    q = coef.a * t
    parts = [t, q, t * xc_r]
    if mask is not None:
      # where, not a product: 0 * nan at a masked-out value would be nan.
      parts = [jnp.where(mask, p, 0) for p in parts]
    r1, r1q, r2 = _parallel.all_reduce_sum(
        [jnp.sum(p, cfg.red_axes, keepdims=True) for p in parts],
        cfg.axis_name, cfg.axis_index_groups)
    tmean, tvar = r1 / n, 2 * r2 / n
    # inv * (inv * R2/n) first: a * inv * inv overflows for a constant
    # feature at a tiny epsilon, where R2 = 0 (inf * 0 = nan).
    du = -coef.a * (coef.inv * (coef.inv * (r2 / n)))
    # a * (t - mean(t)) as a * t - mean(a * t): transposed, the cotangent is
    # centred before it is scaled (a * (g - mean(g))), which is exact where
    # g is constant, and mean(g) is the same reduction as dbias.
    dv = -r1q / n
    terms.append(q)
  # Per group (ghost), a parameter's tangent times a per-group vector goes
  # through a (groups, features) view: see _modes.times_groups.
  times = operator.mul if cfg.ghost is None else _modes.times_groups
  if tscale is not None:
    du = _add(du, times(tscale, coef.gain))
    if coef.offset is not None:
      dv = _add(dv, times(tscale, coef.offset))
  if tbias is not None:
    dv = _add(dv, times(tbias, jnp.ones_like(zeros)))
  if du is not None or dv is not None:
    du = zeros if du is None else jnp.broadcast_to(du, zeros.shape)
    dv = zeros if dv is None else jnp.broadcast_to(dv, zeros.shape)
    # One cast to "varying" for both vectors: its transpose is the
    # backward's ONE all-reduce inside shard_map (elsewhere: no cast, and no
    # stack, whose transpose would be two more small kernels).
    uv = _parallel.to_varying([du, dv], like=x)
    if mask is not None:
      # A masked-out nan/inf value has no say in the parameters' tangents.
      xc_q = jnp.where(mask | jnp.isfinite(xc_q), xc_q, 0)
    if cfg.ghost is None:
      u, v = uv[0], jnp.broadcast_to(uv[1], x.shape)
    else:
      # Per-group vectors: on CPU their transposed broadcasts (per-group
      # sums of the cotangent) need care, see _modes.ghost_broadcast.
      u, v = _modes.ghost_broadcast(*uv, x.shape, cfg.red_axes)
    terms += [xc_q * u, v]
  if not terms:
    ty = jnp.zeros(shape, cfg.out_dtype)
  else:
    # In the view's shape, reshaped to x's own shape last. Transposed, the
    # cotangent is viewed first, then (ghost, CPU) passes one more barrier:
    # every reduction of it reads a bitcast of the parameter (see _view),
    # and the view is not materialized for the consumers outside the chain.
    ty = _cpu.fan_in(terms, cfg.out_dtype)
    if cfg.ghost is not None:
      ty = _cpu.choose(ty, cpu=lax.optimization_barrier, default=lambda t: t)
    ty = ty.reshape(shape)
  return ty, tmean, tvar


def _add(a, b):
  return b if a is None else a + b
