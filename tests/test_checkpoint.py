"""examples/checkpoint.py: Orbax checkpoints, resume, and what a kill leaves.

Tiny digits runs on one device (bitwise comparisons), and subprocesses for
the command line and for kill -9.
"""

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import checkpoint
from examples import errors
from examples import mnist
from examples import parallel
from examples import reporting
from examples import train
from tests import helpers
from tests.helpers import ROOT, TINY, TINY_CONFIG

# 2 epochs, a checkpoint after each, the settings of the TINY flags.
CONFIG = dataclasses.replace(TINY_CONFIG, devices=1, warmup_epochs=0.2)


def _epochs(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                        "checkpoints")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-epoch run: (workdir, result)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, train.train_and_evaluate(CONFIG, workdir)


def test_checkpoint_holds_state_rng_epoch_and_config(finished):
  workdir, result = finished
  assert _epochs(workdir) == [1, 2]
  ckpts = checkpoint.Checkpoints(workdir, CONFIG)
  restored = ckpts.restore(result.state, result.rng)
  ckpts.close()
  assert restored.epoch == 2 and restored.path.endswith("checkpoints/2")
  assert [r["epoch"] for r in restored.history] == [1, 2]
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(
      (restored.state, restored.rng)), parallel.to_host(
          (result.state, result.rng)))
  with open(os.path.join(workdir, "checkpoints", "2", "meta",
                         "metadata")) as f:
    meta = json.load(f)
  assert meta["config"]["hidden"] == [32] and meta["epoch"] == 2


def test_resume_equals_an_uninterrupted_run(finished, tmp_path):
  _, straight = finished
  workdir = str(tmp_path)
  first = train.train_and_evaluate(dataclasses.replace(CONFIG, stop_after=1),
                                   workdir)
  assert [r["epoch"] for r in first.history] == [1] and _epochs(workdir) == [1]
  resumed = train.train_and_evaluate(dataclasses.replace(CONFIG, resume=True),
                                     workdir)
  assert [r["epoch"] for r in resumed.history] == [1, 2]
  jax.tree.map(np.testing.assert_array_equal,
               flax.serialization.to_state_dict(
                   parallel.to_host(resumed.state)),
               flax.serialization.to_state_dict(
                   parallel.to_host(straight.state)))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["epoch"] for line in f] == [1, 2]


def test_resume_with_other_settings_is_refused(finished):
  workdir, _ = finished
  before = helpers.snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"other settings \(learning_rate: 0.1 in the "
                     r"checkpoint, 0.2 now\)"):
    train.train_and_evaluate(
        dataclasses.replace(CONFIG, resume=True, learning_rate=0.2), workdir)
  assert helpers.snapshot(workdir) == before


def test_existing_checkpoint_is_never_overwritten(finished):
  workdir, _ = finished
  before = helpers.snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError, match="exists: pass --resume"):
    mnist.main(TINY + ["--workdir", workdir])
  assert helpers.snapshot(workdir) == before


def test_resume_without_checkpoint(tmp_path):
  with pytest.raises(checkpoint.CheckpointError,
                     match="--resume: no checkpoint"):
    train.train_and_evaluate(dataclasses.replace(CONFIG, resume=True),
                             str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError,
                     match="--resume needs the --workdir"):
    mnist.main(TINY + ["--resume"])


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
  garbage = tmp_path / "checkpoints" / "3" / "state"
  garbage.mkdir(parents=True)
  (garbage / "manifest.ocdbt").write_bytes(b"\x85garbage, as after a crash")
  with pytest.raises(checkpoint.CheckpointError,
                     match="checkpoints/3 is unreadable.*left as it is"):
    train.train_and_evaluate(dataclasses.replace(CONFIG, resume=True),
                             str(tmp_path))
  assert (garbage / "manifest.ocdbt").read_bytes().startswith(b"\x85garbage")


def test_keeps_the_last_n_and_checkpoints_by_time(tmp_path):
  train.train_and_evaluate(dataclasses.replace(CONFIG, epochs=3,
                                               keep_checkpoints=2),
                           str(tmp_path / "a"))
  assert _epochs(str(tmp_path / "a")) == [2, 3]
  # The default interval (10 s) is longer than this run: the last epoch only.
  train.train_and_evaluate(dataclasses.replace(CONFIG, epochs=3,
                                               checkpoint_every=10.0),
                           str(tmp_path / "b"))
  assert _epochs(str(tmp_path / "b")) == [3]


def _poison_batch_stats(workdir, template):
  """Rewrites the latest checkpoint with a NaN in one running variance."""
  config = dataclasses.replace(CONFIG, epochs=3)
  ckpts = checkpoint.Checkpoints(workdir, config)
  r = ckpts.restore(template.state, template.rng)
  ckpts.close()
  stats = jax.tree.map(lambda x: x, r.state.batch_stats)
  stats["hidden0"]["bn"]["var"] = stats["hidden0"]["bn"]["var"].at[3].set(
      jnp.nan)
  shutil.rmtree(r.path)
  ckpts = checkpoint.Checkpoints(workdir, config)
  ckpts.save(r.epoch, r.state.replace(batch_stats=stats), r.rng, r.history,
             0)
  ckpts.close()


