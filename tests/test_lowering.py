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


# --------------------------------------------------------------------------
# Small sums: folded on CPU (jbn._cpu.reduce_sum, tile), reductions elsewhere


FOLD_CASES = [  # whole folds (<= 8 values, odd sizes), partial, none
    ((3, 8, 5), (1,)), ((2, 7, 3), (1,)), ((9, 4), (0,)), ((2, 5, 1, 4), (1, 2)),
    ((2, 1, 3), (1,)), ((2, 3, 2, 4), (1, 2)), ((48, 3), (0,)),
    ((3, 4, 16, 2), (1, 2)), ((2, 3, 5, 32, 2), (1, 2, 3)), ((2, 9, 3), (1,)),
    ((40, 3), (0,))]


@pytest.mark.parametrize("shape,axes", FOLD_CASES,
                         ids=["x".join(map(str, s)) for s, _ in FOLD_CASES])
def test_folded_sum_and_tile_are_a_sum_and_a_broadcast(rng, shape, axes):
  from jbn import _cpu
  d = rng.normal(size=shape).astype(np.float32)
  want = d.astype(np.float64).sum(axes, keepdims=True)
  # The deterministic bound of any summation order: (n - 1) eps sum |d|.
  n = np.prod([shape[a] for a in axes])
  bound = (n - 1) * np.finfo(np.float32).eps * np.abs(d).astype(
      np.float64).sum(axes, keepdims=True) + 1e-7
  got = jax.jit(lambda d: _cpu.reduce_sum(d, axes))(d)
  assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want))
  w = rng.normal(size=want.shape).astype(np.float32)
  np.testing.assert_array_equal(
      jax.jit(lambda w: _cpu.tile(w, shape, axes))(w),
      np.broadcast_to(w, shape))
  # Reverse mode through tile is the fold: the sum of the cotangent.
  (back,) = jax.linear_transpose(lambda w: _cpu.tile(w, shape, axes), w)(d)
  assert np.all(np.abs(back - want) <= bound), np.max(np.abs(back - want))


def _compiled_fwd_bwd(shape, dtype, **mode):
  """The CPU-compiled HLO of a train step's fwd+bwd (jax.vjp) and state."""
  params, state = jbn.init(shape[-1])
  x = jax.ShapeDtypeStruct(shape, dtype)

  def fwd_bwd(p, x, dy):
    (y, new), vjp = jax.vjp(
        lambda p, x: jbn.batch_norm(p, state, x, True, **mode), p, x)
    return y, vjp((dy, jax.tree.map(jnp.zeros_like, new))), new
  return jax.jit(fwd_bwd).lower(params, x, x).compile().as_text()


def _reductions(hlo: str) -> list[tuple[list[int], list[int]]]:
  """``(operand shape, output shape)`` of each reduction in compiled HLO."""
  dims = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
  found = []
  for comp in hlo.split("\n\n"):
    shapes = dict(re.findall(r"(%[\w.\-]+) = \w+\[([\d,]*)\]", comp))
    for out, arg in re.findall(
        r"= \w+\[([\d,]*)\]\S* reduce\((%[\w.\-]+)", comp):
      found.append((dims(shapes[arg]), dims(out)))
  return found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(256, 128), (64, 8, 8, 16)],
                         ids=["2d", "4d"])
def test_ghost_sums_fold_before_any_reduction_on_cpu(shape, dtype):
  """On CPU, per-group sums add halves in a loop before any reduction.

  XLA:CPU (YNNPACK) reduces the middle axis of ``(groups, g, C)`` at a
  third of the speed of a loop adding halves (8 values per group, 2-D) and
  at half the speed of plain batch norm's leading axis (4-D): 2-D ghost
  fwd+bwd was 1.2-1.8x plain batch norm, 4-D 1.2-1.3x. Now no reduction of
  the compiled step reads more than 1/8 of x (2-D: the forward's sums are
  whole folds, the backward's transposed tiles; 4-D: partial folds, then
  reductions), while plain batch norm's read x itself.
  """
  largest = lambda hlo: max(  # noqa: E731
      int(np.prod(arg)) for arg, _ in _reductions(hlo))
  assert largest(_compiled_fwd_bwd(shape, dtype)) == np.prod(shape)
  assert largest(_compiled_fwd_bwd(shape, dtype, ghost_batch_size=8)) <= (
      np.prod(shape) // 8)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_small_sums_stay_reductions_on_gpu_and_tpu(platform):
  """No folds or tiles (slices, concatenations) outside CPU."""
  step, params = _train_step(ghost_batch_size=4)
  x = jax.ShapeDtypeStruct((64, SHAPE[-1]), jnp.float32)  # groups of 4
  module = lambda p: jax.export.export(  # noqa: E731
      jax.jit(step), platforms=[p])(params, x).mlir_module()
  cpu, text = module("cpu"), module(platform)
  count = lambda op, t: len(re.findall(rf"stablehlo\.{op}\b", t))  # noqa
  # On CPU, the forward's two sums and the backward's two (the transposes
  # of tiles) are slices and adds; elsewhere they are reductions.
  assert count("reduce", cpu) + 4 <= count("reduce", text)
  assert count("slice", cpu) > count("slice", text) + 8


@pytest.mark.parametrize("shape", [(256, 128), (64, 8, 8, 16)],
                         ids=["2d", "4d"])
def test_reductions_over_ghost_groups_keep_no_size_one_axis(shape):
  """Sums over groups (dscale, dbias, the running update) reduce a
  ``(groups, features)`` view, never ``(groups, 1, C)`` keeping the 1.

  YNNPACK reduces axis 0 of a product of ``(128, 1, 4096)`` arrays 8x
  slower than of ``(128, 4096)`` (2.2 vs 0.28 ms): dscale alone took as
  long as the whole forward of a 2-D ghost step.
  """
  found = _reductions(_compiled_fwd_bwd(shape, jnp.float32,
                                        ghost_batch_size=8))
  assert len(found) >= 4, found
  assert not [r for r in found if 1 in r[1]], found
