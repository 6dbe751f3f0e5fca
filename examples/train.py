"""The training loop shared by the examples (after Flax's ``examples/imagenet``).

``create_train_state``, ``train_step``, ``eval_step`` and
``train_and_evaluate(config, workdir)``; the entry points (``mnist.py``,
``cifar.py``) only parse flags into a :class:`Config`.

Data parallelism: the step functions run under ``jax.shard_map`` over a 1-D
mesh of every device used (all processes), axis ``'batch'``. The batch is
split over the axis; parameters, optimizer state and ``batch_stats`` are
replicated. Batch norm gets ``axis_name='batch'``, so its statistics are
those of the global batch (synced BN) and ``batch_stats`` stay identical on
every device. Each device's loss is its share of the global mean (sum of its
per-example losses divided by the *global* batch size): inside
``shard_map`` the gradient of a replicated parameter comes out already summed
over the axis, so the sum of the shares gives exactly the gradient of the
global mean, the same as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from examples import data as data_lib
from examples import models

AXIS = "batch"
PRNG_IMPL = "rbg"
CHECKPOINT = "checkpoint.msgpack"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
MODEL = "model.jax"
# Flags that change how a run is carried out, not what it computes: a
# resumed run may change them.
RUN_ONLY = ("data_dir", "devices", "stop_after", "progress", "plot", "resume",
            "quiet")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a training run.

  Attributes:
    dataset: ``digits`` (scikit-learn's, bundled), ``mnist`` /
      ``fashion_mnist`` (IDX files in ``data_dir``), ``cifar10`` (pickle
      batches in ``data_dir``) or ``synthetic`` (32x32x3 random images).
    data_dir: where the dataset files are.
    model: ``mlp`` or ``resnet``.
    hidden: widths of the MLP's hidden layers.
    width, stage_sizes: the ResNet's first-stage width and blocks per stage.
    use_bn: batch norm after every hidden layer (False: biases instead).
    bn_momentum, bn_epsilon: of every batch norm (Flax convention).
    optimizer: ``sgd`` (Nesterov momentum) or ``adamw``.
    learning_rate: peak of the warmup + cosine schedule.
    momentum: SGD momentum (ignored by AdamW).
    weight_decay: decoupled weight decay, masked off the batch norm scale and
      bias by ``jbn.decay_mask``.
    warmup_epochs: linear warmup from 0, then cosine decay to 0 at the end
      of ``epochs``.
    epochs: length of the run (and of the schedule).
    batch_size: GLOBAL training batch, split over all devices; must be
      divisible by the number of devices.
    eval_batch_size: global evaluation batch (rounded up to a multiple of
      the number of devices; padding does not count).
    augment: random crops (4-pixel zero padding) and horizontal flips.
    seed: initialization, data order and augmentation all derive from it.
    devices: devices used per process (default: all).
    stop_after: stop after this epoch, as if the run were killed there
      (resume with ``resume=True``); the schedule still spans ``epochs``.
    resume: continue from ``<workdir>/checkpoint.msgpack``.
    progress: tqdm progress bars (only on a terminal).
    plot: write ``<workdir>/curves.png``.
    quiet: print nothing.
    synthetic_size: train and test sizes of the synthetic dataset.
  """

  dataset: str = "digits"
  data_dir: str | None = None
  model: str = "mlp"
  hidden: tuple[int, ...] = (512, 512)
  width: int = 16
  stage_sizes: tuple[int, ...] = (1, 1, 1)
  use_bn: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  optimizer: str = "sgd"
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  warmup_epochs: float = 1.0
  epochs: int = 20
  batch_size: int = 64
  eval_batch_size: int = 512
  augment: bool = False
  seed: int = 0
  devices: int | None = None
  stop_after: int | None = None
  resume: bool = False
  progress: bool = True
  plot: bool = False
  quiet: bool = False
  synthetic_size: tuple[int, int] = (512, 128)


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the running statistics of the batch norms."""

  batch_stats: Any = None


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or from another configuration."""


@dataclasses.dataclass
class TrainResult:
  """What :func:`train_and_evaluate` returns."""

  state: TrainState  # replicated over `mesh`
  rng: jax.Array  # replicated raw key data
  model: nn.Module
  dataset: data_lib.Dataset
  history: list[dict[str, Any]]
  mesh: jax.sharding.Mesh


