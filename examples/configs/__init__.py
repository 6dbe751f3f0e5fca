"""The configuration of a training run, and the command line made from it.

:class:`Config` is the one place a setting is written: its default, its help
text, its flag group, whether a resumed run may change it. The command-line
flags of ``mnist.py`` and ``cifar.py`` are generated from its fields
(:func:`make_parser`), the checkpoint records it, and resuming compares it
(fields marked ``run_only`` excepted). ``configs/mnist.py`` and
``configs/cifar.py`` hold each entry point's defaults (``get_config()``, as in
Flax's examples).

To add a setting, add one field here::

    label_smoothing: float = option(
        0.0, "weight of the uniform distribution in the targets",
        group="training")

and use ``config.label_smoothing`` where it matters: ``--label-smoothing``
appears on both entry points, in the checkpoint, and in the resume check.
Types: ``bool`` (a ``--flag`` or ``--no-flag`` that flips the default),
``int``, ``float``, ``str`` (``choices=`` to restrict), ``X | None``, and
tuples of ints (comma-separated on the command line).

This module imports neither JAX nor Flax.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")
BN_MODES = ("batchnorm", "renorm", "ghost")
RECALIBRATE = ("none", "pooled", "batch_mean")

GROUPS = {
    "data": None,
    "model": None,
    "training": None,
    "checkpoints and output": None,
    "devices and processes": (
        "Data parallel over every device of every process (jax.shard_map,\n"
        "axis 'batch', synced batch norm). On CPU, several devices come from\n"
        "XLA_FLAGS=--xla_force_host_platform_device_count=4 set in the\n"
        "environment before Python starts."),
}


# pylint: disable-next=redefined-builtin
def option(default: Any, help: str, *, group: str,
           run_only: bool = False, flag: str | None = None,
           model: str | None = None, choices: Sequence[str] | None = None,
           cli: bool = True) -> Any:
  """A :class:`Config` field with what its command-line flag needs.

  Args:
    default: the default value (entry points override it in ``configs/``).
    help: what the setting does, for ``--help``.
    group: the ``--help`` section (a key of ``GROUPS``).
    run_only: how the run is carried out, not what it computes: a resumed
      run may change it.
    flag: the flag's name without dashes (default: the field's name with
      ``-`` for ``_``); a bool that defaults to True gets ``--no-<flag>``.
    model: only entry points training this model (``mlp``, ``resnet``)
      have the flag.
    choices: the values allowed.
    cli: False: no flag (set by the entry point or a script).
  """
  assert group in GROUPS, group
  return dataclasses.field(default=default, metadata=dict(
      help=help, group=group, run_only=run_only, flag=flag, model=model,
      choices=tuple(choices) if choices else None, cli=cli))


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a training run (see each field's help)."""

  # Data.
  dataset: str = option(
      "digits", "digits (scikit-learn's, bundled), mnist / fashion_mnist "
      "(IDX files in --data-dir), cifar10 (python batches in --data-dir) or "
      "synthetic (random 32x32x3 images)", group="data", choices=DATASETS)
  data_dir: str | None = option(
      None, "where the dataset files are; nothing is ever downloaded",
      group="data", run_only=True)
  synthetic_size: tuple[int, int] = option(
      (512, 128), "train,test sizes of the synthetic dataset", group="data",
      model="resnet")

  # Model.
  model: str = option("mlp", "mlp or resnet", group="model", cli=False)
  hidden: tuple[int, ...] = option(
      (512, 512), "hidden layer widths", group="model", model="mlp")
  width: int = option(
      16, "channels of the first stage, doubled at each next stage",
      group="model", model="resnet")
  stage_sizes: tuple[int, ...] = option(
      (1, 1, 1), "residual blocks per stage", group="model", model="resnet")
  use_bn: bool = option(
      True, "batch norm after every hidden Dense/Conv (--no-bn: biases "
      "instead, for comparison)", group="model", flag="bn")
  bn_mode: str = option(
      "batchnorm", "batchnorm: plain (synced) batch norm; renorm: batch "
      "renormalization (Ioffe 2017) with jbn.renorm_clip's warm-up schedule "
      "driven by the training step (--renorm-* flags); ghost: ghost batch "
      "norm, each device's share split into --ghost-batch-size groups "
      "normalized on their own. Evaluation and the exported model are the "
      "same for all three", group="model", flag="bn", choices=BN_MODES)
  ghost_batch_size: int | None = option(
      None, "examples per ghost batch, with --bn ghost (required there); "
      "must divide the per-device batch (--batch-size / devices)",
      group="model")
  renorm_warmup_steps: int | None = option(
      None, "--bn renorm: steps of plain batch norm (rmax 1, dmax 0) before "
      "the clipping relaxes (default: 10%% of the run's steps)",
      group="model")
  renorm_rmax_steps: int | None = option(
      None, "--bn renorm: step at which r's bound reaches --renorm-rmax "
      "(default: 80%% of the run's steps)", group="model")
  renorm_dmax_steps: int | None = option(
      None, "--bn renorm: step at which d's bound reaches --renorm-dmax "
      "(default: 50%% of the run's steps)", group="model")
  renorm_rmax: float = option(
      3.0, "--bn renorm: final bound of r = sigma_batch / sigma_running "
      "(clipped to [1/rmax, rmax])", group="model")
  renorm_dmax: float = option(
      5.0, "--bn renorm: final bound of |d| = |mu_batch - mu_running| / "
      "sigma_running", group="model")
  bn_momentum: float = option(
      0.9, "decay of the running statistics, Flax convention (PyTorch's "
      "momentum=0.1 is 0.9 here)", group="model")
  bn_epsilon: float = option(1e-5, "added to the variance", group="model")
  augment: bool = option(
      False, "random crops (4-pixel zero padding) and horizontal flips",
      group="model", model="resnet")

  # Training.
  optimizer: str = option(
      "sgd", "SGD with Nesterov momentum, or AdamW", group="training",
      choices=("sgd", "adamw"))
  learning_rate: float = option(
      0.1, "peak learning rate: linear warmup, then cosine decay",
      group="training")
  momentum: float = option(0.9, "SGD momentum (AdamW ignores it)",
                           group="training")
  weight_decay: float = option(
      5e-4, "decoupled weight decay, not applied to batch norm scale/bias "
      "(jbn.decay_mask)", group="training")
  warmup_epochs: float = option(
      1.0, "linear warmup from 0, then cosine decay to 0 at the last epoch",
      group="training")
  epochs: int = option(20, "epochs, also the length of the schedule",
                       group="training")
  batch_size: int = option(
      64, "GLOBAL batch, split over all devices of all processes; must be "
      "divisible by their number (per-device batch = batch-size / devices)",
      group="training")
  eval_batch_size: int = option(
      512, "global evaluation batch (rounded up to a multiple of the "
      "devices; padding does not count)", group="training")
  seed: int = option(
      0, "initialization, data order and augmentation all derive from it",
      group="training")
  weight_ema: float = option(
      0.0, "keep an exponential moving average of the parameters with this "
      "decay (0: off), warmed up as min(decay, (1 + step) / (10 + step)); "
      "after training it is evaluated and exported instead of the "
      "parameters (its batch norm statistics recalibrated, see "
      "--recalibrate)", group="training")
  recalibrate: str = option(
      "pooled", "after training, recompute the batch norm running "
      "statistics from one pass over the training set (train-mode batch "
      "norm, batches of --batch-size, no augmentation, parameters fixed; "
      "jbn.recalibrate): pooled = the exact statistics of all the inputs "
      "seen, batch_mean = the mean of the per-batch statistics (the EMA's "
      "limit), none = keep the EMA's. Reported before/after; the export "
      "uses them", group="training", choices=RECALIBRATE)
  max_bad_steps: int = option(
      0, "skip up to this many steps whose loss or new state is not finite "
      "(the step is not applied); one more stops the run (exit 3) with the "
      "last good checkpoint kept and nothing exported", group="training",
      run_only=True)
  stop_after: int | None = option(
      None, "stop after this epoch as if killed (resume later); the "
      "schedule still spans --epochs", group="training", run_only=True)

  # Checkpoints and output.
  resume: bool = option(
      False, "continue the run in --workdir from its last checkpoint (same "
      "flags; the data order is a function of seed and epoch, so the result "
      "equals an uninterrupted run)", group="checkpoints and output",
      run_only=True)
  checkpoint_every: float = option(
      10.0, "seconds: an epoch that ends at least this long after the last "
      "checkpoint is checkpointed (0: every epoch); the last epoch run "
      "always is", group="checkpoints and output", run_only=True)
  keep_checkpoints: int = option(
      3, "checkpoints kept in <workdir>/checkpoints (Orbax)",
      group="checkpoints and output", run_only=True)
  progress: bool = option(
      True, "progress bars for epochs longer than a few seconds (only on a "
      "terminal)", group="checkpoints and output", run_only=True)
  plot: bool = option(False, "write <workdir>/curves.png (matplotlib)",
                      group="checkpoints and output", run_only=True)
  quiet: bool = option(False, "print nothing", group="checkpoints and output",
                       run_only=True, cli=False)

  # Devices and processes.
  devices: int | None = option(
      None, "use the first N devices of each process (default: all)",
      group="devices and processes", run_only=True)
  coordinator_address: str | None = option(
      None, "several processes: HOST:PORT of process 0 (with "
      "--num-processes and --process-id; each process reads its share of "
      "every batch; process 0 writes the files)",
      group="devices and processes", run_only=True)
  num_processes: int | None = option(None, "processes in the run",
                                     group="devices and processes",
                                     run_only=True)
  process_id: int | None = option(None, "this process, 0 .. N-1",
                                  group="devices and processes",
                                  run_only=True)
  heartbeat_timeout: int = option(
      10, "seconds after which a silent process counts as dead (the others "
      "then stop, exit 4)", group="devices and processes", run_only=True)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
