"""``jbn.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

The module holds no maths: it declares the same variables as Flax's
``BatchNorm`` (``params/{scale,bias}``, ``batch_stats/{mean,var}``), hands
them to :func:`jbn.batch_norm` and stores the running statistics it returns.
Swapping it into a Flax model is one line::

  from jbn.linen import BatchNorm   # instead of nn.BatchNorm

and checkpoints move both ways between the two modules unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from jbn._layout import feature_axes as _canonical_axes
from jbn._functional import batch_norm

Array = jax.Array
Dtype = Any
Initializer = Any


def _as_train_flag(use_running_average: Any) -> bool | Array:
  """``not use_running_average``, for a Python value or a boolean scalar array.

  Shared by :mod:`jbn.linen` and :mod:`jbn.nnx`. A (possibly traced) boolean
  scalar array becomes its logical negation, so one compiled function can
  serve both modes.
  """
  if isinstance(use_running_average, jax.Array):
    if (use_running_average.ndim != 0
        or use_running_average.dtype != jnp.bool_):
      raise TypeError(
          f"use_running_average must be a Python bool or a boolean scalar "
          f"array, got an array of dtype {use_running_average.dtype} and "
          f"shape {use_running_average.shape}.")
    return jnp.logical_not(use_running_average)
  return not use_running_average


def _flax_mask(mask: Array | None, ndim: int) -> Array | None:
  """A Flax-style mask (any dtype, NumPy-broadcastable to ``x``) for jbn.

  Flax casts the mask to bool and broadcasts it against ``x`` by NumPy rules;
  :func:`jbn.batch_norm` wants a boolean mask of ``x``'s rank (or of ``x``
  without its feature axes). Left-padding with size-1 axes gives NumPy's
  meaning without materializing a full-size mask.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask, dtype=bool)
  if mask.ndim < ndim:
    mask = mask.reshape((1,) * (ndim - mask.ndim) + mask.shape)
  return mask


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

  Example:
    >>> import jax, jax.numpy as jnp
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
    >>> bn.apply(variables, x, use_running_average=True).round(3)
    Array([[0.8  , 2.423],
           [2.8  , 8.481]], dtype=float32)
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

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | Array | None = None,
               *, mask: Array | None = None) -> Array:
    """Normalizes ``x`` with batch or running statistics.

    Args:
      x: the input.
      use_running_average: as the field of the same name; give it here or to
        the constructor, not both.
      mask: array broadcastable to ``x`` (NumPy rules, cast to bool, as in
        Flax); False elements do not count in the statistics.

    Returns:
      The normalized input, of ``x``'s shape and ``dtype`` (default
      ``x.dtype``).
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    x = jnp.asarray(x)
    feature_shape = tuple(
        x.shape[a] for a in _canonical_axes(self.axis, x.ndim))

    stats_dtype = (jnp.float32 if self.force_float32_reductions
                   else self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean",
                            lambda s: jnp.zeros(s, stats_dtype), feature_shape)
    ra_var = self.variable("batch_stats", "var",
                           lambda s: jnp.ones(s, stats_dtype), feature_shape)
    # Same creation order as Flax (scale, then bias): same rngs per name.
    params = {}
    if self.use_scale:
      params["scale"] = self.param("scale", self.scale_init, feature_shape,
                                   self.param_dtype)
    if self.use_bias:
      params["bias"] = self.param("bias", self.bias_init, feature_shape,
                                  self.param_dtype)

    train = _as_train_flag(use_running_average)
    mask = _flax_mask(mask, x.ndim)
    initializing = self.is_initializing()
    if initializing and mask is None and train is True and math.prod(
        x.shape) == math.prod(feature_shape):
      train = False  # one value per feature: no batch statistics to show
    state = {"mean": ra_mean.value, "var": ra_var.value}
    y, new_state = batch_norm(
        params, state, x, train, axis=self.axis, momentum=self.momentum,
        epsilon=self.epsilon,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        mask=mask, dtype=self.dtype, sync=self.sync)
    if not initializing and train is not False:
      ra_mean.value = new_state["mean"]
      ra_var.value = new_state["var"]
    return y
