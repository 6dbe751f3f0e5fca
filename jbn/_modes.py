"""Training modes: what turns batch statistics into ``y = (x - c) * a + b``.

Every train-mode forward of :func:`jbn.batch_norm` normalizes with four
per-feature vectors computed here from the batch moments (and, for batch
renormalization, the running statistics):

* ``center`` ``c``: the batch mean (the value subtracted from ``x``);
* ``inv``: ``1 / sqrt(batch_var + epsilon)``, through which the output
  depends on the batch variance;
* ``gain``: what multiplies ``scale`` into ``a = scale * gain``;
* ``offset``: what multiplies ``scale`` into ``b = bias + scale * offset``.

Plain batch norm: ``gain = inv``, ``offset = 0``. Batch renormalization
(Ioffe, 2017): ``gain = r * inv``, ``offset = d`` with ``r`` and ``d`` held
constant in differentiation. The closed-form derivative in
:mod:`jbn._functional` is written in these four vectors, so a mode changes
coefficients, never the normalization or its derivative.

Ghost batch norm is a *view*: the batch axis is split into groups that each
get their own moments (the group axis is kept like a feature axis), and the
groups' statistics are combined into one running-statistics update.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _cpu
from jbn import _layout
from jbn import _parallel

Array = jax.Array


class RenormClip(NamedTuple):
  """Clipping of batch renormalization's corrections ``r`` and ``d``.

  ``r = clip(sigma_B / sigma, rmin, rmax)`` and
  ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``, where ``mu``/``sigma``
  come from the running statistics. ``RenormClip(1, 0)`` is plain batch
  norm. Fields may be Python floats or (traced) scalars, so a schedule
  (:func:`jbn.renorm_clip`) never recompiles.

  Attributes:
    rmax: upper bound of ``r``, >= 1.
    dmax: bound of ``|d|``, >= 0.
    rmin: lower bound of ``r``; ``None`` means ``1 / rmax``.
  """

  rmax: Any
  dmax: Any
  rmin: Any = None


def renorm_clip(step, *, warmup_steps: int = 5000, rmax: float = 3.0,
                dmax: float = 5.0, rmax_steps: int = 40000,
                dmax_steps: int = 25000) -> RenormClip:
  """The batch-renorm clipping schedule of Ioffe (2017), at ``step``.

  Plain batch norm (``rmax = 1``, ``dmax = 0``) for the first
  ``warmup_steps`` steps, then both bounds relax linearly, reaching ``rmax``
  at ``rmax_steps`` and ``dmax`` at ``dmax_steps`` (the paper's ImageNet
  schedule, in steps of batch 32: 5k, 40k, 25k).

  Args:
    step: the training step (an int or a traced integer scalar).
    warmup_steps: steps of plain batch norm.
    rmax: final upper bound of ``r`` (>= 1).
    dmax: final bound of ``|d|`` (>= 0).
    rmax_steps: step at which ``rmax`` is reached (>= ``warmup_steps``).
    dmax_steps: step at which ``dmax`` is reached (>= ``warmup_steps``).

  Returns:
    A :class:`jbn.RenormClip` of float32 scalars (``rmin = 1 / rmax``).

  Raises:
    ValueError: bounds or steps out of order.

  Example:
    >>> import jbn
    >>> [round(float(jbn.renorm_clip(s).rmax), 4) for s in (0, 5000, 22500, 40000)]
    [1.0, 1.0, 2.0, 3.0]
  """
  if not rmax >= 1 or not dmax >= 0:
    raise ValueError(f"renorm_clip needs rmax >= 1 and dmax >= 0, got "
                     f"rmax={rmax!r}, dmax={dmax!r}.")
  if not (0 <= warmup_steps <= rmax_steps and warmup_steps <= dmax_steps):
    raise ValueError(
        f"renorm_clip needs 0 <= warmup_steps <= rmax_steps and warmup_steps "
        f"<= dmax_steps, got warmup_steps={warmup_steps!r}, "
        f"rmax_steps={rmax_steps!r}, dmax_steps={dmax_steps!r}.")
  step = jnp.asarray(step, jnp.float32)

  def ramp(end):
    return jnp.clip((step - warmup_steps) / max(end - warmup_steps, 1), 0, 1)

  r = 1 + (rmax - 1) * ramp(rmax_steps)
  return RenormClip(rmax=r, dmax=dmax * ramp(dmax_steps), rmin=1 / r)


def check_renorm(renorm) -> RenormClip | None:
  """``renorm`` as a :class:`RenormClip` with ``rmin`` set, or a clear error."""
  if renorm is None:
    return None
  if not isinstance(renorm, RenormClip):
    raise TypeError(f"renorm must be None or a jbn.RenormClip (e.g. "
                    f"jbn.renorm_clip(step)), got {renorm!r}.")
  rmin = renorm.rmin
  concrete = {}
  for name in ("rmax", "dmax", "rmin"):
    value = getattr(renorm, name)
    try:
      concrete[name] = None if value is None else float(value)
    except (TypeError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError):
      concrete[name] = None
  rmax_, dmax_, rmin_ = concrete["rmax"], concrete["dmax"], concrete["rmin"]
  if rmax_ is not None and not rmax_ >= 1:
    raise ValueError(f"renorm.rmax={renorm.rmax!r} must be >= 1 (1 keeps "
                     f"r = 1: plain batch norm).")
  if dmax_ is not None and not dmax_ >= 0:
    raise ValueError(f"renorm.dmax={renorm.dmax!r} must be >= 0.")
  if rmin_ is not None and not 0 < rmin_ <= 1:
    raise ValueError(f"renorm.rmin={renorm.rmin!r} must be in (0, 1].")
  if rmin is None:
    rmin = 1 / jnp.asarray(renorm.rmax, jnp.float32)
  return RenormClip(*(jnp.asarray(v, jnp.float32)
                      for v in (renorm.rmax, renorm.dmax, rmin)))


class Coefficients(NamedTuple):
  """Per-feature vectors of one train-mode normalization (keepdims)."""

  center: Array  # c: subtracted from x (the batch mean)
  inv: Array  # 1 / sqrt(batch var + epsilon)
  gain: Array  # a = scale * gain
  offset: Array | None  # b = bias + scale * offset (None: 0)
  a: Array
  b: Array | None  # None: 0


def coefficients(mean: Array, var: Array, count: Array, scale: Array | None,
                 bias: Array | None, *, epsilon: float,
                 renorm: RenormClip | None = None,
                 running: tuple[Array, Array] | None = None) -> Coefficients:
  """The :class:`Coefficients` of plain batch norm or batch renorm.

  ``scale``/``bias`` broadcast against ``mean``; ``running`` is the running
  ``(mean, var)`` (renorm only). A feature with no valid value gets
  ``r = 1``, ``d = 0`` under renorm.
  """
  inv = lax.rsqrt(var + epsilon)
  if renorm is None:
    gain, offset = inv, None
  else:
    run_mean, run_var = running
    run_inv = lax.rsqrt(run_var + epsilon)
    r = jnp.clip(jnp.sqrt(var + epsilon) * run_inv, renorm.rmin, renorm.rmax)
    d = jnp.clip((mean - run_mean) * run_inv, -renorm.dmax, renorm.dmax)
    # No valid value, or unusable running statistics (a damaged state):
    # plain batch norm for that feature.
    ok = ((count > 0) & jnp.isfinite(run_mean) & jnp.isfinite(run_var)
          & (run_var >= 0))
    r = lax.stop_gradient(jnp.where(ok, r, 1))
    d = lax.stop_gradient(jnp.where(ok, d, 0))
    # `one` is exactly 1 (x / x of a finite positive x), but XLA cannot
    # know it: dividing `a` and `b` by it ends their per-feature arithmetic
    # (clips, selects) in a division, which XLA computes once per feature
    # instead of fusing it into every element of the y and dx loops (an
    # optimization barrier does not stop that fusion). Bits unchanged.
    sigma = lax.stop_gradient(jnp.where(ok, jnp.sqrt(run_var + epsilon), 1))
    one = sigma / sigma
    gain, offset = r * inv, d
  a = gain if scale is None else gain * scale
  b = bias
  if offset is not None and scale is not None:
    b = scale * offset if b is None else b + scale * offset
  elif offset is not None:
    b = offset if b is None else b + offset
  if renorm is not None:
    a, b = a / one, b / one
  return Coefficients(mean, inv, gain, offset, a, b)


# --------------------------------------------------------------------------
# Ghost batch norm


def check_ghost(ghost_batch_size, shape, lay: _layout.Layout, axis_name):
  """Validates ``ghost_batch_size`` against ``x``'s leading (batch) axis."""
  if ghost_batch_size is None:
    return None
  if (not isinstance(ghost_batch_size, numbers.Integral)
      or isinstance(ghost_batch_size, bool) or ghost_batch_size < 1):
    raise ValueError(f"ghost_batch_size must be None or an int >= 1, got "
                     f"{ghost_batch_size!r}.")
  if 0 in lay.feat_axes:
    raise ValueError(
        f"ghost_batch_size splits the leading (batch) axis of x into groups, "
        f"but axis 0 is a feature axis (axis={lay.feat_axes!r}).")
  batch = shape[0]
  if batch % ghost_batch_size:
    hint = ""
    if ghost_batch_size > batch:
      hint = (" It is larger than the batch: ghost batches are local to each "
              "device (the batch here is this device's share); for "
              "statistics over more values than one device holds, use "
              "axis_name (and axis_index_groups) without ghost_batch_size.")
    raise ValueError(
        f"ghost_batch_size={ghost_batch_size} must divide the batch size "
        f"{batch} (the leading axis of x, of shape {shape}).{hint}")
  return int(ghost_batch_size)


