"""Folding a batch norm into the layer before it, for inference."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def fold_batch_norm(kernel: Array, bias: Array | None,
                    bn_params: Mapping[str, Array],
                    bn_state: Mapping[str, Array], *, epsilon: float,
                    feature_axis: int = -1) -> tuple[Array, Array]:
  r"""Folds an evaluation-mode batch norm into the Dense/Conv before it.

  A linear layer ``z = x * kernel + bias`` (a matrix product or a
  convolution) followed by batch norm in evaluation mode,

  .. math::
     y = \mathrm{scale} \cdot \frac{z - \mathrm{mean}}
         {\sqrt{\mathrm{var} + \epsilon}} + \mathrm{bias_{bn}},

  is the same linear layer with

  .. math::
     a = \frac{\mathrm{scale}}{\sqrt{\mathrm{var} + \epsilon}}, \quad
     \mathrm{kernel}' = a \cdot \mathrm{kernel}, \quad
     \mathrm{bias}' = a\,(\mathrm{bias} - \mathrm{mean}) + \mathrm{bias_{bn}},

  where :math:`a` scales the kernel along its output-feature axis. The folded
  layer always has a bias, even if the original one had none.

  The kernel layouts of Flax hold the output features on the last axis:
  ``(in, out)`` for ``nn.Dense``, ``(H, W, in, out)`` (HWIO) for ``nn.Conv``;
  that is ``feature_axis=-1``. PyTorch-style ``(out, in, H, W)`` kernels take
  ``feature_axis=0``. The batch norm may normalize any axis of its input
  (``axis=-1`` for NHWC, ``axis=1`` for NCHW) as long as that axis carries the
  layer's output features, one statistic per output feature.

  Only the running statistics count: folding equals the unfolded layers in
  evaluation mode (``train=False`` / ``use_running_average=True``), never in
  training. Arithmetic is in at least float32; the results have ``kernel``'s
  dtype.

  Args:
    kernel: the layer's weights, output features on ``feature_axis``.
    bias: the layer's bias of shape ``(out,)``, or None for a layer without
      bias (e.g. ``use_bias=False`` before a batch norm).
    bn_params: the batch norm's ``{'scale', 'bias'}`` (either may be absent:
      no scale means 1, no bias 0), each of shape ``(out,)``.
    bn_state: its running statistics ``{'mean', 'var'}``, each ``(out,)``.
    epsilon: the batch norm's epsilon (keyword-only and required: folding
      with another value than the layer used gives other numbers).
    feature_axis: the axis of ``kernel`` holding the output features.

  Returns:
    ``(kernel, bias)`` of the folded layer: same shape as ``kernel``, and
    ``(out,)``.

  Raises:
    ValueError: ``feature_axis`` out of range, a shape that is not
      ``(out,)``, missing running statistics, or ``epsilon`` <= 0.

  Example:
    >>> import jax.numpy as jnp, jbn
    >>> kernel = jnp.array([[1., 2.], [3., 4.]])      # Dense (in=2, out=2)
    >>> bn_params = {'scale': jnp.array([2., 1.]), 'bias': jnp.array([0., 1.])}
    >>> bn_state = {'mean': jnp.array([1., 0.]), 'var': jnp.array([.75, 3.75])}
    >>> k, b = jbn.fold_batch_norm(kernel, None, bn_params, bn_state,
    ...                            epsilon=0.25)  # a = scale / 1, scale / 2
    >>> k
    Array([[2., 1.],
           [6., 2.]], dtype=float32)
    >>> b
    Array([-2.,  1.], dtype=float32)
  """
  kernel = jnp.asarray(kernel)
  if not isinstance(feature_axis, numbers.Integral) or not (
      -kernel.ndim <= feature_axis < kernel.ndim):
    raise ValueError(
        f"feature_axis={feature_axis!r} is out of range for a kernel of shape "
        f"{kernel.shape}: it names the kernel axis of the output features "
        f"(-1 for Flax Dense (in, out) and Conv HWIO kernels, 0 for "
        f"PyTorch-style (out, in, ...) kernels).")
  if not isinstance(epsilon, numbers.Real) or not epsilon > 0:
    raise ValueError(f"epsilon={epsilon!r} must be a number > 0: the epsilon "
                     f"of the batch norm being folded.")
  axis = int(feature_axis) % kernel.ndim
  out = kernel.shape[axis]
  missing = {"mean", "var"} - set(bn_state)
  if missing:
    raise ValueError(f"bn_state is missing {sorted(missing)}: pass the batch "
                     f"norm's running statistics (its 'batch_stats').")
  named = {f"bn_state['{k}']": bn_state[k] for k in ("mean", "var")}
  named.update({f"bn_params['{k}']": bn_params[k]
                for k in ("scale", "bias") if k in bn_params})
  if bias is not None:
    named["bias"] = bias
  for name, value in named.items():
    if tuple(jnp.shape(value)) != (out,):
      raise ValueError(
          f"{name} has shape {tuple(jnp.shape(value))}, but the kernel of "
          f"shape {kernel.shape} has {out} output features on feature_axis="
          f"{feature_axis}: expected ({out},). Is feature_axis the kernel "
          f"axis the batch norm normalizes?")

  dt = jnp.promote_types(kernel.dtype, jnp.float32)
  a = lax.rsqrt(jnp.asarray(bn_state["var"], dt) + jnp.asarray(epsilon, dt))
  if "scale" in bn_params:
    a = a * jnp.asarray(bn_params["scale"], dt)
  b = -jnp.asarray(bn_state["mean"], dt)
  if bias is not None:
    b = b + jnp.asarray(bias, dt)
  b = a * b
  if "bias" in bn_params:
    b = b + jnp.asarray(bn_params["bias"], dt)
  shape = [1] * kernel.ndim
  shape[axis] = out
  folded = kernel.astype(dt) * a.reshape(shape)
  return folded.astype(kernel.dtype), b.astype(kernel.dtype)
