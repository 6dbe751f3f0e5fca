"""End to end: training steps of the CIFAR example, jbn vs flax batch norm.

The step is the example trainer's own (``examples/train.py``'s
``train_step`` under ``examples/parallel.py``'s ``shard_map``, on one
device): the examples' ResNet, SGD with Nesterov momentum and masked weight
decay, the state carried over from step to step. Only the batch norm class
differs.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from benchmarks import timing

DESCRIPTION = ("The CIFAR ResNet of ``examples/`` (Conv -> BN -> relu, "
               "residual blocks), trained by the example's own train_step.")


def _examples():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  # pylint: disable=import-outside-toplevel
  from examples import models, parallel, train
  from examples.configs import cifar
  return models, parallel, train, cifar


def step_thunk(norm: Callable[..., nn.Module], images: np.ndarray,
               labels: np.ndarray) -> Callable[[], Any]:
  """A thunk that runs one training step and keeps the training state.

  ``norm`` is the batch-norm class (``flax.linen.BatchNorm`` or
  ``jbn.linen.BatchNorm``); everything else is identical.
  """
  models, parallel, train, cifar = _examples()
  batch = len(images)
  config = cifar.get_config()
  mesh = parallel.make_mesh(1)
  model = models.ResNet(norm=models.Norm(module=norm, axis_name=parallel.AXIS),
                        width=config.width, stage_sizes=config.stage_sizes)
  tx = train.create_optimizer(config, steps_per_epoch=1000)
  state = jax.jit(functools.partial(
      train.create_train_state, model, tx, images.shape[1:]),
                  out_shardings=parallel.replicated(mesh))(
      jax.random.key(0, impl=train.PRNG_IMPL))
  p_train, _ = parallel.shard_steps(
      functools.partial(train.train_step, global_batch=batch),
      train.eval_step, mesh)
  images, labels = parallel.global_batch(mesh, batch, images, labels)
  rng = parallel.replicate(np.zeros((4,), np.uint32), mesh)
  carry = [state]

  def thunk():
    carry[0], metrics = jax.block_until_ready(
        p_train(carry[0], images, labels, rng))
    return metrics["loss"]
  return thunk


def bench_e2e(batch: int, reps: timing.Reps) -> timing.Timings:
  """Median seconds per training step, jbn.linen vs flax.linen, interleaved."""
  try:
    jbn_linen = importlib.import_module("jbn.linen")  # imports flax's side
  except ImportError as e:
    raise SystemExit(f"--e2e needs jbn.linen.BatchNorm ({e}).") from None
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, 32, 32, 3), dtype=np.float32)
  labels = rng.integers(0, 10, (batch,)).astype(np.int32)
  thunks = {"jbn": step_thunk(jbn_linen.BatchNorm, images, labels),
            "flax": step_thunk(nn.BatchNorm, images, labels)}
  return timing.run_round_robin(thunks, reps)
