r"""Batch norm checkpoints to and from PyTorch and Keras, conventions exact.

``import jbn.interop`` imports neither PyTorch nor Keras: tensors and layers
are read by duck typing, and ``torch`` is imported only by the functions that
build PyTorch tensors (:func:`to_torch_batch_norm`, :func:`flax_to_torch`).

Conventions (jbn and Flax / PyTorch / Keras 3):

* **momentum**: the decay kept on the old value, default 0.99 / the weight
  ``p`` of the new batch, default 0.1, so jbn's ``1 - p`` / as jbn.
  PyTorch's ``momentum=None`` is a cumulative average (factor ``1 / T``):
  jbn keeps no counter but takes ``momentum=T / (T + 1)`` step by step.
  See :func:`momentum_from_torch`, :func:`momentum_to_torch`.
* **epsilon**: 1e-5 / 1e-5 / 1e-3, and no checkpoint stores it.
* **running variance**: biased / *unbiased* (``n / (n - 1)``) / biased.
* **num_batches_tracked**: PyTorch only, a buffer it reads only with
  ``momentum=None``.
* **names**: ``scale, bias`` + ``mean, var`` / ``weight, bias`` +
  ``running_mean, running_var`` / ``gamma, beta`` + ``moving_mean,
  moving_variance``.

Epsilon is never dropped: no checkpoint format stores it, so every converter
that reads weights returns the epsilon it was given or read from the layer
(:class:`BatchNormWeights`), and refuses to guess one.

The running variance: in evaluation every framework normalizes with the
stored variance as it is, so copying PyTorch's ``running_var`` unchanged
reproduces PyTorch's evaluation outputs exactly; that is what the layer and
model converters do. Only continued *training* sees the difference between
PyTorch's unbiased and jbn's biased running average: see
:func:`var_from_torch` and :func:`var_to_torch`.
"""

from __future__ import annotations

import decimal
import math
import numbers
import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FlaxPath = str | tuple[str, ...]
NameMap = Mapping[str, FlaxPath] | Callable[[str], FlaxPath]

__all__ = (
    "BatchNormWeights",
    "flax_to_torch",
    "from_keras_batch_norm",
    "from_torch_batch_norm",
    "momentum_from_torch",
    "momentum_to_torch",
    "to_keras_batch_norm",
    "to_torch_batch_norm",
    "torch_to_flax",
    "var_from_torch",
    "var_to_torch",
)

_TORCH_BN_KEYS = ("weight", "bias", "running_mean", "running_var",
                  "num_batches_tracked")
_KERAS_BN_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


class BatchNormWeights(NamedTuple):
  """One converted batch norm layer: the arguments :func:`jbn.batch_norm` needs.

  Attributes:
    params: ``{'scale', 'bias'}`` (either absent when the source had none),
      in the source's dtype.
    state: ``{'mean', 'var'}``, float32.
    epsilon: the source layer's epsilon: pass it on as ``epsilon=``.
  """

  params: dict[str, Array]
  state: dict[str, Array]
  epsilon: float


# --------------------------------------------------------------------------
# Momentum and running variance


def momentum_from_torch(torch_momentum: float | None, *,
                        num_batches_tracked: int | None = None) -> float:
  r"""jbn's ``momentum`` for PyTorch's ``momentum``.

  PyTorch updates ``running = (1 - p) * running + p * batch``; jbn (like Flax
  and Keras) ``running = m * running + (1 - m) * batch``, so :math:`m = 1 - p`
  (PyTorch's default ``0.1`` is ``0.9`` here). The complement is taken on the
  decimal value you wrote (``1 - 0.9`` gives ``0.1``, not
  ``0.09999999999999998``), so the round trip gives back what you wrote.

  ``torch_momentum=None`` is PyTorch's cumulative average: the step that
  brings the count to :math:`T + 1` uses the factor :math:`1 / (T + 1)`, so
  after it the running statistics are the plain mean of all batches seen.
  jbn keeps no counter, but :func:`jbn.batch_norm` accepts a (traced)
  ``momentum``: passing :math:`T / (T + 1)` at each step, with your own count
  :math:`T` of the batches already averaged (PyTorch's
  ``num_batches_tracked``), reproduces the cumulative average. That value
  changes every step: with the Flax wrappers, where ``momentum`` is a module
  field, the model has to pass it to its layers itself.

  Args:
    torch_momentum: PyTorch's ``momentum``, in [0, 1], or None.
    num_batches_tracked: with ``torch_momentum=None``, the number of batches
      already averaged; ignored otherwise.

  Returns:
    The ``momentum`` to pass to :func:`jbn.batch_norm` (for the next step
    only, when ``torch_momentum`` is None).

  Raises:
    ValueError: ``torch_momentum`` outside [0, 1]; None without a valid
      ``num_batches_tracked``.

  Example:
    >>> from jbn import interop
    >>> interop.momentum_from_torch(0.1)
    0.9
    >>> interop.momentum_from_torch(None, num_batches_tracked=3)  # 4th batch
    0.75
  """
  if torch_momentum is None:
    if num_batches_tracked is None:
      raise ValueError(
          "torch_momentum=None is PyTorch's cumulative average, which has no "
          "fixed jbn momentum: pass num_batches_tracked=T (the batches "
          "already averaged) to get the momentum T / (T + 1) of the next "
          "step.")
    count = _count(num_batches_tracked, "num_batches_tracked")
    return count / (count + 1)
  p = _unit_interval(torch_momentum, "torch_momentum",
                     "PyTorch's momentum is the weight of the new batch "
                     "(default 0.1)")
  return _complement(p)


