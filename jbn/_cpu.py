"""XLA:CPU fusion workarounds, applied on CPU only.

XLA:CPU fuses an elementwise producer (a shift ``x - s``, a dtype convert, a
product) into a reduction only when nothing else shares that producer; a
shared producer is materialized in full (an activation-sized temporary) and
read again. jbn's sibling reductions (``sum(x - s)`` and ``sum((x - s)**2)``
in the forward, ``sum(dy)`` and ``sum(dy * (x - mean))`` in the backward)
share their producers, so on CPU each gets private operands behind a chain
of ``optimization_barrier``\\ s (two identical barriers would be merged, so
they are chained). The barriers are identities: nothing is copied.

On GPU and TPU the opposite is wanted: sibling reductions that read the same
operand are fused into one pass over it, which barriers would prevent. Both
helpers here are ``lax.platform_dependent``, resolved when the program is
lowered: a CUDA or TPU program holds no barrier at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax

# Sums on CPU (reduce_sum) and their transposes (tile) fold by halves. At
# most FOLD_MAX values per output are folded all the way (one loop); larger
# sums fold FOLD_LEVELS halvings (XLA:CPU makes two loops writing 1/16 of x
# each), then reduce. Measured on 4-D ghost steps: 3 halvings, 1/4 x of
# temporaries and 0.77-1.17x plain; 4, 1/8 x and 0.66-0.97x; 5, XLA splits
# the fold badly (4x x in bfloat16, 1.0-1.6x); whole folds of more than 8
# values are split after their first halving (an x/2 temporary).
FOLD_MAX = 8
FOLD_LEVELS = 4


def choose(*args, cpu, default):
  """``cpu(*args)`` in a program lowered for CPU, ``default(*args)`` elsewhere.

  Resolved when the program is lowered (``lax.platform_dependent``): the
  compiler never sees a conditional.
  """
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def chain(values: Any, n: int) -> list[Any]:
  """``n`` copies of ``values`` behind chained barriers (use in a CPU branch).

  Give each reduction one copy and build its elementwise producer from that
  copy only: XLA cannot merge the copies, so each producer stays private.
  """
  out = []
  for _ in range(n):
    values = lax.optimization_barrier(values)
    out.append(values)
  return out


def private_map(fn, args: tuple, n: int) -> list[Any]:
  """``n`` values of ``fn(*args)``: on CPU each from private copies of ``args``.

  Elsewhere ``fn`` runs once and its value is used ``n`` times, so that the
  sibling reductions reading it are fused into one pass.
  """
  return choose(*args,
                cpu=lambda *a: [fn(*copy) for copy in chain(a, n)],
                default=lambda *a: [fn(*a)] * n)


def _barrier_sum(terms):
  acc = lax.optimization_barrier(terms[-1])
  for term in reversed(terms[1:-1]):
    acc = lax.optimization_barrier(term + acc)
  return terms[0] + acc


def fan_in(terms: Sequence[Any], dtype) -> Any:
  """``sum(terms).astype(dtype)``, shaped so its transpose hands out copies.

  In a linear (tangent) map the sum is exact up to the final rounding to
  ``dtype`` elsewhere; on CPU each term is rounded to ``dtype`` first and the
  terms are added through a chain of barriers, so that, transposed for
  reverse mode, each reduction the transpose makes converts and reads the
  cotangent on its own (a shared convert would be an activation-sized
  float32 temporary). For float32 the two are the same.
  """
  terms = list(terms)

  def cpu(ts):
    ts = [t.astype(dtype) for t in ts]
    return ts[0] if len(ts) == 1 else _barrier_sum(ts)

  return choose(terms, cpu=cpu,
                default=lambda ts: sum(ts[1:], ts[0]).astype(dtype))


def reduce_sum(d, axes: tuple[int, ...]):
  """``jnp.sum(d, axes, keepdims=True)``; on CPU, through a fold.

  For per-group sums (ghost batches): XLA:CPU's reduction (YNNPACK) of the
  middle axis of ``(groups, g, C)`` runs at half the speed of its reduction
  of plain batch norm's leading axis, and a loop adding halves of the same
  data 2-3x faster than it. On CPU, halvings (``d[:n/2] + d[n/2:]``) in
  parallel loops come first: all the way where at most :data:`FOLD_MAX`
  values are added; else :data:`FOLD_LEVELS` of them (the loops write 1/8
  of what they read), a barrier, and the reduction of the rest. (This also
  speeds plain batch norm's sums 1.1-1.9x, but its temporaries would go
  from ~0 to 1/8 of ``x`` in float32; not used there.) Not for a linear map
  that reverse mode transposes (the transpose of a slice is an ``x``-sized
  pad): there, :func:`tile` is the broadcast whose transpose is this fold.
  """
  def reduce(d):
    return jnp.sum(d, axes, keepdims=True)

  kind, halvings = _plan(d.shape, axes)
  if kind is None:
    return reduce(d)

  def cpu(d):
    if kind == "whole":
      for a in axes:
        d = _halve(d, a)
      return d
    for ax in halvings:
      d = _half(d, ax)
    return reduce(lax.optimization_barrier(d))

  return choose(d, cpu=cpu, default=reduce)


def tile(w, shape, axes: tuple[int, ...]):
  """``jnp.broadcast_to(w, shape)`` for a ``w`` of size 1 on ``axes``.

  On CPU, the mirror of :func:`reduce_sum`: doubling concatenations (after
  a broadcast to 1/16 of ``shape`` and a barrier, for a partial fold), so
  that transposed (reverse mode) the sum over ``axes`` is that fold.
  """
  def broadcast(w):
    return jnp.broadcast_to(w, shape)

  kind, halvings = _plan(shape, axes)
  if kind is None:
    return broadcast(w)

  def cpu(w):
    if kind == "whole":
      for a in axes:
        w = _double(w, a, shape[a])
      return w
    part = list(shape)
    for ax in halvings:
      part[ax] //= 2
    w = lax.optimization_barrier(jnp.broadcast_to(w, part))
    for ax in reversed(halvings):
      w = lax.concatenate([w, w], ax)
    return w

  return choose(w, cpu=cpu, default=broadcast)


def _plan(shape, axes: tuple[int, ...]):
  """``("whole", None)``, ``("part", halvings)`` or ``(None, None)``.

  Whole: at most :data:`FOLD_MAX` values per output, every axis folded.
  Part: :data:`FOLD_LEVELS` halvings of even sizes, taken from ``axes`` in
  order (the axes of each, in order). None: no fold (a plain reduction).
  """
  if 0 in shape or not axes:
    return None, None
  if math.prod(shape[a] for a in axes) <= FOLD_MAX:
    return "whole", None
  halvings = []
  for ax in axes:
    n = shape[ax]
    while n % 2 == 0 and len(halvings) < FOLD_LEVELS:
      halvings.append(ax)
      n //= 2
  if len(halvings) < FOLD_LEVELS:
    return None, None
  return "part", halvings


def _double(w, ax: int, n: int):
  """``w`` repeated ``n`` times along ``ax``."""
  if n == 1:
    return w
  half = _double(w, ax, n // 2)
  return lax.concatenate([half, half] + [w] * (n % 2), ax)


def _halve(d, ax: int):
  """The sum of ``d`` along ``ax`` (keepdims) by halves: _double's
  transpose."""
  n = d.shape[ax]
  if n == 1:
    return d
  h = n // 2
  total = _halve(_half(d, ax), ax)
  return total + lax.slice_in_dim(d, 2 * h, n, axis=ax) if n % 2 else total


def _half(d, ax: int):
  """``d[:h] + d[h:2h]`` along ``ax`` (``h = n // 2``)."""
  h = d.shape[ax] // 2
  return (lax.slice_in_dim(d, 0, h, axis=ax)
          + lax.slice_in_dim(d, h, 2 * h, axis=ax))
