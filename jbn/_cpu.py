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

from collections.abc import Sequence
from typing import Any

from jax import lax


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
