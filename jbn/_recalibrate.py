"""Exact recalibration of running statistics (PreciseBN).

After training with a weight average (SWA, an EMA of the weights,
schedule-free optimizers) or after any change of the parameters, the running
statistics that the EMA of :func:`jbn.batch_norm` wrote no longer describe
the activations of the parameters in hand. Recalibration runs the model in
training mode over some data with the parameters fixed and replaces each
layer's running statistics with statistics computed from that data.

Each ``jbn.linen.BatchNorm`` reports, per call, the moments of its input
(:class:`jbn.Moments`, local to the device, stacked): see the
``'batch_moments'`` hook in :mod:`jbn.linen` and :mod:`jbn.nnx`. They are
merged exactly with Chan's formula (:func:`jbn.merge_moments`), across calls,
batches and, once at the end, devices and processes.

The two estimators, for a layer that saw batches ``b`` of ``n_b`` valid
values with means ``mu_b`` and biased variances ``var_b`` (``N = sum n_b``)::

  pooled:      mean = sum_b n_b mu_b / N
               var  = sum_b n_b (var_b + (mu_b - mean)**2) / N
  batch_mean:  mean = sum_b n_b mu_b / N
               var  = sum_b n_b var_b / N

``pooled`` is the mean and biased variance of all the valid values seen;
``batch_mean`` leaves out the spread of the batch means (law of total
variance), which is what the EMA tends to for batches of equal size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jbn import _flax
from jbn import _moments
from jbn import _running
from jbn._moments import Moments

Array = jax.Array
Path = tuple[str, ...]

ESTIMATORS = ("pooled", "batch_mean")
SOWN = "moments"  # the name jbn.linen.BatchNorm sows its moments under
_NO_BATCH = object()


# --------------------------------------------------------------------------
# Shared with jbn.nnx.recalibrate


def check_estimator(estimator) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(
        f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")


def first_and_rest(batches: Iterable) -> tuple[Any, Iterable]:
  """The first batch and an iterator over the others; raises if none."""
  iterator = iter(batches)
  first = next(iterator, _NO_BATCH)
  if first is _NO_BATCH:
    raise ValueError(
        "batches is empty: recalibrate needs at least one batch to compute "
        "statistics from.")
  return first, iterator


def absorb(rows: Array, moments: Array) -> Array:
  """Merges one call's stacked moments into ``(count, shift, delta, m2, w)``.

  ``rows[:4]`` is a :class:`Moments`; ``rows[4]`` (``w``) sums the ``m2`` of
  every call, the numerator of the ``batch_mean`` variance.
  """
  new = Moments(*moments.astype(rows.dtype))
  merged = _moments.merge(Moments(*rows[:4]), new)
  return jnp.stack([*merged, rows[4] + new.m2])


def finalize(m: Moments, within: Array | None, old: Mapping[str, Array],
             estimator: str) -> dict[str, Array]:
  """A layer's new running statistics from its merged moments.

  Features that saw no valid value keep ``old``. A warm-start ``count``
  becomes :data:`jbn._running.SATURATED` where values were seen: the
  statistics are final estimates, and further training updates them with
  the plain EMA (as after ``jbn.upgrade_state(state)``).
  """
  mean, var = _moments.mean_var(m)
  if estimator == "batch_mean":
    var = within / jnp.maximum(m.count, 1)
  seen = m.count > 0
  new = dict(old)
  new["mean"] = jnp.where(seen, mean, old["mean"]).astype(old["mean"].dtype)
  new["var"] = jnp.where(seen, var, old["var"]).astype(old["var"].dtype)
  if "count" in old:
    new["count"] = jnp.where(seen, _running.SATURATED, old["count"]).astype(
        old["count"].dtype)
  return new


# --------------------------------------------------------------------------
# Trees of layers


def _bn_layers(batch_stats, path: Path = ()) -> dict[Path, Mapping]:
  """Paths of the entries of ``batch_stats`` holding ``mean`` and ``var``."""
  if not isinstance(batch_stats, Mapping):
    return {}
  if "mean" in batch_stats and "var" in batch_stats:
    return {path: batch_stats}
  found = {}
  for key, sub in batch_stats.items():
    found.update(_bn_layers(sub, path + (key,)))
  return found


def _reported(collection, path: Path = ()) -> dict[Path, tuple[Array, ...]]:
  """Each layer's sown moments (one stacked array per call) by path."""
  if not isinstance(collection, Mapping):
    return {}
  if isinstance(collection.get(SOWN), (tuple, list)):
    return {path: tuple(collection[SOWN])}
  found = {}
  for key, sub in collection.items():
    found.update(_reported(sub, path + (key,)))
  return found


def _replace(tree, path: Path, value):
  """A copy of the nested mapping ``tree`` with ``value`` at ``path``."""
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = _replace(tree[path[0]], path[1:], value)
  return new if type(tree) is dict else type(tree)(new)


