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

# Most values per output for which a sum on CPU adds halves (reduce_sum), and
# a broadcast tiles by doubling (tile), instead of reducing (broadcasting).
# XLA:CPU fuses up to 3 halvings into one loop; a deeper fold is split after
# its first halving (an x / 2 temporary), slower than the reduction.
FOLD_MAX = 8


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
  """``jnp.sum(d, axes, keepdims=True)``; on CPU, small sums are folded.

  Where each output adds at most :data:`FOLD_MAX` values (ghost batches, a
  tiny batch), XLA:CPU's reduction (YNNPACK) of ``(groups, g, C)``'s middle
  axis is 3-4x slower than adding halves, ``d[:g/2] + d[g/2:]`` and so on,
  all in one parallel loop. Not for a linear map that reverse mode
  transposes (the transpose of a slice is an ``x``-sized pad); there,
  :func:`tile` is the broadcast whose transpose is this fold.
  """
  def reduce(d):
    return jnp.sum(d, axes, keepdims=True)

  if not foldable(d.shape, axes):
    return reduce(d)
  return choose(d, cpu=lambda d: _fold(d, axes), default=reduce)


def foldable(shape, axes: tuple[int, ...]) -> bool:
  """Whether a sum over ``axes`` adds few enough values to be folded."""
  return 0 not in shape and math.prod(shape[a] for a in axes) <= FOLD_MAX


def tile(w, shape, axes: tuple[int, ...]):
  """``w`` (size 1 on ``axes``) repeated to ``shape``'s size on ``axes``.

  By doubling concatenations, ``log2(n)`` per axis. Transposed (reverse
  mode), each concatenation adds two halves: the transpose is
  :func:`reduce_sum`'s fold.
  """
  for ax in axes:
    w = _double(w, ax, shape[ax])
  return w


def _double(w, ax: int, n: int):
  """``w`` repeated ``n`` times along ``ax``."""
  if n == 1:
    return w
  half = _double(w, ax, n // 2)
  return lax.concatenate([half, half] + [w] * (n % 2), ax)


def _fold(d, axes: tuple[int, ...]):
  """The sum of ``d`` over ``axes`` (keepdims) by adding halves."""
  for ax in axes:
    d = _halve(d, ax)
  return d


def _halve(d, ax: int):
  """The sum of ``d`` along ``ax`` (keepdims): the transpose of _double."""
  n = d.shape[ax]
  if n == 1:
    return d
  h = n // 2
  part = lambda lo, hi: lax.slice_in_dim(d, lo, hi, axis=ax)  # noqa: E731
  total = _halve(part(0, h) + part(h, 2 * h), ax)
  return total + part(2 * h, n) if n % 2 else total
