"""Devices and processes: the mesh, the sharded steps, multi-process runs.

Data parallelism: the step functions run under ``jax.shard_map`` over a 1-D
mesh of every device used (all processes), axis ``'batch'``. The batch is
split over the axis; parameters, optimizer state and ``batch_stats`` are
replicated. Batch norm gets ``axis_name='batch'``, so its statistics are
those of the global batch (synced BN) and ``batch_stats`` stay identical on
every device.

Several processes (``jax.distributed``; gloo collectives on CPU): each
process feeds its share of every global batch. When one process dies, the
others stop at once instead of waiting ~100 s for JAX's heartbeat and
shutdown barrier, naming the lost process, with exit status 4. Two things
notice the loss: the collective that fails (:func:`exit_if_a_process_is_lost`)
and :class:`PeerWatch`, a TCP link between process 0 and every other process
whose only job is to close when a process dies. The link matters when no
collective is running: while Orbax writes a checkpoint the survivor waits in
a coordination-service barrier, and JAX's coordination client would
terminate it (SIGABRT, "Terminating process because the JAX distributed
service detected fatal errors") once the heartbeat times out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples import errors

AXIS = "batch"
# Signs of a collective (gloo) or coordination-service failure: another
# process is gone.
_LOST_PEER = re.compile(r"gloo|connection (closed|reset|refused)|socket closed"
                        r"|heartbeat|barrier|unavailable", re.IGNORECASE)


def initialize(config) -> None:
  """``jax.distributed.initialize`` when the config names the processes.

  ``config.coordinator_address``, ``num_processes`` and ``process_id`` go
  together (all or none). On CPU the cross-process collectives go through
  gloo. Must run before anything else touches a device; a second call does
  nothing.

  Raises:
    UsageError: some but not all of the three are set.
  """
  given = (config.coordinator_address, config.num_processes,
           config.process_id)
  if all(v is None for v in given) or jax.distributed.is_initialized():
    return
  if any(v is None for v in given):
    raise errors.UsageError(
        "--coordinator-address, --num-processes and --process-id go "
        "together: pass all three (or none for one process).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes, process_id=config.process_id,
      heartbeat_timeout_seconds=config.heartbeat_timeout)


def _is_lost_peer(error: BaseException) -> bool:
  return (isinstance(error, (jax.errors.JaxRuntimeError, ValueError))
          and bool(_LOST_PEER.search(str(error))))


@contextlib.contextmanager
def exit_if_a_process_is_lost(coordinator_address: str | None = None
                              ) -> Iterator[None]:
  """In a multi-process run, the loss of a process ends this one at once.

  JAX would otherwise raise, then wait at its shutdown barrier for the dead
  process until the heartbeat times out, and abort. Here the process prints
  which process was lost and exits with status 4 (``os._exit``: no atexit
  handlers, no barrier), whether a collective fails or :class:`PeerWatch`
  sees a process vanish. The last checkpoint is complete (Orbax finalizes
  a checkpoint atomically), so every process can restart with ``--resume``.
  Any other exception passes through (and tells the other processes that
  this one stopped on purpose). ``coordinator_address`` (``HOST:PORT`` of
  process 0) lets :class:`PeerWatch` connect; without it only failing
  collectives are noticed.
  """
  if jax.process_count() == 1:
    yield
    return
  watch = PeerWatch.start(coordinator_address)
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if not _is_lost_peer(e):
      watch.stop()
      raise
    others = [p for p in range(jax.process_count())
              if p != jax.process_index()]
    lost = (f"process {others[0]}" if len(others) == 1 else
            f"one of processes {', '.join(map(str, others))}")
    _lost(lost, str(e).strip().splitlines()[0][:300])
  watch.stop()


_EXITING = threading.Lock()


def _lost(who: str, detail: str) -> None:
  """Prints which process was lost and exits with status 4, once."""
  if not _EXITING.acquire(blocking=False):
    threading.Event().wait()  # another thread is exiting the process
  me, n = jax.process_index(), jax.process_count()
  sys.stdout.flush()
  print(f"error: process {me} of {n}: lost {who} ({detail}). Stopping; "
        f"the last checkpoint is intact: restart every process with "
        f"--resume and the same --workdir.", file=sys.stderr, flush=True)
  os._exit(errors.EXIT_LOST_PROCESS)  # pylint: disable=protected-access


class PeerWatch:
  """Notices within milliseconds that another process of the run died.

  Process 0 accepts one TCP connection from every other process (on a free
  port it announces with a collective; the host is the coordinator's). The
  connections carry nothing while all is well: when a process dies, the
  kernel closes its end, and a thread of the process on the other end sees
  it, prints which process was lost and exits with status 4; process 0 also
  tells the others which one it lost. A process that stops on purpose (its
  run returned or raised) first says ``bye``, and its peers stop watching
  it. This covers what the failing collective does not: a survivor that is
  waiting in a coordination-service barrier (Orbax's, while it writes a
  checkpoint) rather than in a collective.
  """

  CONNECT_TIMEOUT = 60.0  # seconds for every process to connect at start

  def __init__(self, links: dict[int, socket.socket]):
    self._links = links  # peer process -> socket
    self._stopped = threading.Event()
    for peer, link in links.items():
      threading.Thread(target=self._watch, args=(peer, link), daemon=True,
                       name=f"peer-watch-{peer}").start()

  @classmethod
  def start(cls, coordinator_address: str | None) -> "PeerWatch":
    """Connects process 0 with every other process (a collective: every
    process calls it at the same point); watches nothing without an
    address."""
    me, n = jax.process_index(), jax.process_count()
    if coordinator_address is None:
      return cls({})
    host = coordinator_address.rsplit(":", 1)[0].strip("[]")
    server = None
    port = 0
    if me == 0:
      server = socket.create_server(("", 0))
      server.settimeout(cls.CONNECT_TIMEOUT)
      port = server.getsockname()[1]
    port = int(multihost_utils.broadcast_one_to_all(np.int32(port)))
    links = {}
    if me == 0:
      with server:
        for _ in range(n - 1):
          link, _ = server.accept()
          link.settimeout(cls.CONNECT_TIMEOUT)
          peer = int(link.makefile("r").readline())
          link.settimeout(None)
          links[peer] = link
    else:
      link = socket.create_connection((host, port),
                                      timeout=cls.CONNECT_TIMEOUT)
      link.sendall(f"{me}\n".encode())
      link.settimeout(None)
      links[0] = link
    return cls(links)

  def stop(self) -> None:
    """This process stops on purpose: tells its peers, stops watching."""
    self._stopped.set()
    for link in self._links.values():
      try:
        link.sendall(b"bye\n")
      except OSError:
        pass

  def _watch(self, peer: int, link: socket.socket) -> None:
    lines = link.makefile("r")
    try:
      line = lines.readline()
    except OSError:
      line = ""
    if self._stopped.is_set() or line == "bye\n":
      return  # a peer that stops on purpose
    if line.startswith("lost "):  # process 0 lost another process
      _lost(f"process {line.split()[1]}", "reported by process 0")
    if jax.process_index() == 0:  # tell the others which one it was
      for other, other_link in self._links.items():
        if other != peer:
          try:
            other_link.sendall(f"lost {peer}\n".encode())
          except OSError:
            pass
    _lost(f"process {peer}", "its connection to this process closed")


def make_mesh(devices_per_process: int | None = None) -> jax.sharding.Mesh:
  """1-D mesh, axis ``'batch'``, over the first ``devices_per_process``
  devices of every process (all of them by default), process by process.

  Raises:
    UsageError: more devices asked for than a process has.
  """
  per_process: dict[int, list] = {}
  for d in jax.devices():
    per_process.setdefault(d.process_index, []).append(d)
  available = min(len(v) for v in per_process.values())
  n = available if devices_per_process is None else devices_per_process
  if not 1 <= n <= available:
    raise errors.UsageError(
        f"--devices {devices_per_process}: this process has {available} "
        f"device(s). On CPU, make more with XLA_FLAGS="
        f"--xla_force_host_platform_device_count=N (set before Python starts).")
  devices = [d for p in sorted(per_process) for d in per_process[p][:n]]
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def shard_steps(train_step: Callable, eval_step: Callable,
                mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """The jitted, sharded steps.

  ``train_step(state, images, labels, rng)`` (donates ``state``) and
  ``eval_step(state, images, labels, weights)``: state and rng replicated,
  the batch split over the axis, outputs replicated.
  """
  p_train = jax.jit(jax.shard_map(
      train_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P()),
      out_specs=(P(), P())), donate_argnums=0)
  p_eval = jax.jit(jax.shard_map(
      eval_step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
      out_specs=P()))
  return p_train, p_eval


def global_batch(mesh: jax.sharding.Mesh, size: int, *local: np.ndarray
                 ) -> list[jax.Array]:
  """Global arrays of ``size`` rows, split over the mesh, from each
  process's consecutive share (``size / processes`` rows)."""
  sharding = NamedSharding(mesh, P(AXIS))
  return [jax.make_array_from_process_local_data(sharding, a,
                                                 (size,) + a.shape[1:])
          for a in local]


def batch_spec(mesh: jax.sharding.Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  """The abstract value of such a global batch (to compile ahead of time)."""
  return jax.ShapeDtypeStruct(shape, dtype,
                              sharding=NamedSharding(mesh, P(AXIS)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_0_says(flag: bool) -> bool:
  """Process 0's ``flag``, on every process: for a decision that all must
  take together (whether to write a checkpoint now)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def to_host(tree):
  """NumPy copies of replicated arrays (works with several processes)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places host arrays, identical on every process, replicated on ``mesh``."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree)


def params_digest(params) -> str:
  """SHA-256 of the parameters' bytes, in tree order (equal iff bitwise)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(to_host(params)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()