def test_checkpoint_with_nan_batch_stats_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  config = dataclasses.replace(CONFIG, epochs=3, stop_after=2)
  result = train.train_and_evaluate(config, workdir)
  _poison_batch_stats(workdir, result)
  t0 = time.perf_counter()
  out = subprocess.run(
      [sys.executable, "examples/mnist.py", *TINY, "--epochs", "3",
       "--checkpoint-every", "0", "--resume", "--workdir", workdir], cwd=ROOT,
      env=helpers.subprocess_env(), capture_output=True, text=True,
      timeout=120)
  seconds = time.perf_counter() - t0
  assert out.returncode == errors.EXIT_USAGE, out.stderr
  assert re.search(r"error: checkpoint \S+/checkpoints/2 holds invalid "
                   r"values: batch_stats/hidden0/bn/var \(1 of 32 values not "
                   r"finite\)\. Refusing to resume from it; move it away to "
                   r"resume from an earlier checkpoint \(kept: epochs 1, 2\)",
                   out.stderr), out.stderr
  assert not os.path.exists(os.path.join(workdir, "model.jax"))
  assert _epochs(workdir) == [1, 2]
  print(f"NaN batch_stats checkpoint: exit {out.returncode} after "
        f"{seconds:.1f} s")


def test_msgpack_checkpoint_of_the_old_format_is_converted(finished,
                                                           tmp_path, capsys):
  _, straight = finished
  first = train.train_and_evaluate(dataclasses.replace(CONFIG, stop_after=1),
                                   str(tmp_path / "a"))
  workdir = tmp_path / "b"
  workdir.mkdir()
  # A checkpoint.msgpack as the examples wrote before Orbax; their Config
  # had neither keep_checkpoints nor checkpoint_every.
  old = {k: v for k, v in dataclasses.asdict(CONFIG).items()
         if k not in ("keep_checkpoints", "checkpoint_every")}
  payload = {
      "state": flax.serialization.to_state_dict(parallel.to_host(
          first.state)),
      "epoch": 1, "rng": parallel.to_host(first.rng),
      "config": json.dumps(old), "history": json.dumps(first.history)}
  (workdir / "checkpoint.msgpack").write_bytes(
      flax.serialization.to_bytes(payload))
  with pytest.raises(checkpoint.CheckpointError, match="exists: pass --resume"):
    train.train_and_evaluate(CONFIG, str(workdir))
  resumed = train.train_and_evaluate(
      dataclasses.replace(CONFIG, resume=True, quiet=False), str(workdir))
  assert "checkpoint.msgpack (the format before Orbax) to " in (
      capsys.readouterr().out)
  assert parallel.params_digest(resumed.state.params) == (
      parallel.params_digest(straight.state.params))
  assert _epochs(str(workdir)) == [1, 2]
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "checkpoint.msgpack").write_bytes(b"\x85garbage")
  with pytest.raises(checkpoint.CheckpointError,
                     match="checkpoint.msgpack is unreadable"):
    train.train_and_evaluate(dataclasses.replace(CONFIG, resume=True),
                             str(tmp_path / "c"))


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path,
                                                          monkeypatch):
  path = str(tmp_path / "metrics.jsonl")
  reporting.atomic_write(path, b"good")

  def crash(*args):
    raise KeyboardInterrupt  # killed between writing and renaming

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    reporting.atomic_write(path, b"partial")
  monkeypatch.undo()
  assert open(path, "rb").read() == b"good"
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_leftovers_of_a_kill_are_removed_on_resume(finished, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(finished[0], workdir)
  # What kill -9 can leave: a half-written checkpoint, an atomic write's
  # temporary file.
  os.makedirs(os.path.join(workdir, "checkpoints",
                           "3.orbax-checkpoint-tmp-1234", "state"))
  with open(os.path.join(workdir, ".metrics.jsonl.x1y2.tmp"), "w") as f:
    f.write("{")
  assert len(helpers.stray_files(workdir)) == 2
  train.train_and_evaluate(dataclasses.replace(CONFIG, resume=True), workdir)
  assert helpers.stray_files(workdir) == []
  assert _epochs(workdir) == [1, 2]


def _start(workdir, *extra):
  env = dict(helpers.subprocess_env(), PYTHONUNBUFFERED="1")
  return subprocess.Popen(
      [sys.executable, "examples/mnist.py", *TINY, "--epochs", "12",
       "--checkpoint-every", "0", "--keep-checkpoints", "2", "--workdir",
       workdir, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def test_kill_9_at_random_moments_then_resume(tmp_path):
  """kill -9 a run three times at random moments (mostly while it writes a
  checkpoint: that is where a tiny run spends its time); every resume works,
  no temporary file survives, and the end result is bitwise that of a run
  never killed."""
  workdir = str(tmp_path / "w")
  shuffle = random.Random(0)
  killed_at = []
  for i in range(3):
    proc = _start(workdir, *(["--resume"] if i else []))
    lines = []
    for line in proc.stdout:
      lines.append(line)
      # The first run has two complete checkpoints once epoch 3 is logged
      # (a save waits for the one before); a resumed run resumed.
      if line.startswith("epoch   3/" if i == 0 else "epoch "):
        break
    assert i == 0 or any(l.startswith("resumed from ") for l in lines), (
        killed_at, "".join(lines) + proc.stdout.read())
    time.sleep(shuffle.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at.append(sorted(os.listdir(os.path.join(workdir,
                                                    "checkpoints"))))
  final = _start(workdir, "--resume")
  out, _ = final.communicate(timeout=120)
  print("checkpoints after each kill:", killed_at)
  assert final.returncode == 0, out
  assert "resumed from " in out
  assert helpers.stray_files(workdir) == [], killed_at
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["epoch"] for line in f] == list(range(1, 13))
  digest = re.search(r"params sha256 ([0-9a-f]{64})", out).group(1)
  config = dataclasses.replace(CONFIG, epochs=12, checkpoint_every=60.0)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert digest == parallel.params_digest(straight.state.params), killed_at