def momentum_to_torch(momentum: float) -> float:
  r"""PyTorch's ``momentum`` for jbn's: :math:`p = 1 - m`.

  Args:
    momentum: jbn/Flax/Keras momentum (decay kept on the old value), in
      [0, 1].

  Returns:
    The ``momentum=`` of the equivalent ``torch.nn.BatchNorm*d``.

  Raises:
    ValueError: ``momentum`` outside [0, 1].

  Example:
    >>> from jbn import interop
    >>> interop.momentum_to_torch(0.9), interop.momentum_to_torch(0.99)
    (0.1, 0.01)
  """
  m = _unit_interval(momentum, "momentum",
                     "jbn's momentum is the decay kept on the old value "
                     "(default 0.99)")
  return _complement(m)


def var_from_torch(running_var: Any, *, n: int, torch_momentum: float | None,
                   num_batches_tracked: int) -> Array:
  r"""PyTorch's unbiased running variance as jbn's biased one, for training on.

  Both start at 1. With :math:`p` PyTorch's momentum, :math:`s_t` the biased
  variance of batch :math:`t` and :math:`n` the values per feature in a batch
  (batch size x spatial size), after :math:`T` steps

  .. math::
     \mathrm{rv}_T = (1-p)^T + p \sum_{t=1}^T (1-p)^{T-t}
                     \tfrac{n}{n-1}\, s_t  \quad\text{(PyTorch)}, \qquad
     v_T = (1-p)^T + p \sum_{t=1}^T (1-p)^{T-t} s_t  \quad\text{(jbn)},

  so the two differ only in the factor :math:`n / (n-1)` on the part that
  came from data, not on the :math:`(1-p)^T` left of the initial 1:

  .. math::
     v_T = \big(\mathrm{rv}_T - (1-p)^T\big)\,\frac{n-1}{n} + (1-p)^T .

  That is the running variance jbn would hold after training on the same
  batches from :func:`jbn.init` with ``momentum=1 - p``. The naive
  :math:`\mathrm{rv}_T (n-1)/n` also shrinks the initial 1 and is off by
  :math:`(1-p)^T / n`. With ``torch_momentum=None`` (cumulative average) the
  initial 1 is gone after the first step and :math:`v_T = \mathrm{rv}_T
  (n-1)/n`.

  Why no exact conversion exists when batch sizes varied: with batch
  :math:`t` holding :math:`n_t` values, each term carries its own factor
  :math:`n_t / (n_t - 1)`, and the checkpoint stores only the weighted sum,
  not the :math:`s_t`; a single number cannot be unmixed. (A smaller last
  batch, ``drop_last=False``, is such a case.) Any :math:`n` between the
  smallest and largest :math:`n_t` is then off by at most
  :math:`1/(n_{\min}-1) - 1/(n_{\max}-1)` relative. For convolutions
  :math:`n` is batch x H x W, so :math:`n/(n-1)` is close to 1 and copying
  ``running_var`` unchanged costs at most :math:`1/(n-1)` relative: the
  conversion matters for small dense batches.

  For *inference* do not convert: PyTorch normalizes with ``running_var`` as
  stored, so copying it reproduces PyTorch's outputs exactly.

  Args:
    running_var: PyTorch's ``running_var`` (tensor or array).
    n: values per feature in each training batch (e.g. 4 x 2 x 2 for
      batches of shape (4, C, 2, 2)), an int >= 2.
    torch_momentum: PyTorch's ``momentum`` p, in [0, 1], or None.
    num_batches_tracked: PyTorch's ``num_batches_tracked`` T, an int >= 0.

  Returns:
    The biased running variance, float32 (computed in float64).

  Raises:
    ValueError: ``n`` < 2, ``torch_momentum`` outside [0, 1], or a negative
      or non-integer ``num_batches_tracked``.

  Example:
    >>> from jbn import interop
    >>> interop.var_from_torch([2.0], n=4, torch_momentum=0.5,
    ...                        num_batches_tracked=1)  # (2 - .5) * 3/4 + .5
    Array([1.625], dtype=float32)
  """
  w0, factor = _var_terms(n, torch_momentum, num_batches_tracked)
  rv = _to_numpy(running_var).astype(np.float64)
  return jnp.asarray((rv - w0) * factor + w0, jnp.float32)


def var_to_torch(var: Any, *, n: int, torch_momentum: float | None,
                 num_batches_tracked: int) -> Array:
  r"""The inverse of :func:`var_from_torch`: jbn's biased running variance as
  PyTorch's unbiased one, :math:`\mathrm{rv}_T = (v_T - w)\,n/(n-1) + w`
  with :math:`w = (1-p)^T` the weight left on the initial 1.

  Exact when all :math:`T` batches (PyTorch's and jbn's, with jbn's momentum
  ``1 - p``) had :math:`n` values per feature; see :func:`var_from_torch`.
  For inference do not convert: copy ``var`` as is.

  Args:
    var: jbn's ``state['var']``.
    n: values per feature in each training batch, an int >= 2.
    torch_momentum: PyTorch's ``momentum`` p, in [0, 1], or None.
    num_batches_tracked: all training steps the statistics have seen, T.

  Returns:
    The unbiased running variance, float32 (computed in float64).

  Raises:
    ValueError: as :func:`var_from_torch`.

  Example:
    >>> from jbn import interop
    >>> interop.var_to_torch([1.625], n=4, torch_momentum=0.5,
    ...                      num_batches_tracked=1)
    Array([2.], dtype=float32)
  """
  w0, factor = _var_terms(n, torch_momentum, num_batches_tracked)
  v = _to_numpy(var).astype(np.float64)
  return jnp.asarray((v - w0) / factor + w0, jnp.float32)


