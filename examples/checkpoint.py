"""Checkpoints of a training run, with Orbax.

``<workdir>/checkpoints/<epoch>/`` holds ``state`` (the whole ``TrainState``
-- params, ``batch_stats``, optimizer state, step -- and the PRNG key) and
``meta`` (JSON: the epoch, the config, the metrics so far). One checkpoint
per epoch; the last ``config.keep_checkpoints`` are kept. Orbax writes each
into a temporary directory and renames it once complete, so a checkpoint is
either whole or absent; the temporary directory a kill leaves behind is
removed the next time the run opens its checkpoints
(:func:`remove_unfinished`). Saving is asynchronous (the copy to host memory
is not, so the train step may donate the state right after) and works with
several processes: each writes its shards, process 0 the metadata.

Checkpoints of the previous format (``<workdir>/checkpoint.msgpack``) are
converted on ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from examples import configs
from examples import errors

CHECKPOINTS = "checkpoints"
LEGACY = "checkpoint.msgpack"  # the format before Orbax
# In the name of a checkpoint Orbax is still writing.
UNFINISHED = ".orbax-checkpoint-tmp"


class CheckpointError(errors.UsageError):
  """A checkpoint is missing, unreadable, invalid or from other settings."""


@dataclasses.dataclass
class Restored:
  """What a checkpoint holds, arrays placed like the templates given."""

  state: Any
  rng: jax.Array
  epoch: int
  history: list[dict[str, Any]]
  skipped_steps: int
  path: str
  note: str = ""  # what the restore did besides reading


def remove_unfinished(directory: str) -> list[str]:
  """Removes the checkpoints a kill left half-written in ``directory``
  (Orbax's temporary directories); returns their names.

  (Orbax's own ``cleanup_tmp_directories`` runs in a background thread that
  ``CheckpointManager.close`` does not wait for.)
  """
  if not os.path.isdir(directory):
    return []
  names = sorted(n for n in os.listdir(directory) if UNFINISHED in n)
  for name in names:
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return names


class Checkpoints:
  """The checkpoints of one run (``<workdir>/checkpoints``).

  Every process of a run creates it, saves and restores together.
  """

  def __init__(self, workdir: str, config: configs.Config):
    self.config = config
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    self.legacy = os.path.join(os.path.abspath(workdir), LEGACY)
    if jax.process_index() == 0:
      remove_unfinished(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def path(self, epoch: int) -> str:
    return os.path.join(self.directory, str(epoch))

  def epochs(self) -> list[int]:
    """The epochs with a complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def check_absent(self) -> None:
    """Raises CheckpointError if the run has a checkpoint already."""
    epochs = self.epochs()
    if epochs or os.path.exists(self.legacy):
      where = self.path(epochs[-1]) if epochs else self.legacy
      raise CheckpointError(
          f"{where} exists: pass --resume to continue that run, or choose "
          f"another --workdir. Nothing was overwritten.")

  def save(self, epoch: int, state, rng: jax.Array,
           history: list[dict[str, Any]], skipped_steps: int) -> None:
    """Starts writing the checkpoint of ``epoch`` (asynchronously)."""
    self._manager.save(epoch, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"train_state": state, "rng": rng}),
        meta=ocp.args.JsonSave({
            "epoch": epoch, "config": configs.to_dict(self.config),
            "history": history, "skipped_steps": skipped_steps})))

  def restore(self, state, rng: jax.Array) -> Restored:
    """The latest checkpoint, shaped and placed like ``state`` and ``rng``.

    Raises:
      CheckpointError: there is none, it is unreadable, or it was written
        with other settings (the message names the fields that differ).
    """
    epochs = self.epochs()
    if not epochs:
      if os.path.exists(self.legacy):
        return self._convert_legacy(state, rng)
      raise CheckpointError(
          f"--resume: no checkpoint in {self.directory}. Start without "
          f"--resume, or pass the --workdir of the run to continue.")
    epoch = epochs[-1]
    path = self.path(epoch)
    try:
      meta = self._manager.restore(epoch, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
      saved_config = meta["config"]
    except Exception as e:  # orbax, tensorstore, json: all the same here
      raise self._unreadable(path, e) from e
    self._check_settings(saved_config, path)
    try:
      template = self._template(epoch, state)
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"train_state": template, "rng": rng})
      arrays = self._manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(path, e) from e
    restored = arrays["train_state"]
    if template is not state:
      restored = state.replace(**restored)
    return Restored(restored, arrays["rng"], int(meta["epoch"]),
                    meta["history"], int(meta.get("skipped_steps", 0)), path)

  def _template(self, epoch: int, state):
    """``state``, or, for a checkpoint written before a field of the state
    existed (``ema_params``) and that is empty here, a dict of the fields
    it has (the missing ones then keep ``state``'s empty values)."""
    on_disk = self._manager.item_metadata(epoch)["state"].tree["train_state"]
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
              if f.metadata.get("pytree_node", True)}
    absent = [k for k, v in fields.items()
              if k not in on_disk and not jax.tree.leaves(v)]
    if not absent:
      return state
    return {k: v for k, v in fields.items() if k not in absent}

  def wait(self) -> None:
    """Blocks until every checkpoint started is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _unreadable(self, path: str, error: Exception) -> CheckpointError:
    earlier = [e for e in self.epochs() if self.path(e) != path]
    hint = (f"move it away to resume from an earlier one (epochs "
            f"{', '.join(map(str, earlier))}) or to start over"
            if earlier else "move it away to start over in this --workdir")
    return CheckpointError(
        f"checkpoint {path} is unreadable ({type(error).__name__}: "
        f"{str(error)[:500]}). It was left as it is; {hint}.")

  def _check_settings(self, saved: dict[str, Any], path: str) -> None:
    saved = configs.comparable(saved)
    current = configs.comparable(configs.to_dict(self.config))
    diff = {k: (saved.get(k), current.get(k))
            for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)}
    if diff:
      changes = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now"
                          for k, (a, b) in diff.items())
      raise CheckpointError(
          f"checkpoint {path} was written by a run with other settings "
          f"({changes}). Resume with the same flags (only "
          f"{', '.join(configs.RUN_ONLY)} may change), or use a new "
          f"--workdir.")

  def _convert_legacy(self, state, rng: jax.Array) -> Restored:
    """Reads ``checkpoint.msgpack`` (flax.serialization, the format before
    Orbax) and writes it as this run's first Orbax checkpoint."""
    path = self.legacy
    host = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: np.asarray(x.addressable_data(0)), tree)
    try:
      with open(path, "rb") as f:
        raw = flax.serialization.msgpack_restore(f.read())
      saved_config = json.loads(raw["config"])
    except Exception as e:  # msgpack, KeyError, ...: all the same here
      raise self._unreadable(path, e) from e
    self._check_settings(saved_config, path)
    try:
      epoch = int(raw["epoch"])
      history = json.loads(raw["history"])
      host_rng = np.asarray(raw["rng"])
      host_state = flax.serialization.from_state_dict(host(state),
                                                      raw["state"])
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(path, e) from e
    place = lambda template, x: jax.make_array_from_callback(  # noqa: E731
        x.shape, template.sharding, lambda i: x[i])
    state = jax.tree.map(place, state, host_state)
    rng = place(rng, host_rng)
    self.save(epoch, state, rng, history, 0)
    self.wait()
    return Restored(state, rng, epoch, history, 0, path, note=(
        f"converted {path} (the format before Orbax) to {self.path(epoch)}; "
        f"the old file is left as it is"))
