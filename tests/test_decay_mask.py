"""jbn.decay_mask: skip batch norm params in optax weight decay."""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import jbn
import jbn.linen
import jbn.nnx

LR, WD = 0.1, 0.5


class LinenNet(nn.Module):
  """Conv -> BN, a nested block with a user-named BN, LayerNorm, Dense."""

  @nn.compact
  def __call__(self, x):
    x = jbn.linen.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))

    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Dense(4, use_bias=False)(x)
        return nn.BatchNorm(use_running_average=True, name="bn1")(x)

    x = Block()(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(2)(x)


@pytest.fixture(scope="module")
def linen_params():
  shapes = jax.eval_shape(LinenNet().init, jax.random.key(0),
                          jnp.ones((1, 4, 4, 1)))["params"]
  return jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), shapes)


LINEN_MASK = {
    "Conv_0": {"kernel": True, "bias": True},
    "BatchNorm_0": {"scale": False, "bias": False},
    "Block_0": {"Dense_0": {"kernel": True},
                "bn1": {"scale": False, "bias": False}},
    "LayerNorm_0": {"scale": False, "bias": False},
    "Dense_0": {"kernel": True, "bias": True},
}


def test_linen_mask_skips_every_norm_param(linen_params):
  assert jbn.decay_mask(linen_params) == LINEN_MASK


def test_exclude_biases_also_skips_dense_and_conv_biases(linen_params):
  mask = jbn.decay_mask(linen_params, exclude_biases=True)
  expected = jax.tree.map(lambda m: m, LINEN_MASK)
  expected["Conv_0"]["bias"] = expected["Dense_0"]["bias"] = False
  assert mask == expected


def test_containers_frozendict_lists_and_jbn_init_dicts():
  bn_params, _ = jbn.init(3)
  tree = [{"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
          {"my_norm": bn_params},
          {"scale": jnp.ones(3)}]  # RMSNorm-like: scale alone
  assert jbn.decay_mask(tree) == [{"kernel": True, "bias": True},
                                  {"my_norm": {"scale": False, "bias": False}},
                                  {"scale": False}]
  frozen = jbn.decay_mask(FrozenDict({"bn": bn_params, "w": jnp.ones(2)}))
  assert frozen == FrozenDict({"bn": {"scale": False, "bias": False},
                               "w": True})


def test_scale_next_to_other_params_is_decayed():
  # A learned 'scale' inside a module that also has a kernel is no norm.
  params = {"attn": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(())}}
  assert jbn.decay_mask(params) == {"attn": {"kernel": True, "scale": True}}


def test_boxed_params_get_a_bool_in_place_of_the_box():
  class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(3, kernel_init=nn.with_partitioning(
          nn.initializers.ones, (None, "model")))(x)
      return jbn.linen.BatchNorm(use_running_average=True, scale_init=(
          nn.with_partitioning(nn.initializers.ones, ("model",))))(x)

  boxed = jax.eval_shape(Boxed().init, jax.random.key(0),
                         jnp.ones((2, 2)))["params"]
  mask = jbn.decay_mask(boxed)
  assert mask == jbn.decay_mask(nn.unbox(boxed))
  assert mask["BatchNorm_0"] == {"scale": False, "bias": False}


def _zero_grad_step(tx, params):
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, state, params)
  return optax.apply_updates(params, updates)


@pytest.mark.parametrize("mask", [
    "callable", "precomputed", "partial_exclude_biases"])
def test_adamw_step_leaves_bn_params_and_decays_kernels(linen_params, mask):
  exclude_biases = mask == "partial_exclude_biases"
  mask_arg = {
      "callable": jbn.decay_mask,
      "precomputed": jbn.decay_mask(linen_params),
      "partial_exclude_biases": functools.partial(jbn.decay_mask,
                                                  exclude_biases=True),
  }[mask]
  tx = optax.adamw(LR, weight_decay=WD, mask=mask_arg)
  new = _zero_grad_step(tx, linen_params)
  expected_mask = jbn.decay_mask(linen_params, exclude_biases=exclude_biases)
  expected = jax.tree.map(lambda p, m: p * (1 - LR * WD) if m else p,
                          linen_params, expected_mask)
  jax.tree.map(np.testing.assert_array_equal, new, expected)
  np.testing.assert_array_equal(new["Block_0"]["bn1"]["scale"], 2.0)
  np.testing.assert_allclose(new["Conv_0"]["kernel"], 2.0 * (1 - LR * WD),
                             rtol=1e-6)


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 2, (3, 3), rngs=rngs)
    self.bn = jbn.nnx.BatchNorm(2, rngs=rngs)


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(2)])
    self.norm = nnx.BatchNorm(2, rngs=rngs)
    self.head = nnx.Linear(2, 3, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = nnx.relu(block.bn(block.conv(x)))
    return self.head(self.norm(x).mean((1, 2)))


NNX_MASK = {
    "blocks": {i: {"conv": {"kernel": True, "bias": True},
                   "bn": {"scale": False, "bias": False}} for i in range(2)},
    "norm": {"scale": False, "bias": False},
    "head": {"kernel": True, "bias": True},
}


def test_nnx_state_mask():
  model = NnxNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  for tree in (params, nnx.as_pure(params)):
    mask = jbn.decay_mask(tree)
    assert isinstance(mask, nnx.State)
    assert nnx.to_pure_dict(mask) == NNX_MASK
  # A whole state (running statistics beside scale/bias) gives the same.
  mask = nnx.to_pure_dict(jbn.decay_mask(nnx.state(model)))
  for bn in (mask["norm"], *(b["bn"] for b in mask["blocks"].values())):
    assert (bn.pop("mean"), bn.pop("var")) == (True, True)
  assert mask == NNX_MASK


@pytest.mark.parametrize("mask", ["callable", "precomputed"])
def test_nnx_optimizer_step_leaves_bn_params_and_decays_kernels(mask):
  model = NnxNet(nnx.Rngs(0))
  mask_arg = (jbn.decay_mask if mask == "callable"
              else jbn.decay_mask(nnx.state(model, nnx.Param)))
  optimizer = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WD,
                                               mask=mask_arg),
                            wrt=nnx.Param)
  before = nnx.to_pure_dict(nnx.clone(nnx.state(model, nnx.Param)))
  zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zero)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for i in range(2):
    for name in ("scale", "bias"):
      np.testing.assert_array_equal(after["blocks"][i]["bn"][name],
                                    before["blocks"][i]["bn"][name])
    np.testing.assert_allclose(after["blocks"][i]["conv"]["kernel"],
                               before["blocks"][i]["conv"]["kernel"]
                               * (1 - LR * WD), rtol=1e-6)
  np.testing.assert_array_equal(after["norm"]["scale"], 1.0)
  np.testing.assert_allclose(after["head"]["kernel"],
                             before["head"]["kernel"] * (1 - LR * WD),
                             rtol=1e-6)


def test_import_jbn_does_not_import_flax():
  code = "import jbn, sys; jbn.decay_mask({}); assert 'flax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
