"""``jbn.nnx.BatchNorm``: the counterpart of ``flax.nnx.BatchNorm``.

The module holds no maths: it keeps Flax NNX's variables (``Param`` ``scale``
and ``bias``, ``BatchStat`` ``mean`` and ``var``), hands them to
:func:`jbn.batch_norm` and writes back the running statistics it returns.
Modes switch as in Flax: ``model.train()`` / ``model.eval()``,
``nnx.view(model, use_running_average=...)``, ``set_attributes``, or the
``use_running_average`` argument of the constructor or of ``__call__``.
"""

from __future__ import annotations

import warnings

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jbn import _flax
from jbn import _recalibrate
from jbn._modes import RenormClip
from jbn._moments import Moments

Array = jax.Array
Dtype = Any
Initializer = Any

_NO_MODE = (
    "No `use_running_average` argument was provided to BatchNorm. Consider "
    "one of the following options:\n\n"
    "1. Pass `use_running_average` to the BatchNorm constructor:\n\n"
    "  self.bn = jbn.nnx.BatchNorm(..., use_running_average=True/False)\n\n"
    "2. Pass `use_running_average` to the BatchNorm __call__:\n\n"
    "  self.bn(x, use_running_average=True/False)\n\n"
    "3. Use `model.train()` / `model.eval()`, or `nnx.view` to create a view "
    "of the model with a specific `use_running_average` value:\n\n"
    "  model_view = nnx.view(model, use_running_average=True/False)\n")


