"""Training and evaluation (after Flax's ``examples/imagenet/train.py``).

``create_train_state``, ``train_step``, ``eval_step`` and
``train_and_evaluate(config, workdir)``. The steps run under ``jax.shard_map``
(``parallel.py``): batch norm gets ``axis_name='batch'`` (synced BN), and each
device's loss is its share of the global mean (the sum of its per-example
losses divided by the *global* batch size). Inside ``shard_map`` the gradient
of a replicated parameter comes out already summed over the axis, so the sum
of the shares gives exactly the gradient of the global mean, the same as on
one device.

Batch norm modes (``--bn``, ``bn_modes.py``): plain, batch renormalization
(the clipping schedule ``jbn.renorm_clip`` is evaluated at the traced
``state.step`` inside ``train_step`` and passed per call down to every batch
norm: one compiled step serves the whole run) or ghost batch norm
(``Norm.ghost_batch_size``).
With ``--weight-ema`` the state also carries an EMA of the parameters. After
the last epoch, ``recalibration.finish`` evaluates the EMA and recalibrates
the running statistics; the export uses what it returns.

Fail safe (``failsafe.py``): a step whose loss, or whose new parameters,
``batch_stats``, weight EMA or optimizer state, are not finite (or whose
running variance is negative) is not applied. The run then stops
(``TrainingStopped``, exit 3) unless ``config.max_bad_steps`` allows skipping
it; the last checkpoint is kept and nothing is exported. A restored state
is checked the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import jbn
from examples import bn_modes
from examples import checkpoint
from examples import configs
from examples import data as data_lib
from examples import errors
from examples import failsafe
from examples import models
from examples import parallel
from examples import recalibration
from examples import reporting
from examples.parallel import AXIS

PRNG_IMPL = "rbg"


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the running statistics of the batch norms and,
  with ``--weight-ema``, an EMA of the parameters (``{}`` without)."""

  batch_stats: Any = None
  ema_params: Any = None


@dataclasses.dataclass
class TrainResult:
  """What :func:`train_and_evaluate` returns."""

  state: TrainState  # replicated over `mesh`
  rng: jax.Array  # replicated raw key data
  model: nn.Module
  dataset: data_lib.Dataset
  history: list[dict[str, Any]]
  mesh: jax.sharding.Mesh
  # What the export holds (replicated): the parameters (the weight EMA's
  # with --weight-ema) and their batch_stats (recalibrated with
  # --recalibrate); `state`'s own before the last epoch.
  variables: dict[str, Any] | None = None


def create_model(config: configs.Config, dataset: data_lib.Dataset, *,
                 axis_name: str | None = AXIS) -> nn.Module:
  """The network of ``config``, standardizing inputs with the training
  split's per-channel mean and std."""
  mean, std = dataset.channel_stats()
  norm = models.Norm(
      use_bn=config.use_bn, momentum=config.bn_momentum,
      epsilon=config.bn_epsilon, axis_name=axis_name,
      ghost_batch_size=bn_modes.ghost_batch_size(config))
  common = dict(num_classes=dataset.num_classes, mean=tuple(mean.tolist()),
                std=tuple(std.tolist()), norm=norm)
  if config.model == "mlp":
    return models.MLP(hidden=tuple(config.hidden), **common)
  if config.model == "resnet":
    return models.ResNet(stage_sizes=tuple(config.stage_sizes),
                         width=config.width, **common)
  raise errors.UsageError(f"unknown model {config.model!r}; expected mlp or "
                          f"resnet.")


