"""Glue shared by :mod:`jbn.linen` and :mod:`jbn.nnx` (no maths).

Both modules translate Flax's conventions (``use_running_average``, a mask of
any dtype broadcast by NumPy rules, shape-only calls) into one call of
:func:`jbn.batch_norm`. This module imports no Flax: ``jbn.nnx`` does not
import ``jbn.linen``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jbn import _functional
from jbn import _layout
from jbn import _moments

Array = jax.Array


class Options(NamedTuple):
  """The batch-norm arguments a Flax module holds as fields."""

  axis: Any
  momentum: Any
  epsilon: float
  dtype: Any
  axis_name: Any
  axis_index_groups: Any
  sync: str
  ghost_batch_size: int | None


def feature_shape(x: Array, axis) -> tuple[int, ...]:
  """The sizes of ``x``'s feature axes (the core's axis errors if bad)."""
  return _layout.layout(x.shape, axis).feature_shape


def train_flag(use_running_average: Any) -> bool | Array:
  """``not use_running_average``, for a Python value or a boolean scalar array.

  A (possibly traced) boolean scalar array becomes its logical negation, so
  one compiled function can serve both modes.
  """
  if isinstance(use_running_average, jax.Array):
    if (use_running_average.ndim != 0
        or use_running_average.dtype != jnp.bool_):
      raise TypeError(
          f"use_running_average must be a Python bool or a boolean scalar "
          f"array, got an array of dtype {use_running_average.dtype} and "
          f"shape {use_running_average.shape}.")
    return jnp.logical_not(use_running_average)
  return not use_running_average


def flax_mask(mask: Array | None, ndim: int) -> Array | None:
  """A Flax-style mask (any dtype, NumPy-broadcastable to ``x``) for jbn.

  Flax casts the mask to bool and broadcasts it against ``x`` by NumPy rules;
  :func:`jbn.batch_norm` wants a boolean mask of ``x``'s rank (or of ``x``
  without its feature axes). Left-padding with size-1 axes gives NumPy's
  meaning without materializing a full-size mask.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask, dtype=bool)
  if mask.ndim < ndim:
    mask = mask.reshape((1,) * (ndim - mask.ndim) + mask.shape)
  return mask


def one_value_per_feature(x: Array, opts: Options, mask) -> bool:
  """Whether a train-mode call would see one value per feature (locally)."""
  return _functional.values_per_feature(
      x.shape, opts.axis, mask=mask,
      ghost_batch_size=opts.ghost_batch_size) == 1


def no_gradient_through(y: Array, message: str) -> Array:
  """``y``, but differentiating through it raises ``ValueError(message)``.

  The error comes when ``jax.grad``/``jax.jvp`` (``nnx.grad``,
  ``nnx.value_and_grad``, ...) traces the call, i.e. in every training step,
  while forward-only calls (``nnx.tabulate``, ``jax.eval_shape``, a plain
  forward pass) go through.
  """
  @jax.custom_jvp
  def guard(y):
    return y

  @guard.defjvp
  def guard_jvp(primals, tangents):
    raise ValueError(message)

  return guard(y)


def call(opts: Options, params, state, x: Array, train, mask, *, renorm=None,
         local: bool = False):
  """:func:`jbn.batch_norm` with the module's options: ``(y, new_state)``.

  ``local`` drops ``axis_name`` (Flax computes statistics without it while
  initializing, where the mapped axis need not exist).
  """
  return _functional.batch_norm(
      params, state, x, train, axis=opts.axis, momentum=opts.momentum,
      epsilon=opts.epsilon, axis_name=None if local else opts.axis_name,
      axis_index_groups=None if local else opts.axis_index_groups,
      mask=mask, dtype=opts.dtype, sync=opts.sync, renorm=renorm,
      ghost_batch_size=opts.ghost_batch_size)


def one_value_message(x: Array, axis) -> str:
  return _functional.ONE_VALUE.format(
      n=1, where=f"for input of shape {x.shape} with axis={axis!r}")


# The collection (linen) / attribute (nnx) where jbn.recalibrate finds each
# layer's batch moments: (count, shift, delta, m2) stacked, feature-shaped.
MOMENTS = "batch_moments"


def local_moments(x: Array, opts: Options, mask) -> Array:
  """This device's moments of ``x`` (stacked), for recalibration.

  Local on purpose: :func:`jbn.recalibrate` merges participants once, at
  the end (under plain ``jit`` with sharded arrays they are global anyway).
  """
  return jnp.stack(_moments.moments(x, axis=opts.axis, mask=mask))
