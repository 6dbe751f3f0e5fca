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
"""

from __future__ import annotations

import os

# Must happen before jax is imported: 4 CPU devices for the axis-name rows.
_N_DEVICES = 4
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={_N_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# PyTorch's OpenMP threads otherwise spin for a while after each call and
# steal the cores from whichever contender runs next (read when torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import dataclasses
import datetime
import functools
import gc
import importlib
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn

DEFAULT_SHAPES = ((256, 1024), (1024, 4096), (64, 32, 32, 64),
                  (32, 56, 56, 64), (128, 16, 16, 256))
QUICK_SHAPES = ((256, 1024), (64, 32, 32, 64))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
WORKS = ("fwd+bwd", "train fwd", "eval")
PASSES = {"train fwd": 3, "fwd+bwd": 8, "eval": 2}
JAX_CONTENDERS = ("jbn", "flax", "flax-sv")
CONTENDERS = JAX_CONTENDERS + ("torch",)
LABELS = {"jbn": "jbn", "flax": "flax", "flax-sv": "flax slow-var",
          "torch": "torch"}
AXIS = "batch"
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic mmap threshold
# --keep-freed-memory: glibc never hands freed memory back to the kernel (one
# arena, no mmap'd chunks, no trimming), so fresh output buffers are recycled
# instead of page-faulted in again on every call.
KEEP_FREED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                     "MALLOC_TRIM_THRESHOLD_": str(2**40)}
MOMENTUM, EPSILON = 0.99, 1e-5  # the defaults of both jbn and Flax


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The contenders, all with one signature:
#   apply(params, state, x, train, axis_name) -> (y, new_state)
# params = {'scale', 'bias'}, state = {'mean', 'var'} (Flax's variables).


def jbn_apply(params, state, x, train, axis_name):
  return jbn.batch_norm(params, state, x, train, momentum=MOMENTUM,
                        epsilon=EPSILON, axis_name=axis_name)


def flax_apply(params, state, x, train, axis_name, *, use_fast_variance):
  bn = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name,
                    use_fast_variance=use_fast_variance)
  variables = {"params": params, "batch_stats": state}
  if train:
    y, updates = bn.apply(variables, x, use_running_average=False,
                          mutable=["batch_stats"])
    return y, updates["batch_stats"]
  return bn.apply(variables, x, use_running_average=True), state


APPLY = {
    "jbn": jbn_apply,
    "flax": functools.partial(flax_apply, use_fast_variance=True),
    "flax-sv": functools.partial(flax_apply, use_fast_variance=False),
}


def work_fn(apply: Callable, work: str, axis_name: str | None) -> Callable:
  """The function timed (or measured) for one contender and one work type."""
  if work == "train fwd":
    return lambda p, s, x: apply(p, s, x, True, axis_name)
  if work == "eval":
    return lambda p, s, x: apply(p, s, x, False, axis_name)[0]
  if work == "fwd+bwd":
    def fwd_bwd(p, s, x, dy):
      y, vjp, new_s = jax.vjp(lambda p, x: apply(p, s, x, True, axis_name),
                              p, x, has_aux=True)
      return y, new_s, vjp(dy)
    return fwd_bwd
  if work == "grad":
    def grad(p, s, x):
      loss = lambda p, x: jnp.sum(apply(p, s, x, True, axis_name)[0] ** 2)
      return jax.grad(loss, argnums=(0, 1))(p, x)
    return grad
  raise ValueError(f"unknown work {work!r}")


def shard(fn: Callable, work: str, mesh: Mesh) -> Callable:
  """``fn`` under ``jax.shard_map``, x (and dy) split on the batch axis."""
  b = P(AXIS)
  in_specs = {"fwd+bwd": (P(), P(), b, b)}.get(work, (P(), P(), b))
  out_specs = {"train fwd": (b, P()), "eval": b, "fwd+bwd": (b, P(), (P(), b)),
               "grad": (P(), b)}[work]
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# --------------------------------------------------------------------------
# Timing


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


def torch_thunks(torch, x32: np.ndarray, dy32: np.ndarray,
                 dtype_name: str) -> dict[str, Callable[[], Any]]:
  """PyTorch CPU thunks for the three work types, NCHW for 4-D inputs."""
  F = torch.nn.functional
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  if x32.ndim == 4:  # NHWC -> NCHW, torch's native layout
    x32, dy32 = (np.ascontiguousarray(a.transpose(0, 3, 1, 2))
                 for a in (x32, dy32))
  c = x32.shape[1]
  x = torch.from_numpy(x32).to(tdt)
  dy = torch.from_numpy(dy32).to(tdt)
  xg = x.clone().requires_grad_(True)
  w = torch.ones(c, requires_grad=True)
  b = torch.zeros(c, requires_grad=True)
  rm, rv = torch.zeros(c), torch.ones(c)
  tm = 1 - MOMENTUM  # PyTorch's momentum is the weight of the new value

  def train():
    with torch.no_grad():
      return F.batch_norm(x, rm, rv, w, b, training=True, momentum=tm,
                          eps=EPSILON)

  def fwd_bwd():
    y = F.batch_norm(xg, rm, rv, w, b, training=True, momentum=tm,
                     eps=EPSILON)
    return y, torch.autograd.grad(y, (xg, w, b), dy)

  def evaluate():
    with torch.no_grad():
      return F.batch_norm(x, rm, rv, w, b, training=False, eps=EPSILON)

  return {"fwd+bwd": fwd_bwd, "train fwd": train, "eval": evaluate}


# --------------------------------------------------------------------------
# One row: a shape, a dtype, with or without an axis name


@dataclasses.dataclass
class Row:
  shape: tuple[int, ...]
  dtype: str
  axis: bool
  nbytes: int
  per_device_nbytes: int
  floor: float = math.nan  # seconds
  reps: int = 0
  times: dict = dataclasses.field(default_factory=dict)  # (work, name) -> s
  faults: dict = dataclasses.field(default_factory=dict)  # (work, name) -> n
  temp_vjp: dict = dataclasses.field(default_factory=dict)  # name -> bytes
  temp_grad: dict = dataclasses.field(default_factory=dict)  # name -> bytes

  @property
  def kind(self) -> str:
    return "CNN" if len(self.shape) == 4 else "MLP"

  def t(self, work: str, name: str) -> float:
    return self.times.get((work, name), math.nan)

  def ratio(self, work: str, name: str) -> float:
    """``name``'s time over jbn's: > 1 means jbn is faster."""
    return self.t(work, name) / self.t(work, "jbn")

  def floor_multiple(self, work: str, name: str) -> float:
    return self.t(work, name) / (PASSES[work] * self.floor)


def bench_row(shape, dtype_name, axis, *, reps: Reps, torch, mesh,
              seed=0) -> Row:
  dtype = DTYPES[dtype_name]
  rng = np.random.default_rng(seed)
  x32 = rng.standard_normal(shape, dtype=np.float32)
  dy32 = rng.standard_normal(shape, dtype=np.float32)
  nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
  row = Row(shape, dtype_name, axis, nbytes,
            nbytes // (_N_DEVICES if axis else 1))

  if axis:
    put_x = functools.partial(jax.device_put,
                              device=NamedSharding(mesh, P(AXIS)))
    put_p = functools.partial(jax.device_put, device=NamedSharding(mesh, P()))
  else:
    put_x = put_p = functools.partial(jax.device_put, device=jax.devices()[0])
  x = put_x(jnp.asarray(x32, dtype))
  dy = put_x(jnp.asarray(dy32, dtype))
  params, state = jbn.init(shape[-1])
  params, state = put_p(params), put_p(state)
  axis_name = AXIS if axis else None

  def compile_(fn, work, *args):
    if axis:
      fn = shard(fn, work, mesh)
    return jax.jit(fn).lower(*args).compile()

  # c = 1.5 is exact in bfloat16, so XLA cannot simplify the multiply away.
  thunks = {"floor": jax_thunk(jax.jit(lambda x: x * 1.5).lower(x)
                               .compile(), (x,))}
  for name in JAX_CONTENDERS:
    # The cotangent has the output's dtype (Flax returns float32 for bf16 x).
    y_dtype = jax.eval_shape(work_fn(APPLY[name], "eval", None), params,
                             state, x).dtype
    dy_c = dy if y_dtype == dy.dtype else put_x(jnp.asarray(dy32, y_dtype))
    for work in WORKS:
      args = (params, state, x, dy_c) if work == "fwd+bwd" else (
          params, state, x)
      compiled = compile_(work_fn(APPLY[name], work, axis_name), work, *args)
      thunks[f"{work}|{name}"] = jax_thunk(compiled, args)
      if work == "fwd+bwd":
        row.temp_vjp[name] = compiled.memory_analysis().temp_size_in_bytes
    compiled = compile_(work_fn(APPLY[name], "grad", axis_name), "grad",
                        params, state, x)
    row.temp_grad[name] = compiled.memory_analysis().temp_size_in_bytes
  if torch is not None and not axis:
    for work, thunk in torch_thunks(torch, x32, dy32, dtype_name).items():
      thunks[f"{work}|torch"] = thunk

  timings = run_round_robin(thunks, reps)
  row.reps = timings.reps
  row.floor = timings.medians.pop("floor")
  row.faults[("floor", "floor")] = timings.faults.pop("floor")
  for key, value in timings.medians.items():
    work, name = key.split("|")
    row.times[(work, name)] = value
    row.faults[(work, name)] = timings.faults[key]
  return row


# --------------------------------------------------------------------------
# End to end: a small CIFAR-style residual CNN, one SGD step under jit


def e2e_model(norm: Callable[..., nn.Module]) -> nn.Module:
  """The CIFAR ResNet of ``examples/`` (Conv -> BN -> relu, residual blocks).

  ``norm`` is the batch-norm class (``flax.linen.BatchNorm`` or
  ``jbn.linen.BatchNorm``); everything else is identical.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from examples import models  # pylint: disable=import-outside-toplevel
  return models.ResNet(norm=models.Norm(module=norm))