# ---------------------------------------------------------------------------
# Building blocks


def load_dataset(config: Config) -> data_lib.Dataset:
  """The dataset named by ``config.dataset``, from local files only."""
  if config.dataset == "digits":
    return data_lib.load_digits(seed=0)
  if config.dataset == "synthetic":
    train_size, test_size = config.synthetic_size
    return data_lib.synthetic_images(train_size=train_size,
                                     test_size=test_size, seed=config.seed)
  if config.dataset not in ("mnist", "fashion_mnist", "cifar10"):
    raise ValueError(f"unknown dataset {config.dataset!r}; expected digits, "
                     f"mnist, fashion_mnist, cifar10 or synthetic.")
  if config.data_dir is None:
    raise data_lib.DataError(
        f"dataset {config.dataset!r} is read from local files: pass "
        f"--data-dir. Nothing is ever downloaded.")
  if config.dataset == "cifar10":
    return data_lib.load_cifar10(config.data_dir)
  return data_lib.load_idx(config.data_dir, name=config.dataset)


def create_model(config: Config, dataset: data_lib.Dataset, *,
                 axis_name: str | None = AXIS) -> nn.Module:
  """The network of ``config``, standardizing inputs with the training
  split's per-channel mean and std."""
  mean, std = dataset.channel_stats()
  norm = models.Norm(use_bn=config.use_bn, momentum=config.bn_momentum,
                     epsilon=config.bn_epsilon, axis_name=axis_name)
  common = dict(num_classes=dataset.num_classes, mean=tuple(mean.tolist()),
                std=tuple(std.tolist()), norm=norm)
  if config.model == "mlp":
    return models.MLP(hidden=tuple(config.hidden), **common)
  if config.model == "resnet":
    return models.ResNet(stage_sizes=tuple(config.stage_sizes),
                         width=config.width, **common)
  raise ValueError(f"unknown model {config.model!r}; expected mlp or resnet.")


def create_optimizer(config: Config, steps_per_epoch: int
                     ) -> optax.GradientTransformation:
  """SGD (Nesterov) or AdamW on a warmup + cosine schedule; weight decay
  skips the batch norm scale and bias (``jbn.decay_mask``)."""
  total = config.epochs * steps_per_epoch
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=total, end_value=0.0)
  if config.optimizer == "sgd":
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=jbn.decay_mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay,
                       mask=jbn.decay_mask)
  raise ValueError(f"unknown optimizer {config.optimizer!r}; expected sgd or "
                   f"adamw.")


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: Sequence[int], rng: jax.Array
                       ) -> TrainState:
  """Initializes parameters, running statistics and optimizer state."""
  variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32),
                         train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=tx, batch_stats=variables.get("batch_stats", {}))


