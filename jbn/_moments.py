"""Per-feature moments: the one place jbn computes statistics.

A :class:`Moments` accumulator holds, per feature, the number of valid
values, a *shift* close to their mean, the mean relative to that shift, and
the sum of squared deviations from the mean (``M2``)::

    count = n    shift = s    delta = mean - s    m2 = sum((x - mean)**2)

One batch is reduced with sums shifted by ``s`` (``d = x - s``)::

    S1 = sum(d)    S2 = sum(d**2)    delta = S1 / n    m2 = S2 - S1 * delta

which is exact in real arithmetic for any ``s`` and free of cancellation when
``s`` is close to the mean: the relative error of the variance grows like
``1 + z**2`` times the float32 epsilon, ``z`` being ``(mean - s) / std``
(``(mean / std)**2`` for the textbook ``E[x^2] - E[x]^2``). The shift is a
*pilot mean*: the mean of a small strided sample of the batch (16 values per
feature, computed relative to the sample's first value so that it is exact
to the last bit of the data's magnitude), so ``z`` is about 1/4 and the
variance is as accurate as a float32 two-pass variance, from ONE read of
``x``. With a mask, a feature whose sample holds no valid value falls back to
its first valid value anywhere in the batch.

Accumulators merge with Chan's parallel formula relative to the shift of the
larger one (differences of nearby shifts are exact), so batches, devices and
processes combine without cancellation: :func:`merge`, :func:`merge_stacked`.

Across devices (:func:`batch_moments`):

* ``sync="psum"``: every device shifts by the same value (the running mean,
  identical on every device of the axis) and ONE all-reduce sums
  ``(S1, S2[, n])``. Accurate once the running mean is within a few batch
  standard deviations of the data;
* ``sync="gather"``: every device reduces its shard with its own pilot shift;
  ONE collective gathers the ``4 x devices x C`` values and Chan's formula
  merges them. Accurate whatever the running statistics are.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _cpu
from jbn import _layout
from jbn import _parallel

Array = jax.Array

SYNC_MODES = ("psum", "gather")
PILOT_SIZE = 16  # values per feature in the sample that gives the shift
PILOT_SHARE = 8  # per group: at most 1/PILOT_SHARE of them (at least one)


class Moments(NamedTuple):
  """Moments of a set of values, per feature, relative to a shift.

  A batch's :func:`jbn.moments`, merged with others by
  :func:`jbn.merge_moments` (Chan's parallel formula: exact in any order, no
  cancellation), finalized by :func:`jbn.moments_mean_var`. All fields have
  the feature shape (or broadcast against ``x``, inside jbn) and the
  statistics dtype (at least float32).
  """

  count: Array  # number of valid values (a float: exact up to 2**24 in f32)
  shift: Array  # a value close to the mean; carries no gradient
  delta: Array  # mean - shift
  m2: Array  # sum over the valid values of (value - mean)**2

  @classmethod
  def empty(cls, feature_shape, dtype: Any = jnp.float32) -> "Moments":
    """The moments of no values: the neutral element of :func:`merge`."""
    shape = _layout.as_shape(feature_shape, "feature_shape")
    zeros = jnp.zeros(shape, dtype)
    return cls(zeros, zeros, zeros, zeros)


def stat_dtype(dtype: Any) -> jnp.dtype:
  """The dtype statistics are computed in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def _safe_div(num, den):
  return num / jnp.maximum(den, 1)


# --------------------------------------------------------------------------
# The shift


