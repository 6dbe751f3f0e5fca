"""Per-feature moments: local shifted sums, mask, and the ONE collective.

This is the only module in jbn that computes batch statistics or talks to
other devices. Everything else (the functional core, the Flax wrappers)
calls into it.

Numerics. The variance is computed from *shifted* sums::

    d   = x - s                      (s: a per-feature shift, no gradient)
    S1  = sum(m * d)    S2 = sum(m * d**2)    n = sum(m)
    mean = s + S1 / n   var = S2 / n - (S1 / n)**2

which is exact in real arithmetic for any ``s`` and free of catastrophic
cancellation whenever ``s`` lies within a few standard deviations of the
batch mean (the relative error then grows like ``((mean - s) / std)**2``
times the float32 epsilon, instead of ``(mean / std)**2`` for the textbook
``E[x^2] - E[x]^2``). Both sums come from the same read of ``x``: the cost is
that of the fast formula.

Where the shift comes from:

* no ``axis_name`` (one device, or plain ``jit`` with sharded arrays): one
  element of the batch itself (the first valid one), so the variance is
  accurate at every step, the first included;
* ``axis_name`` with ``sync="psum"`` (the default): the running mean. It is the
  only per-feature value that is identical on every device without talking
  to them, so the forward stays at ONE all-reduce of ``2C`` (``3C`` with a
  mask) values. Accurate once the running mean is within a few batch standard
  deviations of the data; requires the running statistics to be identical
  across the axis (which synced batch norm keeps them);
* ``axis_name`` with ``sync="gather"``: each device reduces its shard to
  ``(count, shift, mean - shift, M2)`` with a local shift; one collective
  gathers those ``4 x devices x C`` values and Chan's parallel formula merges
  them relative to one device's shift. Accurate whatever the running mean is
  (PyTorch's SyncBatchNorm gathers per-device moments the same way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SYNC_MODES = ("psum", "gather")


class Moments(NamedTuple):
  """Batch statistics, broadcastable against ``x`` (size 1 on reduced axes)."""

  mean: jax.Array  # stat dtype, keepdims shape
  var: jax.Array  # stat dtype, keepdims shape, biased (population) variance
  count: jax.Array  # stat dtype; number of valid elements behind each feature


def stat_dtype(dtype: Any) -> jnp.dtype:
  """The dtype statistics are computed in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def axis_size(axis_name, axis_index_groups=None) -> int:
  """Number of participants a collective over ``axis_name`` sums over."""
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
  return math.prod(lax.axis_size(n) for n in names)


def varying_axes(value) -> frozenset:
  """Mesh axes along which ``value`` varies inside ``shard_map`` (else empty)."""
  aval = jax.typeof(value)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))


def all_reduce_sum(arrays: Sequence[jax.Array], axis_name, axis_index_groups):
  """Sums arrays of one shape and dtype across ``axis_name`` in ONE all-reduce.

  The arrays are stacked so that exactly one collective is issued, whatever
  their number. Without ``axis_name`` they come back unchanged.
  """
  if axis_name is None:
    return tuple(arrays)
  stacked = lax.psum(jnp.stack(arrays), axis_name,
                     axis_index_groups=axis_index_groups)
  return tuple(stacked[i] for i in range(len(arrays)))


def gather(value: jax.Array, axis_name, axis_index_groups) -> jax.Array:
  """Every participant's ``value``, stacked on a new leading axis.

  Written as ONE all-reduce of a buffer where each participant fills its own
  row: unlike ``lax.all_gather`` the result is typed as identical on every
  device inside ``shard_map`` (it can leave with ``P()`` and be
  differentiated), and it works the same under ``pmap`` and ``vmap``.
  The buffer is small: participants x 4 x C values.
  """
  names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
  index = lax.axis_index(tuple(names) if len(names) > 1 else names[0])
  size = axis_size(axis_name, axis_index_groups)
  if axis_index_groups is not None:
    total = math.prod(lax.axis_size(n) for n in names)
    position = np.zeros(total, np.int32)
    for group in axis_index_groups:
      position[list(group)] = np.arange(len(group))
    index = jnp.asarray(position)[index]
  rows = jnp.zeros((size,) + value.shape, value.dtype)
  rows = lax.dynamic_update_index_in_dim(rows, value, index, axis=0)
  return lax.psum(rows, axis_name, axis_index_groups=axis_index_groups)


def first_valid_shift(x: jax.Array, red_axes: tuple[int, ...],
                      mask: jax.Array | None, fallback: jax.Array) -> jax.Array:
  """One element of the batch per feature, used as the shift (keepdims).

  Without a mask: the element at index 0 of every reduced axis. With a mask:
  the first element whose mask is set (a feature that has none there falls
  back to ``fallback``, which only matters for accuracy, never correctness).
  """
  sdt = stat_dtype(x.dtype)
  if mask is None:
    idx = tuple(slice(0, 1) if a in red_axes else slice(None)
                for a in range(x.ndim))
    return x[idx].astype(sdt)
  # Mask dims that are size 1 broadcast, so index 0 there is as good as any.
  row = mask if mask.ndim == 0 else jnp.any(
      mask, axis=tuple(a for a in range(x.ndim) if a not in red_axes),
      keepdims=True)
  flat = jnp.argmax(row.reshape(-1))
  starts = list(jnp.unravel_index(flat, row.shape)) if row.ndim else []
  starts = [starts[a] if a in red_axes else 0 for a in range(x.ndim)]
  sizes = [1 if a in red_axes else x.shape[a] for a in range(x.ndim)]
  picked = lax.dynamic_slice(x, starts, sizes).astype(sdt)
  valid = lax.dynamic_slice(jnp.broadcast_to(mask, x.shape), starts, sizes)
  return jnp.where(valid, picked, fallback.astype(sdt))


