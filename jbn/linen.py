"""``jbn.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

The module holds no maths: it declares the same variables as Flax's
``BatchNorm`` (``params/{scale,bias}``, ``batch_stats/{mean,var}``), hands
them to :func:`jbn.batch_norm` and stores the running statistics it returns.
Swapping it into a Flax model is one line::

  from jbn.linen import BatchNorm   # instead of nn.BatchNorm

and checkpoints move both ways between the two modules unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from jbn import _flax
from jbn._modes import RenormClip

Array = jax.Array
Dtype = Any
Initializer = Any


class BatchNorm(nn.Module):
  r"""Batch normalization, a drop-in for ``flax.linen.BatchNorm``.

  Same fields, same call signature, same variables (names, shapes, dtypes)
  and the same ``use_running_average`` rule as the Flax module: pass it to
  the constructor or to ``__call__``, exactly once (``nn.merge_param``). The
  computation is :func:`jbn.batch_norm`: in training,
  :math:`y = \mathrm{scale} \cdot (x - \mu) / \sqrt{\sigma^2 + \epsilon} +
  \mathrm{bias}` with the batch mean and *biased* variance, and
  ``batch_stats`` decay as ``new = momentum * old + (1 - momentum) * batch``
  (Flax/Keras convention; PyTorch's ``momentum=0.1`` is ``0.9`` here).

  What differs from ``flax.linen.BatchNorm``, on purpose:

  * **Output dtype.** ``dtype=None`` gives the input's dtype (bfloat16 in,
    bfloat16 out) where Flax promotes the input with the parameters
    (bfloat16 in, float32 out). Pass ``dtype=jnp.float32`` to get Flax's
    output dtype. Statistics are computed in at least float32 either way.
  * **Variance.** Always cancellation-free (shifted sums) at the cost of
    Flax's fast formula, so ``use_fast_variance`` is accepted and ignored:
    both values give the accurate variance (Flax's ``True`` can be wrong by
    orders of magnitude when ``|mean| >> std``).
  * **Reductions.** Always in at least float32, so
    ``force_float32_reductions`` only sets the storage dtype of
    ``batch_stats``, as in Flax (float32 if True, ``param_dtype`` if False).
  * **Cross-device statistics** take one collective (``sync="psum"``, or
    the robust ``sync="gather"``; see :func:`jbn.batch_norm`) and are
    count-weighted under a ``mask`` (Flax averages per-device means); an
    all-False mask keeps the running statistics instead of writing NaN.
  * **One value per feature** in training (e.g. a batch of 1 with no
    spatial axes) raises ``ValueError`` instead of silently outputting the
    bias. During ``init`` such an input falls back to the running
    statistics, so ``model.init(key, x[:1])`` still works.
  * **Modes Flax lacks**: ``renorm`` (batch renormalization, with a per-call
    override for schedules), ``ghost_batch_size`` (ghost batch norm) and
    ``warm_start`` (running statistics that are the exact average of the
    first ``1 / (1 - momentum)`` batches; adds an int32
    ``batch_stats/count``). See :func:`jbn.batch_norm`.

  During ``init`` (``self.is_initializing()``), as in Flax, the batch
  statistics are computed without ``axis_name`` (the mapped axis need not
  exist) and ``batch_stats`` are not updated, so calling the layer twice
  gives the same output.

  ``use_running_average`` may also be a (traced) boolean scalar array: one
  compiled function then serves training and evaluation; ``batch_stats`` is
  written in both cases, so it must be mutable.

  Attributes:
    use_running_average: if True, normalize with ``batch_stats`` and leave
      them unchanged; if False, use and update the batch statistics.
    axis: the feature axis or axes (NHWC: ``-1``; NCHW: ``1``).
    momentum: decay of the running statistics, in [0, 1].
    epsilon: added to the variance, > 0.
    dtype: output dtype; ``None`` keeps the input's dtype (see above).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: add a learned ``bias`` (beta).
    use_scale: multiply by a learned ``scale`` (gamma).
    bias_init: initializer of ``bias`` (zeros).
    scale_init: initializer of ``scale`` (ones).
    axis_name: mapped axis (``nn.vmap``, ``jax.shard_map``, ``jax.pmap``)
      across which statistics are global. Not needed under plain ``jax.jit``
      with sharded arrays.
    axis_index_groups: groups of indices along ``axis_name`` sharing
      statistics (``jax.pmap`` only in current JAX).
    use_fast_variance: accepted for compatibility and ignored (see above).
    force_float32_reductions: dtype of ``batch_stats``: float32 if True,
      ``param_dtype`` if False; reductions are float32 either way.
    sync: jbn only, with ``axis_name``: ``"psum"`` (one all-reduce) or
      ``"gather"`` (robust to running statistics far from the data); see
      :func:`jbn.batch_norm`.
    renorm: jbn only: ``None`` or a :class:`jbn.RenormClip` (batch
      renormalization); ``__call__(..., renorm=...)`` overrides it per call.
    ghost_batch_size: jbn only: ``None`` or the size of the ghost batches the
      leading axis is split into.
    warm_start: jbn only: keep an int32 ``count`` of updates in
      ``batch_stats`` and average the first batches exactly.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jbn.linen import BatchNorm
    >>> x = jnp.array([[1., 10.], [3., 30.]])
    >>> bn = BatchNorm(momentum=0.9)
    >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (2,), 'var': (2,)},
     'params': {'bias': (2,), 'scale': (2,)}}
    >>> y, updates = bn.apply(variables, x, use_running_average=False,
    ...                       mutable=['batch_stats'])
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> updates['batch_stats']['mean']
    Array([0.2, 2. ], dtype=float32)
    >>> variables = {**variables, **updates}  # the new batch_stats
    >>> y = bn.apply(variables, x, use_running_average=True)
    >>> np.asarray(y, np.float64).round(3)  # machine-independent digits
    array([[0.8  , 2.423],
           [2.8  , 8.481]])
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  sync: str = "psum"
  renorm: RenormClip | None = None
  ghost_batch_size: int | None = None
  warm_start: bool = False

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | Array | None = None,
               *, mask: Array | None = None,
               renorm: RenormClip | None = None) -> Array:
    """Normalizes ``x`` with batch or running statistics.

    Args:
      x: the input.
      use_running_average: as the field of the same name; give it here or to
        the constructor, not both.
      mask: array broadcastable to ``x`` (NumPy rules, cast to bool, as in
        Flax); False elements do not count in the statistics.
      renorm: overrides the ``renorm`` field for this call (e.g.
        ``jbn.renorm_clip(step)`` for the warm-up schedule).

    Returns:
      The normalized input, of ``x``'s shape and ``dtype`` (default
      ``x.dtype``).
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x = jnp.asarray(x)
    feature_shape = _flax.feature_shape(x, self.axis)

    stats_dtype = (jnp.float32 if self.force_float32_reductions
                   else self.param_dtype)
    stats = {
        "mean": self.variable("batch_stats", "mean",
                              lambda s: jnp.zeros(s, stats_dtype),
                              feature_shape),
        "var": self.variable("batch_stats", "var",
                             lambda s: jnp.ones(s, stats_dtype),
                             feature_shape)}
    if self.warm_start:
      stats["count"] = self.variable("batch_stats", "count",
                                     lambda s: jnp.zeros(s, jnp.int32),
                                     feature_shape)
    # Same creation order as Flax (scale, then bias): same rngs per name.
    params = {}
    if self.use_scale:
      params["scale"] = self.param("scale", self.scale_init, feature_shape,
                                   self.param_dtype)
    if self.use_bias:
      params["bias"] = self.param("bias", self.bias_init, feature_shape,
                                  self.param_dtype)

    opts = _flax.Options(
        axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, sync=self.sync,
        ghost_batch_size=self.ghost_batch_size)
    train = _flax.train_flag(use_running_average)
    mask = _flax.flax_mask(mask, x.ndim)
    initializing = self.is_initializing()
    if initializing and train is True and _flax.one_value_per_feature(
        x, opts, mask):
      train = False  # one value per feature: no batch statistics to show
    y, new_state = _flax.call(
        opts, params, {k: v.value for k, v in stats.items()}, x, train, mask,
        renorm=renorm if renorm is not None else self.renorm,
        local=initializing)
    if not initializing and train is not False:
      for key, var in stats.items():
        var.value = new_state[key]
      if train is True and self.is_mutable_collection(
          _flax.MOMENTS):  # jbn.recalibrate (Python-bool modes only)
        self.sow(_flax.MOMENTS, "moments", _flax.local_moments(x, opts, mask))
    return y