def _name(path: Path) -> str:
  return "/".join(map(str, path)) or "<root>"


def _check_reported(calls, layers) -> None:
  """Every BatchNorm of ``batch_stats`` reported, and nothing else did."""
  if not calls:
    raise ValueError(
        "recalibrate found no jbn.linen.BatchNorm running in training mode: "
        f"apply_fn reported no '{_flax.MOMENTS}'. Build the model with "
        "jbn.linen.BatchNorm (flax.linen.BatchNorm cannot report its "
        "moments) and pass what puts it in training mode, e.g. "
        "apply_kwargs={'train': True}.")
  unknown = sorted(_name(p) for p in calls if p not in layers)
  if unknown:
    raise ValueError(
        f"jbn.linen.BatchNorm layers {unknown} reported moments but "
        f"variables['batch_stats'] has no statistics for them: pass the "
        f"variables of the model that apply_fn applies.")
  silent = sorted(_name(p) for p in layers if p not in calls)
  if silent:
    raise ValueError(
        f"the batch-norm layers {silent} reported no moments, so their "
        f"running statistics cannot be recalibrated: they are not "
        f"jbn.linen.BatchNorm (e.g. flax.linen.BatchNorm), or were not "
        f"called in training mode.")


def _flat(parts: list[Moments]) -> Moments:
  """Feature-shaped moments concatenated into one 1-D :class:`Moments`."""
  return Moments(*(jnp.concatenate([p[i].reshape(-1) for p in parts])
                   for i in range(4)))


def _unflat(flat: Moments, like: list[Array]) -> list[Moments]:
  out, start = [], 0
  for a in like:
    stop = start + a.size
    out.append(Moments(*(f[start:stop].reshape(a.shape) for f in flat)))
    start = stop
  return out


# --------------------------------------------------------------------------
# The pass


def _merge_calls(acc: Moments, calls: tuple[Array, ...]) -> Moments:
  """``acc`` merged with every call's stacked moments (one Chan merge)."""
  return _moments.merge_stacked(Moments(*(
      jnp.stack([acc[i]] + [c[i].astype(acc[i].dtype) for c in calls])
      for i in range(4))))


def _within(within, calls, axis_name):
  """Adds each call's (global) ``m2`` to ``within``: ``batch_mean`` only.

  With ``axis_name``, the calls of all layers are merged across participants
  in ONE collective, since a batch's variance is that of the global batch.
  """
  order = [(p, c) for p in sorted(calls) for c in calls[p]]
  m2 = [c[3] for _, c in order]
  if axis_name is not None:
    flat = _flat([Moments(*c) for _, c in order])
    merged = _moments.all_moments(flat, axis_name, None)
    m2 = [m.m2 for m in _unflat(merged, m2)]
  new = dict(within)
  for (p, _), v in zip(order, m2):
    new[p] = new[p] + v.astype(new[p].dtype)
  return new


def _names(axis_name) -> tuple:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def mesh_of(batch, axis_name=None):
  """The mesh of the batch's ``NamedSharding`` (None if it has none).

  With ``axis_name``, the mesh must exist and have that axis.
  """
  shardings = [getattr(a, "sharding", None) for a in jax.tree.leaves(batch)]
  meshes = [s.mesh for s in shardings if isinstance(s, NamedSharding)]
  if axis_name is None:
    return meshes[0] if meshes else None
  if not meshes:
    raise ValueError(
        f"recalibrate(axis_name={axis_name!r}) takes its mesh from the "
        f"batches: pass global arrays with a NamedSharding along "
        f"{axis_name!r}, e.g. jax.device_put(x, NamedSharding(mesh, "
        f"P({axis_name!r}))); got shardings "
        f"{sorted({type(s).__name__ for s in shardings})}.")
  mesh = meshes[0]
  if not set(_names(axis_name)) <= set(mesh.axis_names):
    raise ValueError(
        f"axis_name={axis_name!r} is not an axis of the batches' mesh, whose "
        f"axes are {mesh.axis_names}.")
  return mesh


def _placed(tree, sharding):
  """``tree`` laid out as ``sharding`` (also across processes)."""
  return jax.jit(lambda: tree, out_shardings=sharding)()