def e2e_step_thunk(norm, images, labels) -> Callable[[], Any]:
  """A thunk that runs one jitted SGD step and keeps the training state."""
  import optax  # pylint: disable=import-outside-toplevel
  model = e2e_model(norm)
  variables = model.init(jax.random.key(0), images, train=False)
  tx = optax.sgd(0.05, momentum=0.9)
  carry = [variables["params"], variables["batch_stats"]]
  carry.append(tx.init(carry[0]))

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  def thunk():
    *new, loss = jax.block_until_ready(step(*carry, images, labels))
    carry[:] = new
    return loss
  return thunk


def bench_e2e(batch: int, reps: Reps) -> Timings:
  """Median seconds per training step, jbn.linen vs flax.linen, interleaved."""
  try:
    jbn_linen = importlib.import_module("jbn.linen")  # imports flax's side
  except ImportError as e:
    raise SystemExit(f"--e2e needs jbn.linen.BatchNorm ({e}).") from None
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)
  thunks = {"jbn": e2e_step_thunk(jbn_linen.BatchNorm, images, labels),
            "flax": e2e_step_thunk(nn.BatchNorm, images, labels)}
  return run_round_robin(thunks, reps)


# --------------------------------------------------------------------------
# Report


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> str:
  try:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "unknown"


