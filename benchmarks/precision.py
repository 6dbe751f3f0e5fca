"""Relative error of the batch variance: jbn vs Flax vs a float32 two-pass.

For ``--batches`` random float32 batches of shape ``(256, 16)`` drawn as
``offset + N(0, 1)``, computes each contender's biased batch variance per
feature (in float32, on one CPU device, all batches in one jitted ``vmap``)
and its relative error against the float64 two-pass variance of the same
float32 data. Prints, per offset, the median and the 99th percentile of the
error over all ``batches x 16`` features, as a Markdown table.

Contenders:

* ``jbn``: ``jbn.batch_norm(..., momentum=0.0)``'s new running variance, from
  the ``jbn`` of this checkout (pilot-mean shift);
* ``jbn, old shift (emulated)``: the shift jbn used before issue 9 (the
  first element of the batch), with the same shifted sums written out here;
* ``flax default``: ``flax.linen.BatchNorm()`` (``use_fast_variance=True``:
  ``E[x^2] - E[x]^2``);
* ``flax two-pass``: ``flax.linen.BatchNorm(use_fast_variance=False)``;
* ``float32 two-pass``: ``mean(x)`` then ``mean((x - mean)**2)``, float32.

Usage (from the repository root; the checkout's ``jbn`` is imported)::

  .venv/bin/python benchmarks/precision.py               # ~10 s on 2 cores
  .venv/bin/python benchmarks/precision.py --batches 2000 --seed 1
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The checkout's jbn, not whichever one is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jbn

SHAPE = (256, 16)
OFFSETS = (0.0, 1e2, 1e4)


def _jbn(x):
  params, state = jbn.init(x.shape[-1])
  return jbn.batch_norm(params, state, x, True, momentum=0.0)[1]["var"]


def _old_jbn_shift(x):
  """jbn before issue 9: sums shifted by the batch's first element."""
  shift = x[:1]
  d = x - shift
  m1 = jnp.mean(d, axis=0)
  return jnp.maximum(jnp.mean(d * d, axis=0) - m1 * m1, 0)


def _flax(use_fast_variance):
  model = nn.BatchNorm(use_running_average=False, momentum=0.0,
                       use_fast_variance=use_fast_variance)

  def var(x):
    params, state = jbn.init(x.shape[-1])  # the same variable tree as Flax
    _, updates = model.apply({"params": params, "batch_stats": state}, x,
                             mutable=["batch_stats"])
    return updates["batch_stats"]["var"]

  return var


def _two_pass_f32(x):
  mean = jnp.mean(x, axis=0)
  return jnp.mean(jnp.square(x - mean), axis=0)


CONTENDERS = {
    "jbn": _jbn,
    "jbn, old shift (emulated)": _old_jbn_shift,
    "flax default (use_fast_variance=True)": _flax(True),
    "flax two-pass (use_fast_variance=False)": _flax(False),
    "float32 two-pass": _two_pass_f32,
}


def relative_errors(batches: int, offset: float, seed: int):
  """{contender: relative variance errors (batches * 16 values)}."""
  rng = np.random.default_rng(seed)
  x = (offset + rng.standard_normal((batches,) + SHAPE)).astype(np.float32)
  truth = np.var(x.astype(np.float64), axis=1)
  fns = jax.jit(lambda x: {name: jax.vmap(fn)(x)
                           for name, fn in CONTENDERS.items()})
  out = fns(jnp.asarray(x))
  return {name: (np.abs(np.asarray(v, np.float64) - truth) / truth).ravel()
          for name, v in out.items()}


def table(batches: int, seed: int) -> str:
  errs = {off: relative_errors(batches, off, seed) for off in OFFSETS}
  head = "| contender | " + " | ".join(
      f"offset {off:g}: median | p99" for off in OFFSETS) + " |"
  lines = [head, "|---" * (1 + 2 * len(OFFSETS)) + "|"]
  for name in CONTENDERS:
    cells = []
    for off in OFFSETS:
      e = errs[off][name]
      cells += [f"{np.median(e):.2e}", f"{np.percentile(e, 99):.2e}"]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=1000,
                      help="random (256, 16) batches per offset")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  print(f"Relative error of the biased batch variance, float32, "
        f"{args.batches} batches of {SHAPE} per offset (offset + N(0, 1)), "
        f"seed {args.seed}; jbn from {os.path.dirname(jbn.__file__)}, "
        f"jax {jax.__version__}.\n")
  print(table(args.batches, args.seed))


if __name__ == "__main__":
  main()