RUN_ONLY = tuple(name for name, f in FIELDS.items() if f.metadata["run_only"])
_TYPES = typing.get_type_hints(Config)


def _integers(count: int | None):
  """argparse ``type=`` for comma-separated integers (``count`` of them)."""
  def parse(text: str) -> tuple[int, ...]:
    try:
      values = tuple(int(s) for s in text.split(","))
    except ValueError:
      values = ()
    if not values or (count is not None and len(values) != count):
      how_many = f"exactly {count}" if count else "some"
      raise argparse.ArgumentTypeError(
          f"{text!r}: expected {how_many} comma-separated integers, e.g. "
          f"{','.join(['64'] * (count or 2))}.")
    return values
  return parse


def _flag_type(kind):
  """(argparse ``type=``, metavar) for a field's annotated type."""
  if isinstance(kind, types.UnionType):  # X | None
    (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
  if typing.get_origin(kind) is tuple:
    args = typing.get_args(kind)
    count = None if args[-1] is Ellipsis else len(args)
    return _integers(count), ",".join(["N"] * (count or 2)) + (
        "" if count else ",...")
  return kind, None


def _show(value) -> str:
  if isinstance(value, tuple):
    return ",".join(map(str, value))
  return str(value)


def make_parser(defaults: Config, *, description: str | None = None,
                choices: Mapping[str, Sequence[str]] | None = None
                ) -> argparse.ArgumentParser:
  """The command line of an entry point whose defaults are ``defaults``.

  One flag per :class:`Config` field (those with ``cli=True`` and, if the
  field names a model, only for ``defaults.model``), plus ``--workdir``.
  Flags not given are absent from the parsed namespace: :func:`given` lists
  those that were. ``choices`` narrows a field's allowed values.
  """
  parser = argparse.ArgumentParser(
      description=description,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  groups = {name: parser.add_argument_group(name, text)
            for name, text in GROUPS.items()}
  groups["checkpoints and output"].add_argument(
      "--workdir", default=None,
      help="where checkpoints/, metrics.jsonl, curves.png and model.jax go "
           "(default: a new runs/<dataset>-<time>)")
  for name, f in FIELDS.items():
    meta = f.metadata
    if not meta["cli"] or meta["model"] not in (None, defaults.model):
      continue
    group = groups[meta["group"]]
    default = getattr(defaults, name)
    flag = meta["flag"] or name.replace("_", "-")
    if _TYPES[name] is bool:
      group.add_argument(
          f"--no-{flag}" if default else f"--{flag}", dest=name,
          action="store_false" if default else "store_true",
          default=argparse.SUPPRESS,
          help=meta["help"] + (" (on by default; this flag turns it off)"
                               if default else ""))
      continue
    kind, metavar = _flag_type(_TYPES[name])
    allowed = (choices or {}).get(name, meta["choices"])
    shown = "" if default is None else f" (default: {_show(default)})"
    group.add_argument(f"--{flag}", dest=name, type=kind, metavar=metavar,
                       choices=allowed, default=argparse.SUPPRESS,
                       help=meta["help"] + shown)
  return parser


def given(args: argparse.Namespace) -> dict[str, Any]:
  """The :class:`Config` fields set on the command line."""
  return {name: value for name, value in vars(args).items() if name in FIELDS}


def from_args(args: argparse.Namespace, defaults: Config,
              **fields: Any) -> Config:
  """``defaults`` with the flags given in ``args``, then ``fields``."""
  return dataclasses.replace(defaults, **{**given(args), **fields})


def comparable(settings: Mapping[str, Any]) -> dict[str, Any]:
  """The fields that must match to resume: all but ``run_only``; a field
  missing from ``settings`` (a checkpoint older than the field) counts as
  its default."""
  out = {name: f.default for name, f in FIELDS.items()
         if name not in RUN_ONLY}
  out.update({k: v for k, v in settings.items() if k not in RUN_ONLY})
  return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def to_dict(config: Config) -> dict[str, Any]:
  """JSON-ready (tuples as lists)."""
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(config).items()}