def _var_terms(n, torch_momentum, num_batches_tracked):
  """``(weight left on the initial 1, (n - 1) / n)``, validated."""
  if (isinstance(n, bool) or not isinstance(n, numbers.Integral)
      or n < 2):
    raise ValueError(
        f"n={n!r} must be an int >= 2: the number of values per feature in "
        f"each training batch (batch size x spatial size, e.g. 4 * 2 * 2 for "
        f"batches of shape (4, C, 2, 2)).")
  count = _count(num_batches_tracked, "num_batches_tracked")
  if torch_momentum is None:
    w0 = 1.0 if count == 0 else 0.0
  else:
    p = _unit_interval(torch_momentum, "torch_momentum",
                       "PyTorch's momentum is the weight of the new batch")
    w0 = (1.0 - p) ** count
  return w0, (n - 1) / n


# --------------------------------------------------------------------------
# One layer: PyTorch


def from_torch_batch_norm(source: Any, *, epsilon: float | None = None
                          ) -> BatchNormWeights:
  r"""A PyTorch ``BatchNorm{1,2,3}d`` as jbn ``(params, state, epsilon)``.

  ``weight -> scale``, ``bias -> bias``, ``running_mean -> mean``,
  ``running_var -> var`` copied unchanged (so evaluation outputs are
  PyTorch's exactly; for training on see :func:`var_from_torch`);
  ``num_batches_tracked`` is dropped (jbn keeps no counter; read it from the
  state dict if you need it). PyTorch normalizes axis 1: call
  :func:`jbn.batch_norm` with ``axis=1`` on PyTorch's layout (NC, NCL,
  NCHW, NCDHW), or ``axis=-1`` after moving the channels last. Its
  ``momentum=p`` is ``momentum_from_torch(p)`` (``1 - p``) here.

  Args:
    source: the module (its ``eps`` is used), or its ``state_dict()`` (keys
      without a module prefix; tensors or arrays).
    epsilon: required with a state dict, which does not store ``eps``;
      optional with a module, where it must equal ``module.eps``.

  Returns:
    :class:`BatchNormWeights` ``(params, state, epsilon)``.

  Raises:
    ValueError: unexpected or missing keys (e.g. a module prefix, or
      ``track_running_stats=False``), shapes that are not one ``(C,)``,
      epsilon missing, not > 0, or different from ``module.eps``.

  Example:
    >>> import torch, jbn
    >>> from jbn import interop
    >>> bn = torch.nn.BatchNorm2d(2, eps=1e-3)
    >>> _ = bn.running_var.fill_(4.0)
    >>> w = interop.from_torch_batch_norm(bn)
    >>> w.epsilon, w.state['var']
    (0.001, Array([4., 4.], dtype=float32))
    >>> x = torch.ones(1, 2, 1, 1)
    >>> y, _ = jbn.batch_norm(w.params, w.state, x.numpy(), train=False,
    ...                       axis=1, epsilon=w.epsilon)
    >>> y.ravel().round(4)
    Array([0.4999, 0.4999], dtype=float32)
    >>> bn.eval()(x).detach().ravel().numpy().round(4)
    array([0.4999, 0.4999], dtype=float32)
  """
  if _is_torch_module(source):
    eps = float(source.eps)
    if epsilon is not None and float(epsilon) != eps:
      raise ValueError(
          f"epsilon={epsilon!r} but the module has eps={eps!r}: the module's "
          f"outputs use its own eps; leave epsilon out to use it.")
    state_dict = source.state_dict()
  else:
    if epsilon is None:
      raise ValueError(
          "epsilon is required: a PyTorch state dict does not store eps. Pass "
          "epsilon= the module's eps (PyTorch's default is 1e-5), or pass "
          "the module itself.")
    eps = _epsilon(epsilon)
    state_dict = source
  arrays = _layer_arrays(
      state_dict, _TORCH_BN_KEYS, ("running_mean", "running_var"),
      "PyTorch BatchNorm",
      "track_running_stats=False keeps none, and jbn needs them")
  return _weights(arrays, "weight", "bias", "running_mean", "running_var", eps)


