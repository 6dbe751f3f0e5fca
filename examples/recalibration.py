"""After training: the weight EMA's score and exact batch norm statistics.

The running statistics a run ends with are an EMA over the last few hundred
batches, each taken with the parameters of its own step. They describe the
final parameters only roughly, and not at all the parameters of a weight
average (``--weight-ema``), which never ran forward during training.
:func:`finish` fixes both, after the last epoch (issue 11):

1. with ``--weight-ema``, evaluates the EMA parameters with the run's running
   statistics (``ema_test_*``);
2. with ``--recalibrate pooled|batch_mean`` (and batch norm), replaces the
   running statistics of the parameters to export (the EMA's, or the trained
   ones) by :func:`jbn.recalibrate`'s over one pass of the training split
   (:func:`recalibrate`) and evaluates again (``recalibrated_test_*``).

The pass is training-mode batch norm on batches of ``--batch-size``, sharded
over the mesh as in training (``parallel.global_batch``, ``axis_name``
``'batch'``: synced statistics, each device's moments merged once at the
end), every training example once in a fixed order (the last batch padded
and masked out of the statistics), no augmentation, parameters fixed. Batch
renorm's correction is not applied there (plain batch statistics, as the
clip is 1, 0 at the start of training); ghost batch norm keeps its ghost
batches, so deeper layers see what they saw in training.

Nothing here is checkpointed: it is a function of the last checkpoint and
the training split, so ``--resume`` of a finished run recomputes it (the
same numbers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

import jbn
from examples import data as data_lib
from examples import parallel


def train_set_batches(dataset: data_lib.Dataset, mesh: jax.sharding.Mesh,
                      batch_size: int) -> Iterator[dict[str, jax.Array]]:
  """The training split once, in order, as global batches of
  ``batch_size`` split over ``mesh`` like training batches: ``{'images',
  'mask'}``, the last batch padded (``mask`` False on the padding)."""
  for images, _, weights in data_lib.eval_batches(
      dataset.train_images, dataset.train_labels, batch_size=batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()):
    images, mask = parallel.global_batch(mesh, batch_size, images,
                                         weights > 0)
    yield {"images": images, "mask": mask}


def recalibrate(model: nn.Module, variables: Mapping[str, Any],
                dataset: data_lib.Dataset, mesh: jax.sharding.Mesh, *,
                batch_size: int, estimator: str) -> dict[str, Any]:
  """New ``batch_stats`` for ``variables`` from the training split
  (``jbn.recalibrate`` under ``mesh``, ``estimator`` ``'pooled'`` or
  ``'batch_mean'``); ``model``'s batch norms must use ``axis_name='batch'``.
  """
  def apply(v, batch, **kwargs):
    return model.apply(v, batch["images"], mask=batch["mask"], **kwargs)

  return jbn.recalibrate(
      apply, variables, train_set_batches(dataset, mesh, batch_size),
      estimator=estimator, apply_kwargs={"train": True},
      axis_name=parallel.AXIS)


def finish(config, state, model: nn.Module, dataset: data_lib.Dataset,
           mesh: jax.sharding.Mesh, last: Mapping[str, Any],
           evaluate: Callable[[Any], dict[str, float]],
           log: Callable[..., None]
           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The post-training steps of ``config`` on the final ``state``.

  Args:
    config: the run's ``Config`` (``weight_ema``, ``recalibrate``,
      ``use_bn``, ``batch_size``).
    state: the final ``TrainState``, replicated over ``mesh``.
    model: the trained model (batch norms on ``axis_name='batch'``).
    dataset: its data.
    mesh: the training mesh.
    last: the last epoch's record (``test_loss``, ``test_accuracy``).
    evaluate: ``state -> {'test_loss', 'test_accuracy'}``.
    log: prints (process 0).

  Returns:
    ``(variables, record)``: the ``{'params', 'batch_stats'}`` to export
    (replicated) and the keys to add to the last epoch's record:
    ``ema_test_loss``/``ema_test_accuracy`` (with ``--weight-ema``),
    ``recalibrated_test_loss``/``recalibrated_test_accuracy`` and
    ``recalibrate_seconds`` (with ``--recalibrate`` and batch norm), and
    always ``final_test_loss``/``final_test_accuracy``: the exported
    variables' scores.
  """
  params, stats = state.params, state.batch_stats
  final = {k: last[k] for k in ("test_loss", "test_accuracy")}
  record = {}
  if config.weight_ema:
    params = state.ema_params
    final = evaluate(state.replace(params=params))
    record.update({f"ema_{k}": v for k, v in final.items()})
    log(f"weight EMA {config.weight_ema:g}, the run's running statistics: "
        f"test_loss {final['test_loss']:.4f}  test_acc "
        f"{100 * final['test_accuracy']:.2f}%")
  if config.recalibrate != "none" and config.use_bn:
    t0 = time.perf_counter()
    stats = recalibrate(model, {"params": params, "batch_stats": stats},
                        dataset, mesh, batch_size=config.batch_size,
                        estimator=config.recalibrate)
    scores = evaluate(state.replace(params=params, batch_stats=stats))
    seconds = time.perf_counter() - t0
    record.update({f"recalibrated_{k}": v for k, v in scores.items()},
                  recalibrate_seconds=seconds)
    log(f"recalibrated batch norm ({config.recalibrate} over the "
        f"{len(dataset.train_images)} training images"
        f"{', weight EMA' if config.weight_ema else ''}; {seconds:.2f} s): "
        f"test_loss {final['test_loss']:.4f} -> {scores['test_loss']:.4f}  "
        f"test_acc {100 * final['test_accuracy']:.2f}% -> "
        f"{100 * scores['test_accuracy']:.2f}%")
    final = scores
  record.update({f"final_{k}": v for k, v in final.items()})
  return {"params": params, "batch_stats": stats}, record