def _compiled(local_step, local_finish, acc, within, batch, mesh, axis_name):
  """The jitted ``step`` and ``finish``, and the accumulators laid out as
  the step returns them (so that it compiles once).

  Without ``axis_name``: plain ``jit``, accumulators replicated over the
  batch's mesh if it has one. With ``axis_name``: ``shard_map`` over the
  mesh, one accumulator per device (stacked along ``axis_name``), ``within``
  replicated.
  """
  if axis_name is None:
    if mesh is not None:
      acc, within = _placed((acc, within), NamedSharding(mesh, P()))
    return jax.jit(local_step), jax.jit(local_finish), acc, within
  spec = P(axis_name)
  devices = math.prod(mesh.shape[a] for a in _names(axis_name))

  def sharded_step(variables, acc, within, batch):
    acc, within = local_step(variables, _local(acc), within, batch)
    return jax.tree.map(lambda a: a[None], acc), within

  def sharded_finish(acc, within, old):
    return local_finish(_local(acc), within, old)

  step = jax.jit(jax.shard_map(
      sharded_step, mesh=mesh,
      in_specs=(P(), spec, P(), jax.tree.map(lambda _: spec, batch)),
      out_specs=(spec, P())))
  finish = jax.jit(jax.shard_map(
      sharded_finish, mesh=mesh, in_specs=(spec, P(), P()), out_specs=P()))
  acc = _placed(
      jax.tree.map(lambda a: jnp.broadcast_to(a, (devices,) + a.shape), acc),
      NamedSharding(mesh, spec))
  return step, finish, acc, _placed(within, NamedSharding(mesh, P()))


def _local(tree):
  """This device's block of per-device values (inside ``shard_map``)."""
  return jax.tree.map(lambda a: a[0], tree)