def independent(values, copies: int = 1):
  """``copies`` copies of ``values`` that XLA cannot common up with each other.

  XLA:CPU's reduction fusions take their elementwise producers (a shift, a
  dtype convert, a product) only when no other op shares them; a shared
  producer is materialized in full and re-read instead. Giving each
  reduction its own barrier'd operands keeps every producer private, so each
  reduction reads ``x`` straight from memory. The barriers are chained (two
  identical barriers would be merged) and are identities: nothing is copied.
  """
  out = []
  for _ in range(copies):
    values = lax.optimization_barrier(values)
    out.append(values)
  return out


def _local_sums(x, red_axes, mask, shift):
  """(S1, S2, n) of ``x - shift`` over ``red_axes``, in the stat dtype.

  S1 and S2 are two reductions over ``x`` that XLA fuses with their
  elementwise producers (see :func:`independent`).
  """
  sdt = shift.dtype
  (x1, shift1, mask1), (x2, shift2, mask2) = independent((x, shift, mask), 2)
  d1 = x1.astype(sdt) - shift1
  d2 = jnp.square(x2.astype(sdt) - shift2)
  if mask is None:
    n = jnp.asarray(math.prod(x.shape[a] for a in red_axes), sdt)
  else:
    d1, d2 = jnp.where(mask1, d1, 0), jnp.where(mask2, d2, 0)
    # Count over the axes the mask spans; broadcast axes multiply the count.
    spanned = tuple(a for a in red_axes if mask.shape[a] != 1)
    repeat = math.prod(x.shape[a] for a in red_axes if mask.shape[a] == 1)
    n = jnp.sum(mask, axis=spanned, keepdims=True, dtype=sdt) * repeat
  s1 = jnp.sum(d1, axis=red_axes, keepdims=True)
  s2 = jnp.sum(d2, axis=red_axes, keepdims=True)
  return s1, s2, n


def _safe_div(num, den):
  return num / jnp.maximum(den, 1)


def moments(x: jax.Array, red_axes: tuple[int, ...], *,
            mask: jax.Array | None = None,
            shift: jax.Array | None = None,
            axis_name=None, axis_index_groups=None,
            sync: str = "psum") -> Moments:
  """Mean, biased variance and count of ``x`` over ``red_axes`` (keepdims).

  Args:
    x: input of any floating dtype; statistics are in at least float32.
    red_axes: the axes reduced over (all but the feature axes).
    mask: boolean, already broadcastable to ``x`` with the same rank.
    shift: the cross-device shift (keepdims, identical on every device), used
      with ``axis_name`` and ``sync="psum"``. Ignored otherwise.
    axis_name, axis_index_groups: make the statistics global over a mapped
      axis, with one collective.
    sync: ``"psum"`` (one all-reduce of shifted sums) or ``"gather"``
      (one collective gathering per-device moments, Chan's merge).

  Returns:
    ``Moments(mean, var, count)``; a feature with ``count == 0`` gets a finite
    mean and variance (the caller decides to ignore them).
  """
  sdt = stat_dtype(x.dtype)
  keep_shape = tuple(1 if a in red_axes else x.shape[a] for a in range(x.ndim))
  if axis_name is None or sync == "gather":
    local = first_valid_shift(x, red_axes, mask, jnp.zeros(keep_shape, sdt))
  else:
    local = lax.stop_gradient(jnp.broadcast_to(shift, keep_shape).astype(sdt))
  s1, s2, n = _local_sums(x, red_axes, mask, local)
  n = jnp.broadcast_to(n, s1.shape)

  if axis_name is not None and sync == "gather":
    # Per device: count, shift, mean relative to the shift, and M2. Merged
    # relative to one device's shift (differences of nearby shifts are
    # exact), so nothing of the size of |mean| is ever rounded.
    rel = _safe_div(s1, n)
    m2_d = jnp.maximum(s2 - s1 * rel, 0)
    parts = gather(jnp.stack([n, local, rel, m2_d]), axis_name,
                   axis_index_groups)
    ns, shifts, rels, m2s = parts[:, 0], parts[:, 1], parts[:, 2], parts[:, 3]
    ref = jnp.take_along_axis(shifts, jnp.argmax(ns, axis=0)[None], axis=0)[0]
    deltas = (shifts - ref) + rels
    count = jnp.sum(ns, axis=0)
    mrel = _safe_div(jnp.sum(ns * deltas, axis=0), count)
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(ns * jnp.square(deltas - mrel), axis=0)
    return Moments(ref + mrel, _safe_div(m2, count), count)

  if axis_name is None:
    count = n
  elif mask is None:
    s1, s2 = all_reduce_sum([s1, s2], axis_name, axis_index_groups)
    count = n * axis_size(axis_name, axis_index_groups)
  else:
    s1, s2, count = all_reduce_sum([s1, s2, n], axis_name, axis_index_groups)
  m1 = _safe_div(s1, count)
  var = jnp.maximum(_safe_div(s2, count) - m1 * m1, 0)
  return Moments(local + m1, var, count)