class BatchNorm(nnx.Module):
  r"""Batch normalization, the counterpart of ``flax.nnx.BatchNorm``.

  Same constructor, call signature, variables and mode switches as
  ``flax.nnx.BatchNorm`` (Flax 0.12): ``Param`` ``scale`` / ``bias`` in
  ``param_dtype``, ``BatchStat`` ``mean`` / ``var`` in float32 (whatever
  ``dtype`` and ``param_dtype`` are), and ``use_running_average`` switched by
  ``.train()`` / ``.eval()``, ``nnx.view`` or ``set_attributes``. The
  computation is :func:`jbn.batch_norm`: batch mean and *biased* variance in
  training, ``new = momentum * old + (1 - momentum) * batch`` for the running
  statistics (Flax/Keras convention; PyTorch's ``momentum=0.1`` is ``0.9``
  here).

  What differs from ``flax.nnx.BatchNorm``, on purpose (as in
  :class:`jbn.linen.BatchNorm`):

  * **Output dtype.** ``dtype=None`` gives the input's dtype (bfloat16 in,
    bfloat16 out); Flax promotes the input with the parameters and the
    statistics (bfloat16 in, float32 out). ``promote_dtype`` defaults to
    ``None`` (no promotion); pass ``flax.nnx.nn.dtypes.promote_dtype`` to get
    Flax's output dtype. A given ``promote_dtype`` is applied as in Flax to
    ``(x, mean, var, scale, bias)``; the promoted ``x``, ``scale`` and
    ``bias`` are used, while the running statistics are always read and
    written in float32 (never rounded to a lower ``dtype``).
  * **Variance.** Always cancellation-free at the fast formula's cost:
    ``use_fast_variance`` is accepted and ignored.
  * **Cross-device statistics** take one collective (``sync="psum"``, or the
    robust ``"gather"``), count-weighted under a ``mask``; an all-False mask
    keeps the running statistics instead of writing NaN.
  * **One value per feature** in training (e.g. ``nnx.tabulate(model,
    jnp.ones((1, 32)))`` on a model in training mode). Flax silently
    outputs the bias and drags the running variance toward 0. jbn keeps
    shape probes working and makes training fail loudly: the call warns,
    normalizes with the running statistics and leaves them unchanged, and
    differentiating through it (``nnx.grad``, ``nnx.value_and_grad``,
    ``jax.jvp``: every training step) raises ``ValueError``. With
    ``axis_name``, or a traced ``use_running_average``, it raises at once,
    as :func:`jbn.batch_norm` does.
  * **Modes Flax lacks**: ``renorm``, ``ghost_batch_size``, ``warm_start``,
    as in :class:`jbn.linen.BatchNorm` (``warm_start`` adds a
    ``BatchStat`` ``count``, int32).

  ``use_running_average`` may also be a (traced) boolean scalar array given
  to ``__call__``: one compiled function then serves both modes (the running
  statistics are written in both; unchanged in evaluation).

  Args:
    num_features: size of the feature axis (or a tuple of sizes when
      ``axis`` names several axes).
    use_running_average: if True, normalize with the running statistics and
      leave them unchanged; if False, use and update the batch statistics.
    axis: feature axis or axes (NHWC: ``-1``; NCHW: ``1``).
    momentum: decay of the running statistics, in [0, 1].
    epsilon: added to the variance, > 0.
    dtype: output dtype; ``None`` keeps the (promoted) input's dtype.
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: add a learned ``bias`` (beta).
    use_scale: multiply by a learned ``scale`` (gamma).
    bias_init: initializer of ``bias`` (zeros).
    scale_init: initializer of ``scale`` (ones).
    axis_name: mapped axis (``nnx.vmap``, ``jax.shard_map``, ``jax.pmap``)
      across which statistics are global.
    axis_index_groups: groups of indices along ``axis_name`` sharing
      statistics (``jax.pmap`` only in current JAX).
    use_fast_variance: accepted for compatibility and ignored (see above).
    promote_dtype: ``None`` (default) or Flax's promotion function (see
      above).
    rngs: ``nnx.Rngs`` for the parameter initializers.
    bias_metadata: metadata of the ``bias`` ``Param``.
    scale_metadata: metadata of the ``scale`` ``Param``.
    sync: jbn only, with ``axis_name``: ``"psum"`` or ``"gather"``; see
      :func:`jbn.batch_norm`.
    renorm: jbn only: ``None`` or a :class:`jbn.RenormClip` (batch
      renormalization); ``__call__(..., renorm=...)`` overrides it per call.
    ghost_batch_size: jbn only: ``None`` or the ghost batch size.
    warm_start: jbn only: keep an int32 ``count`` of updates and average
      the first batches exactly.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> import jbn.nnx
    >>> x = jnp.array([[1., 10.], [3., 30.]])
    >>> bn = jbn.nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> bn(x).round(3)  # training mode: batch statistics
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> bn.mean[...]
    Array([0.2, 2. ], dtype=float32)
    >>> bn.eval()  # running statistics from now on
    >>> np.asarray(bn(x), np.float64).round(3)  # machine-independent digits
    array([[0.8  , 2.423],
           [2.8  , 8.481]])
    >>> bn.mean[...]  # unchanged
    Array([0.2, 2. ], dtype=float32)
  """

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      use_running_average: bool | None = False,
      axis: int | Sequence[int] = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] | None = None,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      sync: str = "psum",
      renorm: RenormClip | None = None,
      ghost_batch_size: int | None = None,
      warm_start: bool = False,
  ):
    feature_shape = ((num_features,) if isinstance(num_features, int)
                     else tuple(num_features))
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    self.count: nnx.BatchStat | None
    if warm_start:
      self.count = nnx.BatchStat(jnp.zeros(feature_shape, jnp.int32))
    else:
      self.count = nnx.data(None)
    # Same order of rngs.params() draws as Flax (scale, then bias).
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = nnx.Param(
          scale_init(rngs.params(), feature_shape, param_dtype),
          **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = nnx.Param(
          bias_init(rngs.params(), feature_shape, param_dtype),
          **bias_metadata)
    else:
      self.bias = nnx.data(None)

    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.sync = sync
    self.renorm = renorm
    self.ghost_batch_size = ghost_batch_size
    self.warm_start = warm_start

  def __call__(self, x: Array, use_running_average: bool | Array | None = None,
               *, mask: Array | None = None,
               renorm: RenormClip | None = None) -> Array:
    """Normalizes ``x`` with batch or running statistics.

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name for this
        call.
      mask: array broadcastable to ``x`` (NumPy rules, cast to bool, as in
        Flax); False elements do not count in the statistics.
      renorm: overrides the ``renorm`` attribute for this call (e.g.
        ``jbn.renorm_clip(step)``).

    Returns:
      The normalized input, of ``x``'s shape and ``dtype`` (default: the
      dtype of ``x``, after ``promote_dtype`` if one is given).
    """
    if use_running_average is None:  # the call argument wins, as in Flax
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(_NO_MODE)
    x = jnp.asarray(x)
    feature_shape = tuple(self.mean.shape)
    got = _flax.feature_shape(x, self.axis)
    if got != feature_shape:
      raise ValueError(
          f"BatchNorm was built for num_features={self.num_features!r} but "
          f"got x of shape {x.shape} whose feature axis axis={self.axis!r} "
          f"has size {got if len(got) > 1 else got[0]}.")

    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    state = {"mean": self.mean[...], "var": self.var[...]}
    if self.count is not None:
      state["count"] = self.count[...]
    if self.promote_dtype is not None:
      x, _, _, scale, bias = self.promote_dtype(
          (x, state["mean"], state["var"], scale, bias), dtype=self.dtype)
    params = {k: v for k, v in (("scale", scale), ("bias", bias))
              if v is not None}
    opts = _flax.Options(
        axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, sync=self.sync,
        ghost_batch_size=self.ghost_batch_size)
    train = _flax.train_flag(use_running_average)
    mask = _flax.flax_mask(mask, x.ndim)
    probe = (train is True and self.axis_name is None
             and _flax.one_value_per_feature(x, opts, mask))
    if probe:
      # A shape probe (nnx.tabulate, model(x[:1])): the running statistics
      # give the output and stay as they are; a training step (anything
      # differentiated) fails.
      message = _flax.one_value_message(x, self.axis)
      warnings.warn(
          f"{message} Using the running statistics and leaving them "
          f"unchanged for this call; differentiating it raises.",
          stacklevel=2)
      train = False
    y, new_state = _flax.call(
        opts, params, state, x, train, mask,
        renorm=renorm if renorm is not None else self.renorm)
    if probe:
      y = _flax.no_gradient_through(y, message)
    if train is not False:
      self.mean[...] = new_state["mean"]
      self.var[...] = new_state["var"]
      if self.count is not None:
        self.count[...] = new_state["count"]
      if train is True and getattr(self, _flax.MOMENTS,
                                   None) is not None:  # jbn.nnx.recalibrate
        getattr(self, _flax.MOMENTS)[...] = _flax.local_moments(x, opts, mask)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``, as ``flax.nnx.BatchNorm.set_view``.

    Args:
      use_running_average: if True, the stored batch statistics will be used
        instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


# --------------------------------------------------------------------------
# Recalibration (PreciseBN)

# Imported here because recalibration was appended to this module.



class BatchMoments(nnx.Variable):
  """Moments a :class:`BatchNorm` reports while :func:`recalibrate` runs.

  A ``(5, *feature_shape)`` float32 array: the rows of a :class:`jbn.Moments`
  ``(count, shift, delta, m2)`` and the sum of the ``m2`` of every call.
  Writing a call's stacked moments ``(count, shift, delta, m2)`` *merges*
  them in (Chan's formula) instead of replacing the value, so a layer called
  several times per forward counts every call. :func:`recalibrate` creates
  these before its pass and deletes them after.
  """

  @classmethod
  def empty(cls, feature_shape, sharding=None) -> "BatchMoments":
    value = jnp.zeros((5, *feature_shape), jnp.float32)
    return cls(value if sharding is None else jax.device_put(value, sharding))

  def set_value(self, value, **kwargs):
    super().set_value(_recalibrate.absorb(self.get_raw_value(), value),
                      **kwargs)


def _path_name(path) -> str:
  return "/".join(map(str, path)) or "<model>"


def _replicate(model, mesh) -> NamedSharding | None:
  """Lays the model's arrays that are on no mesh out on ``mesh``, replicated.

  That is where the jitted step, given batches sharded over ``mesh``, leaves
  them: laying them out first saves a second compilation. Returns the
  replicated sharding (None without a mesh).
  """
  if mesh is None:
    return None
  replicated = NamedSharding(mesh, PartitionSpec())
  nnx.update(model, jax.tree.map(
      lambda a: a if isinstance(getattr(a, "sharding", None), NamedSharding)
      else jax.device_put(a, replicated), nnx.state(model)))
  return replicated


def _batch_norms(model) -> list[tuple[str, BatchNorm]]:
  """The model's jbn BatchNorms by path; raises for Flax's or for none."""
  found, foreign = [], []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, BatchNorm):
      found.append((_path_name(path), module))
    elif isinstance(module, nnx.BatchNorm):
      foreign.append(_path_name(path))
  if foreign:
    raise ValueError(
        f"recalibrate cannot compute the statistics of flax.nnx.BatchNorm "
        f"layers {sorted(foreign)}, and leaving them stale would give a "
        f"half-recalibrated model: use jbn.nnx.BatchNorm there (same "
        f"variables, a drop-in).")
  if not found:
    raise ValueError(
        f"the model holds no jbn.nnx.BatchNorm (got a "
        f"{type(model).__name__}): there are no running statistics to "
        f"recalibrate.")
  return found