def to_torch_batch_norm(params: Mapping[str, Any], state: Mapping[str, Any],
                        *, num_batches_tracked: int) -> dict[str, Any]:
  """jbn ``(params, state)`` as a PyTorch ``BatchNorm{1,2,3}d`` state dict.

  ``scale -> weight``, ``bias -> bias``, ``mean -> running_mean``,
  ``var -> running_var`` unchanged (PyTorch's evaluation then gives jbn's
  outputs exactly; for training on see :func:`var_to_torch`). PyTorch's
  affine layer has both a weight and a bias: a missing ``scale`` is written
  as ones, a missing ``bias`` as zeros (the same function); with neither,
  the state dict is that of ``affine=False``. Build the module with
  ``eps=`` the epsilon jbn used (no state dict stores it) and
  ``momentum=momentum_to_torch(m)``.

  ``num_batches_tracked`` is required rather than written as 0: PyTorch reads
  it only with ``momentum=None``, as the count of batches the cumulative
  average holds, where 0 would make the next training step throw the
  statistics away. Pass the number of training batches the statistics have
  seen (for example PyTorch's count at export plus the jbn steps since).
  With a numeric momentum nothing reads it.

  Args:
    params: ``{'scale', 'bias'}``, either may be absent.
    state: ``{'mean', 'var'}``.
    num_batches_tracked: an int >= 0 (or a 0-d integer tensor/array).

  Returns:
    A dict of CPU tensors (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``) for
    ``module.load_state_dict(..., strict=True)``.

  Raises:
    ValueError: missing ``mean``/``var``, unexpected keys, shapes that are
      not one ``(C,)``, or a bad ``num_batches_tracked``.

  Example:
    >>> import torch, jbn
    >>> from jbn import interop
    >>> params, state = jbn.init(3)
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> bn.load_state_dict(interop.to_torch_batch_norm(
    ...     params, state, num_batches_tracked=0), strict=True)
    <All keys matched successfully>
  """
  import torch  # pylint: disable=import-outside-toplevel
  count = _count(num_batches_tracked, "num_batches_tracked")
  arrays = _jbn_arrays(params, state)
  out = {}
  if "scale" in arrays or "bias" in arrays:
    c = arrays["mean"].shape
    out["weight"] = arrays.get("scale", np.ones(c, np.float32))
    out["bias"] = arrays.get("bias", np.zeros(c, np.float32))
  out["running_mean"] = arrays["mean"]
  out["running_var"] = arrays["var"]
  out = {k: _to_tensor(v, torch) for k, v in out.items()}
  out["num_batches_tracked"] = torch.tensor(count, dtype=torch.long)
  return out


# --------------------------------------------------------------------------
# One layer: Keras


def from_keras_batch_norm(source: Any, *, epsilon: float | None = None
                          ) -> BatchNormWeights:
  r"""A Keras ``BatchNormalization`` as jbn ``(params, state, epsilon)``.

  ``gamma -> scale``, ``beta -> bias``, ``moving_mean -> mean``,
  ``moving_variance -> var``. Keras's momentum is jbn's (decay kept on the
  old value) and its variance is biased too, so nothing else changes; its
  feature axis is the layer's ``axis`` (default -1). ``center=False`` /
  ``scale=False`` layers have no ``beta`` / ``gamma`` and give no ``bias`` /
  ``scale``. Keras's default epsilon is 1e-3, jbn's 1e-5: at a variance of
  1e-3 the wrong one scales the outputs by
  :math:`\sqrt{2 \cdot 10^{-3} / 1.01 \cdot 10^{-3}} \approx 1.41`, so the
  epsilon always comes back with the weights.

  Args:
    source: a built ``keras.layers.BatchNormalization`` (its ``epsilon`` is
      used), or a mapping from the weight names (``'gamma'``, ``'beta'``,
      ``'moving_mean'``, ``'moving_variance'``) to arrays.
    epsilon: required with a mapping; optional with a layer, where it must
      equal ``layer.epsilon``.

  Returns:
    :class:`BatchNormWeights` ``(params, state, epsilon)``.

  Raises:
    ValueError: unexpected or missing weights, an unbuilt layer, a layer
      with ``renorm=True`` (jbn has no batch renormalization yet), shapes
      that are not one ``(C,)``, epsilon missing, not > 0, or different from
      ``layer.epsilon``.

  Example:
    >>> import numpy as np
    >>> from jbn import interop
    >>> w = interop.from_keras_batch_norm(
    ...     {'gamma': np.ones(2), 'moving_mean': np.zeros(2),
    ...      'moving_variance': np.ones(2)}, epsilon=1e-3)   # center=False
    >>> w.epsilon, sorted(w.params), sorted(w.state)
    (0.001, ['scale'], ['mean', 'var'])
  """
  if _is_keras_layer(source):
    if getattr(source, "renorm", False):
      raise ValueError(
          "the Keras layer has renorm=True: batch renormalization keeps other "
          "statistics (moving_stddev, renorm_mean, ...) that jbn has no "
          "counterpart for yet.")
    if not source.weights:
      raise ValueError(
          "the Keras layer is not built (it has no weights yet): call it on "
          "an input or layer.build(input_shape) first.")
    eps = float(source.epsilon)
    if epsilon is not None and float(epsilon) != eps:
      raise ValueError(
          f"epsilon={epsilon!r} but the layer has epsilon={eps!r}: the "
          f"layer's outputs use its own epsilon; leave epsilon out to use it.")
    weights = {v.name: v for v in source.weights}
  else:
    if epsilon is None:
      raise ValueError(
          "epsilon is required: Keras weights do not store it. Pass epsilon= "
          "the layer's epsilon (Keras's default is 1e-3, not jbn's 1e-5), or "
          "pass the layer itself.")
    eps = _epsilon(epsilon)
    weights = source
  arrays = _layer_arrays(weights, _KERAS_BN_KEYS,
                         ("moving_mean", "moving_variance"),
                         "Keras BatchNormalization", "")
  return _weights(arrays, "gamma", "beta", "moving_mean", "moving_variance",
                  eps)


