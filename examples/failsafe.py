"""What a valid training state is, and what the loop does with a bad step.

A state is valid when every float in its parameters, ``batch_stats``, weight
EMA (``ema_params``, ``--weight-ema``) and optimizer state is finite and
every running variance (a ``batch_stats`` leaf named ``var``) is >= 0.
``train_step`` computes :func:`state_ok` for the state it produced and keeps
the old state if that one (or the loss) is not valid; :class:`BadSteps`
counts such steps on the host and stops the run once there are more than
``--max-bad-steps``. A restored checkpoint is checked with
:func:`state_problems`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from examples import errors
from examples import parallel

CHECKED = ("params", "batch_stats", "ema_params", "opt_state")


def _float_leaves(state, group: str) -> Iterator[tuple[str, Any]]:
  for path, x in jax.tree_util.tree_leaves_with_path(getattr(state, group)):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      yield f"{group}/{name}", x


def _leaf_ok(name: str, x) -> jax.Array:
  ok = jnp.all(jnp.isfinite(x))
  if name.startswith("batch_stats/") and name.endswith("/var"):
    ok &= jnp.all(x >= 0)
  return ok


def state_ok(state) -> dict[str, jax.Array]:
  """Per part of ``CHECKED``, whether all its values are valid (jittable)."""
  return {g: jnp.all(jnp.stack([_leaf_ok(n, x) for n, x in
                                _float_leaves(state, g)] or [True]))
          for g in CHECKED}


def state_problems(state) -> list[str]:
  """The leaves of a (replicated) state that are not valid, described."""
  problems = []
  for group in CHECKED:
    for name, x in _float_leaves(state, group):
      x = parallel.to_host(x)
      if not bool(_leaf_ok(name, x)):
        what = [f"{np.sum(~np.isfinite(x))} of {x.size} values not finite",
                f"{np.sum(x < 0)} negative variances"]
        what = ", ".join(w for w in what if w[0] != "0")
        problems.append(f"{name} ({what})")
  return problems


class BadSteps:
  """Counts the steps that were not applied; stops the run past a limit."""

  def __init__(self, max_bad_steps: int, log: Callable[..., None],
               skipped: int = 0, last_checkpoint: str | None = None):
    self.max_bad_steps = max_bad_steps
    self.log = log
    self.skipped = skipped  # over the whole run, resumes included
    self.last_checkpoint = last_checkpoint

  def check(self, epoch: int, first_step: int, steps: int,
            oks: list[dict[str, Any]]) -> list[bool]:
    """Whether each step was applied, from the ``ok`` metrics of the steps
    ``first_step, first_step + 1, ...`` of ``epoch``.

    Raises:
      TrainingStopped: more than ``max_bad_steps`` steps were not applied.
    """
    applied = []
    for step, ok in enumerate(parallel.to_host(oks), first_step):
      ok = {k: bool(ok[k]) for k in ("loss",) + CHECKED}
      applied.append(all(ok.values()))
      if applied[-1]:
        continue
      self.skipped += 1
      what = (f"epoch {epoch}, step {step + 1}/{steps}: "
              f"{', '.join(k for k, v in ok.items() if not v)} not finite "
              f"after the update; the step was not applied")
      if self.skipped > self.max_bad_steps:
        kept = (f"The last good checkpoint, {self.last_checkpoint}, is kept; "
                if self.last_checkpoint else
                "No checkpoint had been written yet; ")
        raise errors.TrainingStopped(
            f"training stopped at {what}. {kept}nothing was exported. Try a "
            f"lower --learning-rate, or --max-bad-steps N to skip up to N "
            f"such steps.")
      self.log(f"warning: {what} (skipped {self.skipped} of --max-bad-steps "
               f"{self.max_bad_steps})")
    return applied
