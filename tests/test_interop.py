"""jbn.interop against PyTorch and Keras themselves, and float64 NumPy.

Every conversion is checked by running the other framework's own layer (or
model) on the same input, never by converting back and forth with jbn's code
alone.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import subprocess  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import jbn  # noqa: E402
import jbn.linen  # noqa: E402
from jbn import interop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCH_LAYOUTS = [  # (module class, NC... input shape)
    (torch.nn.BatchNorm1d, (8, 5)),
    (torch.nn.BatchNorm1d, (4, 5, 7)),
    (torch.nn.BatchNorm2d, (4, 5, 3, 6)),
    (torch.nn.BatchNorm3d, (2, 5, 3, 2, 4)),
]


def np64_eval(x, scale, bias, mean, var, eps, axis):
  """Evaluation-mode batch norm in float64 NumPy, features on ``axis``."""
  shape = [1] * x.ndim
  shape[axis] = -1
  f = lambda a: np.asarray(a, np.float64).reshape(shape)
  y = (np.asarray(x, np.float64) - f(mean)) / np.sqrt(f(var) + eps)
  if scale is not None:
    y = y * f(scale)
  if bias is not None:
    y = y + f(bias)
  return y


def randomize_torch_bn(bn, rng, count=7):
  """Random weight/bias/running statistics, as after some training."""
  c = bn.num_features
  with torch.no_grad():
    if bn.affine:
      bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype("f4")))
      bn.bias.copy_(torch.from_numpy(rng.normal(0, 1, c).astype("f4")))
    bn.running_mean.copy_(torch.from_numpy(rng.normal(0, 2, c).astype("f4")))
    bn.running_var.copy_(torch.from_numpy(rng.uniform(0.1, 3, c).astype("f4")))
    bn.num_batches_tracked.fill_(count)
  return bn


def test_import_does_not_import_torch_or_keras():
  code = ("import sys, jbn, jbn.interop; "
          "assert 'torch' not in sys.modules, 'torch'; "
          "assert 'keras' not in sys.modules, 'keras'; "
          "assert not hasattr(jbn, 'interop') or 'interop' not in jbn.__all__")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------
# Momentum


@pytest.mark.parametrize("p", [0.1, 0.01, 0.3, 0.0, 1.0])
def test_momentum_round_trip(p):
  m = interop.momentum_from_torch(p)
  assert m == pytest.approx(1 - p, abs=1e-15)
  assert interop.momentum_to_torch(m) == p


def test_momentum_from_torch_gives_torch_running_mean(rng):
  bn = torch.nn.BatchNorm2d(3, momentum=0.3)
  params, state = jbn.init(3)
  for _ in range(3):
    x = rng.normal(1, 2, (4, 3, 2, 2)).astype(np.float32)
    bn.train()(torch.from_numpy(x))
    _, state = jbn.batch_norm(params, state, x, True, axis=1,
                              momentum=interop.momentum_from_torch(0.3))
  np.testing.assert_allclose(state["mean"], bn.running_mean, rtol=1e-6,
                             atol=1e-7)


def test_cumulative_average_momentum_none(rng):
  """torch momentum=None: jbn reproduces it with momentum T / (T + 1)."""
  bn = torch.nn.BatchNorm1d(3, momentum=None)
  params, state = jbn.init(3)
  batches = [rng.normal(i, 1 + i, (6, 3)).astype(np.float32) for i in range(4)]
  for t, x in enumerate(batches):
    bn.train()(torch.from_numpy(x))
    m = interop.momentum_from_torch(None, num_batches_tracked=t)
    _, state = jbn.batch_norm(params, state, x, True, momentum=m)
  x64 = np.asarray(batches, np.float64)
  np.testing.assert_allclose(bn.running_mean, x64.mean(axis=1).mean(axis=0),
                             rtol=1e-6)
  np.testing.assert_allclose(state["mean"], bn.running_mean, rtol=1e-6)
  np.testing.assert_allclose(state["var"], x64.var(axis=1).mean(axis=0),
                             rtol=1e-6)
  biased = interop.var_from_torch(bn.running_var, n=6, torch_momentum=None,
                                  num_batches_tracked=4)
  np.testing.assert_allclose(biased, state["var"], rtol=1e-6)


# ---------------------------------------------------------------------------
# Layer level: PyTorch


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cls,shape", TORCH_LAYOUTS)
def test_torch_round_trip_is_bitwise(cls, shape, affine, rng):
  bn = randomize_torch_bn(cls(shape[1], affine=affine, eps=1e-3), rng)
  w = interop.from_torch_batch_norm(bn)
  assert w.epsilon == 1e-3
  assert sorted(w.params) == (["bias", "scale"] if affine else [])
  assert all(v.dtype == jnp.float32 for v in w.state.values())
  back = interop.to_torch_batch_norm(
      w.params, w.state, num_batches_tracked=bn.num_batches_tracked)
  original = bn.state_dict()
  assert list(back) == list(original)
  for key, value in original.items():
    assert back[key].dtype == value.dtype, key
    assert torch.equal(back[key], value), key
  fresh = cls(shape[1], affine=affine)
  fresh.load_state_dict(back, strict=True)


def test_converted_state_does_not_alias_torch_buffers(rng):
  """Regression: the jbn state shared memory with the torch buffers, so
  training the torch layer on changed the converted state."""
  bn = randomize_torch_bn(torch.nn.BatchNorm1d(3), rng)
  w = interop.from_torch_batch_norm(bn)
  before = {k: np.array(v) for k, v in {**w.params, **w.state}.items()}
  bn.train()(torch.from_numpy(rng.normal(5, 3, (4, 3)).astype(np.float32)))
  with torch.no_grad():
    bn.weight.add_(1.0)
  for key, value in {**w.params, **w.state}.items():
    np.testing.assert_array_equal(value, before[key], err_msg=key)
  variables = interop.torch_to_flax(bn.state_dict(), {"": "bn"})
  saved = np.array(variables["batch_stats"]["bn"]["var"])
  bn.train()(torch.from_numpy(rng.normal(5, 3, (4, 3)).astype(np.float32)))
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["var"], saved)


def test_torch_state_dict_with_epsilon(rng):
  bn = randomize_torch_bn(torch.nn.BatchNorm1d(4), rng)
  w = interop.from_torch_batch_norm(bn.state_dict(), epsilon=1e-5)
  assert w.epsilon == 1e-5
  np.testing.assert_array_equal(w.state["var"], bn.running_var)
  np.testing.assert_array_equal(w.params["scale"], bn.weight.detach())


@pytest.mark.parametrize("cls,shape", TORCH_LAYOUTS)
def test_torch_eval_outputs_match(cls, shape, rng):
  """Eval: jbn on NC... with axis=1, and channels-last with axis=-1."""
  bn = randomize_torch_bn(cls(shape[1], eps=1e-3), rng).eval()
  x = rng.normal(0, 2, shape).astype(np.float32)
  with torch.no_grad():
    want = bn(torch.from_numpy(x)).numpy()
  w = interop.from_torch_batch_norm(bn)
  ref64 = np64_eval(x, bn.weight.detach(), bn.bias.detach(), bn.running_mean,
                    bn.running_var, 1e-3, axis=1)
  y, _ = jbn.batch_norm(w.params, w.state, x, False, axis=1,
                        epsilon=w.epsilon)
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y, ref64, rtol=1e-6, atol=1e-6)
  y_last, _ = jbn.batch_norm(w.params, w.state, np.moveaxis(x, 1, -1), False,
                             axis=-1, epsilon=w.epsilon)
  np.testing.assert_allclose(np.moveaxis(np.asarray(y_last), -1, 1), want,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,shape", TORCH_LAYOUTS)
def test_torch_train_step_matches(cls, shape, rng):
  """Train: same outputs (both normalize with the biased batch variance),
  same running mean, and torch's unbiased running var converts to jbn's."""
  bn = randomize_torch_bn(cls(shape[1], momentum=0.2), rng, count=0)
  w = interop.from_torch_batch_norm(bn)
  x = rng.normal(1, 2, shape).astype(np.float32)
  want = bn.train()(torch.from_numpy(x)).detach().numpy()
  y, state = jbn.batch_norm(w.params, w.state, x, True, axis=1,
                            momentum=interop.momentum_from_torch(0.2),
                            epsilon=w.epsilon)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["mean"], bn.running_mean, rtol=1e-6,
                             atol=1e-6)
  n = x.size // shape[1]
  # Not var_from_torch here: the initial var was random, not 1; one step
  # mixes 0.8 * old + 0.2 * batch, batch unbiased in torch.
  old = w.state["var"]
  torch_batch = (bn.running_var.numpy() - 0.8 * np.asarray(old)) / 0.2
  jbn_batch = (np.asarray(state["var"]) - 0.8 * np.asarray(old)) / 0.2
  np.testing.assert_allclose(jbn_batch * n / (n - 1), torch_batch, rtol=1e-4)


# ---------------------------------------------------------------------------
# Running variance: unbiased (torch) -> biased (jbn)


def test_var_from_torch_reproduces_jbn_running_var(rng):
  """5 identical steps on both sides: the conversion gives jbn's running
  variance to float32 precision; the naive n/(n-1) rescaling does not."""
  bn = torch.nn.BatchNorm2d(3, momentum=0.1)
  params, state = jbn.init(3)
  batches = [rng.normal(0.5, 1.5, (4, 3, 2, 2)).astype(np.float32)
             for _ in range(5)]
  for x in batches:
    bn.train()(torch.from_numpy(x))
    _, state = jbn.batch_norm(params, state, x, True, axis=1,
                              momentum=interop.momentum_from_torch(0.1))
  # An independent float64 account of jbn's recurrence.
  var64 = np.ones(3)
  for x in batches:
    var64 = 0.9 * var64 + 0.1 * x.astype(np.float64).var(axis=(0, 2, 3))
  np.testing.assert_allclose(state["var"], var64, rtol=1e-6)

  n, count = 4 * 2 * 2, int(bn.num_batches_tracked)
  assert count == 5
  converted = interop.var_from_torch(bn.running_var, n=n, torch_momentum=0.1,
                                     num_batches_tracked=count)
  naive = bn.running_var.numpy() * (n - 1) / n
  err = np.max(np.abs(np.asarray(converted) - var64) / var64)
  naive_err = np.max(np.abs(naive - var64) / var64)
  assert err < 1e-6, err
  assert naive_err > 1e-2, naive_err  # (1 - p)^T / n = 0.037 absolute
  np.testing.assert_allclose(np.abs(naive - var64), 0.9**5 / n, rtol=1e-4)
  # And back: jbn's biased var as torch's unbiased one.
  back = interop.var_to_torch(state["var"], n=n, torch_momentum=0.1,
                              num_batches_tracked=count)
  np.testing.assert_allclose(back, bn.running_var, rtol=1e-6)


def test_var_conversion_with_no_steps_is_identity():
  for p in (0.1, None):
    got = interop.var_from_torch(np.ones(2), n=8, torch_momentum=p,
                                 num_batches_tracked=0)
    np.testing.assert_array_equal(got, np.ones(2))


# ---------------------------------------------------------------------------
# Layer level: Keras 3 (JAX backend)


def keras_bn(rng, shape, **kwargs):
  layer = keras.layers.BatchNormalization(**kwargs)
  layer.build((None, *shape[1:]))
  for v in layer.weights:
    c = v.shape
    value = {"gamma": rng.uniform(0.5, 2, c), "beta": rng.normal(0, 1, c),
             "moving_mean": rng.normal(0, 1, c),
             "moving_variance": rng.uniform(1e-3, 2e-3, c)}[v.name]
    v.assign(value.astype(np.float32))
  return layer


@pytest.mark.parametrize("center,scale", [(True, True), (False, True),
                                          (True, False), (False, False)])
@pytest.mark.parametrize("axis", [-1, 1])
def test_keras_eval_outputs_match(center, scale, axis, rng):
  shape = (4, 5, 3, 6)
  layer = keras_bn(rng, shape, axis=axis, center=center, scale=scale)
  x = rng.normal(0, 0.05, shape).astype(np.float32)
  want = np.asarray(layer(x, training=False))
  w = interop.from_keras_batch_norm(layer)
  assert w.epsilon == 1e-3 == layer.epsilon  # Keras's default, carried
  assert ("scale" in w.params) == scale and ("bias" in w.params) == center
  y, _ = jbn.batch_norm(w.params, w.state, x, False, axis=axis,
                        epsilon=w.epsilon)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  ref64 = np64_eval(x, w.params.get("scale"), w.params.get("bias"),
                    w.state["mean"], w.state["var"], 1e-3, axis=axis)
  np.testing.assert_allclose(y, ref64, rtol=1e-5, atol=1e-5)
  # jbn's default epsilon instead, at variances in [1e-3, 2e-3]: the
  # centred outputs grow by a factor sqrt((v + 1e-3) / (v + 1e-5)) >= 1.22.
  y_wrong, _ = jbn.batch_norm(w.params, w.state, x, False, axis=axis)
  bias = 0.0
  if center:
    bias = np.asarray(w.params["bias"]).reshape(
        [-1 if a == axis % x.ndim else 1 for a in range(x.ndim)])
  ratio = (np.asarray(y_wrong) - bias) / (want - bias)
  assert np.all(ratio > 1.2), ratio.min()


def test_keras_train_step_matches(rng):
  """Same momentum convention and biased variance: one Keras training step
  and one jbn step give the same outputs and moving statistics."""
  shape = (8, 5)
  layer = keras_bn(rng, shape, momentum=0.9)
  x = rng.normal(1, 2, shape).astype(np.float32)
  w = interop.from_keras_batch_norm(layer)
  want = np.asarray(layer(x, training=True))
  y, state = jbn.batch_norm(w.params, w.state, x, True, momentum=0.9,
                            epsilon=w.epsilon)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["mean"], layer.moving_mean, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(state["var"], layer.moving_variance, rtol=1e-5)


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, False)])
def test_jbn_to_keras_and_back(use_scale, use_bias, rng):
  params, state = jbn.init(5, use_scale=use_scale, use_bias=use_bias)
  params = {k: v + rng.uniform(0.5, 1, 5).astype(np.float32)
            for k, v in params.items()}
  state = {"mean": jnp.asarray(rng.normal(0, 1, 5), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32)}
  layer = keras.layers.BatchNormalization(epsilon=1e-5)
  layer.build((None, 5))
  written = interop.to_keras_batch_norm(params, state, layer, epsilon=1e-5)
  assert sorted(written) == ["beta", "gamma", "moving_mean", "moving_variance"]
  x = rng.normal(0, 1, (3, 5)).astype(np.float32)
  y, _ = jbn.batch_norm(params, state, x, False, epsilon=1e-5)
  np.testing.assert_allclose(layer(x, training=False), y, rtol=1e-6,
                             atol=1e-6)
  w = interop.from_keras_batch_norm(layer)
  for key, value in {**params, **state}.items():
    tree = w.params if key in ("scale", "bias") else w.state
    np.testing.assert_array_equal(tree[key], value)


# ---------------------------------------------------------------------------
# Model level


class TorchNet(torch.nn.Module):
  """conv -> BN -> relu -> 1x1 conv (bias) -> mean -> Linear -> LayerNorm."""

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(4, momentum=0.2, eps=1e-4)
    self.proj = torch.nn.Conv2d(4, 6, 1)
    self.fc = torch.nn.Linear(6, 5)
    self.norm = torch.nn.LayerNorm(5)

  def forward(self, x):
    x = F.relu(self.bn(self.conv(x)))
    return self.norm(self.fc(self.proj(x).mean(dim=(2, 3))))


class FlaxNet(nn.Module):
  """TorchNet in Flax, NHWC."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv")(x)
    x = jbn.linen.BatchNorm(use_running_average=not train,
                            momentum=interop.momentum_from_torch(0.2),
                            epsilon=1e-4, name="bn")(x)
    x = nn.Conv(6, (1, 1), name="proj")(nn.relu(x)).mean(axis=(1, 2))
    return nn.LayerNorm(epsilon=1e-5, name="norm")(nn.Dense(5, name="fc")(x))