def _sample(shape, red_axes, size):
  """Static strided slices picking about ``size`` values along ``red_axes``.

  The first reduced axis (the batch, usually) is sampled first, evenly spaced
  over its length, then the next ones as far as needed. Feature axes are
  kept whole.
  """
  slices, remaining = [], size
  for a, n in enumerate(shape):
    if a not in red_axes:
      slices.append(slice(None))
      continue
    k = max(1, min(n, remaining))
    step = max(1, n // k)
    slices.append(slice(0, step * k, step))
    remaining = -(-remaining // k)
  return tuple(slices)


def _first_valid(x, red_axes, mask, sdt):
  """Per feature, the first valid value of the batch (0 where none is)."""
  feat = [a for a in range(x.ndim) if a not in red_axes]
  red_sizes = tuple(mask.shape[a] for a in red_axes)
  keep = tuple(1 if a in red_axes else mask.shape[a] for a in range(x.ndim))
  flat = jnp.transpose(mask, list(red_axes) + feat).reshape(
      (math.prod(red_sizes),) + tuple(mask.shape[a] for a in feat))
  first = jnp.argmax(flat, axis=0)
  valid = jnp.any(flat, axis=0).reshape(keep)
  coords = iter(jnp.unravel_index(first, red_sizes))
  index = []
  for a in range(x.ndim):
    if a in red_axes:
      index.append(next(coords).reshape(keep))
    else:
      index.append(lax.broadcasted_iota(
          jnp.int32, tuple(x.shape[a] if b == a else 1
                           for b in range(x.ndim)), a))
  return jnp.where(valid, x[tuple(index)].astype(sdt), 0)


def pilot_shift(x: Array, red_axes: tuple[int, ...],
                mask: Array | None = None, per_group: bool = False) -> Array:
  """A per-feature shift close to the batch mean (keepdims, no gradient).

  The mean of a strided sample of about :data:`PILOT_SIZE` valid values per
  feature (``per_group``: at most one in :data:`PILOT_SHARE` of them, so
  that the sample is never a pass over ``x``: for ghost batches of 8 rows,
  one row per group), taken relative to the sample's first value (so that it is exact
  to the last bit of the data's magnitude) and summed with unrolled
  elementwise adds (a reduction op of this size costs more than the
  arithmetic on XLA:CPU). A feature without a valid value in the sample
  takes its first valid value in the batch; one without any valid value
  takes 0.
  """
  sdt = stat_dtype(x.dtype)
  keep = tuple(1 if a in red_axes else x.shape[a] for a in range(x.ndim))
  if any(x.shape[a] == 0 for a in red_axes):
    return jnp.zeros(keep, sdt)
  x = lax.stop_gradient(x)
  size = PILOT_SIZE
  if per_group:
    values = math.prod(x.shape[a] for a in red_axes)
    size = min(size, max(1, values // PILOT_SHARE))
  pick = _sample(x.shape, red_axes, size)
  xs = x[pick].astype(sdt)
  points = list(itertools.product(*(
      range(xs.shape[a]) if a in red_axes else [slice(None)]
      for a in range(x.ndim))))
  value = lambda i: xs[tuple(  # noqa: E731
      slice(j, j + 1) if isinstance(j, int) else j for j in i)]
  if mask is None:
    ref = value(points[0])
    total = sum((value(i) - ref for i in points[1:]), jnp.zeros(keep, sdt))
    return ref + total / len(points)
  ms = mask[tuple(p if mask.shape[a] != 1 else slice(0, 1)
                  for a, p in enumerate(pick))]
  valid = lambda i: ms[tuple(  # noqa: E731
      (slice(j, j + 1) if ms.shape[a] != 1 else slice(0, 1))
      if isinstance(j, int) else j for a, j in enumerate(i))]
  first = value(points[0])
  ref = jnp.where(valid(points[0]) & jnp.isfinite(first), first, 0)
  total = jnp.zeros(keep, sdt)
  count = jnp.zeros(keep, sdt)
  for i in points:
    total = total + jnp.where(valid(i), value(i) - ref, 0)
    count = count + valid(i)
  shift = ref + total / jnp.maximum(count, 1)
  return lax.cond(jnp.any(count == 0),
                  lambda: jnp.where(count > 0, shift,
                                    _first_valid(x, red_axes, mask, sdt)),
                  lambda: shift)


# --------------------------------------------------------------------------
# One batch on one device


def local_sums(x: Array, red_axes: tuple[int, ...], mask: Array | None,
               shift: Array, view=None):
  """``(S1, S2, n)`` of ``x - shift`` over ``red_axes`` (keepdims).

  ``S1`` and ``S2`` are two reductions over ONE read of ``x`` (fused on
  GPU/TPU; each fused with its own producer on CPU, see :mod:`jbn._cpu`,
  where per-group sums are folded: :func:`jbn._cpu.reduce_sum`).
  Masked-out values never reach the sums, not even as ``0 * nan``.
  ``view`` (e.g. a ghost-batch reshape) is applied to ``x`` and ``mask``
  before the CPU barriers, so that each reduction reads a bitcast of the
  input (see ``jbn._functional._view``); ``red_axes`` and ``shift`` refer to
  the viewed shape.
  """
  sdt = shift.dtype
  # Per-group sums (a view: ghost batches) are folded on CPU.
  total = _cpu.reduce_sum if view is not None else functools.partial(
      jnp.sum, keepdims=True)
  view = view or (lambda a: a)

  def shifted(x, shift, mask):
    d = x.astype(sdt) - shift
    return d if mask is None else jnp.where(mask, d, 0)

  x, mask = view(x), view(mask)
  d1, d2 = _cpu.private_map(shifted, (x, shift, mask), 2)
  s1 = total(d1, red_axes)
  s2 = total(d2 * d2, red_axes)
  if mask is None:
    n = jnp.full(s1.shape, math.prod(x.shape[a] for a in red_axes), sdt)
  else:
    # Count over the axes the mask spans; broadcast axes multiply the count.
    spanned = tuple(a for a in red_axes if mask.shape[a] != 1)
    repeat = math.prod(x.shape[a] for a in red_axes if mask.shape[a] == 1)
    n = jnp.broadcast_to(
        jnp.sum(mask, axis=spanned, keepdims=True, dtype=sdt) * repeat,
        s1.shape)
  return s1, s2, n


def from_sums(count, shift, s1, s2) -> Moments:
  """:class:`Moments` from the shifted sums of one or more devices."""
  delta = _safe_div(s1, count)
  return Moments(count, shift, delta, jnp.maximum(s2 - s1 * delta, 0))


def local_moments(x: Array, red_axes: tuple[int, ...],
                  mask: Array | None = None, view=None) -> Moments:
  """:class:`Moments` of this device's ``x`` over ``red_axes`` (keepdims).

  ``view``: see :func:`local_sums`.
  """
  v = view or (lambda a: a)
  shift = pilot_shift(v(x), red_axes, v(mask), per_group=view is not None)
  s1, s2, n = local_sums(x, red_axes, mask, shift, view)
  return from_sums(n, shift, s1, s2)


# --------------------------------------------------------------------------
# Merging


def merge_stacked(parts: Moments) -> Moments:
  """Merges moments stacked along a leading axis (Chan et al.'s formula).

  Relative to the shift of the part with the largest count: every other
  part's mean is expressed as ``(its shift - that shift) + its delta``, a
  difference of nearby values, so nothing of the size of ``|mean|`` is ever
  rounded.
  """
  counts = parts.count
  ref = jnp.take_along_axis(parts.shift, jnp.argmax(counts, axis=0)[None],
                            axis=0)[0]
  deltas = (parts.shift - ref) + parts.delta
  count = jnp.sum(counts, axis=0)
  delta = _safe_div(jnp.sum(counts * deltas, axis=0), count)
  m2 = (jnp.sum(parts.m2, axis=0)
        + jnp.sum(counts * jnp.square(deltas - delta), axis=0))
  return Moments(count, ref, delta, m2)


def merge(a: Moments, b: Moments) -> Moments:
  """The moments of the union of two sets of values."""
  return merge_stacked(jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b))


def mean_var(m: Moments) -> tuple[Array, Array]:
  """Mean and biased variance (0 where the count is 0)."""
  return m.shift + m.delta, _safe_div(m.m2, m.count)


# --------------------------------------------------------------------------
# Across devices


def all_moments(local: Moments, axis_name, axis_index_groups) -> Moments:
  """Merges every participant's moments: ONE collective of ``4 x P x C``."""
  parts = _parallel.gather(jnp.stack(local), axis_name, axis_index_groups)
  return merge_stacked(Moments(*(parts[:, i] for i in range(4))))


def batch_moments(x: Array, red_axes: tuple[int, ...], *,
                  mask: Array | None = None, axis_name=None,
                  axis_index_groups=None, sync: str = "gather",
                  common_shift: Array | None = None, view=None) -> Moments:
  """The batch's moments over ``red_axes`` and ``axis_name`` (keepdims).

  The train forward of :func:`jbn.batch_norm` and :func:`jbn.moments` both
  come here. ``common_shift`` (identical on every device) is used with
  ``axis_name`` and ``sync="psum"`` only. ``view``: see :func:`local_sums`.
  """
  if axis_name is None:
    return local_moments(x, red_axes, mask, view)
  if sync == "gather":
    return all_moments(local_moments(x, red_axes, mask, view), axis_name,
                       axis_index_groups)
  shape = (view or (lambda a: a))(x).shape
  keep = tuple(1 if a in red_axes else shape[a] for a in range(len(shape)))
  shift = lax.stop_gradient(jnp.broadcast_to(common_shift, keep)).astype(
      stat_dtype(x.dtype))
  s1, s2, n = local_sums(x, red_axes, mask, shift, view)
  if mask is None:
    s1, s2 = _parallel.all_reduce_sum([s1, s2], axis_name, axis_index_groups)
    n = n * _parallel.axis_size(axis_name, axis_index_groups)
  else:
    s1, s2, n = _parallel.all_reduce_sum([s1, s2, n], axis_name,
                                         axis_index_groups)
  return from_sums(n, shift, s1, s2)


# --------------------------------------------------------------------------
# Public API


def moments(x: Array, *, axis=-1, mask: Array | None = None, axis_name=None,
            axis_index_groups=None) -> Moments:
  r"""Per-feature moments of one batch, ready to merge with others.

  Reduces ``x`` over every axis but ``axis`` (and across ``axis_name``,
  and only where ``mask`` is set) into a :class:`jbn.Moments` accumulator
  ``(count, shift, delta, m2)`` of the feature shape: the count of valid
  values, a shift close to their mean, ``mean - shift``, and the sum of
  squared deviations from the mean. Merge accumulators with
  :func:`jbn.merge_moments` (e.g. in a ``lax.scan`` over batches) and read
  them with :func:`jbn.moments_mean_var`. This is the same code that
  computes :func:`jbn.batch_norm`'s batch statistics.

  Numerics: one read of ``x``, sums shifted by a pilot mean, in at least
  float32: as accurate as a two-pass variance (no cancellation when
  ``|mean| >> std``). Across ``axis_name``, each device's moments are
  gathered with ONE collective (``4 x devices x C`` values) and merged with
  Chan's formula, so unequal per-device counts are weighted exactly.
  Differentiable (the shift carries no gradient).

  Args:
    x: input of any floating dtype.
    axis: feature axis or axes, kept (NHWC: ``-1``; NCHW: ``1``).
    mask: boolean, broadcastable to ``x`` or to ``x`` without its feature
      axes; False values are left out.
    axis_name: mapped axis (``jax.shard_map``, ``jax.pmap``,
      ``jax.vmap(axis_name=...)``) across which the moments are global.
    axis_index_groups: groups of indices along ``axis_name`` (as in
      ``jax.lax.psum``).

  Returns:
    A :class:`jbn.Moments` whose fields have the feature shape.

  Example:
    >>> import jax.numpy as jnp, jbn
    >>> a = jbn.moments(jnp.array([[1.], [2.], [3.]]))
    >>> b = jbn.moments(jnp.array([[10.], [11.], [12.], [13.], [14.]]))
    >>> a.count
    Array([3.], dtype=float32)
    >>> mean, var = jbn.moments_mean_var(jbn.merge_moments(a, b))
    >>> mean.round(4), var.round(4)
    (Array([8.25], dtype=float32), Array([24.9375], dtype=float32))
  """
  x = _layout.check_x(x, "moments")
  lay = _layout.layout(x.shape, axis)
  mask = _layout.prepare_mask(mask, x.shape, lay)
  if axis_name is not None:
    _parallel.axis_size(axis_name, axis_index_groups)  # NameError if unbound
  m = batch_moments(x, lay.red_axes, mask=mask, axis_name=axis_name,
                    axis_index_groups=axis_index_groups, sync="gather")
  return Moments(*(f.reshape(lay.feature_shape) for f in m))


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Moments of the union of two sets of values (Chan's parallel formula).

  Exact in real arithmetic and free of cancellation in floating point: the
  means are combined relative to the shift of the larger set. Merging with
  :meth:`jbn.Moments.empty` returns the other argument's statistics, so an
  empty accumulator can start a ``lax.scan``.

  Args:
    a: moments of one set (e.g. from :func:`jbn.moments`).
    b: moments of another set, with the same shapes.

  Returns:
    A :class:`jbn.Moments`.

  Example:
    >>> import jax.numpy as jnp, jbn
    >>> acc = jbn.Moments.empty(1)
    >>> for batch in ([[1.], [2.], [3.]], [[10.], [11.]]):
    ...   acc = jbn.merge_moments(acc, jbn.moments(jnp.array(batch)))
    >>> acc.count
    Array([5.], dtype=float32)
    >>> jbn.moments_mean_var(acc)[0].round(4)
    Array([5.4], dtype=float32)
  """
  return merge(Moments(*a), Moments(*b))


def moments_mean_var(m: Moments) -> tuple[Array, Array]:
  """The mean and the biased (population) variance of a :class:`Moments`.

  Args:
    m: an accumulator.

  Returns:
    ``(mean, var)``, with ``var = m2 / count``; a feature with no values
    gets ``mean = shift`` and ``var = 0``.

  Example:
    >>> import jax.numpy as jnp, jbn
    >>> mean, var = jbn.moments_mean_var(jbn.moments(jnp.array([[1.], [3.]])))
    >>> mean, var
    (Array([2.], dtype=float32), Array([1.], dtype=float32))
  """
  return mean_var(Moments(*m))