def create_optimizer(config: configs.Config, steps_per_epoch: int
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
  raise errors.UsageError(f"unknown optimizer {config.optimizer!r}; expected "
                          f"sgd or adamw.")


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: Sequence[int], rng: jax.Array, *,
                       weight_ema: bool = False) -> TrainState:
  """Initializes parameters, running statistics, optimizer state and, with
  ``weight_ema``, the EMA of the parameters (a copy of them)."""
  variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32),
                         train=False)
  params = variables["params"]
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx,
      batch_stats=variables.get("batch_stats", {}),
      ema_params=jax.tree.map(jnp.copy, params) if weight_ema else {})


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
  take = lambda a: jax.lax.dynamic_slice_in_dim(a, offset, local)  # noqa: E731
  dy = take(jax.random.randint(k_y, (global_batch,), 0, 2 * pad + 1))
  dx = take(jax.random.randint(k_x, (global_batch,), 0, 2 * pad + 1))
  flip = take(jax.random.bernoulli(k_flip, shape=(global_batch,)))
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(image, y, x, f):
    out = jax.lax.dynamic_slice(image, (y, x, 0), (height, width, channels))
    return jnp.where(f, out[:, ::-1], out)

  return jax.vmap(crop)(padded, dy, dx, flip)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
               rng: jax.Array, *, global_batch: int, augment: bool = False,
               renorm: Callable[[jax.Array], jbn.RenormClip] | None = None,
               weight_ema: float = 0.0
               ) -> tuple[TrainState, dict[str, Any]]:
  """One SGD step on this device's shard; run it under ``shard_map``.

  Args:
    state: replicated train state.
    images, labels: this device's ``global_batch / devices`` examples.
    rng: replicated raw PRNG key data (``augment`` only).
    global_batch: examples per step over all devices.
    augment: random crops and flips.
    renorm: batch renormalization's schedule (``bn_modes.renorm_schedule``),
      called on the traced ``state.step``; the clip goes to every batch norm
      of the model per call.
    weight_ema: decay of the EMA of the parameters (``state.ema_params``),
      warmed up as ``min(decay, (1 + step) / (10 + step))``; 0: none.

  Returns:
    The new (replicated) state -- the old one if the step produced a
    non-finite loss or state -- and metrics: the global batch's mean loss,
    its number of correct predictions, and ``ok``: per part (``loss`` and
    each of ``failsafe.CHECKED``), whether it was valid.
  """
  local = images.shape[0]
  if augment:
    key = jax.random.fold_in(
        jax.random.wrap_key_data(rng, impl=PRNG_IMPL), state.step)
    images = augment_images(key, images, jax.lax.axis_index(AXIS) * local,
                            global_batch)

  clip = None if renorm is None else renorm(state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, renorm=clip, mutable=["batch_stats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # This device's share of the global mean: shares sum to the mean.
    return jnp.sum(losses) / global_batch, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # `grads` are already summed over the axis (replicated params under
  # shard_map): the gradient of the global mean loss. No pmean here.
  new_state = state.apply_gradients(
      grads=grads, batch_stats=updates.get("batch_stats", {}))
  if weight_ema:
    decay = jnp.minimum(weight_ema, (1.0 + state.step) / (10.0 + state.step))
    new_state = new_state.replace(ema_params=jax.tree.map(
        lambda e, p: decay * e + (1 - decay) * p, state.ema_params,
        new_state.params))
  loss = jax.lax.psum(loss, AXIS)
  ok = {"loss": jnp.isfinite(loss), **failsafe.state_ok(new_state)}
  applied = jnp.all(jnp.stack(list(ok.values())))
  new_state = jax.tree.map(functools.partial(jnp.where, applied), new_state,
                           state)
  correct = jax.lax.psum(jnp.sum(jnp.argmax(logits, -1) == labels), AXIS)
  return new_state, {"loss": loss, "correct": correct, "ok": ok}


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


def evaluate(state: TrainState, dataset: data_lib.Dataset, p_eval: Callable,
             mesh: jax.sharding.Mesh, batch_size: int) -> dict[str, float]:
  """Mean loss and accuracy on the test split, every example once."""
  totals = []
  for batch in data_lib.eval_batches(
      dataset.test_images, dataset.test_labels, batch_size=batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()):
    totals.append(p_eval(state, *parallel.global_batch(mesh, batch_size,
                                                       *batch)))
  totals = parallel.to_host(jax.tree.map(lambda *x: sum(x), *totals))
  return {"test_loss": float(totals["loss"] / totals["count"]),
          "test_accuracy": float(totals["correct"] / totals["count"])}


@dataclasses.dataclass
class _Loop:
  """What the epochs of a run share."""

  config: configs.Config
  dataset: data_lib.Dataset
  mesh: jax.sharding.Mesh
  p_train: Callable
  bad_steps: failsafe.BadSteps
  check_every: int = 16  # steps between checks of the `ok` flags

  def epoch(self, state: TrainState, rng: jax.Array, epoch: int
            ) -> tuple[TrainState, dict[str, Any]]:
    """Trains one epoch; returns the new state and the epoch's record."""
    c = self.config
    steps = len(self.dataset.train_images) // c.batch_size
    show = c.progress and not c.quiet and jax.process_index() == 0
    bar = reporting.progress_bar(steps, f"epoch {epoch}/{c.epochs}", show)
    t0 = time.perf_counter()
    metrics, applied = [], []
    for step, batch in enumerate(data_lib.train_batches(
        self.dataset.train_images, self.dataset.train_labels,
        batch_size=c.batch_size, seed=c.seed, epoch=epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count())):
      state, m = self.p_train(state, *parallel.global_batch(
          self.mesh, c.batch_size, *batch), rng)
      metrics.append(m)
      # Every few steps, look at the steps before this one (it runs on).
      if step and step % self.check_every == 0:
        applied += self.bad_steps.check(
            epoch, len(applied), steps,
            [m["ok"] for m in metrics[len(applied):-1]])
      bar.update(1)
      if not bar.disable and (step % 10 == 0 or step == steps - 1):
        seen = (step + 1) * c.batch_size
        bar.set_postfix(loss=f"{float(parallel.to_host(m['loss'])):.4f}",
                        ex_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
    applied += self.bad_steps.check(
        epoch, len(applied), steps, [m["ok"] for m in metrics[len(applied):]])
    bar.close()
    host = parallel.to_host({k: jnp.stack([m[k] for m in metrics])
                             for k in ("loss", "correct")})
    good = np.array(applied)
    train_time = time.perf_counter() - t0
    return state, {
        "epoch": epoch,
        "train_loss": float(np.mean(host["loss"][good])),
        "train_accuracy": float(np.sum(host["correct"][good])
                                / (max(good.sum(), 1) * c.batch_size)),
        "skipped_steps": int(np.sum(~good)),
        "examples_per_sec": steps * c.batch_size / train_time,
    }


def train_and_evaluate(config: configs.Config, workdir: str) -> TrainResult:
  """Trains ``config`` on all devices, evaluating and checkpointing each epoch.

  Writes ``<workdir>/checkpoints/<epoch>`` (Orbax: the last epoch, and any
  epoch ending ``config.checkpoint_every`` seconds after the last checkpoint;
  the last ``config.keep_checkpoints`` kept), ``<workdir>/metrics.jsonl``
  and, with ``config.plot``, ``<workdir>/curves.png``. Only process 0 writes
  files other than checkpoints, and prints.

  Raises:
    CheckpointError: ``workdir`` already has a checkpoint and
      ``config.resume`` is False (nothing is overwritten), or resuming fails
      (no checkpoint, unreadable, other settings, invalid values).
    UsageError: a batch size that does not split over the devices, too
      many devices asked for.
    DataError: dataset files missing or malformed.
    TrainingStopped: a step went non-finite (beyond ``max_bad_steps``).
  """
  is_main = jax.process_index() == 0
  log = (print if is_main and not config.quiet
         else lambda *a, **k: None)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    reporting.remove_stale_temporaries(workdir)
  ckpts = checkpoint.Checkpoints(workdir, config)
  try:
    if not config.resume:
      ckpts.check_absent()
    dataset = data_lib.load_dataset(config)
    mesh = parallel.make_mesh(config.devices)
    n_dev = mesh.size
    if config.batch_size % n_dev:
      raise errors.UsageError(
          f"--batch-size {config.batch_size} is the global batch: it must be "
          f"divisible by the {n_dev} devices (per-device batch = batch size "
          f"/ devices).")
    n_train = len(dataset.train_images)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
      raise errors.UsageError(f"--batch-size {config.batch_size} is larger "
                              f"than the {n_train} training examples.")
    bn_modes.check(config, n_dev)
    if not 0 <= config.weight_ema < 1:
      raise errors.UsageError(f"--weight-ema {config.weight_ema}: a decay in "
                              f"[0, 1) (0: off).")
    renorm = bn_modes.renorm_schedule(config,
                                      config.epochs * steps_per_epoch)
    eval_batch = -(-config.eval_batch_size // n_dev) * n_dev
    model = create_model(config, dataset)
    tx = create_optimizer(config, steps_per_epoch)

    @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
    def init(seed):
      # "rbg" (XLA's RngBitGenerator) compiles far faster than threefry on
      # CPU; it is deterministic on a given backend.
      init_rng, rng = jax.random.split(jax.random.key(seed, impl=PRNG_IMPL))
      return (create_train_state(model, tx, dataset.image_shape, init_rng,
                                 weight_ema=config.weight_ema > 0),
              jax.random.key_data(rng))

    state, rng = init(config.seed)
    history, start_epoch, skipped = [], 0, 0
    if config.resume:
      restored = ckpts.restore(state, rng)
      problems = failsafe.state_problems(restored.state)
      if problems:
        raise checkpoint.CheckpointError(
            f"checkpoint {restored.path} holds invalid values: "
            f"{'; '.join(problems[:5])}. Refusing to resume from it; move it "
            f"away to resume from an earlier checkpoint (kept: epochs "
            f"{', '.join(map(str, ckpts.epochs()))}) or start over.")
      if restored.note:
        log(restored.note)
      state, rng, start_epoch = restored.state, restored.rng, restored.epoch
      history, skipped = restored.history, restored.skipped_steps
      log(f"resumed from {restored.path} at epoch {start_epoch}/"
          f"{config.epochs}")
    if is_main:
      reporting.write_metrics(workdir, history)  # a fresh run: a fresh log

    p_train, p_eval = parallel.shard_steps(
        functools.partial(train_step, global_batch=config.batch_size,
                          augment=config.augment, renorm=renorm,
                          weight_ema=config.weight_ema), eval_step, mesh)
    log(f"data: {dataset.source}")
    log(f"{dataset.name}: {n_train} train / {len(dataset.test_images)} test "
        f"images {dataset.image_shape}; {config.model} "
        f"({bn_modes.describe(config, renorm)}); "
        f"{n_dev} device(s) in {jax.process_count()} process(es), global "
        f"batch {config.batch_size} = {config.batch_size // n_dev} per "
        f"device; {steps_per_epoch} steps/epoch; workdir {workdir}")
    t_compile = time.perf_counter()
    p_train = p_train.lower(
        state, parallel.batch_spec(mesh, (config.batch_size,
                                          *dataset.image_shape), jnp.float32),
        parallel.batch_spec(mesh, (config.batch_size,), jnp.int32),
        rng).compile()
    log(f"compiled the train step in {time.perf_counter() - t_compile:.1f} s")

    loop = _Loop(config, dataset, mesh, p_train, failsafe.BadSteps(
        config.max_bad_steps, log, skipped,
        ckpts.path(start_epoch) if start_epoch else None))
    last_epoch = (config.epochs if config.stop_after is None
                  else min(config.epochs, config.stop_after))
    last_save = time.perf_counter()
    for epoch in range(start_epoch + 1, last_epoch + 1):
      t0 = time.perf_counter()
      state, record = loop.epoch(state, rng, epoch)
      record.update(evaluate(state, dataset, p_eval, mesh, eval_batch))
      record["epoch_seconds"] = time.perf_counter() - t0
      history.append(record)
      # Every process must take this decision the same way: process 0's.
      if epoch == last_epoch or parallel.process_0_says(
          time.perf_counter() - last_save >= config.checkpoint_every):
        ckpts.save(epoch, state, rng, history, loop.bad_steps.skipped)
        loop.bad_steps.last_checkpoint = ckpts.path(epoch)
        last_save = time.perf_counter()
      if is_main:
        reporting.append_metrics(workdir, record)
      log(reporting.epoch_line(record, config.epochs))
    # After the last epoch: the weight EMA's score, recalibrated running
    # statistics (not checkpointed: a resume recomputes them); the export
    # uses `variables`.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if history and history[-1]["epoch"] == config.epochs:
      variables, extra = recalibration.finish(
          config, state, model, dataset, mesh, history[-1],
          lambda s: evaluate(s, dataset, p_eval, mesh, eval_batch), log)
      # A new list: the checkpoint being written holds the old one.
      history = history[:-1] + [{**history[-1], **extra}]
      if is_main:
        reporting.write_metrics(workdir, history)
  except (errors.UsageError, errors.TrainingStopped):
    ckpts.close()  # let the checkpoint being written (a good one) finish
    raise
  ckpts.close()  # (not after a bug, or a lost process: nothing to wait for)

  if config.plot and is_main and history:
    reporting.plot_curves(os.path.join(workdir, reporting.CURVES), history,
                          f"{dataset.name} {config.model}")
  return TrainResult(state=state, rng=rng, model=model, dataset=dataset,
                     history=history, mesh=mesh, variables=variables)