def recalibrate(model: nnx.Module, batches, *,
                estimator: str = "pooled") -> None:
  r"""Replaces the running statistics of ``model``'s BatchNorms, in place.

  The NNX counterpart of :func:`jbn.recalibrate` (PreciseBN): calls
  ``model(batch)`` on every batch with every :class:`jbn.nnx.BatchNorm` in
  training mode (the rest of the model keeps its mode: call
  ``model.train()`` first for dropout during the pass), under one
  ``nnx.jit`` (compiled once per batch shape), and writes into each layer's
  ``mean`` and ``var`` the statistics of the inputs it saw:

  * ``"pooled"``: the exact mean and biased variance of every valid value
    (count-weighted over batches);
  * ``"batch_mean"``: the same mean and the count-weighted mean of the
    per-call biased variances (the limit of the EMA).

  See :func:`jbn.recalibrate` for the maths and why PyTorch's ``update_bn``
  differs. Each layer's ``use_running_average`` is restored afterwards, the
  :class:`BatchMoments` the pass adds are deleted (the model's state tree is
  unchanged), the EMA updates made during the pass are overwritten, and
  parameters are untouched. Masks the model gives its BatchNorms are
  respected; a layer called several times merges all its calls; a feature
  that saw no valid value keeps its statistics; a warm-start ``count``
  becomes saturated where values were seen. If the pass fails, the model is
  left as it was (up to the layout below). Batches may be arrays sharded
  over a mesh: the reductions of the plain ``nnx.jit`` are then global, and
  the model's arrays that are on no mesh are first replicated over it (where
  the step would leave them; this way it compiles once).

  Args:
    model: an ``nnx.Module`` holding :class:`jbn.nnx.BatchNorm` layers. It
      is called as ``model(batch)``: for a model that takes several inputs,
      pass batches it can unpack, or wrap it in a small ``nnx.Module`` (the
      wrapper shares the layers, so they are updated).
    batches: an iterable of batches (arrays or pytrees).
    estimator: ``"pooled"`` or ``"batch_mean"``.

  Raises:
    ValueError: for an unknown ``estimator``, a model without
      :class:`jbn.nnx.BatchNorm`, one holding ``flax.nnx.BatchNorm`` layers
      (their statistics would stay stale: use :class:`jbn.nnx.BatchNorm`),
      no batches, or a layer not run in training mode by ``model(batch)``
      (e.g. its caller passes ``use_running_average=True``).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> import jbn.nnx
    >>> bn = jbn.nnx.BatchNorm(1, use_running_average=True,
    ...                        rngs=nnx.Rngs(0))
    >>> batches = [jnp.array([[1.], [2.], [3.]]),
    ...            jnp.array([[10.], [11.], [12.], [13.], [14.]])]
    >>> jbn.nnx.recalibrate(bn, batches)
    >>> np.asarray(bn.mean[...], np.float64).round(4)
    array([8.25])
    >>> np.asarray(bn.var[...], np.float64).round(4)
    array([24.9375])
    >>> bn.use_running_average  # restored
    True
  """
  _recalibrate.check_estimator(estimator)
  layers = _batch_norms(model)
  first, rest = _recalibrate.first_and_rest(batches)
  saved = [(layer, layer.use_running_average,
            {k: getattr(layer, k)[...] for k in ("mean", "var", "count")
             if getattr(layer, k) is not None}) for _, layer in layers]
  written = set()  # filled while tracing: the layers that reported

  @nnx.jit
  def step(model, batch):
    inner = [(name, getattr(layer, _flax.MOMENTS))
             for name, layer in _batch_norms(model)]
    before = [v.get_raw_value() for _, v in inner]
    model(batch)
    written.update(name for (name, v), b in zip(inner, before)
                   if v.get_raw_value() is not b)

  @jax.jit
  def finish(rows, old):
    return [_recalibrate.finalize(Moments(*r[:4]), r[4], o, estimator)
            for r, o in zip(rows, old)]

  done = False
  try:
    replicated = _replicate(model, _recalibrate.mesh_of(first))
    for _, layer in layers:
      layer.use_running_average = False
      setattr(layer, _flax.MOMENTS,
              BatchMoments.empty(layer.mean.shape, replicated))
    step(model, first)
    silent = sorted(name for name, _ in layers if name not in written)
    if silent:
      raise ValueError(
          f"jbn.nnx.BatchNorm layers {silent} did not run in training mode "
          f"during model(batch), so their statistics cannot be "
          f"recalibrated: they were not called, or their caller passes "
          f"use_running_average=True to them.")
    for batch in rest:
      step(model, batch)
    rows = [getattr(layer, _flax.MOMENTS)[...] for _, layer in layers]
    new = finish(rows, [old for _, _, old in saved])
    for (_, layer), stats in zip(layers, new):
      for key, value in stats.items():
        getattr(layer, key)[...] = value
    done = True
  finally:
    for layer, mode, old in saved:
      layer.use_running_average = mode
      if hasattr(layer, _flax.MOMENTS):
        delattr(layer, _flax.MOMENTS)
      if not done:
        for key, value in old.items():
          getattr(layer, key)[...] = value
