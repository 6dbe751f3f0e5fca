"""Test configuration: 4 CPU devices, forced before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh():
  """A 1-D mesh over the 4 forced CPU devices, axis 'batch' (Auto axes)."""
  assert jax.device_count() == 4, "conftest must set XLA_FLAGS before jax"
  return jax.sharding.Mesh(np.array(jax.devices()), ("batch",))


@pytest.fixture
def rng():
  return np.random.default_rng(0)
