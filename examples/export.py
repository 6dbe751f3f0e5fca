"""The trained model for inference: batch norm folded, ``jax.export``-ed.

``<workdir>/model.jax`` maps float32 images in [0, 1] of shape
``(b, H, W, C)`` (``b`` symbolic) to logits ``(b, num_classes)``; input
standardization is inside it, the weights are constants in it. It runs with
no model code: ``jax.export.deserialize(open(path, 'rb').read()).call(x)``
(``predict.py`` does that).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from examples import models
from examples import parallel
from examples import reporting

MODEL = "model.jax"


def export_inference(result, path: str, *,
                     platforms: Sequence[str] = ("cpu", "cuda"),
                     check_examples: int = 256) -> float:
  """Folds every batch norm of ``result`` (a ``train.TrainResult``) and
  writes the exported model to ``path`` (process 0, atomically).

  The model is ``result.variables``: the weight EMA's parameters with
  ``--weight-ema``, and the recalibrated running statistics with
  ``--recalibrate`` (see ``recalibration.py``).

  The export runs on every platform in ``platforms`` plus the current one.

  Returns:
    The largest absolute difference between the folded, exported logits and
    the unfolded model in evaluation mode on the first ``check_examples``
    test images.
  """
  variables = parallel.to_host(result.variables or {
      "params": result.state.params, "batch_stats": result.state.batch_stats})
  model = result.model.clone(
      norm=dataclasses.replace(result.model.norm, axis_name=None))
  folded_model, folded_params = models.fold(model, variables)

  def infer(images):
    return folded_model.apply({"params": folded_params}, images, train=False)

  height, width, channels = result.dataset.image_shape
  spec = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape(f"b, {height}, {width}, {channels}"),
      jnp.float32)
  platforms = tuple(dict.fromkeys((jax.default_backend(), *platforms)))
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(spec)
  if jax.process_index() == 0:
    reporting.atomic_write(path, exported.serialize())
  images = result.dataset.test_images[:check_examples]
  folded = exported.call(images)
  unfolded = jax.jit(functools.partial(model.apply, train=False))(
      variables, images)
  return float(jnp.max(jnp.abs(folded - unfolded)))
