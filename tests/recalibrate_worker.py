"""The model of tests/test_recalibrate.py's multi-device tests, and the entry
point of each process of its two-process test.

Run as ``python tests/recalibrate_worker.py ADDRESS PROCESS_ID DATA OUT``:
the process joins a 2-process JAX cluster (gloo on CPU) whose 4 devices form
one mesh, feeds its half of every batch with
``jax.make_array_from_process_local_data``, runs
``jbn.recalibrate(..., axis_name="batch")`` with both estimators and, as
process 0, writes the statistics to ``OUT`` (an ``.npz``).
"""

import functools
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
import jbn.linen


class Net(nn.Module):
  """BatchNorm, Dense, BatchNorm, each BatchNorm under the row mask.

  The second layer's input depends on the first layer's batch statistics,
  so a wrong merge across devices shows downstream too.
  """

  axis_name: Any = None

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    bn = functools.partial(
        jbn.linen.BatchNorm, use_running_average=not train,
        axis_name=self.axis_name, scale_init=nn.initializers.normal(1.0),
        bias_init=nn.initializers.normal(1.0))
    h = nn.Dense(2)(bn()(x, mask=mask))
    return bn()(h, mask=mask)


def apply_fn(model):
  """``apply_fn`` for :func:`jbn.recalibrate` on ``{'x', 'mask'}`` batches."""
  return lambda v, b, **kw: model.apply(v, b["x"], b["mask"][:, None], **kw)


def main(address: str, process_id: int, data: str, out: str) -> None:
  start = time.perf_counter()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(address, num_processes=2, process_id=process_id)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  sharding = NamedSharding(mesh, P("batch"))
  arrays = np.load(data)
  with open(data + ".variables", "rb") as f:
    variables = serialization.msgpack_restore(f.read())
  half = arrays["x"].shape[1] // 2
  rows = slice(process_id * half, (process_id + 1) * half)
  batches = [
      {k: jax.make_array_from_process_local_data(sharding, arrays[k][b, rows])
       for k in ("x", "mask")} for b in range(arrays["x"].shape[0])]
  results = {}
  for estimator in ("pooled", "batch_mean"):
    stats = jbn.recalibrate(apply_fn(Net(axis_name="batch")), variables,
                            batches, estimator=estimator,
                            apply_kwargs={"train": True}, axis_name="batch")
    results.update({f"{estimator}/{layer}/{k}": np.asarray(v)
                    for layer, s in stats.items() for k, v in s.items()})
  if process_id == 0:
    np.savez(out, **results)
  print(f"process {process_id}: {jax.device_count()} devices in "
        f"{jax.process_count()} processes, recalibrated in "
        f"{time.perf_counter() - start:.1f} s", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