def to_keras_batch_norm(params: Mapping[str, Any], state: Mapping[str, Any],
                        layer: Any = None, *, epsilon: float | None = None
                        ) -> dict[str, np.ndarray]:
  """jbn ``(params, state)`` as Keras ``BatchNormalization`` weights.

  ``scale -> gamma``, ``bias -> beta``, ``mean -> moving_mean``,
  ``var -> moving_variance``, nothing else changes (same momentum
  convention, both biased). With ``layer``, its variables are assigned too:
  a ``gamma``/``beta`` the layer has but ``params`` lacks is set to ones /
  zeros (the same function); and since a Keras layer carries its own
  epsilon (default 1e-3), ``epsilon=`` the one jbn used is required and must
  equal ``layer.epsilon``.

  Args:
    params: ``{'scale', 'bias'}``, either may be absent.
    state: ``{'mean', 'var'}``.
    layer: optional built ``keras.layers.BatchNormalization`` to assign.
    epsilon: with ``layer``, the epsilon the jbn layer used.

  Returns:
    A dict from Keras weight names to float32 NumPy arrays (with ``layer``:
    the values assigned to it).

  Raises:
    ValueError: missing ``mean``/``var``, unexpected keys, shapes that are
      not one ``(C,)``; with ``layer``: an unbuilt layer, epsilon missing or
      different from ``layer.epsilon``, a ``scale``/``bias`` the layer cannot
      hold (``scale=False``/``center=False``), or shapes unlike the layer's.

  Example:
    >>> import jbn
    >>> from jbn import interop
    >>> params, state = jbn.init(2, use_bias=False)
    >>> sorted(interop.to_keras_batch_norm(params, state))
    ['gamma', 'moving_mean', 'moving_variance']
  """
  arrays = _jbn_arrays(params, state)
  names = {"scale": "gamma", "bias": "beta", "mean": "moving_mean",
           "var": "moving_variance"}
  out = {names[k]: np.asarray(v, np.float32) for k, v in arrays.items()}
  if layer is None:
    return out
  if not _is_keras_layer(layer) or not layer.weights:
    raise ValueError(
        f"layer must be a built keras.layers.BatchNormalization, got "
        f"{type(layer).__name__} with no weights.")
  if epsilon is None:
    raise ValueError(
        f"epsilon is required with a layer: pass the epsilon the jbn layer "
        f"used, to check it against layer.epsilon={layer.epsilon!r} (Keras's "
        f"default is 1e-3, jbn's 1e-5).")
  if _epsilon(epsilon) != float(layer.epsilon):
    raise ValueError(
        f"epsilon={epsilon!r} but layer.epsilon={layer.epsilon!r}: the Keras "
        f"layer would normalize differently; build it with "
        f"epsilon={epsilon!r}.")
  variables = {v.name: v for v in layer.weights}
  c = out["moving_mean"].shape
  for name, default in (("gamma", np.ones(c, np.float32)),
                        ("beta", np.zeros(c, np.float32))):
    if name in out and name not in variables:
      raise ValueError(
          f"params has {'scale' if name == 'gamma' else 'bias'} but the "
          f"layer has no {name} (built with "
          f"{'scale' if name == 'gamma' else 'center'}=False).")
    if name in variables and name not in out:
      out[name] = default
  for name, value in out.items():
    if tuple(variables[name].shape) != value.shape:
      raise ValueError(
          f"{name} has shape {value.shape} but the layer's has "
          f"{tuple(variables[name].shape)}.")
  for name, value in out.items():
    variables[name].assign(value)
  return out


# --------------------------------------------------------------------------
# Whole models: PyTorch state dict <-> Flax variables


def torch_to_flax(state_dict: Mapping[str, Any], name_map: NameMap, *,
                  template: Mapping[str, Any] | None = None
                  ) -> dict[str, dict[str, Any]]:
  """A PyTorch Conv/BatchNorm/Linear state dict as Flax variables.

  Keys are grouped by module (``'layer1.0.bn1.running_var'`` belongs to
  ``'layer1.0.bn1'``) and ``name_map`` gives each module's path in the Flax
  tree. What each module becomes:

  =============================  ==========================================
  PyTorch                        Flax
  =============================  ==========================================
  BatchNorm (has running stats)  ``params``: ``weight -> scale``,
                                 ``bias -> bias``; ``batch_stats``:
                                 ``running_mean -> mean``,
                                 ``running_var -> var`` (as is: eval-exact);
                                 ``num_batches_tracked`` dropped
  Conv{1,2,3}d ``weight``        ``kernel``, ``(O, I, *spatial)`` ->
                                 ``(*spatial, I, O)`` (OIHW -> HWIO)
  Linear ``weight``              ``kernel``, ``(out, in)`` -> ``(in, out)``
  1-D ``weight`` (LayerNorm,     ``scale``
  GroupNorm, BN without stats)
  ``bias``                       ``bias``
  =============================  ==========================================

  The Flax model must compute what the PyTorch one does: same padding
  (Flax's ``'SAME'`` pads ``(0, 1)`` for a 3x3 stride-2 convolution on an
  even size, where PyTorch's ``padding=1`` pads ``(1, 1)``), the batch norm
  epsilons (not in any state dict) and ``momentum=1 - p``, the flattening
  order before a Linear layer (NCHW vs NHWC), and its inputs transposed
  NCHW -> NHWC. Transposed convolutions (``(I, O, ...)`` weights) and
  embeddings are not recognized: their weights would be mistaken for
  Conv/Linear ones.

  Args:
    state_dict: the PyTorch ``state_dict()`` (tensors or arrays).
    name_map: the Flax path of each PyTorch module prefix: a dict or a
      callable from prefix (``'layer1.0.bn1'``) to path (``'stage0/bn'`` or
      ``('stage0', 'bn')``).
    template: optional Flax variables (e.g. ``model.init(...)`` or its
      ``jax.eval_shape``) to check the result against: the same
      ``params``/``batch_stats`` leaves and shapes; the result then takes
      the template's dtypes.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of nested dicts of arrays
    (``batch_stats`` only if there is a batch norm).

  Raises:
    ValueError: a prefix ``name_map`` does not map, a path that is not a
      string or tuple of strings, two modules on the same path, a parameter
      name or weight rank it does not know, a batch norm missing a running
      statistic, or (with ``template``) missing/extra leaves or other
      shapes.

  Example:
    >>> import numpy as np, jax
    >>> from jbn import interop
    >>> sd = {'0.weight': np.ones((8, 3, 3, 3)),         # Conv2d(3, 8, 3)
    ...       '1.weight': np.ones(8), '1.bias': np.zeros(8),  # BatchNorm2d(8)
    ...       '1.running_mean': np.zeros(8), '1.running_var': np.ones(8),
    ...       '1.num_batches_tracked': np.array(5),
    ...       '3.weight': np.ones((10, 8)), '3.bias': np.zeros(10)}  # Linear
    >>> variables = interop.torch_to_flax(
    ...     sd, {'0': 'conv', '1': 'bn', '3': 'head'})
    >>> jax.tree.map(np.shape, variables)
    {'batch_stats': {'bn': {'mean': (8,), 'var': (8,)}},
     'params': {'bn': {'bias': (8,), 'scale': (8,)},
                'conv': {'kernel': (3, 3, 3, 8)},
                'head': {'bias': (10,), 'kernel': (8, 10)}}}
  """
  mapper = _mapper(name_map)
  out = {"params": {}, "batch_stats": {}}
  owner = {}  # flax path -> torch prefix, to report collisions
  for prefix, group in _groups(state_dict).items():
    path = mapper(prefix)
    if path in owner:
      raise ValueError(
          f"name_map sends torch modules {owner[path]!r} and {prefix!r} to "
          f"the same Flax path {'/'.join(path)!r}.")
    owner[path] = prefix
    for collection, leaf, value in _torch_module_to_flax(prefix, group):
      _tree_set(out[collection], path + (leaf,), value)
  if not out["batch_stats"]:
    del out["batch_stats"]
  if template is not None:
    out = _match_template(out, template)
  return out


