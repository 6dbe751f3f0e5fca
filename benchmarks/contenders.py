"""What is timed: jbn, flax.linen.BatchNorm (two settings) and PyTorch, for
three kinds of work, and one benchmark row (a shape, a dtype, with or
without an axis name) measuring them all.

The JAX contenders share one signature,
``apply(params, state, x, train, axis_name) -> (y, new_state)`` with
``params = {'scale', 'bias'}`` and ``state = {'mean', 'var'}`` (Flax's
variables). A new contender (say, a new batch norm mode) is one more entry
in ``APPLY`` and its column name in ``LABELS``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from benchmarks import timing

N_DEVICES = 4  # forced CPU devices for the axis-name rows
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
WORKS = ("fwd+bwd", "train fwd", "eval")
PASSES = {"train fwd": 3, "fwd+bwd": 8, "eval": 2}
# Column names in the report.
LABELS = {"jbn": "jbn", "jbn-renorm": "jbn renorm", "jbn-ghost": "jbn ghost",
          "flax": "flax", "flax-sv": "flax slow-var", "torch": "torch"}
AXIS = "batch"
MOMENTUM, EPSILON = 0.99, 1e-5  # the defaults of both jbn and Flax


RENORM = jbn.RenormClip(3.0, 5.0)  # the paper's final clipping
GHOST_BATCH_SIZE = 8  # or the largest divisor of a smaller local batch


def jbn_apply(params, state, x, train, axis_name, **mode):
  return jbn.batch_norm(params, state, x, train, momentum=MOMENTUM,
                        epsilon=EPSILON, axis_name=axis_name, **mode)


def flax_apply(params, state, x, train, axis_name, *, use_fast_variance):
  bn = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name,
                    use_fast_variance=use_fast_variance)
  variables = {"params": params, "batch_stats": state}
  if train:
    y, updates = bn.apply(variables, x, use_running_average=False,
                          mutable=["batch_stats"])
    return y, updates["batch_stats"]
  return bn.apply(variables, x, use_running_average=True), state


# The JAX contenders, in report order (a new one: an entry here and in LABELS).
APPLY = {
    "jbn": jbn_apply,
    "jbn-renorm": functools.partial(jbn_apply, renorm=RENORM),
    "jbn-ghost": lambda p, s, x, train, axis_name: jbn_apply(
        p, s, x, train, axis_name,
        ghost_batch_size=math.gcd(GHOST_BATCH_SIZE, x.shape[0])),
    "flax": functools.partial(flax_apply, use_fast_variance=True),
    "flax-sv": functools.partial(flax_apply, use_fast_variance=False),
}
JAX_CONTENDERS = tuple(APPLY)
CONTENDERS = JAX_CONTENDERS + ("torch",)


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


def bench_row(shape, dtype_name, axis, *, reps: timing.Reps, torch, mesh,
              seed=0) -> Row:
  dtype = DTYPES[dtype_name]
  rng = np.random.default_rng(seed)
  x32 = rng.standard_normal(shape, dtype=np.float32)
  dy32 = rng.standard_normal(shape, dtype=np.float32)
  nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
  row = Row(shape, dtype_name, axis, nbytes,
            nbytes // (mesh.size if axis else 1))

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
  thunks = {"floor": timing.jax_thunk(jax.jit(lambda x: x * 1.5).lower(x)
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
      thunks[f"{work}|{name}"] = timing.jax_thunk(compiled, args)
      if work == "fwd+bwd":
        row.temp_vjp[name] = compiled.memory_analysis().temp_size_in_bytes
    compiled = compile_(work_fn(APPLY[name], "grad", axis_name), "grad",
                        params, state, x)
    row.temp_grad[name] = compiled.memory_analysis().temp_size_in_bytes
  if torch is not None and not axis:
    for work, thunk in torch_thunks(torch, x32, dy32, dtype_name).items():
      thunks[f"{work}|torch"] = thunk

  timings = timing.run_round_robin(thunks, reps)
  row.reps = timings.reps
  row.floor = timings.medians.pop("floor")
  row.faults[("floor", "floor")] = timings.faults.pop("floor")
  for key, value in timings.medians.items():
    work, name = key.split("|")
    row.times[(work, name)] = value
    row.faults[(work, name)] = timings.faults[key]
  return row
