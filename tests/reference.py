"""An independent float64 reference for batch norm (tests only).

Nothing here imports jbn: the forward pass is written in float64 NumPy from
the definition, and the gradients are JAX autodiff of the same formulas in
float64 (under ``jax.enable_x64``), so they check jbn's closed-form
``custom_vjp`` against plain calculus.

Conventions pinned here (the public contract of ``jbn.batch_norm``):

* statistics reduce over every axis but the feature axes;
* the variance is the biased (population) one;
* ``new = momentum * old + (1 - momentum) * batch`` (Flax convention);
* ``mask`` is broadcastable to ``x`` or to ``x`` without its feature axes;
  masked-out elements do not count in the statistics but are still
  normalized; a feature with no valid element keeps its running statistics.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Forward(NamedTuple):
  """Reference results, all float64 NumPy."""

  y: np.ndarray  # x.shape
  batch_mean: np.ndarray  # feature shape
  batch_var: np.ndarray  # feature shape, biased
  count: np.ndarray  # feature shape, number of valid elements
  new_mean: np.ndarray  # feature shape
  new_var: np.ndarray  # feature shape


def feature_axes(axis, ndim: int) -> tuple[int, ...]:
  """Canonical, sorted, non-negative feature axes."""
  axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
  return tuple(sorted(int(a) % ndim for a in axes))


def _layout(shape, axis):
  feat = feature_axes(axis, len(shape))
  red = tuple(a for a in range(len(shape)) if a not in feat)
  bshape = tuple(shape[a] if a in feat else 1 for a in range(len(shape)))
  fshape = tuple(shape[a] for a in feat)
  return feat, red, bshape, fshape


def full_mask(mask, shape, axis) -> np.ndarray:
  """``mask`` as a boolean array of ``shape`` (the shape of ``x``)."""
  feat, _, _, _ = _layout(shape, axis)
  mask = np.asarray(mask, dtype=bool)
  if mask.ndim == len(shape) - len(feat) and mask.ndim != len(shape):
    mask = np.expand_dims(mask, feat)
  return np.broadcast_to(mask, shape)


def _batch_stats(x, red, mask):
  """Mean, biased variance and count over ``red`` (keepdims), float64."""
  m = np.ones(x.shape, bool) if mask is None else mask
  count = m.sum(axis=red, keepdims=True).astype(np.float64)
  safe = np.maximum(count, 1)
  # where, not m * x: a masked-out nan/inf must not reach the statistics.
  mean = np.where(m, x, 0).sum(axis=red, keepdims=True) / safe
  var = np.where(m, (x - mean) ** 2, 0).sum(axis=red, keepdims=True) / safe
  return mean, var, count


def forward(x, scale=None, bias=None, mean=None, var=None, *, train=True,
            axis=-1, momentum=0.99, epsilon=1e-5, mask=None) -> Forward:
  """Batch norm in float64 NumPy, from its definition.

  Args:
    x: input (any dtype; converted to float64).
    scale, bias: per-feature parameters, or None (no scale / no bias).
    mean, var: running statistics (default: zeros / ones, as ``jbn.init``).
    train: batch statistics (True) or running ones (False).
    axis: feature axis or axes.
    momentum, epsilon: as in ``jbn.batch_norm``.
    mask: boolean, broadcastable to ``x`` or to ``x`` without feature axes.

  Returns:
    A :class:`Forward`. In eval mode the batch fields hold the running
    statistics and the new ones equal the old ones.
  """
  x = np.asarray(x, np.float64)
  _, red, bshape, fshape = _layout(x.shape, axis)
  mean = np.zeros(fshape) if mean is None else np.asarray(mean, np.float64)
  var = np.ones(fshape) if var is None else np.asarray(var, np.float64)
  mask = None if mask is None else full_mask(mask, x.shape, axis)
  if train:
    bmean, bvar, count = _batch_stats(x, red, mask)
    bmean, bvar, count = (v.reshape(fshape) for v in (bmean, bvar, count))
    keep = count > 0
    new_mean = np.where(keep, momentum * mean + (1 - momentum) * bmean, mean)
    new_var = np.where(keep, momentum * var + (1 - momentum) * bvar, var)
  else:
    bmean, bvar = mean, var
    count = np.full(fshape, float(np.prod([x.shape[a] for a in red])))
    new_mean, new_var = mean, var
  y = (x - bmean.reshape(bshape)) / np.sqrt(bvar.reshape(bshape) + epsilon)
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(bshape)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(bshape)
  return Forward(y, bmean, bvar, count, new_mean, new_var)


def _jax_train_forward(x, scale, bias, *, axis, epsilon, mask):
  """Train-mode ``y`` in JAX, to be differentiated in float64."""
  _, red, bshape, _ = _layout(x.shape, axis)
  m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(
      mask, x.shape)
  count = jnp.maximum(jnp.sum(m, axis=red, keepdims=True, dtype=x.dtype), 1)
  # where, not m * x: a masked-out nan/inf must not reach the statistics.
  mean = jnp.sum(jnp.where(m, x, 0), axis=red, keepdims=True) / count
  var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0), axis=red,
                keepdims=True) / count
  y = (x - mean) / jnp.sqrt(var + epsilon)
  if scale is not None:
    y = y * scale.reshape(bshape)
  if bias is not None:
    y = y + bias.reshape(bshape)
  return y


def grads(x, scale, bias, cotangent, *, axis=-1, epsilon=1e-5, mask=None):
  """Gradients of ``sum(cotangent * y)`` w.r.t. ``(x, scale, bias)``.

  Autodiff of the train-mode definition in float64 JAX. ``scale`` / ``bias``
  may be None (their gradient is then None).

  Returns:
    ``(dx, dscale, dbias)`` as float64 NumPy arrays (or None).
  """
  with jax.enable_x64(True):
    x64, s64, b64, ct64 = (None if v is None else jnp.asarray(
        np.asarray(v, np.float64)) for v in (x, scale, bias, cotangent))
    m = None if mask is None else jnp.asarray(
        full_mask(mask, np.shape(x), axis))

    def loss(x_, s_, b_, ct_, m_):
      y = _jax_train_forward(x_, s_, b_, axis=axis, epsilon=epsilon, mask=m_)
      return jnp.sum(ct_ * y)

    # jit: one compilation instead of one per primitive (much faster).
    out = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x64, s64, b64, ct64, m)
    return tuple(None if g is None else np.asarray(g, np.float64)
                 for g in out)


# --------------------------------------------------------------------------
# Per-feature statistics of the valid values, and forward-mode derivatives


class ValidStats(NamedTuple):
  """Two-pass float64 statistics of the valid values, per feature."""

  mean: np.ndarray  # feature shape (0 where count == 0)
  var: np.ndarray  # biased (0 where count == 0)
  count: np.ndarray  # number of valid values
  spread: np.ndarray  # max |value - mean| over the valid values (0 if none)


def valid_stats(x, mask=None, *, axis=-1) -> ValidStats:
  """Float64 two-pass mean / biased variance of the valid values of ``x``.

  Masked-out values are never read (they may be nan or inf). ``x`` is taken
  as given (e.g. already rounded to float32): the reference of a float32
  computation is the exact statistics of the float32 data.
  """
  x = np.asarray(x, np.float64)
  feat, red, _, fshape = _layout(x.shape, axis)
  m = (np.ones(x.shape, bool) if mask is None
       else full_mask(mask, x.shape, axis))
  perm = list(red) + list(feat)
  xs = np.transpose(x, perm).reshape((-1,) + fshape)
  ms = np.transpose(m, perm).reshape((-1,) + fshape)
  count = ms.sum(axis=0)
  safe = np.maximum(count, 1)
  mean = np.where(ms, xs, 0).sum(axis=0) / safe
  dev = np.where(ms, xs - mean, 0)
  var = (dev ** 2).sum(axis=0) / safe
  spread = np.abs(dev).max(axis=0) if xs.shape[0] else np.zeros(fshape)
  return ValidStats(mean, var, count.astype(np.float64), spread)


@functools.partial(jax.jit, static_argnames=("axis", "epsilon"))
def _jvp64(primals, tangents, mask, *, axis, epsilon):
  def f(x, s, b):
    return _jax_train_forward(x, s, b, axis=axis, epsilon=epsilon, mask=mask)
  return jax.jvp(f, primals, tangents)


def jvp(x, scale, bias, tx, tscale, tbias, *, axis=-1, epsilon=1e-5,
        mask=None):
  """``(y, dy)`` of train-mode batch norm, forward-mode autodiff in float64.

  ``scale`` / ``bias`` may be None (then their tangents are ignored); a
  tangent of None is a zero tangent. ``tx`` may have a leading batch axis of
  tangents (the Jacobian-vector product of each).
  """
  with jax.enable_x64(True):
    def as64(v):
      return None if v is None else jnp.asarray(np.asarray(v, np.float64))
    x64, s64, b64 = as64(x), as64(scale), as64(bias)
    tx64 = jnp.zeros_like(x64) if tx is None else as64(tx)
    ts64 = None if s64 is None else (
        jnp.zeros_like(s64) if tscale is None else as64(tscale))
    tb64 = None if b64 is None else (
        jnp.zeros_like(b64) if tbias is None else as64(tbias))
    m = None if mask is None else jnp.asarray(
        full_mask(mask, np.shape(x), axis))
    if tx64.ndim > x64.ndim:  # a batch of tangents for x
      y, dy = jax.vmap(lambda t: _jvp64((x64, s64, b64), (t, ts64, tb64), m,
                                        axis=axis, epsilon=epsilon))(tx64)
      y = y[0]
    else:
      y, dy = _jvp64((x64, s64, b64), (tx64, ts64, tb64), m, axis=axis,
                     epsilon=epsilon)
    return np.asarray(y, np.float64), np.asarray(dy, np.float64)


def numeric_jvp(x, scale, bias, tx, tscale, tbias, *, axis=-1, epsilon=1e-5,
                mask=None, step=1e-6):
  """Central difference of :func:`forward` (NumPy float64) along a tangent.

  ``(f(p + h t) - f(p - h t)) / 2h`` with ``h = step`` relative to the size
  of the primal: truncation O(h^2), rounding O(1e-16 / h), both ~1e-10
  relative here. No autodiff involved.
  """
  x = np.asarray(x, np.float64)
  parts = [(x, tx), (scale, tscale), (bias, tbias)]
  h = step * max(1.0, float(np.max(np.abs(x))))

  def moved(sign):
    out = []
    for p, t in parts:
      if p is None:
        out.append(None)
      else:
        p = np.asarray(p, np.float64)
        out.append(p if t is None else p + sign * h * np.asarray(t,
                                                                 np.float64))
    return out

  def y(args):
    return forward(args[0], args[1], args[2], axis=axis, epsilon=epsilon,
                   mask=mask).y

  return (y(moved(+1)) - y(moved(-1))) / (2 * h)


@functools.partial(jax.jit, static_argnums=(3,), static_argnames=("axis",
                                                                  "epsilon"))
def _hessian64(x, scale, bias, loss_fn, mask, *, axis, epsilon):
  def loss(x_):
    return loss_fn(_jax_train_forward(x_, scale, bias, axis=axis,
                                      epsilon=epsilon, mask=mask))
  return jax.hessian(loss)(x)


def hessian(x, scale, bias, loss_fn, *, axis=-1, epsilon=1e-5, mask=None):
  """Hessian w.r.t. ``x`` of ``loss_fn(y)`` (a JAX scalar function), float64.

  ``loss_fn`` must be hashable (a module-level function).
  """
  with jax.enable_x64(True):
    def as64(v):
      return None if v is None else jnp.asarray(np.asarray(v, np.float64))
    m = None if mask is None else jnp.asarray(
        full_mask(mask, np.shape(x), axis))
    return np.asarray(_hessian64(as64(x), as64(scale), as64(bias), loss_fn, m,
                                 axis=axis, epsilon=epsilon), np.float64)