def augment_images(key: jax.Array, images: jax.Array, offset: jax.Array,
                   global_batch: int, *, pad: int = 4) -> jax.Array:
  """Random crop (``pad`` pixels of zero padding) and horizontal flip.

  The random numbers are drawn for the whole global batch from ``key`` (the
  same on every device) and each device takes the rows of its examples,
  ``offset`` onwards: the result does not depend on how the batch is split
  over devices.
  """
  local, height, width, channels = images.shape
  k_y, k_x, k_flip = jax.random.split(key, 3)
  take = lambda a: jax.lax.dynamic_slice_in_dim(a, offset, local)
  dy = take(jax.random.randint(k_y, (global_batch,), 0, 2 * pad + 1))
  dx = take(jax.random.randint(k_x, (global_batch,), 0, 2 * pad + 1))
  flip = take(jax.random.bernoulli(k_flip, shape=(global_batch,)))
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(image, y, x, f):
    out = jax.lax.dynamic_slice(image, (y, x, 0), (height, width, channels))
    return jnp.where(f, out[:, ::-1], out)

  return jax.vmap(crop)(padded, dy, dx, flip)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               rng: jax.Array, *, global_batch: int, augment: bool = False
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's shard; run it under ``shard_map``.

  Args:
    state: replicated train state.
    images, labels: this device's ``global_batch / devices`` examples.
    rng: replicated raw PRNG key data (``augment`` only).
    global_batch: examples per step over all devices.
    augment: random crops and flips.

  Returns:
    The new (replicated) state and the global batch's mean loss and number
    of correct predictions.
  """
  local = images.shape[0]
  if augment:
    key = jax.random.fold_in(
        jax.random.wrap_key_data(rng, impl=PRNG_IMPL), state.step)
    images = augment_images(key, images, jax.lax.axis_index(AXIS) * local,
                            global_batch)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # This device's share of the global mean: shares sum to the mean.
    return jnp.sum(losses) / global_batch, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # `grads` are already summed over the axis (replicated params under
  # shard_map): the gradient of the global mean loss. No pmean here.
  state = state.apply_gradients(
      grads=grads, batch_stats=updates.get("batch_stats", {}))
  correct = jnp.sum(jnp.argmax(logits, -1) == labels)
  metrics = {"loss": jax.lax.psum(loss, AXIS),
             "correct": jax.lax.psum(correct, AXIS)}
  return state, metrics


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array,
              weights: jax.Array) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and weights over the global batch,
  with the running statistics (evaluation mode); run under ``shard_map``."""
  logits = state.apply_fn({"params": state.params,
                           "batch_stats": state.batch_stats}, images,
                          train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  sums = {"loss": jnp.sum(weights * losses),
          "correct": jnp.sum(weights * correct), "count": jnp.sum(weights)}
  return jax.lax.psum(sums, AXIS)


# ---------------------------------------------------------------------------
# Devices, processes, host transfers


def initialize_distributed(coordinator_address: str | None,
                           num_processes: int | None,
                           process_id: int | None) -> None:
  """``jax.distributed.initialize`` when all three flags are given.

  On CPU the cross-process collectives go through gloo. Must run before
  anything else touches a device.
  """
  given = [v is not None for v in (coordinator_address, num_processes,
                                   process_id)]
  if not any(given):
    return
  if not all(given):
    raise ValueError("--coordinator-address, --num-processes and --process-id "
                     "go together: pass all three (or none for one process).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)


def make_mesh(devices_per_process: int | None = None) -> jax.sharding.Mesh:
  """1-D mesh, axis ``'batch'``, over the first ``devices_per_process``
  devices of every process (all of them by default), process by process."""
  per_process: dict[int, list] = {}
  for d in jax.devices():
    per_process.setdefault(d.process_index, []).append(d)
  available = min(len(v) for v in per_process.values())
  n = available if devices_per_process is None else devices_per_process
  if not 1 <= n <= available:
    raise ValueError(
        f"--devices {devices_per_process}: this process has {available} "
        f"device(s). On CPU, make more with XLA_FLAGS="
        f"--xla_force_host_platform_device_count=N (set before Python starts).")
  devices = [d for p in sorted(per_process) for d in per_process[p][:n]]
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def to_host(tree):
  """NumPy copies of replicated arrays (works with several processes)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places host arrays, identical on every process, replicated on ``mesh``."""
  sharding = NamedSharding(mesh, P())

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


# ---------------------------------------------------------------------------
# Files: atomic writes, checkpoints, metrics, plots


def atomic_write(path: str, payload: bytes) -> None:
  """Writes ``path`` so that it is either the old file or the whole new one.

  The bytes go to a temporary file in the same directory, are flushed and
  fsync'ed, then ``os.replace`` swaps it in (atomic on POSIX); the directory
  is fsync'ed so the rename survives a crash.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory,
                             prefix=f".{os.path.basename(path)}.", suffix=".tmp")
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


def _comparable(config: Config) -> dict[str, Any]:
  d = json.loads(json.dumps(dataclasses.asdict(config)))
  return {k: v for k, v in d.items() if k not in RUN_ONLY}


def save_checkpoint(workdir: str, state: TrainState, rng: jax.Array,
                    epoch: int, config: Config,
                    history: list[dict[str, Any]]) -> str:
  """Writes ``<workdir>/checkpoint.msgpack`` atomically (flax.serialization).

  Holds the state (params, batch_stats, optimizer state, step), the epoch
  just finished, the PRNG key, the config and the metrics so far.
  """
  payload = {
      "state": flax.serialization.to_state_dict(to_host(state)),
      "epoch": epoch,
      "rng": to_host(rng),
      "config": json.dumps(dataclasses.asdict(config)),
      "history": json.dumps(history),
  }
  path = os.path.join(workdir, CHECKPOINT)
  atomic_write(path, flax.serialization.to_bytes(payload))
  return path


def load_checkpoint(workdir: str, config: Config, template: TrainState
                    ) -> tuple[TrainState, np.ndarray, int, list]:
  """Reads ``<workdir>/checkpoint.msgpack`` into host arrays.

  Raises:
    CheckpointError: no checkpoint, an unreadable one, or one written with
      a different configuration (the message names the differing fields).
  """
  path = os.path.join(workdir, CHECKPOINT)
  if not os.path.isfile(path):
    raise CheckpointError(
        f"--resume: no checkpoint at {path}. Start without --resume, or pass "
        f"the --workdir of the run to continue.")
  try:
    with open(path, "rb") as f:
      raw = flax.serialization.msgpack_restore(f.read())
    saved = json.loads(raw["config"])
    epoch = int(raw["epoch"])
    history = json.loads(raw["history"])
    rng = np.asarray(raw["rng"])
    state = flax.serialization.from_state_dict(to_host(template), raw["state"])
  except Exception as e:  # msgpack, KeyError, shape errors...: all the same
    raise CheckpointError(
        f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). It was "
        f"left as it is; move it away to start over in this --workdir.") from e
  current = _comparable(config)
  saved = {k: v for k, v in saved.items() if k not in RUN_ONLY}
  diff = {k: (saved.get(k), current.get(k))
          for k in sorted(set(saved) | set(current))
          if saved.get(k) != current.get(k)}
  if diff:
    changes = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now"
                        for k, (a, b) in diff.items())
    raise CheckpointError(
        f"checkpoint {path} was written by a run with other settings "
        f"({changes}). Resume with the same flags (only {', '.join(RUN_ONLY)} "
        f"may change), or use a new --workdir.")
  return state, rng, epoch, history


def write_metrics(workdir: str, history: list[dict[str, Any]]) -> None:
  """(Re)writes ``<workdir>/metrics.jsonl``, one JSON object per epoch."""
  atomic_write(os.path.join(workdir, METRICS),
               "".join(json.dumps(r) + "\n" for r in history).encode())


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
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------
# The loop


def _progress_bar(total: int, desc: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="step", leave=False,
              disable=not (enabled and sys.stderr.isatty()))


def evaluate(state: TrainState, dataset: data_lib.Dataset, step_fn: Callable,
             mesh: jax.sharding.Mesh, batch_size: int) -> dict[str, float]:
  """Mean loss and accuracy on the test split, every example once."""
  sharding = NamedSharding(mesh, P(AXIS))
  pi, pc = jax.process_index(), jax.process_count()
  totals = []
  for images, labels, weights in data_lib.eval_batches(
      dataset.test_images, dataset.test_labels, batch_size=batch_size,
      process_index=pi, process_count=pc):
    batch = [jax.make_array_from_process_local_data(
        sharding, a, (batch_size,) + a.shape[1:])
             for a in (images, labels, weights)]
    totals.append(step_fn(state, *batch))
  totals = to_host(jax.tree.map(lambda *x: sum(x), *totals))
  return {"test_loss": float(totals["loss"] / totals["count"]),
          "test_accuracy": float(totals["correct"] / totals["count"])}


def train_and_evaluate(config: Config, workdir: str) -> TrainResult:
  """Trains ``config`` on all devices, evaluating and checkpointing each epoch.

  Writes ``<workdir>/checkpoint.msgpack`` (atomically, every epoch),
  ``<workdir>/metrics.jsonl`` and, with ``config.plot``,
  ``<workdir>/curves.png``. Only process 0 writes files and prints.

  Raises:
    CheckpointError: ``workdir`` already has a checkpoint and
      ``config.resume`` is False (nothing is overwritten), or resuming fails.
    ValueError: a batch size that does not split over the devices.
    examples.data.DataError: dataset files missing or malformed.
  """
  main = jax.process_index() == 0
  log = print if main and not config.quiet else (lambda *a, **k: None)
  os.makedirs(workdir, exist_ok=True)
  ckpt_path = os.path.join(workdir, CHECKPOINT)
  if os.path.exists(ckpt_path) and not config.resume:
    raise CheckpointError(
        f"{ckpt_path} exists: pass --resume to continue that run, or choose "
        f"another --workdir. Nothing was overwritten.")

  dataset = load_dataset(config)
  mesh = make_mesh(config.devices)
  n_dev, n_proc = mesh.size, jax.process_count()
  if config.batch_size % n_dev:
    raise ValueError(
        f"--batch-size {config.batch_size} is the global batch: it must be "
        f"divisible by the {n_dev} devices (per-device batch = batch size / "
        f"devices).")
  n_train = len(dataset.train_images)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"--batch-size {config.batch_size} is larger than the "
                     f"{n_train} training examples.")
  eval_batch = -(-config.eval_batch_size // n_dev) * n_dev

  model = create_model(config, dataset)
  tx = create_optimizer(config, steps_per_epoch)
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(seed):
    # "rbg" (XLA's RngBitGenerator) compiles far faster than threefry on CPU
    # (seconds per parameter there); it is deterministic on a given backend.
    init_rng, rng = jax.random.split(jax.random.key(seed, impl=PRNG_IMPL))
    return (create_train_state(model, tx, dataset.image_shape, init_rng),
            jax.random.key_data(rng))

  state, rng = init(config.seed)
  history: list[dict[str, Any]] = []
  start_epoch = 0
  if config.resume:
    host_state, host_rng, start_epoch, history = load_checkpoint(
        workdir, config, state)
    state, rng = replicate((host_state, host_rng), mesh)
    if main:
      write_metrics(workdir, history)
    log(f"resumed from {ckpt_path} at epoch {start_epoch}/{config.epochs}")
  elif main:
    write_metrics(workdir, [])  # a fresh run starts a fresh log

  p_train = jax.jit(jax.shard_map(
      functools.partial(train_step, global_batch=config.batch_size,
                        augment=config.augment),
      mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P()),
      out_specs=(P(), P())), donate_argnums=0)
  p_eval = jax.jit(jax.shard_map(eval_step, mesh=mesh,
                                 in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                                 out_specs=P()))
  batch_sharding = NamedSharding(mesh, P(AXIS))
  pi = jax.process_index()
  log(f"data: {dataset.source}")
  log(f"{dataset.name}: {n_train} train / {len(dataset.test_images)} test "
      f"images {dataset.image_shape}; {config.model} "
      f"({'with' if config.use_bn else 'without'} batch norm); "
      f"{n_dev} device(s) in {n_proc} process(es), global batch "
      f"{config.batch_size} = {config.batch_size // n_dev} per device; "
      f"{steps_per_epoch} steps/epoch; workdir {workdir}")

  t_compile = time.perf_counter()
  image_spec = jax.ShapeDtypeStruct(
      (config.batch_size, *dataset.image_shape), jnp.float32,
      sharding=batch_sharding)
  label_spec = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                    sharding=batch_sharding)
  p_train = p_train.lower(state, image_spec, label_spec, rng).compile()
  log(f"compiled the train step in {time.perf_counter() - t_compile:.1f} s")

  last_epoch = config.epochs if config.stop_after is None else min(
      config.epochs, config.stop_after)
  for epoch in range(start_epoch + 1, last_epoch + 1):
    bar = _progress_bar(steps_per_epoch, f"epoch {epoch}/{config.epochs}",
                        config.progress and main and not config.quiet)
    t0 = time.perf_counter()
    metrics = []
    for step, (images, labels) in enumerate(data_lib.train_batches(
        dataset.train_images, dataset.train_labels,
        batch_size=config.batch_size, seed=config.seed, epoch=epoch,
        process_index=pi, process_count=n_proc)):
      images = jax.make_array_from_process_local_data(
          batch_sharding, images, (config.batch_size, *images.shape[1:]))
      labels = jax.make_array_from_process_local_data(
          batch_sharding, labels, (config.batch_size,))
      state, m = p_train(state, images, labels, rng)
      metrics.append(m)
      bar.update(1)
      if not bar.disable and (step % 10 == 0 or step == steps_per_epoch - 1):
        seen = (step + 1) * config.batch_size
        bar.set_postfix(loss=f"{float(to_host(m['loss'])):.4f}",
                        ex_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
    metrics = to_host(jax.tree.map(lambda *x: jnp.stack(x), *metrics))
    train_time = time.perf_counter() - t0
    bar.close()
    record = {
        "epoch": epoch,
        "train_loss": float(np.mean(metrics["loss"])),
        "train_accuracy": float(np.sum(metrics["correct"])
                                / (steps_per_epoch * config.batch_size)),
        **evaluate(state, dataset, p_eval, mesh, eval_batch),
        "examples_per_sec": steps_per_epoch * config.batch_size / train_time,
        "epoch_seconds": time.perf_counter() - t0,
    }
    history.append(record)
    if main:
      save_checkpoint(workdir, state, rng, epoch, config, history)
      with open(os.path.join(workdir, METRICS), "a") as f:
        f.write(json.dumps(record) + "\n")
    log(f"epoch {epoch:3d}/{config.epochs}  train_loss "
        f"{record['train_loss']:.4f}  test_loss {record['test_loss']:.4f}  "
        f"test_acc {100 * record['test_accuracy']:.2f}%  "
        f"{record['examples_per_sec']:.0f} ex/s  "
        f"{record['epoch_seconds']:.2f} s")

  if config.plot and main and history:
    plot_curves(os.path.join(workdir, CURVES), history,
                f"{dataset.name} {config.model}")
  return TrainResult(state=state, rng=rng, model=model, dataset=dataset,
                     history=history, mesh=mesh)


# ---------------------------------------------------------------------------
# Inference export


def export_inference(result: TrainResult, path: str, *,
                     platforms: Sequence[str] = ("cpu", "cuda"),
                     check_examples: int = 256) -> float:
  """Folds every batch norm and exports the model with ``jax.export``.

  The exported function maps float32 images in [0, 1] of shape
  ``(b, H, W, C)`` (``b`` symbolic) to logits ``(b, num_classes)``; input
  standardization is inside it, the weights are constants in it. It runs on
  every platform in ``platforms`` (plus the current one), with no model code:
  ``jax.export.deserialize(open(path, 'rb').read()).call(images)``.

  Returns:
    The largest absolute difference between the folded, exported logits and
    the unfolded model in evaluation mode on the first ``check_examples``
    test images.
  """
  variables = to_host({"params": result.state.params,
                       "batch_stats": result.state.batch_stats})
  model = result.model.clone(
      norm=dataclasses.replace(result.model.norm, axis_name=None))
  folded_model, folded_params = models.fold(model, variables)

  def infer(images):
    return folded_model.apply({"params": folded_params}, images, train=False)

  height, width, channels = result.dataset.image_shape
  spec = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape(f"b, {height}, {width}, {channels}"),
      jnp.float32)
  platforms = tuple(dict.fromkeys((jax.default_backend(), *platforms)))
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(spec)
  if jax.process_index() == 0:
    atomic_write(path, exported.serialize())
  images = result.dataset.test_images[:check_examples]
  folded = exported.call(images)
  unfolded = jax.jit(functools.partial(model.apply, train=False))(
      variables, images)
  return float(jnp.max(jnp.abs(folded - unfolded)))


# ---------------------------------------------------------------------------
# Command line


def add_flags(parser, defaults: Config) -> None:
  """The flags shared by the entry points, with ``defaults``."""
  d = defaults
  g = parser.add_argument_group("training")
  g.add_argument("--workdir", default=None,
                 help="where checkpoint.msgpack, metrics.jsonl, curves.png "
                      "and model.jax go (default: a new runs/<name>-<time>)")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --workdir from its last checkpoint "
                      "(same flags; the data order is a function of seed and "
                      "epoch, so the result equals an uninterrupted run)")
  g.add_argument("--epochs", type=int, default=d.epochs,
                 help="epochs, also the length of the schedule (%(default)s)")
  g.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                 help="stop after this epoch as if killed (resume later)")
  g.add_argument("--batch-size", type=int, default=d.batch_size,
                 help="GLOBAL batch, split over all devices of all processes; "
                      "must be divisible by their number (per-device batch = "
                      "batch-size / devices) (%(default)s)")
  g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                 help="global evaluation batch (%(default)s)")
  g.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer,
                 help="SGD with Nesterov momentum, or AdamW (%(default)s)")
  g.add_argument("--learning-rate", type=float, default=d.learning_rate,
                 help="peak learning rate: linear warmup, then cosine decay "
                      "(%(default)s)")
  g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                 help="(%(default)s)")
  g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                 help="decoupled weight decay, not applied to batch norm "
                      "scale/bias (jbn.decay_mask) (%(default)s)")
  g.add_argument("--bn-momentum", type=float, default=d.bn_momentum,
                 help="decay of the running statistics, Flax convention "
                      "(PyTorch's momentum=0.1 is 0.9 here) (%(default)s)")
  g.add_argument("--no-bn", dest="use_bn", action="store_false",
                 help="no batch norm (biases instead), for comparison")
  g.add_argument("--seed", type=int, default=d.seed, help="(%(default)s)")
  g.add_argument("--no-progress", dest="progress", action="store_false",
                 help="no progress bar (there is none when stderr is not a "
                      "terminal anyway)")
  g.add_argument("--plot", action="store_true",
                 help="write <workdir>/curves.png (matplotlib)")
  g = parser.add_argument_group(
      "devices and processes",
      "Data parallel over every device of every process (jax.shard_map, axis "
      "'batch', synced batch norm). On CPU, several devices come from "
      "XLA_FLAGS=--xla_force_host_platform_device_count=4 set in the "
      "environment before Python starts.")
  g.add_argument("--devices", type=int, default=None,
                 help="use the first N devices of each process (default: all)")
  g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                 help="several processes: address of process 0 (all three "
                      "flags together; each process reads its share of every "
                      "batch; process 0 writes the files)")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)


def config_from_flags(args, **fields) -> Config:
  """A :class:`Config` from the shared flags plus entry-point ``fields``."""
  return Config(
      data_dir=args.data_dir, epochs=args.epochs, stop_after=args.stop_after,
      batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
      optimizer=args.optimizer, learning_rate=args.learning_rate,
      warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
      bn_momentum=args.bn_momentum, use_bn=args.use_bn, seed=args.seed,
      devices=args.devices, resume=args.resume, progress=args.progress,
      plot=args.plot, **fields)


def default_workdir(name: str) -> str:
  """``runs/<name>-<YYYYmmdd-HHMMSS>``, a fresh directory."""
  base = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  path, i = base, 1
  while os.path.exists(path):
    path, i = f"{base}-{i}", i + 1
  return path


def run_and_export(config: Config, args) -> TrainResult:
  """The entry points' common body: processes, training, export, summary."""
  initialize_distributed(args.coordinator_address, args.num_processes,
                         args.process_id)
  if args.resume and args.workdir is None:
    raise CheckpointError("--resume needs the --workdir of the run to "
                          "continue.")
  workdir = args.workdir or default_workdir(config.dataset)
  t0 = time.perf_counter()
  result = train_and_evaluate(config, workdir)
  main = jax.process_index() == 0
  if result.history and result.history[-1]["epoch"] == config.epochs:
    diff = export_inference(result, os.path.join(workdir, MODEL))
    if main:
      print(f"exported {os.path.join(workdir, MODEL)} (batch norm folded; "
            f"max |folded - unfolded| logits = {diff:.2e}); try: python "
            f"examples/predict.py --model {os.path.join(workdir, MODEL)}"
            + (f" --data-dir {config.data_dir}" if config.data_dir else ""))
  if main and result.history:
    last = result.history[-1]
    print(f"test accuracy {100 * last['test_accuracy']:.2f}% after epoch "
          f"{last['epoch']}; {time.perf_counter() - t0:.1f} s")
  # Every process prints it: equal digests mean bitwise-equal parameters.
  print(f"process {jax.process_index()} params sha256 "
        f"{params_digest(result.state.params)}", flush=True)
  return result


USER_ERRORS = (data_lib.DataError, CheckpointError, ValueError)


def cli(main: Callable[[Sequence[str] | None], Any]) -> None:
  """Runs ``main``; a user error prints one line and exits with status 2."""
  try:
    main(None)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