def fmt_shape(shape) -> str:
  return "x".join(map(str, shape))


def fmt(v: float, spec: str) -> str:
  return "-" if math.isnan(v) else format(v, spec)


def nanmedian(values) -> float:
  values = [v for v in values if not math.isnan(v)]
  return statistics.median(values) if values else math.nan


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
             left: int = 3) -> str:
  """A Markdown table; the first ``left`` columns left-aligned, others right."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < left else "--:"
                          for i in range(len(header))) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def row_key(r: Row) -> list[str]:
  mark = (" †" if r.per_device_nbytes >= MMAP_THRESHOLD
          and not keeping_freed_memory() else "")
  return [fmt_shape(r.shape) + mark, r.dtype, AXIS if r.axis else "-",
          f"{r.nbytes / 1e6:.2f}"]


def time_table(rows: Sequence[Row], work: str, names: Sequence[str]) -> str:
  others = [n for n in names if n != "jbn"]
  header = ["shape", "dtype", "axis_name", "x MB", "reps", "floor ms"]
  header += [f"{LABELS[n]} ms" for n in names]
  header += [f"{LABELS[n]}/jbn" for n in others]
  header += [f"{LABELS[n]} ×floor" for n in names]
  body = []
  for r in rows:
    cells = row_key(r) + [str(r.reps), f"{r.floor * 1e3:.3f}"]
    cells += [fmt(r.t(work, n) * 1e3, ".3f") for n in names]
    cells += [fmt(r.ratio(work, n), ".2f") for n in others]
    cells += [fmt(r.floor_multiple(work, n), ".2f") for n in names]
    body.append(cells)
  return md_table(header, body)


def faults_table(rows: Sequence[Row], names: Sequence[str]) -> str:
  """Mean minor page faults per call, per contender (and the floor)."""
  works = ("fwd+bwd", "train fwd")
  header = ["shape", "dtype", "axis_name", "x MB", "x pages", "floor"]
  header += [f"{w}: {LABELS[n]}" for w in works for n in names]
  body = []
  for r in rows:
    cells = row_key(r) + [str(r.per_device_nbytes // 4096),
                          fmt(r.faults.get(("floor", "floor"), math.nan),
                              ".0f")]
    cells += [fmt(r.faults.get((w, n), math.nan), ".0f") for w in works
              for n in names]
    body.append(cells)
  return md_table(header, body)


def x_units(r: Row, temp: int) -> float:
  """A temporary size in units of (per-device) x."""
  return temp / r.per_device_nbytes


def memory_table(rows: Sequence[Row]) -> str:
  header = ["shape", "dtype", "axis_name", "x MB"]
  header += [f"{form}: {LABELS[n]} MB (×x)" for form in ("vjp", "grad")
             for n in JAX_CONTENDERS]
  body = []
  for r in rows:
    cells = row_key(r)
    for temps in (r.temp_vjp, r.temp_grad):
      cells += [f"{temps[n] / 1e6:.2f} ({x_units(r, temps[n]):.2f})"
                for n in JAX_CONTENDERS]
    body.append(cells)
  return md_table(header, body)


def speed_summary(rows: Sequence[Row], names: Sequence[str]) -> str:
  others = [n for n in names if n != "jbn"]
  header = (["work"] + [f"{LABELS[n]}/jbn" for n in others]
            + ["flax/jbn, no axis_name", "flax/jbn, axis_name",
               "rows where jbn < flax"])
  body = []
  for work in WORKS:
    cells = [work]
    for n in others:
      ratios = [v for v in (r.ratio(work, n) for r in rows)
                if not math.isnan(v)]
      cells.append(f"{fmt(nanmedian(ratios), '.2f')} "
                   f"[{min(ratios):.2f}-{max(ratios):.2f}]" if ratios else "-")
    for axis in (False, True):
      cells.append(fmt(nanmedian(r.ratio(work, "flax") for r in rows
                                 if r.axis == axis), ".2f"))
    slower = sum(r.ratio(work, "flax") < 1 for r in rows)
    cells.append(f"{slower}/{len(rows)}")
    body.append(cells)
  return md_table(header, body, left=1)


def memory_summary(rows: Sequence[Row]) -> str:
  lines = []
  for form, attr in (("vjp", "temp_vjp"), ("grad", "temp_grad")):
    med = {n: nanmedian(x_units(r, getattr(r, attr)[n]) for r in rows)
           for n in JAX_CONTENDERS}
    units = ", ".join(f"{LABELS[n]} {v:.2f}" for n, v in med.items())
    extra = nanmedian(
        x_units(r, getattr(r, attr)["flax"] - getattr(r, attr)["jbn"])
        for r in rows)
    # A ratio only means something where jbn's temporary is not ~0.
    sized = [r for r in rows if x_units(r, getattr(r, attr)["jbn"]) >= 0.01]
    ratio = nanmedian(getattr(r, attr)["flax"] / getattr(r, attr)["jbn"]
                      for r in sized)
    lines.append(
        f"- {form} form: median temporary in units of x: {units}; flax needs "
        f"{extra:.2f} x more than jbn (median over rows). flax/jbn ratio: "
        + (f"{ratio:.2f} (median over rows)" if len(sized) == len(rows) else
           f"unbounded in {len(rows) - len(sized)}/{len(rows)} rows, where "
           "jbn's temporary is below 1% of x"
           + (f"; {ratio:.2f} (median) over the others" if sized else ""))
        + ".")
  return "\n".join(lines)


def floor_summary(rows: Sequence[Row]) -> str:
  lines = []
  cnn = [r for r in rows if r.kind == "CNN" and r.dtype == "float32"]
  for axis in (False, True):
    sel = [r for r in cnn if r.axis == axis]
    if not sel:
      continue
    per = ", ".join(f"{fmt_shape(r.shape)}: "
                    f"{r.floor_multiple('fwd+bwd', 'jbn'):.2f}" for r in sel)
    med = {n: nanmedian(r.floor_multiple("fwd+bwd", n) for r in sel)
           for n in JAX_CONTENDERS}
    lines.append(
        f"- CNN float32 fwd+bwd, {'with' if axis else 'no'} axis_name: jbn "
        f"median {med['jbn']:.2f}× the floor ({per}); flax "
        f"{med['flax']:.2f}×, flax slow-var {med['flax-sv']:.2f}×.")
  return "\n".join(lines)


def slower_rows(rows: Sequence[Row]) -> str:
  slower = sorted(((r.ratio(w, "flax"), w, r) for w in WORKS for r in rows
                   if r.ratio(w, "flax") < 1), key=lambda t: t[0])
  if not slower:
    return "jbn is at least as fast as flax (default) on every row."
  return "\n".join(
      f"- {w}: {fmt_shape(r.shape)} {r.dtype} "
      f"{'axis_name' if r.axis else 'no axis_name'}: flax/jbn {ratio:.2f} "
      f"(jbn {r.t(w, 'jbn') * 1e3:.3f} ms, flax {r.t(w, 'flax') * 1e3:.3f} ms)"
      for ratio, w, r in slower)


def header(args, torch, mesh_ok: bool, load: str) -> str:
  versions = [f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}",
              f"flax {flax.__version__}", f"jbn {jbn.__version__}"]
  versions.append(f"torch {torch.__version__} ({torch.get_num_threads()} "
                  "threads)" if torch is not None else "torch: not used")
  now = datetime.datetime.now(datetime.timezone.utc)
  lines = [
      "# jbn benchmarks: jbn.batch_norm vs flax.linen.BatchNorm",
      "",
      f"- Date: {now:%Y-%m-%d %H:%M} UTC",
      f"- CPU: {cpu_model()}, {os.cpu_count()} cores; "
      f"{jax.device_count()} forced XLA CPU devices; load average (1 / 5 / "
      f"15 min) at the start: {load}",
      f"- Versions: python {platform.python_version()}, " + ", ".join(versions),
      f"- Command: `{' '.join(['python benchmarks/bench.py'] + args.argv)}`",
      f"- Timing: median of {args.reps.describe()}, after "
      f"{args.reps.warmup} warm-up rounds; contenders interleaved round "
      "robin, each repetition in a fresh random order; time.perf_counter "
      "around each call and its block_until_ready; inputs pre-generated, "
      "nothing donated.",
      "- Memory allocator: " + (
          "glibc told never to return freed memory to the kernel ("
          + ", ".join(f"`{k}={v}`" for k, v in KEEP_FREED_MEMORY.items())
          + "): fresh output buffers are recycled, not page-faulted in."
          if keeping_freed_memory() else
          "glibc as configured by the environment (" + (", ".join(
              f"`{k}={os.environ[k]}`" for k in sorted(os.environ)
              if k.startswith("MALLOC_")) or "defaults") + "); see the page "
          "faults table."),
      "",
      "Notes:",
      "",
      "- `flax` = `flax.linen.BatchNorm` with default settings "
      "(`use_fast_variance=True`: one-pass E[x²]-E[x]², which cancels "
      "catastrophically when |mean| >> std); `flax slow-var` = "
      "`use_fast_variance=False` (two-pass variance). Both with their default "
      "`dtype=None`, which returns float32 for bfloat16 input (jbn returns "
      "bfloat16); their fwd+bwd cotangent is then float32. Momentum 0.99, "
      "epsilon 1e-5 everywhere.",
      "- `torch` = `torch.nn.functional.batch_norm` on CPU, in NCHW (its "
      "native layout; the JAX contenders are NHWC), float32 weight and "
      "running statistics; forward+backward is autograd w.r.t. x, weight and "
      "bias with a fixed output gradient. No axis-name variant. "
      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (the script "
      "sets PASSIVE unless told otherwise: spinning OpenMP threads would "
      "steal the cores from the next contender).",
      "- `floor` = a jitted elementwise `x * 1.5` over the same tensor (same "
      "dtype, same sharding) in the same run. `×floor` = time / (passes × "
      "floor) with passes = 3 (train fwd), 8 (fwd+bwd), 2 (eval). These "
      "pass counts are the tensor-sized memory streams the work needs at "
      "least (train fwd: read x for the statistics, read x, write y; "
      "fwd+bwd: those 3, then read dy and x for the sums, read dy and x and "
      "write dx; eval: read x, write y), while `x * 1.5` is itself two "
      "streams (read x, write): the bandwidth bound is at ×floor = 0.5. "
      "Tensors of a few MB sit in cache, so there the floor is not a "
      "bandwidth figure.",
  ]
  if mesh_ok and not args.no_axis_name:
    lines.append(
        f"- `axis_name={AXIS}` rows: `jax.shard_map` over a Mesh of "
        f"{_N_DEVICES} forced CPU devices, x split on the batch axis, the "
        "contenders given the axis name. The devices share "
        f"{os.cpu_count()} cores, so these rows measure collective and "
        "partitioning overhead, not a speedup.")
  if not keeping_freed_memory():
    lines.append(
        "- † marks tensors whose (per-device) buffer is at or above glibc's "
        "32 MiB mmap threshold: every fresh output buffer pays page faults "
        "(the floor's too).")
  return "\n".join(lines)


# --------------------------------------------------------------------------
# Main


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
  shapes = []
  for item in text.split(","):
    try:
      shape = tuple(int(s) for s in item.strip().lower().split("x"))
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"bad shape {item!r}: expected e.g. 256x1024 or 64x32x32x64"
      ) from None
    if len(shape) not in (2, 4) or min(shape) < 1:
      raise argparse.ArgumentTypeError(
          f"shape {item!r} must be 2-D (N, C) or 4-D NHWC (N, H, W, C)")
    shapes.append(shape)
  return tuple(shapes)


def parse_dtypes(text: str) -> tuple[str, ...]:
  names = tuple(s.strip() for s in text.split(","))
  bad = [n for n in names if n not in DTYPES]
  if bad:
    raise argparse.ArgumentTypeError(
        f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
  return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n", maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="two shapes, 5 repetitions (smoke test)")
  p.add_argument("--reps", type=int, default=None,
                 help="timed repetitions per row (default: as many as fit "
                      "in --row-seconds, between 20 and 200; 5 with --quick)")
  p.add_argument("--row-seconds", type=float, default=15.0,
                 help="time budget per row for the default repetitions")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed rounds first (default 3; 1 with --quick)")
  p.add_argument("--shapes", type=parse_shapes, default=None,
                 help="comma-separated shapes, e.g. 256x1024,64x32x32x64 "
                      "(2-D: MLP (N, C); 4-D: CNN NHWC)")
  p.add_argument("--dtypes", type=parse_dtypes, default=tuple(DTYPES),
                 help="comma-separated, from float32,bfloat16")
  p.add_argument("--no-torch", action="store_true",
                 help="leave PyTorch out even where it is installed")
  p.add_argument("--no-axis-name", action="store_true",
                 help="skip the shard_map rows with an axis name")
  p.add_argument("--e2e", action="store_true",
                 help="also time training steps of a small residual CNN, "
                      "jbn.linen vs flax.linen BatchNorm")
  p.add_argument("--e2e-batch", type=int, default=None,
                 help="batch size of the end-to-end run (default 128; 16 "
                      "with --quick)")
  p.add_argument("--e2e-reps", type=int, default=None,
                 help="timed steps per model (default 30; 3 with --quick)")
  p.add_argument("--keep-freed-memory", action="store_true",
                 help="run with glibc told never to return freed memory to "
                      "the kernel (" + " ".join(
                          f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items())
                      + "), so that fresh output buffers are recycled "
                      "instead of page-faulted in on every call")
  p.add_argument("--out", default=os.path.join("benchmarks", "RESULTS.md"),
                 help="Markdown file to write (default benchmarks/RESULTS.md)")
  args = p.parse_args(argv)
  q = args.quick
  reps = args.reps if args.reps is not None else (5 if q else None)
  warmup = args.warmup if args.warmup is not None else (1 if q else 3)
  e2e_reps = args.e2e_reps if args.e2e_reps is not None else (3 if q else 30)
  if (reps is not None and reps < 1) or e2e_reps < 1 or warmup < 0:
    p.error("--reps and --e2e-reps must be >= 1, --warmup >= 0")
  if args.row_seconds <= 0:
    p.error("--row-seconds must be > 0")
  args.argv = list(argv)
  args.reps = Reps(fixed=reps, seconds=args.row_seconds, warmup=warmup)
  args.e2e_reps = Reps(fixed=e2e_reps, warmup=max(warmup, 1))
  args.shapes = args.shapes or (QUICK_SHAPES if q else DEFAULT_SHAPES)
  args.e2e_batch = args.e2e_batch or (16 if q else 128)
  return args


def import_torch(no_torch: bool):
  if no_torch:
    return None
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    log("torch is not installed: PyTorch column left out")
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def rerun_keeping_freed_memory(argv: Sequence[str]) -> int | None:
  """Runs this script again with KEEP_FREED_MEMORY set (glibc reads it at
  process start); None if it is already set."""
  if keeping_freed_memory():
    return None
  log("--keep-freed-memory: running again with " + " ".join(
      f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()))
  env = dict(os.environ, **KEEP_FREED_MEMORY)
  return subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                        env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
  start = time.perf_counter()
  load = load_average()
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.keep_freed_memory:
    code = rerun_keeping_freed_memory(argv)
    if code is not None:
      return code
  torch = import_torch(args.no_torch)
  mesh_ok = jax.device_count() >= _N_DEVICES
  axes = [False]
  if not args.no_axis_name:
    if mesh_ok:
      axes.append(True)
    else:
      log(f"only {jax.device_count()} devices (jax was imported before "
          "XLA_FLAGS was set): axis-name rows skipped")
  mesh = (Mesh(np.array(jax.devices()[:_N_DEVICES]), (AXIS,)) if mesh_ok
          else None)

  configs = []
  for shape in args.shapes:
    for dtype_name in args.dtypes:
      for axis in axes:
        if axis and shape[0] % _N_DEVICES:
          log(f"{fmt_shape(shape)}: batch not divisible by {_N_DEVICES}, "
              "axis-name row skipped")
          continue
        configs.append((shape, dtype_name, axis))

  rows = []
  for i, (shape, dtype_name, axis) in enumerate(configs, 1):
    t0 = time.perf_counter()
    log(f"[{i}/{len(configs)}] {fmt_shape(shape)} {dtype_name} "
        f"{'axis_name=' + AXIS if axis else 'no axis_name'} ...")
    r = bench_row(shape, dtype_name, axis, reps=args.reps, torch=torch,
                  mesh=mesh)
    rows.append(r)
    log(f"    {time.perf_counter() - t0:.1f} s, {r.reps} reps; fwd+bwd ms: "
        + ", ".join(f"{n} {r.t('fwd+bwd', n) * 1e3:.2f}" for n in CONTENDERS
                    if not math.isnan(r.t("fwd+bwd", n))))

  names = JAX_CONTENDERS + (("torch",) if torch is not None else ())
  parts = [header(args, torch, mesh_ok, load), ""]
  titles = {"fwd+bwd": "Forward + backward (jax.vjp; y, dx, dscale, dbias)",
            "train fwd": "Train-mode forward (y and new running statistics)",
            "eval": "Eval-mode forward"}
  for work in WORKS:
    parts += [f"## {titles[work]}", "", time_table(rows, work, names), ""]
  parts += [
      "## Compiled temporary memory of forward + backward", "",
      "`temp_size_in_bytes` of the compiled function, in MB and in units of "
      "x's size (per device for axis-name rows). vjp: the timed fwd+bwd "
      "above. grad: `jax.grad(lambda p, x: jnp.sum(y ** 2), argnums=(0, 1))`.",
      "", memory_table(rows), "",
      "## Minor page faults per call", "",
      "Mean over the timed calls of the process's minor page faults "
      "(`getrusage`, all threads), per contender; `x pages` is the (per "
      "device) size of x in 4 KiB pages. A fresh output buffer that glibc "
      "has handed back to the kernel costs one fault per page (about a "
      "microsecond each on this VM); who pays them depends on which buffers "
      "the calls before freed, so they move times between contenders from "
      "run to run. `--keep-freed-memory` removes them.", "",
      faults_table(rows, names), ""]
  parts += [
      "## Summary", "",
      "Speed: median over rows of other/jbn time (> 1: jbn faster), "
      "[min-max].", "", speed_summary(rows, names), "",
      "Compiled temporary memory of forward + backward:", "",
      memory_summary(rows), "",
      "Distance to the bandwidth floor (time / (8 × elementwise pass); "
      "the bound is at 0.5, see the notes):", "",
      floor_summary(rows), "",
      "Rows where jbn is slower than flax (default settings), slowest first:",
      "", slower_rows(rows), ""]

  if args.e2e:
    log(f"e2e: residual CNN, batch {args.e2e_batch}, "
        f"{args.e2e_reps.fixed} steps per model ...")
    e2e = bench_e2e(args.e2e_batch, args.e2e_reps)
    med, steps = e2e.medians, e2e.reps
    ex = {k: args.e2e_batch / v for k, v in med.items()}
    parts += [
        "## End to end: training step of a small residual CNN", "",
        f"{e2e_model.__doc__.splitlines()[0]} Batch {args.e2e_batch}, "
        "float32, SGD with momentum (optax) under jit, one step per call "
        f"(train state carried over); median of {steps} interleaved steps "
        "per model.", "",
        md_table(["BatchNorm", "ms / step", "examples / s"],
                 [["jbn.linen.BatchNorm", f"{med['jbn'] * 1e3:.1f}",
                   f"{ex['jbn']:.0f}"],
                  ["flax.linen.BatchNorm", f"{med['flax'] * 1e3:.1f}",
                   f"{ex['flax']:.0f}"]], left=1),
        "",
        f"Throughput jbn / flax: {ex['jbn'] / ex['flax']:.3f}.", ""]

  total = time.perf_counter() - start
  parts.append(f"Total wall time of this run: {total:.0f} s; load average at "
               f"the end: {load_average()}.")
  text = "\n".join(parts) + "\n"
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
    log(f"wrote {args.out} ({total:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
