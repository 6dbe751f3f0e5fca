"""What every training entry point does once its flags are parsed.

``mnist.py`` and ``cifar.py`` only turn their command line into a
:class:`~examples.configs.Config` (``configs.make_parser``) and call
:func:`run`; :func:`main` maps the examples' exceptions to exit statuses.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from examples import checkpoint
from examples import configs
from examples import errors
from examples import export
from examples import parallel
from examples import reporting
from examples import train


def run(config: configs.Config, workdir: str | None) -> train.TrainResult:
  """Starts the processes, trains, exports, prints a summary.

  ``model.jax`` is exported only when the run reached ``config.epochs``;
  it holds ``result.variables`` (recalibrated statistics, weight EMA).
  Every process prints the SHA-256 of its final parameters and of the
  exported variables (equal digests: bitwise-equal values).
  """
  parallel.initialize(config)
  if config.resume and workdir is None:
    raise checkpoint.CheckpointError("--resume needs the --workdir of the run "
                                     "to continue.")
  workdir = workdir or reporting.default_workdir(config.dataset)
  is_main = jax.process_index() == 0
  t0 = time.perf_counter()
  with parallel.exit_if_a_process_is_lost(config.coordinator_address):
    result = train.train_and_evaluate(config, workdir)
    if result.history and result.history[-1]["epoch"] == config.epochs:
      path = os.path.join(workdir, export.MODEL)
      diff = export.export_inference(result, path)
      if is_main:
        print(f"exported {path} (batch norm folded; max |folded - unfolded| "
              f"logits = {diff:.2e}); try: python examples/predict.py "
              f"--model {path}"
              + (f" --data-dir {config.data_dir}" if config.data_dir else ""))
  if is_main and result.history:
    last = result.history[-1]
    what = [w for k, w in (("ema_test_accuracy", "weight EMA"),
                           ("recalibrated_test_accuracy", "recalibrated"))
            if k in last]
    exported = (f" ({', '.join(what)}: "
                f"{100 * last['final_test_accuracy']:.2f}%)" if what else "")
    print(f"test accuracy {100 * last['test_accuracy']:.2f}%{exported} after "
          f"epoch {last['epoch']}; {time.perf_counter() - t0:.1f} s")
  me = jax.process_index()
  print(f"process {me} params sha256 "
        f"{parallel.params_digest(result.state.params)}", flush=True)
  if result.variables is not None:
    print(f"process {me} exported sha256 "
          f"{parallel.params_digest(result.variables)}", flush=True)
  return result


def main(entry: Callable[[Sequence[str] | None], Any]) -> None:
  """Runs ``entry(None)`` (it parses ``sys.argv``). A usage error prints
  one line and exits with status 2; a run stopped on non-finite values,
  status 3. Any other exception is a bug and keeps its traceback."""
  try:
    entry(None)
  except errors.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)
  except errors.TrainingStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_STOPPED)
