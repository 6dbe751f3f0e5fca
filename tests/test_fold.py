"""jbn.fold_batch_norm against the unfolded layers in evaluation mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jbn

EPS = 1e-3


def bn_vars(rng, c, *, use_scale=True, use_bias=True):
  params = {}
  if use_scale:
    params["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
  if use_bias:
    params["bias"] = jnp.asarray(rng.normal(size=c), jnp.float32)
  state = {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.1, 3.0, c), jnp.float32)}
  return params, state


def conv(x, kernel, bias, dims):
  y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                               dimension_numbers=dims)
  if bias is not None:
    y = y + bias.reshape((1, -1, 1, 1) if dims[0] == "NCHW" else (-1,))
  return y


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True),
                                                (True, False)])
@pytest.mark.parametrize("jit", [False, True])
def test_fold_dense(rng, with_bias, use_scale, use_bias, jit):
  x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=3), jnp.float32) if with_bias else None
  params, state = bn_vars(rng, 3, use_scale=use_scale, use_bias=use_bias)
  z = x @ kernel + (0 if bias is None else bias)
  expected, _ = jbn.batch_norm(params, state, z, train=False, epsilon=EPS)
  fold = jax.jit(jbn.fold_batch_norm, static_argnames="epsilon") if jit else (
      jbn.fold_batch_norm)
  k, b = fold(kernel, bias, params, state, epsilon=EPS)
  assert k.shape == kernel.shape and b.shape == (3,)
  np.testing.assert_allclose(x @ k + b, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_conv_hwio(rng, with_bias):
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=4), jnp.float32) if with_bias else None
  params, state = bn_vars(rng, 4)
  dims = ("NHWC", "HWIO", "NHWC")
  expected, _ = jbn.batch_norm(params, state, conv(x, kernel, bias, dims),
                               train=False, epsilon=EPS)
  k, b = jbn.fold_batch_norm(kernel, bias, params, state, epsilon=EPS)
  np.testing.assert_allclose(conv(x, k, b, dims), expected, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_conv_oihw_with_nchw_batch_norm(rng, with_bias):
  # PyTorch layout: kernel (out, in, H, W), batch norm on axis 1 of NCHW.
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 3, 3, 3)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=4), jnp.float32) if with_bias else None
  params, state = bn_vars(rng, 4)
  dims = ("NCHW", "OIHW", "NCHW")
  expected, _ = jbn.batch_norm(params, state, conv(x, kernel, bias, dims),
                               train=False, axis=1, epsilon=EPS)
  k, b = jbn.fold_batch_norm(kernel, bias, params, state, epsilon=EPS,
                             feature_axis=0)
  np.testing.assert_allclose(conv(x, k, b, dims), expected, rtol=1e-5,
                             atol=1e-5)


def test_fold_keeps_the_kernel_dtype(rng):
  kernel = jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16)
  params, state = bn_vars(rng, 2)
  k, b = jbn.fold_batch_norm(kernel, None, params, state, epsilon=EPS)
  assert k.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16


def test_fold_uses_the_given_epsilon(rng):
  kernel = jnp.ones((2, 2))
  params, state = bn_vars(rng, 2)
  k1, _ = jbn.fold_batch_norm(kernel, None, params, state, epsilon=1e-5)
  k2, _ = jbn.fold_batch_norm(kernel, None, params, state, epsilon=1.0)
  assert not np.allclose(k1, k2)


def test_fold_feature_axis_out_of_range(rng):
  params, state = bn_vars(rng, 2)
  with pytest.raises(ValueError, match=r"feature_axis=2 is out of range for a "
                     r"kernel of shape \(3, 2\)"):
    jbn.fold_batch_norm(jnp.ones((3, 2)), None, params, state, epsilon=EPS,
                        feature_axis=2)


def test_fold_shape_mismatch_names_the_argument(rng):
  params, state = bn_vars(rng, 3)
  with pytest.raises(ValueError, match=r"bn_state\['mean'\] has shape \(3,\), "
                     r"but the kernel of shape \(3, 2\) has 2 output features"):
    jbn.fold_batch_norm(jnp.ones((3, 2)), None, params, state, epsilon=EPS)


def test_fold_bias_shape_mismatch(rng):
  params, state = bn_vars(rng, 2)
  with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
    jbn.fold_batch_norm(jnp.ones((3, 2)), jnp.ones(3), params, state,
                        epsilon=EPS)


def test_fold_without_running_statistics(rng):
  params, _ = bn_vars(rng, 2)
  with pytest.raises(ValueError, match=r"bn_state is missing \['var'\]"):
    jbn.fold_batch_norm(jnp.ones((3, 2)), None, params,
                        {"mean": jnp.zeros(2)}, epsilon=EPS)


@pytest.mark.parametrize("epsilon", [0.0, -1e-5])
def test_fold_epsilon_must_be_positive(rng, epsilon):
  params, state = bn_vars(rng, 2)
  with pytest.raises(ValueError, match="epsilon=.* must be a number > 0"):
    jbn.fold_batch_norm(jnp.ones((3, 2)), None, params, state,
                        epsilon=epsilon)


def test_fold_epsilon_is_required(rng):
  params, state = bn_vars(rng, 2)
  with pytest.raises(TypeError, match="epsilon"):
    jbn.fold_batch_norm(jnp.ones((3, 2)), None, params, state)  # pylint: disable=missing-kwoa
