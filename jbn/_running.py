"""The running statistics: one update rule, its guards, and warm start.

:func:`update` is the only place jbn writes ``state``. Given the batch's mean,
biased variance and valid count per feature (no gradient), it returns::

    new = momentum * old + (1 - momentum) * batch          (Flax/Keras EMA)

with these rules, in this order:

* a feature whose batch holds no valid value keeps ``old`` (and its count);
* where ``old`` is unusable (a non-finite mean or variance, or a negative
  variance, e.g. from a damaged checkpoint) the batch value replaces it, so
  a train step on finite data never writes a non-finite or negative value;
* with warm start (``'count'`` in ``state``): the rate is
  ``max(1 / t, 1 - momentum)`` for the feature's ``t``-th update, so the
  first update replaces the initial mean 0 / var 1, the first
  ``1 / (1 - momentum)`` updates are the exact cumulative average, and the
  plain EMA follows. No debiasing division at evaluation (no ``0 / 0``, no
  bf16 rounding of the decay).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# A warm-start count that is saturated for any momentum in use: 1 / 2**30 is
# below any 1 - momentum a float32 can tell from 0 at momentum < 1.
SATURATED = 2 ** 30


def update(state: Mapping[str, Array], mean: Array, var: Array, count: Array,
           momentum) -> dict[str, Array]:
  """The new running statistics after one batch (see the module docstring).

  Args:
    state: ``{'mean', 'var'}`` and, for warm start, an int ``'count'``;
      other keys are carried through unchanged.
    mean, var, count: the batch's statistics, of the feature shape.
    momentum: decay kept on the old value.

  Returns:
    A new dict with the same keys and dtypes.
  """
  old_mean, old_var = state["mean"], state["var"]
  seen = count > 0
  usable = (jnp.isfinite(old_mean) & jnp.isfinite(old_var) & (old_var >= 0))
  new = dict(state)
  if "count" in state:
    old_count = jnp.where(usable, state["count"], 0)
    t = jnp.minimum(old_count + 1, SATURATED)
    rate = jnp.maximum(1 / t.astype(mean.dtype), 1 - momentum)
    warm = rate > 1 - momentum
    new["count"] = jnp.where(seen, t, state["count"]).astype(
        state["count"].dtype)
  else:
    warm = jnp.zeros((), bool)
    rate = None
  for key, old, batch in (("mean", old_mean, mean), ("var", old_var, var)):
    ema = momentum * old + (1 - momentum) * batch
    if rate is not None:
      ema = jnp.where(warm, (1 - rate) * old + rate * batch, ema)
    value = jnp.where(usable, ema, batch)
    new[key] = jnp.where(seen, value, old).astype(old.dtype)
  return new


def upgrade_state(state: Mapping[str, Array], *, count=None) -> dict:
  """Adds the warm-start ``'count'`` to running statistics that lack it.

  A state made without ``warm_start`` (e.g. a Flax checkpoint) continues
  with warm-start updates from here on.

  Args:
    state: ``{'mean', 'var'}`` (any extra keys are kept).
    count: updates already made per feature: ``None`` (default) for
      "already warm" (saturated: the plain EMA continues), an int or an int
      array of the feature shape (``0`` makes the next update replace the
      statistics).

  Returns:
    A new dict with an int32 ``'count'`` of the feature shape.

  Raises:
    ValueError: ``state`` has a ``'count'`` already, lacks ``'mean'``, or
      ``count`` is negative or of the wrong shape.
    TypeError: ``count`` is not an integer.

  Example:
    >>> import jbn
    >>> _, state = jbn.init(2)
    >>> jbn.upgrade_state(state, count=0)['count']
    Array([0, 0], dtype=int32)
  """
  if "mean" not in state:
    raise ValueError("state has no 'mean': pass running statistics as made "
                     "by jbn.init (or a Flax BatchNorm's batch_stats).")
  if "count" in state:
    raise ValueError("state has a 'count' already: it is warm-start state.")
  shape = jnp.shape(state["mean"])
  if count is None:
    value = jnp.full(shape, SATURATED, jnp.int32)
  else:
    value = jnp.asarray(count)
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"count must be an int or an int array, got dtype "
                      f"{value.dtype}.")
    if value.ndim and value.shape != shape:
      raise ValueError(f"count has shape {value.shape}; expected {shape} "
                       f"(the shape of state['mean']) or a scalar.")
    if bool(jnp.any(value < 0)):
      raise ValueError(f"count must be >= 0, got {count!r}.")
    value = jnp.broadcast_to(jnp.minimum(value, SATURATED), shape).astype(
        jnp.int32)
  return {**state, "count": value}