@pytest.fixture(scope="module")
def trained_torch_net():
  torch.manual_seed(0)
  net = TorchNet()
  rng = np.random.default_rng(1)
  opt = torch.optim.SGD(net.parameters(), lr=0.1)
  net.train()
  for _ in range(3):
    x = torch.from_numpy(rng.normal(0.5, 1, (6, 3, 5, 5)).astype(np.float32))
    loss = (net(x) - 1.0).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
  with torch.no_grad():  # non-trivial LayerNorm and BN affine parameters
    net.norm.weight.mul_(1.5)
    net.norm.bias.add_(0.25)
    net.bn.weight.add_(0.5)
  return net


def flax_template():
  return jax.eval_shape(lambda: FlaxNet().init(
      jax.random.key(0), jnp.zeros((1, 5, 5, 3)), train=False))


def test_torch_to_flax_model_matches_torch(trained_torch_net, rng):
  net = trained_torch_net
  sd = net.state_dict()
  variables = interop.torch_to_flax(sd, lambda p: p, template=flax_template())
  np.testing.assert_array_equal(variables["params"]["conv"]["kernel"],
                                sd["conv.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"],
                                sd["fc.weight"].numpy().T)
  assert "num_batches_tracked" not in str(jax.tree.structure(variables))
  x = rng.normal(0.5, 1, (4, 3, 5, 5)).astype(np.float32)
  x_nhwc = x.transpose(0, 2, 3, 1)
  with torch.no_grad():
    want = net.eval()(torch.from_numpy(x)).numpy()
  got = FlaxNet().apply(variables, x_nhwc, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # One training step on both sides: same outputs and running statistics.
  copy = TorchNet()
  copy.load_state_dict(sd, strict=True)
  want_train = copy.train()(torch.from_numpy(x)).detach().numpy()
  got_train, updates = FlaxNet().apply(variables, x_nhwc, train=True,
                                       mutable=["batch_stats"])
  np.testing.assert_allclose(got_train, want_train, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"],
                             copy.bn.running_mean, rtol=1e-5, atol=1e-6)


def test_flax_to_torch_loads_strict_and_matches(trained_torch_net, rng):
  net = trained_torch_net
  sd = net.state_dict()
  variables = interop.torch_to_flax(sd, lambda p: p)
  # Round trip torch -> Flax -> torch: bitwise, num_batches_tracked included.
  back = interop.flax_to_torch(variables, lambda p: p, net,
                               num_batches_tracked=sd["bn.num_batches_tracked"])
  assert list(back) == list(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
  # Changed Flax variables -> a fresh torch model computing the same function.
  variables = jax.tree.map(lambda a: a * 1.1 + 0.01, variables)
  fresh = TorchNet()
  result = fresh.load_state_dict(
      interop.flax_to_torch(variables, lambda p: p, fresh,
                            num_batches_tracked=12), strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  assert int(fresh.bn.num_batches_tracked) == 12
  x = rng.normal(0.5, 1, (4, 3, 5, 5)).astype(np.float32)
  with torch.no_grad():
    want = fresh.eval()(torch.from_numpy(x)).numpy()
  got = FlaxNet().apply(variables, x.transpose(0, 2, 3, 1), train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_kernels(dims, rng):
  conv = {1: torch.nn.Conv1d, 3: torch.nn.Conv3d}[dims](2, 3, 2)
  variables = interop.torch_to_flax(conv.state_dict(), {"": "conv"})
  x = rng.normal(0, 1, (2, 2) + (4,) * dims).astype(np.float32)
  with torch.no_grad():
    want = conv(torch.from_numpy(x)).numpy()
  got = nn.Conv(3, (2,) * dims, padding="VALID").apply(
      {"params": variables["params"]["conv"]},
      np.moveaxis(x, 1, -1))
  np.testing.assert_allclose(np.moveaxis(np.asarray(got), -1, 1), want,
                             rtol=1e-5, atol=1e-6)
  back = interop.flax_to_torch(variables, {"": "conv"}, conv,
                               num_batches_tracked=0)
  assert torch.equal(back["weight"], conv.weight)


# ---------------------------------------------------------------------------
# The example


def test_from_torch_example_smoke(capsys):
  from examples import from_torch  # pylint: disable=import-outside-toplevel
  results = from_torch.main(["--torch-steps", "2", "--jax-steps", "2",
                             "--batch-size", "8", "--eval-size", "8"])
  for key in ("eval_before", "train_mode", "eval_after"):
    assert results[key] <= 1e-5, (key, results)
  assert results["fine_tune_change"] > 1e-3  # the fine-tune changed the model
  out = capsys.readouterr().out
  assert "eval logits after the round trip" in out
  assert "load_state_dict(strict=True)" in out


def test_from_torch_example_name_map():
  from examples import from_torch  # pylint: disable=import-outside-toplevel
  assert from_torch.flax_name("layer2.0.downsample.1") == (
      "stage1_block0/shortcut/bn")
  with pytest.raises(ValueError, match="no Flax name"):
    from_torch.flax_name("layer2.0.relu")


# ---------------------------------------------------------------------------
# Errors: every message interop raises


def _bn_sd(c=3):
  return torch.nn.BatchNorm2d(c).state_dict()


def _jbn(c=3):
  return jbn.init(c)


def _keras_layer(**kwargs):
  layer = keras.layers.BatchNormalization(**kwargs)
  layer.build((None, 3))
  return layer


_TORCH_NET_NAMES = {"conv": "conv", "bn": "bn", "proj": "proj", "fc": "fc",
                    "norm": "norm"}

ERRORS = {
    # momentum and variance helpers
    "cumulative_needs_count": (
        lambda: interop.momentum_from_torch(None), "cumulative average"),
    "negative_count": (
        lambda: interop.momentum_from_torch(None, num_batches_tracked=-1),
        r"num_batches_tracked=-1 must be an int >= 0"),
    "torch_momentum_range": (
        lambda: interop.momentum_from_torch(1.5),
        r"torch_momentum=1.5 must be a number in \[0, 1\]"),
    "momentum_range": (
        lambda: interop.momentum_to_torch(-0.1),
        r"momentum=-0.1 must be a number in \[0, 1\]"),
    "momentum_type": (
        lambda: interop.momentum_to_torch("0.9"),
        r"momentum='0.9' must be a number"),
    "n_too_small": (
        lambda: interop.var_from_torch([1.0], n=1, torch_momentum=0.1,
                                       num_batches_tracked=1),
        r"n=1 must be an int >= 2"),
    "n_not_int": (
        lambda: interop.var_to_torch([1.0], n=2.5, torch_momentum=0.1,
                                     num_batches_tracked=1),
        r"n=2.5 must be an int >= 2"),
    "count_not_int": (
        lambda: interop.var_from_torch([1.0], n=4, torch_momentum=0.1,
                                       num_batches_tracked=1.5),
        r"num_batches_tracked=1.5 must be an int >= 0"),
    "var_torch_momentum": (
        lambda: interop.var_from_torch([1.0], n=4, torch_momentum=2,
                                       num_batches_tracked=1),
        r"torch_momentum=2 must be a number in \[0, 1\]"),
    # PyTorch layer
    "torch_eps_required": (
        lambda: interop.from_torch_batch_norm(_bn_sd()),
        "a PyTorch state dict does not store eps"),
    "torch_eps_mismatch": (
        lambda: interop.from_torch_batch_norm(torch.nn.BatchNorm1d(3),
                                              epsilon=1e-3),
        "but the module has eps=1e-05"),
    "torch_eps_positive": (
        lambda: interop.from_torch_batch_norm(_bn_sd(), epsilon=0.0),
        r"epsilon=0.0 must be a number > 0"),
    "torch_prefix": (
        lambda: interop.from_torch_batch_norm(
            {f"bn1.{k}": v for k, v in _bn_sd().items()}, epsilon=1e-5),
        r"unexpected keys \['bn1.bias'.*strip any module prefix"),
    "torch_no_running_stats": (
        lambda: interop.from_torch_batch_norm(
            torch.nn.BatchNorm2d(3, track_running_stats=False)),
        r"missing \['running_mean', 'running_var'\].*track_running_stats"),
    "torch_shapes": (
        lambda: interop.from_torch_batch_norm(
            {**_bn_sd(), "weight": torch.ones(4)}, epsilon=1e-5),
        r"weight has shape \(4,\).*\(C,\) of running_mean, \(3,\)"),
    "torch_not_1d": (
        lambda: interop.from_torch_batch_norm(
            {k: (v.reshape(1, 3) if v.ndim else v)
             for k, v in _bn_sd().items()}, epsilon=1e-5),
        r"has shape \(1, 3\)"),
    "torch_not_mapping": (
        lambda: interop.from_torch_batch_norm([1, 2], epsilon=1e-5),
        "or a mapping of its weights, got list"),
    "to_torch_count": (
        lambda: interop.to_torch_batch_norm(*_jbn(), num_batches_tracked=-2),
        r"num_batches_tracked=-2 must be an int >= 0"),
    "to_torch_unknown": (
        lambda: interop.to_torch_batch_norm(
            {"weight": jnp.ones(3)}, _jbn()[1], num_batches_tracked=0),
        r"unexpected keys \['weight'\]: expected params"),
    "to_torch_missing_var": (
        lambda: interop.to_torch_batch_norm(
            _jbn()[0], {"mean": jnp.zeros(3)}, num_batches_tracked=0),
        r"state is missing \['var'\]"),
    "to_torch_shapes": (
        lambda: interop.to_torch_batch_norm(
            {"scale": jnp.ones(4)}, _jbn()[1], num_batches_tracked=0),
        r"scale has shape \(4,\).*one feature axis"),
    "to_torch_not_mapping": (
        lambda: interop.to_torch_batch_norm((1, 2), _jbn()[1],
                                            num_batches_tracked=0),
        "params and state must be mappings"),
    # Keras layer
    "keras_eps_required": (
        lambda: interop.from_keras_batch_norm(
            {"moving_mean": np.zeros(3), "moving_variance": np.ones(3)}),
        "Keras weights do not store it"),
    "keras_eps_mismatch": (
        lambda: interop.from_keras_batch_norm(_keras_layer(), epsilon=1e-5),
        r"but the layer has epsilon=0.001"),
    "keras_path_names": (
        lambda: interop.from_keras_batch_norm(
            {"batch_normalization/moving_mean": np.zeros(3)}, epsilon=1e-3),
        r"unexpected keys \['batch_normalization/moving_mean'\]"),
    "keras_missing_stats": (
        lambda: interop.from_keras_batch_norm({"gamma": np.ones(3)},
                                              epsilon=1e-3),
        r"missing \['moving_mean', 'moving_variance'\]"),
    "keras_unbuilt": (
        lambda: interop.from_keras_batch_norm(
            keras.layers.BatchNormalization()),
        "is not built"),
    "keras_renorm": (
        lambda: interop.from_keras_batch_norm(_keras_layer(renorm=True)),
        "renorm=True"),
    "to_keras_layer_type": (
        lambda: interop.to_keras_batch_norm(*_jbn(), layer=object(),
                                            epsilon=1e-3),
        "must be a built keras.layers.BatchNormalization"),
    "to_keras_eps_required": (
        lambda: interop.to_keras_batch_norm(*_jbn(), layer=_keras_layer()),
        "epsilon is required with a layer"),
    "to_keras_eps_mismatch": (
        lambda: interop.to_keras_batch_norm(*_jbn(), layer=_keras_layer(),
                                            epsilon=1e-5),
        "would normalize differently"),
    "to_keras_no_gamma": (
        lambda: interop.to_keras_batch_norm(
            *_jbn(), layer=_keras_layer(scale=False), epsilon=1e-3),
        r"params has scale but the layer has no gamma \(built with "
        r"scale=False\)"),
    "to_keras_shapes": (
        lambda: interop.to_keras_batch_norm(
            *_jbn(4), layer=_keras_layer(), epsilon=1e-3),
        r"gamma has shape \(4,\) but the layer's has \(3,\)"),
    # Models: torch -> Flax
    "map_missing": (
        lambda: interop.torch_to_flax(TorchNet().state_dict(), {"conv": "c"}),
        "name_map has no Flax path for the torch module 'bn'"),
    "map_type": (
        lambda: interop.torch_to_flax(_bn_sd(), ["bn"]),
        "name_map must be a dict or a callable, got list"),
    "map_bad_path": (
        lambda: interop.torch_to_flax(TorchNet().state_dict(), lambda p: 3),
        "name_map gave 3 for the torch module 'conv'; expected a Flax path"),
    "map_empty_path": (
        lambda: interop.torch_to_flax(TorchNet().state_dict(),
                                      lambda p: "a//b"),
        "name_map gave 'a//b'"),
    "map_collision": (
        lambda: interop.torch_to_flax(TorchNet().state_dict(),
                                      lambda p: "same"),
        "sends torch modules 'conv' and 'bn' to the same Flax path 'same'"),
    "unknown_param": (
        lambda: interop.torch_to_flax(
            {"attn.in_proj_weight": np.ones((6, 2))}, lambda p: p),
        "torch key 'attn.in_proj_weight': no rule for a parameter named"),
    "unknown_bn_param": (
        lambda: interop.torch_to_flax(
            {**_bn_sd(), "extra": np.ones(3)}, {"": "bn"}),
        "torch key 'extra': no rule"),
    "bn_missing_var": (
        lambda: interop.torch_to_flax({"bn.running_mean": np.zeros(3)},
                                      lambda p: p),
        r"torch module 'bn' has running statistics but not \['running_var'\]"),
    "weight_rank": (
        lambda: interop.torch_to_flax({"w.weight": np.ones((1,) * 6)},
                                      lambda p: p),
        "torch key 'w.weight' has a weight of rank 6"),
    "template_missing": (
        lambda: interop.torch_to_flax(
            {k: v for k, v in TorchNet().state_dict().items()
             if not k.startswith("norm.")}, lambda p: p,
            template=flax_template()),
        r"the Flax model has \['params/norm/bias', 'params/norm/scale'\], "
        r"which no torch key maps to"),
    "template_extra": (
        lambda: interop.torch_to_flax(
            {**TorchNet().state_dict(), "head.weight": np.ones((2, 5))},
            lambda p: p, template=flax_template()),
        r"torch keys map to \['params/head/kernel'\], which the Flax model "
        r"does not have"),
    "template_shape": (
        lambda: interop.torch_to_flax(
            {**TorchNet().state_dict(), "fc.weight": np.ones((6, 5))},
            lambda p: p, template=flax_template()),
        r"params/fc/kernel: the converted array has shape \(5, 6\) but the "
        r"Flax model's has \(6, 5\)"),
    # Models: Flax -> torch
    "flax_missing_leaf": (
        lambda: interop.flax_to_torch(
            {"params": {}}, lambda p: p, TorchNet(), num_batches_tracked=0),
        "the Flax variables have no 'params/conv/kernel' for torch key "
        "'conv.weight'"),
    "flax_shape": (
        lambda: interop.flax_to_torch(
            interop.torch_to_flax(TorchNet().state_dict(), lambda p: p),
            lambda p: p,
            {**TorchNet().state_dict(), "fc.weight": torch.ones(5, 7)},
            num_batches_tracked=0),
        r"params/fc/kernel gives shape \(5, 6\) for torch key 'fc.weight', "
        r"which has shape \(5, 7\)"),
    "flax_unused": (
        lambda: interop.flax_to_torch(
            interop.torch_to_flax(TorchNet().state_dict(), lambda p: p),
            lambda p: p,
            {k: v for k, v in TorchNet().state_dict().items()
             if not k.startswith("fc.")}, num_batches_tracked=0),
        r"Flax variables \['params/fc/bias', 'params/fc/kernel'\] are not "
        r"used by any torch key"),
    "flax_count": (
        lambda: interop.flax_to_torch({}, lambda p: p, TorchNet(),
                                      num_batches_tracked=None),
        "num_batches_tracked=None must be an int >= 0"),
    "flax_unknown_template_key": (
        lambda: interop.flax_to_torch({}, lambda p: p,
                                      {"attn.in_proj_bias": torch.ones(3)},
                                      num_batches_tracked=0),
        "torch key 'attn.in_proj_bias': no rule"),
    "flax_unknown_bn_key": (
        lambda: interop.flax_to_torch({}, {"": "bn"},
                                      {**_bn_sd(), "extra": torch.ones(3)},
                                      num_batches_tracked=0),
        "torch key 'extra': no rule"),
    "flax_template_rank": (
        lambda: interop.flax_to_torch({}, lambda p: p,
                                      {"w.weight": torch.ones((1,) * 6)},
                                      num_batches_tracked=0),
        "torch key 'w.weight' has a weight of rank 6"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_messages(name):
  fn, match = ERRORS[name]
  with pytest.raises(ValueError, match=match):
    fn()
