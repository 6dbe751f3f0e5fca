"""Every collective jbn issues, in one place.

The statistics need at most ONE collective in the forward (an all-reduce of
shifted sums, or of a buffer in which each participant writes its own
per-feature moments) and ONE in the backward. Nothing else in jbn talks to
other devices: the other modules call these functions.

Inside ``jax.shard_map`` values are typed as varying or invariant along each
mesh axis; :func:`varying_axes` reads that type and :func:`to_varying` casts
explicitly, so that the transpose of the cast (a ``psum``) happens once, on
stacked per-feature vectors, instead of once per implicit cast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def axis_names(axis_name) -> tuple:
  """``axis_name`` as a tuple of names (``()`` for None)."""
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def axis_size(axis_name, axis_index_groups=None) -> int:
  """Number of participants a collective over ``axis_name`` sums over.

  Raises ``NameError`` when no enclosing transform binds ``axis_name``.
  """
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  return math.prod(lax.axis_size(n) for n in axis_names(axis_name))


def varying_axes(value) -> frozenset:
  """Mesh axes along which ``value`` varies inside ``shard_map`` (else empty)."""
  aval = jax.typeof(value)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))


def to_varying(values: Sequence[jax.Array], like) -> Sequence[jax.Array]:
  """``values`` (arrays of one shape) cast to vary wherever ``like`` varies.

  Needed once for the per-feature vectors that multiply a varying activation:
  the arrays are stacked and cast together, so the transpose of the cast is
  the backward's ONE all-reduce. Outside ``shard_map`` (no varying types), or
  when they all vary already, they come back as they are.
  """
  want = varying_axes(like)
  if all(want <= varying_axes(v) for v in values):
    return values
  stacked = jnp.stack(values)  # varies along the union of their axes
  missing = tuple(sorted(want - varying_axes(stacked)))
  if missing:
    stacked = lax.pcast(stacked, missing, to="varying")
  return [stacked[i] for i in range(len(values))]


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
  names = axis_names(axis_name)
  index = lax.axis_index(names if len(names) > 1 else names[0])
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
