"""Two processes on 127.0.0.1 train together (jax.distributed, gloo on CPU),
and stop promptly, naming the lost process, when the other one dies."""

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from examples import checkpoint
from examples import errors
from examples import mnist
from examples import parallel
from examples import reporting
from examples import train
from tests import helpers
from tests.helpers import ROOT

FLAGS = ["--epochs", "1", "--batch-size", "128", "--hidden", "32",
         "--warmup-epochs", "0.2", "--no-progress"]


def _start(workdir, flags, address):
  env = dict(helpers.subprocess_env(), PYTHONUNBUFFERED="1")
  return [subprocess.Popen(
      [sys.executable, "examples/mnist.py", *flags, "--workdir", workdir,
       "--coordinator-address", address, "--num-processes", "2",
       "--process-id", str(i)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


@contextlib.contextmanager
def _reaped(procs):
  """Kills whichever of ``procs`` is still running on the way out."""
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _survivor_output(procs, survivor, timeout):
  """``(output, seconds)`` of ``procs[survivor]`` until it exits."""
  t0 = time.perf_counter()
  out, _ = procs[survivor].communicate(timeout=timeout)
  return out, time.perf_counter() - t0


def _outputs_of_successful_runs(procs, timeout=150):
  """Each process's output, once all have exited with status 0."""
  with _reaped(procs):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out}"
  return outputs

def test_two_processes_end_with_identical_parameters(tmp_path):
  workdir = str(tmp_path / "run")
  procs = _start(workdir, FLAGS, f"127.0.0.1:{helpers.free_port()}")
  outputs = _outputs_of_successful_runs(procs)
  digests = [re.search(rf"process {i} params sha256 ([0-9a-f]{{64}})",
                       out).group(1) for i, out in enumerate(outputs)]
  assert digests[0] == digests[1]
  assert "2 device(s) in 2 process(es), global batch 128 = 64 per device" in (
      outputs[0])
  assert "test accuracy" in outputs[0]  # process 0 reports and writes files
  assert os.path.exists(os.path.join(workdir, "model.jax"))
  assert helpers.stray_files(workdir) == []

  # Each process fed its half of every batch: the same training as one
  # process with 2 devices (up to the order of floating-point sums). The
  # checkpoint both processes wrote restores here on 2 local devices.
  config = dataclasses.replace(
      mnist.DEFAULTS, hidden=(32,), batch_size=128, epochs=1,
      warmup_epochs=0.2, devices=2, progress=False, quiet=True)
  local = train.train_and_evaluate(config, str(tmp_path / "local"))
  ckpts = checkpoint.Checkpoints(workdir, dataclasses.replace(config,
                                                              resume=True))
  saved = ckpts.restore(local.state, local.rng)
  ckpts.close()
  assert saved.epoch == 1
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jax.tree.map(close, parallel.to_host(saved.state.params),
               parallel.to_host(local.state.params))
  jax.tree.map(close, parallel.to_host(saved.state.batch_stats),
               parallel.to_host(local.state.batch_stats))


def test_two_processes_renorm_recalibrate_identical(tmp_path):
  """--bn renorm and the post-training recalibration (and the weight EMA it
  recalibrates) over 2 processes: both end with the same bits."""
  workdir = str(tmp_path / "run")
  flags = [*FLAGS, "--bn", "renorm", "--recalibrate", "pooled",
           "--weight-ema", "0.9"]
  procs = _start(workdir, flags, f"127.0.0.1:{helpers.free_port()}")
  outputs = _outputs_of_successful_runs(procs)
  for what in ("params", "exported"):
    digests = [re.search(rf"process {i} {what} sha256 ([0-9a-f]{{64}})",
                         out).group(1) for i, out in enumerate(outputs)]
    assert digests[0] == digests[1], what
  assert "batch renorm: plain for 1 steps" in outputs[0]
  assert "recalibrated batch norm (pooled over the 1437 training images, " \
      "weight EMA" in outputs[0]
  (record,) = reporting.read_metrics(workdir)
  assert 0.3 < record["recalibrated_test_accuracy"] == record[
      "final_test_accuracy"]
  assert os.path.exists(os.path.join(workdir, "model.jax"))


@pytest.mark.parametrize("victim", [1, 0])
def test_when_a_process_dies_the_other_stops_and_names_it(tmp_path, victim):
  """kill -9 one process mid-training: the survivor exits with status 4
  within 30 s (in practice well under a second) and a message naming the
  lost process.

  (No checkpoint is written during the test: a process that waits in an
  Orbax checkpoint barrier when the other dies is terminated by JAX's
  coordination client itself -- SIGABRT, JAX's message -- see parallel.py.)
  """
  survivor = 1 - victim
  workdir = str(tmp_path / "run")
  flags = [*FLAGS, "--epochs", "200", "--checkpoint-every", "600"]
  procs = _start(workdir, flags, f"127.0.0.1:{helpers.free_port()}")
  with _reaped(procs):
    lines = []
    for line in procs[0].stdout:  # training is under way: epoch 3 is done
      lines.append(line)
      if line.startswith("epoch   3/"):
        break
    assert lines and lines[-1].startswith("epoch   3/"), "".join(lines)
    procs[victim].send_signal(signal.SIGKILL)
    out, seconds = _survivor_output(procs, survivor, 60)
  assert procs[survivor].returncode != 0, out
  assert seconds < 30, out
  assert re.search(rf"error: process {survivor} of 2: lost process {victim} "
                   r"\(", out), out[-3000:]
  assert procs[survivor].returncode == errors.EXIT_LOST_PROCESS
  print(f"process {victim} killed: process {survivor} exited "
        f"{procs[survivor].returncode} after {seconds:.2f} s")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_process_in_a_checkpoint_barrier_names_the_lost_one(victim):
  """The survivor waits in a coordination-service barrier (as while Orbax
  writes a checkpoint), not in a collective, when the other process dies:
  it still exits with status 4 within seconds, naming it (without the peer
  watch, JAX's coordination client aborts it: SIGABRT, after the heartbeat
  timeout when process 1 died)."""
  survivor = 1 - victim
  address = f"127.0.0.1:{helpers.free_port()}"
  env = dict(helpers.subprocess_env(), PYTHONUNBUFFERED="1")
  procs = [subprocess.Popen(
      [sys.executable, "tests/barrier_worker.py", str(i), str(victim),
       address], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  with _reaped(procs):
    out, seconds = _survivor_output(procs, survivor, 90)
  assert f"process {survivor} ready" in out, out[-3000:]
  assert procs[survivor].returncode == errors.EXIT_LOST_PROCESS, out[-3000:]
  assert re.search(rf"error: process {survivor} of 2: lost process {victim} "
                   r"\(", out), out[-3000:]
  assert seconds < 30, out[-3000:]
