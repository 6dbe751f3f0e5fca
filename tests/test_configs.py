"""The examples' configuration: one Config field, one generated flag."""

import dataclasses

import pytest

from examples import cifar
from examples import configs
from examples import mnist
from examples.configs import cifar as cifar_config
from examples.configs import mnist as mnist_config


def _flags(defaults):
  parser = configs.make_parser(defaults)
  actions = parser._actions  # pylint: disable=protected-access
  return {s for a in actions for s in a.option_strings}


def test_every_field_is_a_flag_or_says_why_not():
  mlp, resnet = _flags(mnist.DEFAULTS), _flags(cifar.DEFAULTS)
  for name, f in configs.FIELDS.items():
    flag = f.metadata["flag"] or name.replace("_", "-")
    on = {"mlp": mlp, "resnet": resnet}
    for model, flags in on.items():
      expected = f.metadata["cli"] and f.metadata["model"] in (None, model)
      assert any(s.endswith(flag) for s in flags) == expected, (name, model)
  assert "--no-bn" in mlp and "--hidden" in mlp and "--width" not in mlp
  assert "--no-augment" in resnet and "--stage-sizes" in resnet
  assert "--workdir" in mlp


def test_flags_round_trip_into_the_config():
  args = configs.make_parser(mnist.DEFAULTS).parse_args(
      ["--hidden", "32,16", "--no-bn", "--learning-rate", "0.2", "--devices",
       "2", "--optimizer", "adamw", "--max-bad-steps", "3", "--workdir", "w"])
  config = configs.from_args(args, mnist.DEFAULTS)
  assert config == dataclasses.replace(
      mnist.DEFAULTS, hidden=(32, 16), use_bn=False, learning_rate=0.2,
      devices=2, optimizer="adamw", max_bad_steps=3)
  assert args.workdir == "w"
  assert configs.given(args) == {
      "hidden": (32, 16), "use_bn": False, "learning_rate": 0.2,
      "devices": 2, "optimizer": "adamw", "max_bad_steps": 3}


def test_batch_norm_mode_and_after_training_flags_round_trip():
  for parse in (mnist.parse_flags, lambda argv: cifar.parse_flags(
      ["--synthetic", *argv])):
    config, _ = parse(["--bn", "ghost", "--ghost-batch-size", "8",
                       "--weight-ema", "0.99", "--recalibrate", "batch_mean"])
    assert (config.bn_mode, config.ghost_batch_size, config.weight_ema,
            config.recalibrate) == ("ghost", 8, 0.99, "batch_mean")
  config, _ = mnist.parse_flags(
      ["--bn", "renorm", "--renorm-warmup-steps", "5", "--renorm-rmax-steps",
       "50", "--renorm-dmax-steps", "30", "--renorm-rmax", "2",
       "--renorm-dmax", "1"])
  assert (config.bn_mode, config.renorm_warmup_steps, config.renorm_rmax_steps,
          config.renorm_dmax_steps, config.renorm_rmax, config.renorm_dmax
          ) == ("renorm", 5, 50, 30, 2.0, 1.0)
  assert config.use_bn  # --bn picks the mode; --no-bn is still the switch
  defaults = mnist.DEFAULTS
  assert (defaults.bn_mode, defaults.ghost_batch_size, defaults.weight_ema,
          defaults.recalibrate) == ("batchnorm", None, 0.0, "pooled")
  # They change what the run computes: a resume must match them.
  assert not {"bn_mode", "ghost_batch_size", "renorm_warmup_steps",
              "weight_ema", "recalibrate"} & set(configs.RUN_ONLY)


def test_entry_points_take_their_defaults_from_configs():
  assert mnist.DEFAULTS == mnist_config.get_config()
  assert cifar.DEFAULTS == cifar_config.get_config()
  config, workdir = cifar.parse_flags(["--synthetic", "--no-augment",
                                       "--synthetic-size", "32,8"])
  assert (config.dataset, config.augment, config.synthetic_size) == (
      "synthetic", False, (32, 8))
  assert workdir is None


def test_help_shows_the_defaults(capsys):
  with pytest.raises(SystemExit):
    mnist.parse_flags(["--help"])
  out = capsys.readouterr().out
  assert "(default: 512,512)" in out and "(default: 0.1)" in out
  assert "--dataset {digits,mnist,fashion_mnist}" in out
  assert "--bn {batchnorm,renorm,ghost}" in out
  assert "--recalibrate {none,pooled,batch_mean}" in out
  assert "(default: pooled)" in out and "10% of the" in out


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "a,b"], "expected some comma-separated integers"),
    (["--synthetic", "--synthetic-size", "1,2,3"],
     "expected exactly 2 comma-separated integers"),
    (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
    (["--bn", "layernorm"], "invalid choice: 'layernorm'"),
    (["--recalibrate", "ema"], "invalid choice: 'ema'"),
    (["--ghost-batch-size", "x"], "invalid int value: 'x'"),
])
def test_bad_values_are_flag_errors(argv, message, capsys):
  parse = cifar.parse_flags if "--synthetic" in argv else mnist.parse_flags
  with pytest.raises(SystemExit):
    parse(argv)
  assert message in capsys.readouterr().err


def test_resume_compares_all_but_run_only_fields():
  assert "resume" in configs.RUN_ONLY and "devices" in configs.RUN_ONLY
  assert "learning_rate" not in configs.RUN_ONLY
  saved = configs.to_dict(mnist.DEFAULTS)
  del saved["bn_epsilon"]  # a checkpoint older than a field: its default
  saved["devices"] = 4
  assert configs.comparable(saved) == configs.comparable(
      configs.to_dict(mnist.DEFAULTS))