def flax_to_torch(variables: Mapping[str, Any], name_map: NameMap,
                  template: Any, *, num_batches_tracked: int
                  ) -> dict[str, Any]:
  """Flax variables as the state dict of a PyTorch model: the reverse of
  :func:`torch_to_flax`.

  Walks the keys of ``template`` (the PyTorch model, or its ``state_dict()``)
  in order, so the result has exactly its keys, shapes and dtypes and loads
  with ``load_state_dict(strict=True)``. Kernels go back HWIO -> OIHW (and
  ``(in, out) -> (out, in)``); ``scale/bias`` and ``mean/var`` back to the
  batch norm's ``weight/bias`` and ``running_mean/running_var`` (the
  variance as is: PyTorch's evaluation then gives the Flax model's outputs).

  Every batch norm's ``num_batches_tracked`` is set to
  ``num_batches_tracked``: PyTorch reads it only with ``momentum=None``, as
  the number of batches its cumulative average holds (0 would make the next
  step discard the statistics, as some converters do); with a numeric
  momentum nothing reads it. The honest value, required here, is the number
  of training batches the statistics have seen: e.g. the PyTorch count at
  export plus the steps trained in JAX.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of the Flax model.
    name_map: as in :func:`torch_to_flax` (torch prefix -> Flax path).
    template: the PyTorch model, or its state dict (for keys, shapes,
      dtypes).
    num_batches_tracked: an int >= 0 written to every batch norm.

  Returns:
    A dict of CPU tensors in ``template``'s key order.

  Raises:
    ValueError: a prefix ``name_map`` does not map, a template key of a
      kind it does not know, a Flax leaf missing, a shape unlike the
      template's, Flax leaves that no PyTorch key uses, or a bad
      ``num_batches_tracked``.

  Example:
    >>> import torch
    >>> from jbn import interop
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False),
    ...                             torch.nn.BatchNorm2d(8))
    >>> names = {'0': 'conv', '1': 'bn'}
    >>> variables = interop.torch_to_flax(model.state_dict(), names)
    >>> variables['params']['conv']['kernel'].shape
    (3, 3, 3, 8)
    >>> model.load_state_dict(interop.flax_to_torch(
    ...     variables, names, model, num_batches_tracked=0), strict=True)
    <All keys matched successfully>
  """
  import torch  # pylint: disable=import-outside-toplevel
  count = _count(num_batches_tracked, "num_batches_tracked")
  mapper = _mapper(name_map)
  ref_dict = template.state_dict() if _is_torch_module(template) else template
  groups = _groups(ref_dict)
  flat = _flatten({c: variables.get(c, {}) for c in ("params", "batch_stats")
                   if c in variables})
  used = set()
  out = {}
  for prefix, group in groups.items():
    path = mapper(prefix)
    is_bn = "running_mean" in group or "running_var" in group
    rules = {name: _flax_leaf_for(_key(prefix, name), name, ref, is_bn)
             for name, ref in group.items()
             if not (is_bn and name == "num_batches_tracked")}
    for name, ref in group.items():
      key = _key(prefix, name)
      if name not in rules:
        out[key] = torch.tensor(count, dtype=ref.dtype)
        continue
      collection, leaf, to_torch = rules[name]
      full = (collection,) + path + (leaf,)
      if full not in flat:
        raise ValueError(
            f"the Flax variables have no {'/'.join(full)!r} for torch key "
            f"{key!r}: check name_map (it sends {prefix!r} to "
            f"{'/'.join(path)!r}).")
      used.add(full)
      value = to_torch(np.asarray(flat[full]))
      if value.shape != tuple(ref.shape):
        raise ValueError(
            f"{'/'.join(full)} gives shape {value.shape} for torch key {key!r}"
            f", which has shape {tuple(ref.shape)}.")
      out[key] = _to_tensor(value, torch).to(ref.dtype)
  unused = sorted("/".join(p) for p in set(flat) - used)
  if unused:
    raise ValueError(
        f"Flax variables {unused} are not used by any torch key: the PyTorch "
        f"model has no place for them (check name_map and the template).")
  return out


