"""What a run shows and writes besides checkpoints: console lines, progress
bars, ``metrics.jsonl``, ``curves.png``, and the atomic writes they use.

Only process 0 prints and writes (the callers check).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

METRICS = "metrics.jsonl"
CURVES = "curves.png"
_TMP_SUFFIX = ".tmp"
# Epochs shorter than this show no progress bar.
PROGRESS_DELAY_S = 3.0


def default_workdir(name: str) -> str:
  """``runs/<name>-<YYYYmmdd-HHMMSS>``, a fresh directory."""
  base = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  path, i = base, 1
  while os.path.exists(path):
    path, i = f"{base}-{i}", i + 1
  return path


def atomic_write(path: str, payload: bytes) -> None:
  """Writes ``path`` so that it is either the old file or the whole new one.

  The bytes go to a temporary ``.<name>.<random>.tmp`` in the same
  directory, are flushed and fsync'ed, then ``os.replace`` swaps it in
  (atomic on POSIX); the directory is fsync'ed so the rename survives a
  crash. A kill -9 in between can leave the temporary file:
  :func:`remove_stale_temporaries` removes it when the run is resumed.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory,
                             prefix=f".{os.path.basename(path)}.",
                             suffix=_TMP_SUFFIX)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def remove_stale_temporaries(workdir: str) -> list[str]:
  """Removes the temporary files :func:`atomic_write` left in ``workdir``
  when a process was killed mid-write (``.<name>.<random>.tmp``); returns
  their names."""
  if not os.path.isdir(workdir):
    return []
  stale = [f for f in os.listdir(workdir)
           if f.startswith(".") and f.endswith(_TMP_SUFFIX)]
  for f in stale:
    os.remove(os.path.join(workdir, f))
  return stale


def write_metrics(workdir: str, history: list[dict[str, Any]]) -> None:
  """(Re)writes ``<workdir>/metrics.jsonl``, one JSON object per epoch."""
  atomic_write(os.path.join(workdir, METRICS),
               "".join(json.dumps(r) + "\n" for r in history).encode())


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``<workdir>/metrics.jsonl`` ([] if there is none)."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_metrics(workdir: str, record: dict[str, Any]) -> None:
  """Adds one epoch's line to ``<workdir>/metrics.jsonl``. (A line cut by
  a kill is rewritten from the checkpoint on resume.)"""
  with open(os.path.join(workdir, METRICS), "a") as f:
    f.write(json.dumps(record) + "\n")


def progress_bar(total: int, desc: str, enabled: bool):
  """A tqdm bar on stderr that shows only for epochs longer than
  ``PROGRESS_DELAY_S`` and only on a terminal."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="step", leave=False,
              delay=PROGRESS_DELAY_S,
              disable=not (enabled and sys.stderr.isatty()))


def epoch_line(record: dict[str, Any], epochs: int) -> str:
  return (f"epoch {record['epoch']:3d}/{epochs}  train_loss "
          f"{record['train_loss']:.4f}  test_loss {record['test_loss']:.4f}  "
          f"test_acc {100 * record['test_accuracy']:.2f}%  "
          f"{record['examples_per_sec']:.0f} ex/s  "
          f"{record['epoch_seconds']:.2f} s")


def plot_curves(path: str, history: list[dict[str, Any]], title: str) -> None:
  """Loss and accuracy per epoch, to a PNG (matplotlib, Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  epochs = [r["epoch"] for r in history]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
  ax_loss.plot(epochs, [r["test_loss"] for r in history], label="test")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log",
              title="loss")
  ax_loss.legend()
  ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in history],
              label="train (batch statistics)")
  ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history],
              label="test (running statistics)")
  ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
  ax_acc.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=f".{os.path.basename(path)}.",
                             suffix=_TMP_SUFFIX)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
