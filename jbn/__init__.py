"""jbn: batch normalization for JAX, done right.

One pure function (:func:`batch_norm`) with its initializer (:func:`init`);
Flax wrappers live in :mod:`jbn.linen` and :mod:`jbn.nnx` (imported on
demand, so ``import jbn`` does not import Flax).
"""

from jbn._functional import batch_norm
from jbn._functional import init

__version__ = "0.1.0"

__all__ = (
    "batch_norm",
    "init",
)
