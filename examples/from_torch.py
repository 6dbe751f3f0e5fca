"""A PyTorch ResNet into the examples' Flax ResNet (jbn batch norm), and back.

    python examples/from_torch.py                  # ~10 s on 2 CPU cores
    python examples/from_torch.py --torch-steps 50 --jax-steps 20

1. Defines, in PyTorch, a torchvision-style ResNet (``conv1``/``bn1`` stem,
   ``layerK.B.{conv1,bn1,conv2,bn2,downsample}``, ``fc``) with the
   architecture of :class:`examples.models.ResNet`, and trains it a few SGD
   steps on synthetic images so its running statistics are far from their
   initial values.
2. Converts its state dict with :func:`jbn.interop.torch_to_flax` (kernels
   OIHW -> HWIO, Linear weights transposed, batch norms renamed,
   ``num_batches_tracked`` dropped; PyTorch's ``momentum=0.1`` is
   ``momentum=0.9`` in the Flax model) and checks the Flax model's
   evaluation logits, on the same images transposed NCHW -> NHWC, against
   PyTorch's.
3. Fine-tunes the Flax model a few steps in JAX, writes it back with
   :func:`jbn.interop.flax_to_torch`, loads it with
   ``load_state_dict(strict=True)`` and compares the logits again.

The running variance is copied as it is both ways: evaluation uses it
unchanged in both frameworks, so the outputs agree exactly. (Training on
mixes PyTorch's unbiased running variance with jbn's biased batch
variances, a relative difference of 1/(n-1) per step with n = batch x H x W
values per channel, here at most 1/(32 * 8 * 8 - 1) = 5e-4; see
:func:`jbn.interop.var_from_torch` for the exact conversion.)

Architecture details that must match, and do here: Flax's ``'SAME'`` padding
pads a 3x3 stride-2 convolution on an even size by (0, 1), where PyTorch's
``padding=1`` would pad (1, 1), so the PyTorch convolutions pad the way XLA
does (:class:`SameConv2d`); convolutions before a batch norm have no bias;
the shortcut is a 1x1 convolution + batch norm when the shape changes;
global average pooling, then the Linear head.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `examples` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from examples import models  # noqa: E402
from jbn import interop  # noqa: E402

TOLERANCE = 1e-5  # max |logits difference| accepted
TORCH_MOMENTUM = 0.1  # PyTorch's default
EPSILON = 1e-5
MEAN = (0.5, 0.5, 0.5)  # the input standardization, in both models
STD = (0.25, 0.25, 0.25)
IMAGE_SHAPE = (3, 32, 32)  # NCHW, as PyTorch sees them


# ---------------------------------------------------------------------------
# The PyTorch model


class SameConv2d(torch.nn.Conv2d):
  """``Conv2d`` padding like XLA's ``'SAME'``: ``total = max((out - 1) * s +
  k - in, 0)`` per spatial axis with ``out = ceil(in / s)``, ``total // 2``
  before and the rest after."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
               stride: int = 1):
    super().__init__(in_channels, out_channels, kernel_size, stride,
                     padding=0, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pads = []
    for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
      total = max((-(-size // s) - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(channels: int) -> torch.nn.BatchNorm2d:
  return torch.nn.BatchNorm2d(channels, eps=EPSILON, momentum=TORCH_MOMENTUM)


class BasicBlock(torch.nn.Module):
  """relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))."""

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.conv1 = SameConv2d(in_channels, channels, 3, stride)
    self.bn1 = _bn(channels)
    self.conv2 = SameConv2d(channels, channels, 3)
    self.bn2 = _bn(channels)
    self.downsample = None
    if stride != 1 or in_channels != channels:
      self.downsample = torch.nn.Sequential(
          SameConv2d(in_channels, channels, 1, stride), _bn(channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(shortcut + y)


class TorchResNet(torch.nn.Module):
  """:class:`examples.models.ResNet` in PyTorch, torchvision's names."""

  def __init__(self, stage_sizes: Sequence[int] = (1, 1, 1), width: int = 16,
               num_classes: int = 10):
    super().__init__()
    self.conv1 = SameConv2d(IMAGE_SHAPE[0], width, 3)
    self.bn1 = _bn(width)
    channels = width
    for stage, blocks in enumerate(stage_sizes):
      layers = []
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        layers.append(BasicBlock(channels, width * 2**stage, stride))
        channels = width * 2**stage
      setattr(self, f"layer{stage + 1}", torch.nn.Sequential(*layers))
    self.num_stages = len(stage_sizes)
    self.fc = torch.nn.Linear(channels, num_classes)
    self.register_buffer("mean", torch.tensor(MEAN).reshape(1, -1, 1, 1),
                         persistent=False)
    self.register_buffer("std", torch.tensor(STD).reshape(1, -1, 1, 1),
                         persistent=False)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = (images - self.mean) / self.std
    x = F.relu(self.bn1(self.conv1(x)))
    for stage in range(self.num_stages):
      x = getattr(self, f"layer{stage + 1}")(x)
    return self.fc(x.mean(dim=(2, 3)))


_BLOCK = re.compile(
    r"layer(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)")
_BLOCK_PARTS = {"conv1": "conv1/layer", "bn1": "conv1/bn",
                "conv2": "conv2/layer", "bn2": "conv2/bn",
                "downsample.0": "shortcut/layer",
                "downsample.1": "shortcut/bn"}


def flax_name(prefix: str) -> str:
  """The Flax path of a PyTorch module: ``'layer2.0.downsample.1'`` ->
  ``'stage1_block0/shortcut/bn'`` (the name map of both converters)."""
  fixed = {"conv1": "stem/layer", "bn1": "stem/bn", "fc": "head"}
  if prefix in fixed:
    return fixed[prefix]
  m = _BLOCK.fullmatch(prefix)
  if m is None:
    raise ValueError(f"no Flax name for the PyTorch module {prefix!r}")
  return f"stage{int(m[1]) - 1}_block{m[2]}/{_BLOCK_PARTS[m[3]]}"


# ---------------------------------------------------------------------------
# Data and training


def synthetic_batch(rng: np.random.Generator, n: int, num_classes: int = 10
                    ) -> tuple[np.ndarray, np.ndarray]:
  """NCHW float32 images in [0, 1] whose class sets their mean colour."""
  colours = np.random.default_rng(1234).uniform(
      0.2, 0.8, (num_classes, IMAGE_SHAPE[0], 1, 1))
  labels = rng.integers(0, num_classes, n)
  images = colours[labels] + rng.normal(0, 0.15, (n, *IMAGE_SHAPE))
  return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int32)


def nhwc(images: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def train_torch(model: TorchResNet, rng: np.random.Generator, steps: int,
                batch_size: int, lr: float) -> float:
  """``steps`` SGD steps in PyTorch; returns the last loss."""
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
  model.train()
  loss = torch.tensor(float("nan"))
  for _ in range(steps):
    images, labels = synthetic_batch(rng, batch_size)
    loss = F.cross_entropy(model(torch.from_numpy(images)),
                           torch.from_numpy(labels).long())
    opt.zero_grad()
    loss.backward()
    opt.step()
  return float(loss.detach())


def train_flax(model: models.ResNet, variables, rng: np.random.Generator,
               steps: int, batch_size: int, lr: float):
  """``steps`` SGD steps in JAX; returns the new variables and last loss."""
  tx = optax.sgd(lr, momentum=0.9)

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  loss = jnp.nan
  for _ in range(steps):
    images, labels = synthetic_batch(rng, batch_size)
    params, batch_stats, opt_state, loss = step(
        params, batch_stats, opt_state, nhwc(images), labels)
  return {"params": params, "batch_stats": batch_stats}, float(loss)


def torch_logits(model: torch.nn.Module, images: np.ndarray, *,
                 train: bool = False) -> np.ndarray:
  model.train(train)
  with torch.no_grad():
    return model(torch.from_numpy(images)).numpy()


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) -
                             np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------
# The round trip


def parse_flags(argv: Sequence[str] | None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--torch-steps", type=int, default=20,
                      help="SGD steps in PyTorch before the conversion")
  parser.add_argument("--jax-steps", type=int, default=10,
                      help="SGD steps in JAX after it")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--eval-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  """Runs the round trip; returns the measured differences (and raises if
  one is above :data:`TOLERANCE`)."""
  args = parse_flags(argv)
  t0 = time.perf_counter()
  torch.manual_seed(args.seed)
  rng = np.random.default_rng(args.seed)
  eval_images, eval_labels = synthetic_batch(
      np.random.default_rng(args.seed + 1), args.eval_size)
  eval_loss = lambda logits: float(
      optax.softmax_cross_entropy_with_integer_labels(
          jnp.asarray(logits), eval_labels).mean())

  # 1. A PyTorch model with non-trivial running statistics.
  torch_model = TorchResNet()
  loss = train_torch(torch_model, rng, args.torch_steps, args.batch_size,
                     args.lr)
  state_dict = torch_model.state_dict()
  count = int(state_dict["bn1.num_batches_tracked"])
  var = np.concatenate([v.numpy().ravel() for k, v in state_dict.items()
                        if k.endswith("running_var")])
  print(f"PyTorch: {args.torch_steps} SGD steps (loss {loss:.3f}); "
        f"num_batches_tracked={count}, running_var in "
        f"[{var.min():.3g}, {var.max():.3g}]")

  # 2. Convert; compare evaluation (and training-mode) logits.
  model = models.ResNet(
      stage_sizes=(1, 1, 1), width=16, num_classes=10, mean=MEAN, std=STD,
      norm=models.Norm(momentum=interop.momentum_from_torch(TORCH_MOMENTUM),
                       epsilon=EPSILON))
  template = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *nhwc(eval_images[:1]).shape[1:])),
      train=False))
  variables = interop.torch_to_flax(state_dict, flax_name, template=template)
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  ref = torch_logits(torch_model, eval_images)
  flax_logits = evaluate(variables, nhwc(eval_images))
  results = {"eval_before": max_diff(flax_logits, ref)}
  print(f"eval logits, Flax (jbn.linen.BatchNorm) vs PyTorch: max |diff| "
        f"{results['eval_before']:.2g} (max |logit| {np.abs(ref).max():.3g}, "
        f"eval loss {eval_loss(ref):.3f})")
  # The float32 rounding both sides are subject to: PyTorch in float64.
  ref64 = TorchResNet().double()
  ref64.load_state_dict(state_dict, strict=True)
  ref64.eval()
  with torch.no_grad():
    ref64 = ref64(torch.from_numpy(eval_images).double()).numpy()
  results["torch_vs_float64"] = max_diff(ref, ref64)
  results["flax_vs_float64"] = max_diff(flax_logits, ref64)
  print(f"  float32 rounding, vs PyTorch in float64: PyTorch "
        f"{results['torch_vs_float64']:.2g}, Flax "
        f"{results['flax_vs_float64']:.2g}")
  # Training mode normalizes with the batch statistics (biased variance in
  # both); run PyTorch's on a copy, since it updates the running statistics.
  train_copy = TorchResNet()
  train_copy.load_state_dict(state_dict, strict=True)
  ref_train = torch_logits(train_copy, eval_images, train=True)
  flax_train, _ = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, nhwc(eval_images))
  results["train_mode"] = max_diff(flax_train, ref_train)
  print(f"training-mode logits (batch statistics): max |diff| "
        f"{results['train_mode']:.2g}")

  # 3. Fine-tune in JAX, back to PyTorch, compare again.
  variables, loss = train_flax(model, variables, rng, args.jax_steps,
                               args.batch_size, args.lr)
  flax_logits_after = evaluate(variables, nhwc(eval_images))
  results["fine_tune_change"] = max_diff(flax_logits_after, flax_logits)
  back = interop.flax_to_torch(variables, flax_name, torch_model,
                               num_batches_tracked=count + args.jax_steps)
  torch_model.load_state_dict(back, strict=True)
  results["eval_after"] = max_diff(
      torch_logits(torch_model, eval_images), flax_logits_after)
  print(f"JAX: {args.jax_steps} SGD steps (loss {loss:.3f}, eval loss "
        f"{eval_loss(flax_logits_after):.3f}; logits moved by up to "
        f"{results['fine_tune_change']:.3g}); written back, "
        f"load_state_dict(strict=True), num_batches_tracked="
        f"{int(back['bn1.num_batches_tracked'])}")
  print(f"eval logits after the round trip, PyTorch vs Flax: max |diff| "
        f"{results['eval_after']:.2g}")
  print(f"{time.perf_counter() - t0:.1f} s")
  bad = {k: results[k] for k in ("eval_before", "train_mode", "eval_after")
         if not results[k] <= TOLERANCE}
  if bad:
    raise RuntimeError(f"logits differ by more than {TOLERANCE}: {bad}")
  return results


if __name__ == "__main__":
  main()
