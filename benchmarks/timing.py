"""The timing harness: interleaved repetitions, medians, page faults.

Every repetition calls each contender once, in a fresh (seeded) random order;
the result is each one's median time and mean minor page faults per call.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic mmap threshold
# --keep-freed-memory: glibc never hands freed memory back to the kernel (one
# arena, no mmap'd chunks, no trimming), so fresh output buffers are recycled
# instead of page-faulted in again on every call.
KEEP_FREED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                     "MALLOC_TRIM_THRESHOLD_": str(2**40)}


@dataclasses.dataclass(frozen=True)
class Reps:
  """How many timed repetitions: ``fixed``, or as many as fit in ``seconds``
  (estimated from the last warm-up round), clamped to ``[low, high]``."""

  fixed: int | None = None
  seconds: float = 15.0
  low: int = 20
  high: int = 200
  warmup: int = 3

  def count(self, round_seconds: float) -> int:
    if self.fixed is not None:
      return self.fixed
    return int(min(self.high, max(self.low, self.seconds / round_seconds)))

  def describe(self) -> str:
    if self.fixed is not None:
      return f"{self.fixed} timed repetitions"
    return (f"as many timed repetitions as fit in {self.seconds:g} s per row, "
            f"between {self.low} and {self.high} (column `reps`)")


def keeping_freed_memory() -> bool:
  """Whether this process runs with KEEP_FREED_MEMORY (read at its start)."""
  return all(os.environ.get(k) == v for k, v in KEEP_FREED_MEMORY.items())


def minor_faults() -> int:
  """Minor page faults of this process so far (all threads); 0 if unknown."""
  try:
    import resource  # pylint: disable=import-outside-toplevel
  except ImportError:  # not on Unix
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclasses.dataclass(frozen=True)
class Timings:
  medians: dict  # name -> median seconds per call
  reps: int  # timed repetitions
  faults: dict  # name -> mean minor page faults per call


def run_round_robin(thunks: dict[str, Callable[[], Any]],
                    reps: Reps) -> Timings:
  """Median seconds (and mean page faults) per call of each thunk, interleaved.

  Every repetition calls each thunk once, in a fresh (seeded) random order:
  a rotation of one fixed order would leave each contender behind the same
  neighbour every time, and on a small machine what runs just before (cache
  contents, threads still winding down) shows in the time.

  Page faults are counted around each call too: on a VM they cost about a
  microsecond each, and how many a call pays depends on what the allocator
  did with the buffers freed before it, not on the contender alone.
  """
  names = list(thunks)
  order = random.Random(0)
  rounds = []
  for _ in range(max(reps.warmup, 1 if reps.fixed is None else 0)):
    t0 = time.perf_counter()
    for name in names:
      thunks[name]()
    rounds.append(time.perf_counter() - t0)
  n = reps.count(statistics.median(rounds) if rounds else math.inf)
  times = {name: [] for name in names}
  faults = {name: 0 for name in names}
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for _ in range(n):
      for name in order.sample(names, len(names)):
        f0 = minor_faults()
        t0 = time.perf_counter()
        thunks[name]()
        times[name].append(time.perf_counter() - t0)
        faults[name] += minor_faults() - f0
  finally:
    if gc_was_enabled:
      gc.enable()
  return Timings({name: statistics.median(t) for name, t in times.items()},
                 n, {name: f / max(n, 1) for name, f in faults.items()})


def jax_thunk(compiled, args) -> Callable[[], Any]:
  return lambda: jax.block_until_ready(compiled(*args))