def recalibrate(apply_fn: Callable[..., Any], variables: Mapping[str, Any],
                batches: Iterable[Any], *, estimator: str = "pooled",
                apply_kwargs: Mapping[str, Any] | None = None,
                axis_name: Any = None) -> dict[str, Any]:
  r"""Exact running statistics of a Linen model's BatchNorms (PreciseBN).

  Runs ``apply_fn(variables, batch, mutable=['batch_stats',
  'batch_moments'], **apply_kwargs)`` on every batch, with ``variables``
  fixed, and returns new running statistics computed from the inputs each
  ``jbn.linen.BatchNorm`` saw. ``apply_kwargs`` must put the layers in
  training mode (e.g. ``{'train': True}``); the running statistics that
  their EMA writes during these calls are discarded. Use it after SWA, a
  weight EMA or schedule-free training, where the EMA statistics do not
  match the weights.

  For a layer that saw batches of :math:`n_b` valid values with means
  :math:`\mu_b` and biased variances :math:`\sigma^2_b`
  (:math:`N = \sum_b n_b`):

  * ``"pooled"``: :math:`\mu = \sum_b n_b \mu_b / N` and
    :math:`\sigma^2 = \sum_b n_b (\sigma^2_b + (\mu_b - \mu)^2) / N`, the
    exact mean and biased variance of every valid value seen, so a short
    last batch counts for what it holds;
  * ``"batch_mean"``: the same mean and
    :math:`\sigma^2 = \sum_b n_b \sigma^2_b / N`, the count-weighted mean of
    the batch variances: the limit of the EMA (for batches of one size), as
    computed by fvcore's ``update_bn_stats`` up to its weighting and
    unbiasing.

  PyTorch's ``torch.optim.swa_utils.update_bn`` (a cumulative moving
  average) weights every batch equally whatever its size and averages
  unbiased batch variances :math:`n_b \sigma^2_b / (n_b - 1)`: on batches
  ``[1, 2, 3]`` and ``[10, ..., 14]`` it gives mean 7.0 and variance 1.75
  where jbn gives 8.25 and 24.9375 (``"pooled"``) or 8.25 and 1.5
  (``"batch_mean"``).

  The statistics are exact: Chan's merge (:func:`jbn.merge_moments`) of the
  layers' shifted moments, in at least float32. A layer called several times
  per forward merges all its calls (with ``"batch_mean"``, each call counts
  as a batch). ``mask`` arguments the model gives its BatchNorms are
  respected: only valid values count. A feature that saw no valid value
  keeps its statistics. A warm-start ``count`` becomes saturated where
  values were seen (these statistics are final estimates: further training
  updates them with the plain EMA, as after ``jbn.upgrade_state(state)``).

  The step is compiled once (batches of a new shape, e.g. a short last one,
  compile once more). Devices and processes:

  * without ``axis_name``, under plain ``jax.jit``: batches may be arrays
    sharded over devices and processes; the reductions are global;
  * with ``axis_name``, the step runs under ``jax.shard_map`` over the mesh
    of the batches' ``NamedSharding`` (batch leaves split along their
    leading axis over ``axis_name``), each device keeps its own accumulator,
    and participants are merged once, at the end, in one collective
    (``"batch_mean"`` needs each batch's global variance: one collective of
    ``4 x devices x C`` values per batch). The model's BatchNorms should use
    the same ``axis_name`` (as in training) so that deeper layers see
    activations normalized with the global batch.

  Args:
    apply_fn: ``model.apply``, or any function called as ``apply_fn(
      variables, batch, mutable=..., **apply_kwargs)`` returning ``(output,
      updates)``. A batch is passed as is, as the second argument: for a
      model that takes several inputs, unpack it, e.g. ``lambda v, b, **kw:
      model.apply(v, b['image'], mask=b['mask'], **kw)``.
    variables: the model's variables, with ``'params'`` and
      ``'batch_stats'``; not modified.
    batches: an iterable of batches (arrays or pytrees of arrays).
    estimator: ``"pooled"`` or ``"batch_mean"`` (see above).
    apply_kwargs: keyword arguments of ``apply_fn`` that select training
      mode, e.g. ``{'train': True}``; also ``rngs`` for dropout, etc.
    axis_name: mesh axis (or tuple of axes) the batches are sharded along;
      see above.

  Returns:
    A new ``batch_stats`` tree of the same structure as
    ``variables['batch_stats']``: ``mean`` and ``var`` recalibrated, a
    warm-start ``count`` saturated (see above), other leaves unchanged.

  Raises:
    ValueError: for an unknown ``estimator``, ``mutable`` in
      ``apply_kwargs``, ``variables`` without batch-norm statistics, no
      batches, batch-norm layers that report no moments (e.g.
      ``flax.linen.BatchNorm``, or not in training mode), or an
      ``axis_name`` the batches' sharding does not have.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    >>> import jbn, jbn.linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return jbn.linen.BatchNorm(use_running_average=not train)(x)
    >>> net = Net()
    >>> variables = net.init(jax.random.key(0), jnp.ones((2, 1)))
    >>> batches = [jnp.array([[1.], [2.], [3.]]),
    ...            jnp.array([[10.], [11.], [12.], [13.], [14.]])]
    >>> stats = jbn.recalibrate(net.apply, variables, batches,
    ...                         apply_kwargs={'train': True})
    >>> [np.asarray(stats['BatchNorm_0'][k], np.float64).round(4)
    ...  for k in ('mean', 'var')]
    [array([8.25]), array([24.9375])]
    >>> stats = jbn.recalibrate(net.apply, variables, batches,
    ...                         estimator='batch_mean',
    ...                         apply_kwargs={'train': True})
    >>> [np.asarray(stats['BatchNorm_0'][k], np.float64).round(4)
    ...  for k in ('mean', 'var')]
    [array([8.25]), array([1.5])]
  """
  check_estimator(estimator)
  kwargs = dict(apply_kwargs or {})
  if "mutable" in kwargs:
    raise ValueError(
        "apply_kwargs must not contain 'mutable': recalibrate sets it to "
        f"['batch_stats', '{_flax.MOMENTS}'].")
  stats = variables.get("batch_stats") if isinstance(variables,
                                                     Mapping) else None
  layers = _bn_layers(stats)
  if not layers:
    raise ValueError(
        "variables has no batch-norm statistics (no 'batch_stats' entry "
        "with 'mean' and 'var'): pass the model's full variables, e.g. "
        "{'params': ..., 'batch_stats': ...}.")
  first, rest = first_and_rest(batches)
  mesh = mesh_of(first, axis_name)
  batch_mean = estimator == "batch_mean"

  def local_step(variables, acc, within, batch):
    _, updates = apply_fn(variables, batch,
                          mutable=["batch_stats", _flax.MOMENTS], **kwargs)
    calls = _reported(updates.get(_flax.MOMENTS, {}))
    _check_reported(calls, layers)
    acc = {p: _merge_calls(acc[p], calls[p]) for p in acc}
    if batch_mean:
      within = _within(within, calls, axis_name)
    return acc, within

  def local_finish(acc, within, old):
    paths = sorted(acc)
    if axis_name is not None:
      flat = _moments.all_moments(_flat([acc[p] for p in paths]), axis_name,
                                  None)
      merged = dict(zip(paths, _unflat(flat, [acc[p].count for p in paths])))
    else:
      merged = acc
    return {p: finalize(merged[p], within.get(p), old[p], estimator)
            for p in paths}

  dtypes = {p: _moments.stat_dtype(jnp.result_type(s["mean"]))
            for p, s in layers.items()}
  acc = {p: Moments.empty(jnp.shape(s["mean"]), dtypes[p])
         for p, s in layers.items()}
  within = ({p: jnp.zeros(jnp.shape(s["mean"]), dtypes[p])
             for p, s in layers.items()} if batch_mean else {})
  old = {p: dict(s) for p, s in layers.items()}
  step, finish, acc, within = _compiled(local_step, local_finish, acc,
                                        within, first, mesh, axis_name)
  acc, within = step(variables, acc, within, first)
  for batch in rest:
    acc, within = step(variables, acc, within, batch)
  new = finish(acc, within, old)
  for path, value in new.items():
    stats = _replace(stats, path, value if type(layers[path]) is dict
                     else type(layers[path])(value))
  return stats
