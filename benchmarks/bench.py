"""jbn vs flax.linen.BatchNorm (and PyTorch CPU), side by side.

Times, in ONE process and interleaved (round robin: every repetition runs each
contender once, in an order shuffled afresh for each repetition),
the median over many repetitions after warm-up of:

* train-mode forward (output and new running statistics),
* forward + backward (``jax.vjp`` with a fixed cotangent: ``y`` and the
  gradients with respect to ``x``, ``scale`` and ``bias``),
* eval-mode forward,

for ``jbn.batch_norm``, ``flax.linen.BatchNorm`` (default settings, i.e.
``use_fast_variance=True``), Flax with ``use_fast_variance=False`` and,
where it is installed, ``torch.nn.functional.batch_norm`` (CPU, NCHW: its
native layout). Each time is also given as a multiple of a bandwidth floor:
``passes`` times the time of a jitted elementwise ``x * c`` over the same
tensor in the same run (3 passes for train forward, 8 for forward +
backward, 2 for eval). The compiled temporary memory of forward + backward
(``memory_analysis().temp_size_in_bytes``) is reported for both the vjp form
and the ``jax.grad(lambda p, x: jnp.sum(y ** 2), argnums=(0, 1))`` form.

With ``--e2e`` it also measures the training-step throughput of a small
CIFAR-style residual CNN with ``jbn.linen.BatchNorm`` against the identical
model with ``flax.linen.BatchNorm``.

Usage (from the repository root)::

  python benchmarks/bench.py --e2e                # full run, ~5 min on 2 cores
  python benchmarks/bench.py --quick              # a couple of shapes, few reps
  python benchmarks/bench.py --shapes 64x32x32x64 --dtypes float32 --no-torch

Results go to stdout (Markdown) and to ``--out`` (default
``benchmarks/RESULTS.md``); progress goes to stderr.

The code is in the ``benchmarks`` package: ``timing.py`` (the harness),
``contenders.py`` (what is timed, one row), ``e2e.py`` (the end-to-end row,
with the example trainer's own step), ``report.py`` (the Markdown) and
``cli.py`` (flags, environment, the run). This file is the entry point.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
