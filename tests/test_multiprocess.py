"""Two processes on 127.0.0.1 train together (jax.distributed, gloo on CPU)."""

import dataclasses
import os
import re
import socket
import subprocess
import sys

import flax.serialization
import jax
import numpy as np

from examples import mnist
from examples import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--epochs", "1", "--batch-size", "128", "--hidden", "32",
         "--warmup-epochs", "0.2", "--no-progress"]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_end_with_identical_parameters(tmp_path):
  workdir = str(tmp_path / "run")
  address = f"127.0.0.1:{free_port()}"
  # One CPU device per process: drop the test session's 4-device flag.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen(
      [sys.executable, "examples/mnist.py", *FLAGS, "--workdir", workdir,
       "--coordinator-address", address, "--num-processes", "2",
       "--process-id", str(i)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=150)
      outputs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out}"
  digests = [re.search(rf"process {i} params sha256 ([0-9a-f]{{64}})",
                       out).group(1) for i, out in enumerate(outputs)]
  assert digests[0] == digests[1]
  assert "2 device(s) in 2 process(es), global batch 128 = 64 per device" in (
      outputs[0])
  assert "test accuracy" in outputs[0]  # process 0 reports and writes files
  assert os.path.exists(os.path.join(workdir, "model.jax"))

  # Each process fed its half of every batch: the same training as one
  # process with 2 devices (up to the order of floating-point sums).
  config = dataclasses.replace(
      mnist.DEFAULTS, hidden=(32,), batch_size=128, epochs=1,
      warmup_epochs=0.2, devices=2, progress=False, quiet=True)
  local = train.train_and_evaluate(config, str(tmp_path / "local"))
  with open(os.path.join(workdir, "checkpoint.msgpack"), "rb") as f:
    saved = flax.serialization.msgpack_restore(f.read())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               saved["state"]["params"], train.to_host(local.state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               saved["state"]["batch_stats"],
               train.to_host(local.state.batch_stats))
