"""The example networks: an MLP (MNIST, digits) and a small ResNet (CIFAR).

Both are built from :class:`LayerBN` units (Dense or Conv, then
``jbn.linen.BatchNorm``), take float32 images in [0, 1] of shape
``(batch, H, W, C)`` and standardize them inside the network with fixed
per-channel constants, so the exported inference function has the same
input contract as the training data.

``train=True`` uses and updates the batch statistics; ``train=False`` uses
the running averages in ``batch_stats``. In training, ``renorm=`` (a
``jbn.RenormClip``, e.g. ``jbn.renorm_clip(step)``) reaches every batch norm
per call, so a schedule driven by a traced step never recompiles, and
``mask=`` (one bool per example) leaves padding rows out of the statistics.
:func:`fold` turns a trained model into its inference form, every batch norm
folded into the layer before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jbn
from jbn.linen import BatchNorm

# He initialization suits ReLU networks, with or without batch norm (the
# ablation trains both from the same initialization).
_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


@dataclasses.dataclass(frozen=True)
class Norm:
  """How the :class:`LayerBN` units of a network normalize.

  Attributes:
    use_bn: batch norm after every hidden Dense/Conv; if False the layers
      have a bias instead (the ablation's baseline).
    folded: inference form: no batch norm, the layer carries the folded
      kernel and bias (see :func:`fold`).
    momentum: decay of the running statistics (Flax convention: 0.9 keeps
      90% of the old value per step; PyTorch's momentum=0.1).
    epsilon: added to the variance.
    axis_name: mapped axis for synced batch norm (``'batch'`` under
      ``jax.shard_map``), or None on one device.
    ghost_batch_size: ghost batch norm: each device's share of the batch is
      split into groups of this many examples, each normalized with its own
      statistics (``jbn.linen.BatchNorm``'s field); None: plain.
    module: the batch norm class: ``jbn.linen.BatchNorm``, or any drop-in
      with its fields (``flax.linen.BatchNorm``: the benchmark compares them).
  """

  use_bn: bool = True
  folded: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  ghost_batch_size: int | None = None
  module: Any = BatchNorm


class LayerBN(nn.Module):
  """Dense (``kernel_size=None``) or Conv (HWIO kernel, SAME padding), then BN.

  Without batch norm, or folded, the layer has a bias and nothing follows it
  (``renorm`` and ``mask`` then do nothing). The submodules are named
  ``layer`` and ``bn``: :func:`fold` finds them by these names.
  """

  features: int
  norm: Norm = Norm()
  kernel_size: tuple[int, int] | None = None
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               renorm: jbn.RenormClip | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    with_bn = self.norm.use_bn and not self.norm.folded
    if self.kernel_size is None:
      layer = nn.Dense(self.features, use_bias=not with_bn,
                       kernel_init=_kernel_init, name="layer")
    else:
      layer = nn.Conv(self.features, self.kernel_size,
                      strides=(self.strides, self.strides), padding="SAME",
                      use_bias=not with_bn, kernel_init=_kernel_init,
                      name="layer")
    x = layer(x)
    if with_bn:
      # Only what is set: any drop-in (flax.linen.BatchNorm) takes the rest.
      fields = ({} if self.norm.ghost_batch_size is None else
                {"ghost_batch_size": self.norm.ghost_batch_size})
      call = {} if renorm is None else {"renorm": renorm}
      if mask is not None:  # one flag per example, broadcast over the rest
        call["mask"] = mask.reshape(mask.shape[:1] + (1,) * (x.ndim - 1))
      x = self.norm.module(
          use_running_average=not train, momentum=self.norm.momentum,
          epsilon=self.norm.epsilon, axis_name=self.norm.axis_name,
          name="bn", **fields)(x, **call)
    return x


def _standardize(images, mean, std):
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(
      std, images.dtype)


class MLP(nn.Module):
  """Flatten -> [Dense -> BN -> relu] x len(hidden) -> Dense logits."""

  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  norm: Norm = Norm()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool,
               renorm: jbn.RenormClip | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    x = _standardize(images, self.mean, self.std)
    x = x.reshape(x.shape[0], -1)
    for i, features in enumerate(self.hidden):
      x = nn.relu(LayerBN(features, self.norm, name=f"hidden{i}")(
          x, train=train, renorm=renorm, mask=mask))
    return nn.Dense(self.num_classes, name="head")(x)


class ResidualBlock(nn.Module):
  """relu(shortcut(x) + BN(conv(relu(BN(conv(x)))))), 3x3 convolutions."""

  features: int
  strides: int = 1
  norm: Norm = Norm()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               renorm: jbn.RenormClip | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    bn = dict(train=train, renorm=renorm, mask=mask)
    y = nn.relu(LayerBN(self.features, self.norm, (3, 3), self.strides,
                        name="conv1")(x, **bn))
    y = LayerBN(self.features, self.norm, (3, 3), name="conv2")(y, **bn)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = LayerBN(self.features, self.norm, (1, 1), self.strides,
                  name="shortcut")(x, **bn)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small ResNet for 32x32 images: a 3x3 stem, then stages of residual
  blocks (``stage_sizes``), each stage after the first halving the
  resolution and doubling the width, global average pooling, Dense logits."""

  stage_sizes: Sequence[int] = (1, 1, 1)
  width: int = 16
  num_classes: int = 10
  mean: Sequence[float] = (0.0, 0.0, 0.0)
  std: Sequence[float] = (1.0, 1.0, 1.0)
  norm: Norm = Norm()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool,
               renorm: jbn.RenormClip | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    bn = dict(train=train, renorm=renorm, mask=mask)
    x = _standardize(images, self.mean, self.std)
    x = nn.relu(LayerBN(self.width, self.norm, (3, 3), name="stem")(x, **bn))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(self.width * 2**stage, strides, self.norm,
                          name=f"stage{stage}_block{block}")(x, **bn)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def fold(model: nn.Module, variables: Mapping[str, Any]
         ) -> tuple[nn.Module, dict[str, Any]]:
  """The inference form of ``model``: every batch norm folded away.

  Each :class:`LayerBN` (a ``{'layer', 'bn'}`` pair in the parameter tree)
  becomes its layer alone, with the kernel and bias from
  :func:`jbn.fold_batch_norm`. The folded model computes the same function as
  ``model.apply(variables, x, train=False)``, with fewer operations.

  Args:
    model: an :class:`MLP` or :class:`ResNet`.
    variables: its ``{'params': ..., 'batch_stats': ...}``.

  Returns:
    ``(folded_model, folded_params)``, to call as
    ``folded_model.apply({'params': folded_params}, x, train=False)``.
  """
  if not model.norm.use_bn or model.norm.folded:
    return model, variables["params"]
  epsilon = model.norm.epsilon

  def walk(params, stats):
    out = {}
    for name, sub in params.items():
      if not isinstance(sub, Mapping):
        out[name] = sub
      elif set(sub) == {"layer", "bn"}:
        kernel, bias = jbn.fold_batch_norm(
            sub["layer"]["kernel"], sub["layer"].get("bias"), sub["bn"],
            stats[name]["bn"], epsilon=epsilon)
        out[name] = {"layer": {"kernel": kernel, "bias": bias}}
      else:
        out[name] = walk(sub, stats.get(name, {}))
    return out

  folded = model.clone(norm=dataclasses.replace(model.norm, folded=True))
  return folded, walk(variables["params"], variables["batch_stats"])
