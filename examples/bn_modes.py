"""What ``--bn`` means: the checks, the renorm schedule, the ghost batches.

* ``batchnorm``: synced batch norm (statistics of the global batch).
* ``renorm``: batch renormalization (Ioffe, 2017). ``train_step`` evaluates
  :func:`renorm_schedule`'s ``jbn.renorm_clip`` at the traced
  ``state.step`` and passes the clip per call down to every batch norm, so
  one compiled step serves the whole schedule.
* ``ghost``: ghost batch norm; each device splits its share of the batch
  into groups of ``--ghost-batch-size`` with their own statistics (no
  collective touches the activations; the running statistics are still
  identical on every device).

Evaluation, the running statistics' layout and the export are the same for
all three.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

import jbn
from examples import configs
from examples import errors


def ghost_batch_size(config: configs.Config) -> int | None:
  """The ghost batch size of the model's batch norms (None: not ghost)."""
  return config.ghost_batch_size if config.bn_mode == "ghost" else None


def check(config: configs.Config, devices: int) -> None:
  """Raises UsageError for ``--bn`` settings that cannot work.

  A ghost batch must divide each device's share of the batch (ghost batches
  never span devices).
  """
  per_device = config.batch_size // devices
  if config.bn_mode != "batchnorm" and not config.use_bn:
    raise errors.UsageError(f"--bn {config.bn_mode} needs batch norm: drop "
                            f"--no-bn.")
  if config.bn_mode != "ghost" and config.ghost_batch_size is not None:
    raise errors.UsageError("--ghost-batch-size is for --bn ghost.")
  if config.bn_mode != "renorm":
    given = [f"--{n.replace('_', '-')}" for n, f in configs.FIELDS.items()
             if n.startswith("renorm_") and getattr(config, n) != f.default]
    if given:
      raise errors.UsageError(f"{', '.join(given)}: for --bn renorm.")
  if config.bn_mode != "ghost":
    return
  ghost = config.ghost_batch_size
  if ghost is None:
    raise errors.UsageError(
        f"--bn ghost needs --ghost-batch-size N: examples per ghost batch, "
        f"a divisor of the per-device batch ({per_device} = --batch-size "
        f"{config.batch_size} / {devices} device(s)).")
  if ghost < 1 or per_device % ghost:
    raise errors.UsageError(
        f"--ghost-batch-size {ghost} must divide the per-device batch "
        f"{per_device} (--batch-size {config.batch_size} over {devices} "
        f"device(s)): each device splits its own share into ghost batches.")
  if ghost < 2 and config.model == "mlp":
    raise errors.UsageError(
        "--ghost-batch-size 1: the MLP's batch norm would see one value per "
        "feature (output = bias); use 2 or more.")


def renorm_schedule(config: configs.Config, total_steps: int
                    ) -> Callable[[jax.Array], jbn.RenormClip] | None:
  """``step -> jbn.RenormClip`` for ``--bn renorm`` (None otherwise).

  ``jbn.renorm_clip`` with the ``--renorm-*`` flags; the step flags default
  to 10% (plain batch norm), 80% (``rmax`` reached) and 50% (``dmax``
  reached) of ``total_steps``, the proportions of the paper's 5k/40k/25k.

  Raises:
    UsageError: bounds or steps out of order.
  """
  if config.bn_mode != "renorm":
    return None
  warmup = config.renorm_warmup_steps
  warmup = round(0.1 * total_steps) if warmup is None else warmup
  default = lambda steps, fraction: (  # noqa: E731
      max(round(fraction * total_steps), warmup) if steps is None else steps)
  rmax_steps = default(config.renorm_rmax_steps, 0.8)
  dmax_steps = default(config.renorm_dmax_steps, 0.5)
  if not (config.renorm_rmax >= 1 and config.renorm_dmax >= 0):
    raise errors.UsageError(
        f"--renorm-rmax {config.renorm_rmax} must be >= 1 and --renorm-dmax "
        f"{config.renorm_dmax} >= 0 (1 and 0: plain batch norm).")
  if not 0 <= warmup <= min(rmax_steps, dmax_steps):
    raise errors.UsageError(
        f"--renorm-warmup-steps {warmup} must be >= 0 and at most "
        f"--renorm-rmax-steps ({rmax_steps}) and --renorm-dmax-steps "
        f"({dmax_steps}); the run has {total_steps} steps.")
  return functools.partial(
      jbn.renorm_clip, warmup_steps=warmup, rmax=config.renorm_rmax,
      dmax=config.renorm_dmax, rmax_steps=rmax_steps, dmax_steps=dmax_steps)


def describe(config: configs.Config, renorm) -> str:
  """The normalization of ``config`` in words, for the log."""
  if not config.use_bn:
    return "without batch norm"
  if config.bn_mode == "ghost":
    return f"ghost batch norm, ghost batches of {config.ghost_batch_size}"
  if renorm is not None:
    k = renorm.keywords
    return (f"batch renorm: plain for {k['warmup_steps']} steps, then rmax "
            f"-> {k['rmax']:g} by step {k['rmax_steps']}, dmax -> "
            f"{k['dmax']:g} by step {k['dmax_steps']}")
  return "with batch norm"