def ghost_red_axes(red_axes: tuple[int, ...]) -> tuple[int, ...]:
  """The reduced axes of a :func:`ghost_split` ``x``: all but groups, features."""
  return (1,) + tuple(a + 1 for a in red_axes if a != 0)


def ghost_split(a: Array | None, ghost_batch_size: int) -> Array | None:
  """``a`` (``x``, or a mask of its rank) with axis 0 split into groups.

  ``(B, ...)`` becomes ``(B // g, g, ...)``; a size-1 leading axis (a mask
  broadcast over the batch) becomes ``(1, 1, ...)``. The group axis is kept
  like a feature axis: moments over :func:`ghost_red_axes` are per group.
  """
  if a is None:
    return None
  lead = ((1, 1) if a.shape[0] == 1 and ghost_batch_size != 1
          else (a.shape[0] // ghost_batch_size, ghost_batch_size))
  return a.reshape(lead + a.shape[1:])


def combine_groups(mean: Array, var: Array, count: Array, axis_name,
                   axis_index_groups):
  """One running-statistics update from per-group statistics (axis 0).

  The count-weighted mean over groups (and devices: ONE all-reduce of 3C
  values) of their means and biased variances: what batch norm at the ghost
  batch size converges to.
  """
  n, sm, sv = (_sum_groups(w) for w in (count, count * mean, count * var))
  n, sm, sv = _parallel.all_reduce_sum([n, sm, sv], axis_name,
                                       axis_index_groups)
  den = jnp.maximum(n, 1)
  return sm / den, sv / den, n


def _flat(w: Array) -> Array:
  """Per-group vectors ``(G, 1, ..., C)`` as a ``(G, F)`` matrix.

  XLA:CPU (YNNPACK) reduces axis 0 of a product of ``(G, 1, C)`` arrays
  about 8x slower than the same product as ``(G, C)`` (2.2 vs 0.28 ms at
  G=128, C=4096): the reductions over groups go through this view.
  """
  return w.reshape(w.shape[0], -1)


def _sum_groups(w: Array) -> Array:
  """The sum over groups (axis 0) of per-group vectors, keepdims."""
  return jnp.sum(_flat(w), axis=0).reshape((1,) + w.shape[1:])


def times_groups(t: Array, w: Array) -> Array:
  """``t * w`` for a per-feature ``t`` (size 1 on axis 0), per-group ``w``.

  Transposed (reverse mode: ``t`` is a parameter's tangent), the product's
  sum over groups is a ``(G, F)`` reduction, see :func:`_flat`.
  """
  return (t.reshape(1, -1) * _flat(w)).reshape(w.shape)


def ghost_broadcast(u: Array, v: Array, shape, red_axes) -> list[Array]:
  """The tangent's per-group vectors ``u``, ``v`` broadcast to ``shape``.

  ``shape`` is the ghost view of ``x``. Transposed (reverse mode), these
  broadcasts are the backward's per-group sums of the cotangent. On CPU:

  * the vectors pass a barrier, so that the transposed sums stay whole.
    Without it XLA:CPU merges them into dbias's sum over the whole batch
    (two passes sharing a materialized float32 copy of a bfloat16
    cotangent) and fuses that into dx's loop, next to a materialized
    x-sized broadcast of ``a``;
  * the vectors are tiled (:func:`jbn._cpu.tile`): transposed, the sums
    add halves in a loop first, as the forward's do
    (:func:`jbn._cpu.reduce_sum`).

  Elsewhere (GPU, TPU): plain broadcasts, no barrier.
  """
  def broadcast(w):
    return jnp.broadcast_to(w, shape)

  def cpu(u, v):
    u, v = lax.optimization_barrier((u, v))
    return [_cpu.tile(w, shape, red_axes) for w in (u, v)]

  return _cpu.choose(u, v, cpu=cpu,
                     default=lambda u, v: [broadcast(u), broadcast(v)])