# --------------------------------------------------------------------------
# Helpers


def _is_torch_module(x) -> bool:
  return hasattr(x, "state_dict") and hasattr(x, "named_modules")


def _is_keras_layer(x) -> bool:
  return hasattr(x, "get_weights") and hasattr(x, "weights")


def _to_numpy(x) -> np.ndarray:
  """A NumPy *copy* of a tensor, array or Keras variable.

  Never a view: ``Tensor.numpy()`` shares the tensor's memory and
  ``jnp.asarray`` may keep sharing it on CPU, so a PyTorch layer training on
  in place would otherwise change the converted jbn state under our feet.
  """
  if hasattr(x, "detach"):  # torch.Tensor
    x = x.detach().cpu()
    try:
      return x.numpy().copy()
    except TypeError:  # bfloat16 has no NumPy dtype in torch
      return x.float().numpy()
  return np.asarray(x).copy()


def _to_tensor(x: np.ndarray, torch):
  x = np.array(x, copy=True)
  if x.dtype not in (np.float16, np.float32, np.float64):
    x = x.astype(np.float32)  # e.g. bfloat16; load_state_dict casts back
  return torch.from_numpy(x)


def _complement(x: float) -> float:
  """``1 - x`` on the decimal value of ``x`` (1 - 0.9 gives 0.1)."""
  return float(1 - decimal.Decimal(repr(float(x))))


def _number(value) -> float:
  """``float(value)`` for a real number (not a string), else NaN."""
  if isinstance(value, (str, bytes)):
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _unit_interval(value, name: str, meaning: str) -> float:
  v = _number(value)
  if not 0.0 <= v <= 1.0:
    raise ValueError(f"{name}={value!r} must be a number in [0, 1]: {meaning}.")
  return v


def _count(value, name: str) -> int:
  try:
    count = operator.index(value)
  except TypeError:
    count = -1
  if count < 0:
    raise ValueError(f"{name}={value!r} must be an int >= 0 (a count of "
                     f"training batches).")
  return count


def _epsilon(value) -> float:
  eps = _number(value)
  if not eps > 0:
    raise ValueError(f"epsilon={value!r} must be a number > 0.")
  return eps


def _layer_arrays(weights: Mapping[str, Any], allowed: tuple[str, ...],
                  required: tuple[str, ...], what: str, why: str
                  ) -> dict[str, np.ndarray]:
  """Checks the names and (C,) shapes of one layer's weights."""
  if not isinstance(weights, Mapping):
    raise ValueError(f"expected a {what} layer or a mapping of its weights, "
                     f"got {type(weights).__name__}.")
  unexpected = sorted(set(weights) - set(allowed))
  if unexpected:
    raise ValueError(
        f"unexpected keys {unexpected}: expected the weights of one {what} "
        f"layer, {list(allowed)} (strip any module prefix such as 'bn1.'; "
        f"convert whole models with torch_to_flax).")
  missing = [k for k in required if k not in weights]
  if missing:
    raise ValueError(f"missing {missing}: the {what} layer has no running "
                     f"statistics" + (f" ({why})." if why else "."))
  arrays = {k: _to_numpy(v) for k, v in weights.items()}
  shape = arrays[required[0]].shape
  for key, value in arrays.items():
    if key == "num_batches_tracked":
      continue
    if len(shape) != 1 or value.shape != shape:
      raise ValueError(
          f"{key} has shape {value.shape}; every weight of a batch norm layer "
          f"must have the shape (C,) of {required[0]}, {shape}.")
  return arrays


def _weights(arrays, scale, bias, mean, var, eps) -> BatchNormWeights:
  params = {new: jnp.asarray(arrays[old]) for new, old in
            (("scale", scale), ("bias", bias)) if old in arrays}
  state = {"mean": jnp.asarray(arrays[mean], jnp.float32),
           "var": jnp.asarray(arrays[var], jnp.float32)}
  return BatchNormWeights(params, state, eps)


def _jbn_arrays(params, state) -> dict[str, np.ndarray]:
  """Checks jbn ``(params, state)`` of one layer; NumPy arrays."""
  if not isinstance(params, Mapping) or not isinstance(state, Mapping):
    raise ValueError("params and state must be mappings, as from jbn.init.")
  unknown = sorted(set(params) - {"scale", "bias"}) + sorted(
      set(state) - {"mean", "var"})
  if unknown:
    raise ValueError(f"unexpected keys {unknown}: expected params "
                     f"{{'scale', 'bias'}} and state {{'mean', 'var'}}.")
  missing = [k for k in ("mean", "var") if k not in state]
  if missing:
    raise ValueError(f"state is missing {missing}: a batch norm checkpoint "
                     f"needs the running 'mean' and 'var'.")
  arrays = {k: np.asarray(v) for k, v in (*params.items(), *state.items())}
  shape = arrays["mean"].shape
  for key, value in arrays.items():
    if len(shape) != 1 or value.shape != shape:
      raise ValueError(
          f"{key} has shape {value.shape}; PyTorch and Keras batch norms hold "
          f"one feature axis: every array must have the shape (C,) of "
          f"state['mean'], {shape}.")
  return arrays


