"""Which axes are features, which are reduced, and what the mask means.

Shared by the functional core, the public moments and the Flax wrappers, so
that they all read ``axis`` and ``mask`` the same way and fail with the same
messages.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Layout(NamedTuple):
  """The axes of one input: features kept, everything else reduced."""

  feat_axes: tuple[int, ...]  # sorted, non-negative
  red_axes: tuple[int, ...]  # every other axis, sorted
  feature_shape: tuple[int, ...]  # sizes of the feature axes
  bshape: tuple[int, ...]  # feature sizes on feature axes, 1 elsewhere


def check_x(x, what: str) -> Array:
  """``x`` as an array of a real floating dtype, or a clear ``TypeError``."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(
        f"{what} expects a real floating-point x, got dtype {x.dtype}. "
        f"Complex inputs are not supported (Flax normalizes them with a "
        f"complex running mean and the variance of |x - mean|); normalize "
        f"the real and imaginary parts as separate features instead, e.g. "
        f"jnp.concatenate([x.real, x.imag], axis=-1).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{what} expects a floating-point x, got dtype {x.dtype}; cast it "
        f"first, e.g. x.astype(jnp.float32).")
  return x


def as_shape(value, name) -> tuple[int, ...]:
  """``value`` (an int or a tuple of ints) as a shape tuple, or a clear error."""
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


def feature_axes(axis, ndim: int) -> tuple[int, ...]:
  """``axis`` (int or tuple) as sorted non-negative axes, or a clear error."""
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


def layout(shape: tuple[int, ...], axis) -> Layout:
  """The :class:`Layout` of an input of ``shape`` with feature ``axis``."""
  if len(shape) == 0:
    raise ValueError("batch norm expects x of rank >= 1, got a scalar.")
  feat = feature_axes(axis, len(shape))
  red = tuple(a for a in range(len(shape)) if a not in feat)
  return Layout(
      feat_axes=feat, red_axes=red,
      feature_shape=tuple(shape[a] for a in feat),
      bshape=tuple(shape[a] if a in feat else 1 for a in range(len(shape))))


def reduced_count(shape: tuple[int, ...], lay: Layout) -> int:
  """Number of values behind each feature in an input of ``shape``."""
  return math.prod(shape[a] for a in lay.red_axes)


def prepare_mask(mask, shape: tuple[int, ...], lay: Layout) -> Array | None:
  """A boolean mask of ``x``'s rank (size 1 or full on each axis), or None.

  Accepts a mask broadcastable to ``x``, or to ``x`` without its feature axes
  (e.g. ``(batch, time)`` for ``x`` of shape ``(batch, time, features)``).
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  given = mask.shape
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be boolean, got dtype {mask.dtype}.")
  if mask.ndim == len(shape) - len(lay.feat_axes) and mask.ndim != len(shape):
    mask = jnp.expand_dims(mask, lay.feat_axes)
  if not (mask.ndim == len(shape) and all(
      m in (1, s) for m, s in zip(mask.shape, shape))):
    raise ValueError(
        f"mask of shape {given} is not broadcastable to x of shape {shape} "
        f"nor to x without its feature axes "
        f"{tuple(shape[a] for a in lay.red_axes)}.")
  return mask
