"""What XLA gets on each platform: the CPU fusion workaround stays on CPU.

jbn gives XLA:CPU's sibling reductions private operands behind chains of
``optimization_barrier`` (jbn._cpu). On GPU and TPU those barriers would stop
XLA from fusing the sibling reductions into one read, so they must not be
there: ``lax.platform_dependent`` picks the branch when the program is
lowered. These tests lower train steps for 'cpu', 'cuda' and 'tpu' on this
CPU machine with ``jax.export`` and read the StableHLO.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

SHAPE = (16, 4, 4, 8)


def _train_step(mask=False, **kw):
  params, state = jbn.init(SHAPE[-1])
  m = (jnp.arange(SHAPE[0]) % 3 > 0)[:, None, None] if mask else None

  def step(params, x):
    def loss(p, x):
      y, new = jbn.batch_norm(p, state, x, True, mask=m, **kw)
      return jnp.sum(y.astype(jnp.float32) ** 2), new
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return step, params


def _module(platform, dtype=jnp.float32, **kw):
  step, params = _train_step(**kw)
  x = jax.ShapeDtypeStruct(SHAPE, dtype)
  exported = jax.export.export(jax.jit(step), platforms=[platform])(params, x)
  return exported.mlir_module()


VARIANTS = {
    "f32": dict(),
    "bf16": dict(dtype=jnp.bfloat16),
    "mask": dict(mask=True),
    "renorm": dict(renorm=jbn.RenormClip(2.0, 1.0)),
    "ghost": dict(ghost_batch_size=4),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_no_barrier_on_gpu_and_tpu(platform, variant):
  text = _module(platform, **VARIANTS[variant])
  assert "optimization_barrier" not in text


@pytest.mark.parametrize("variant", VARIANTS)
def test_barriers_on_cpu(variant):
  # Forward statistics (2 copies), the rematerialized x - mean (2 copies)
  # and the cotangent's fan-in chain (2 barriers).
  text = _module("cpu", **VARIANTS[variant])
  assert text.count("stablehlo.optimization_barrier") >= 6


def _returns_of_duplicates(text):
  """Branch returns handing one value out twice (``return %a, %a``)."""
  return re.findall(r"stablehlo\.return (%[\w#]+), \1 :", text)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_sibling_reductions_read_one_operand_on_gpu_and_tpu(platform):
  """The statistics' two sums read one ``x - shift`` (so XLA fuses them into
  one pass), as does the tangent's ``x - mean``; on CPU each has its own."""
  accel = _returns_of_duplicates(_module(platform))
  cpu = _returns_of_duplicates(_module("cpu"))
  assert len(accel) >= 2, accel
  assert len(cpu) < len(accel)


def test_multi_platform_export_runs_on_cpu_with_the_same_numbers(rng):
  step, params = _train_step()
  x = jnp.asarray(rng.normal(size=SHAPE) + 2, jnp.float32)
  exported = jax.export.export(jax.jit(step), platforms=["cpu", "cuda",
                                                         "tpu"])(params, x)
  got = exported.call(params, x)
  want = jax.jit(step)(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-6), got, want)