def _key(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def _groups(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """``{'a.b.weight': w}`` -> ``{'a.b': {'weight': w}}``, in order."""
  groups: dict[str, dict[str, Any]] = {}
  for key, value in state_dict.items():
    prefix, _, name = key.rpartition(".")
    groups.setdefault(prefix, {})[name] = value
  return groups


def _mapper(name_map: NameMap) -> Callable[[str], tuple[str, ...]]:
  def mapper(prefix: str) -> tuple[str, ...]:
    if callable(name_map):
      path = name_map(prefix)
    elif isinstance(name_map, Mapping):
      if prefix not in name_map:
        raise ValueError(
            f"name_map has no Flax path for the torch module {prefix!r}.")
      path = name_map[prefix]
    else:
      raise ValueError(f"name_map must be a dict or a callable, got "
                       f"{type(name_map).__name__}.")
    parts = tuple(path.split("/")) if isinstance(path, str) else path
    if (not isinstance(parts, tuple) or not parts
        or not all(isinstance(p, str) and p for p in parts)):
      raise ValueError(
          f"name_map gave {path!r} for the torch module {prefix!r}; expected "
          f"a Flax path such as 'block0/bn' or ('block0', 'bn').")
    return parts
  return mapper


def _conv_perm(ndim: int) -> tuple[int, ...]:
  """OI<spatial> -> <spatial>IO."""
  return tuple(range(2, ndim)) + (1, 0)


def _torch_module_to_flax(prefix, group):
  """``(collection, leaf, array)`` for each entry of one torch module."""
  if "running_mean" in group or "running_var" in group:
    missing = [k for k in ("running_mean", "running_var") if k not in group]
    if missing:
      raise ValueError(f"torch module {prefix!r} has running statistics but "
                       f"not {missing}.")
    names = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var"),
             "num_batches_tracked": None}
    for name, value in group.items():
      if name not in names:
        raise ValueError(_unknown_name(_key(prefix, name), name))
      if names[name] is not None:
        collection, leaf = names[name]
        value = _to_numpy(value)
        if collection == "batch_stats":
          value = value.astype(np.float32)
        yield collection, leaf, jnp.asarray(value)
    return
  for name, value in group.items():
    value = _to_numpy(value)
    if name == "bias":
      yield "params", "bias", jnp.asarray(value)
    elif name == "weight":
      if value.ndim == 1:
        yield "params", "scale", jnp.asarray(value)
      elif value.ndim == 2:
        yield "params", "kernel", jnp.asarray(value.T)
      elif value.ndim <= 5:
        yield "params", "kernel", jnp.asarray(
            value.transpose(_conv_perm(value.ndim)))
      else:
        raise ValueError(
            f"torch key {_key(prefix, name)!r} has a weight of rank "
            f"{value.ndim}: only Conv1d/2d/3d (rank 3-5), Linear (2) and "
            f"normalization (1) weights are known.")
    else:
      raise ValueError(_unknown_name(_key(prefix, name), name))


def _unknown_name(key: str, name: str) -> str:
  return (f"torch key {key!r}: no rule for a parameter named {name!r}. The "
          f"model converters handle Conv/BatchNorm/Linear modules "
          f"({', '.join(_TORCH_BN_KEYS)}).")


def _flax_leaf_for(key, name, ref, is_bn):
  """``(collection, leaf, flax->torch layout function)`` of a torch key."""
  same = lambda a: a
  if is_bn:
    table = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"),
             "running_var": ("batch_stats", "var")}
    if name not in table:
      raise ValueError(_unknown_name(key, name))
    return (*table[name], same)
  if name == "bias":
    return "params", "bias", same
  if name != "weight":
    raise ValueError(_unknown_name(key, name))
  ndim = len(ref.shape)
  if ndim == 1:
    return "params", "scale", same
  if ndim == 2:
    return "params", "kernel", lambda a: a.T
  if ndim <= 5:
    inverse = tuple(np.argsort(_conv_perm(ndim)))
    return "params", "kernel", lambda a: a.transpose(inverse)
  raise ValueError(f"torch key {key!r} has a weight of rank {ndim}: only "
                   f"Conv1d/2d/3d, Linear and normalization weights are known.")


def _tree_set(tree: dict, path: tuple[str, ...], value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _match_template(out, template):
  """Checks ``out`` against the template's params/batch_stats; its dtypes."""
  want = _flatten({c: template[c] for c in ("params", "batch_stats")
                   if c in template})
  got = _flatten(out)
  missing = sorted("/".join(p) for p in set(want) - set(got))
  if missing:
    raise ValueError(f"the Flax model has {missing}, which no torch key maps "
                     f"to (check name_map).")
  extra = sorted("/".join(p) for p in set(got) - set(want))
  if extra:
    raise ValueError(f"torch keys map to {extra}, which the Flax model does "
                     f"not have (check name_map).")
  result = {}
  for path, ref in want.items():
    value = got[path]
    if tuple(value.shape) != tuple(ref.shape):
      raise ValueError(
          f"{'/'.join(path)}: the converted array has shape "
          f"{tuple(value.shape)} but the Flax model's has {tuple(ref.shape)} "
          f"(wrong name_map, or a layer the converters do not know, e.g. a "
          f"transposed convolution).")
    _tree_set(result, path, value.astype(ref.dtype))
  return result
