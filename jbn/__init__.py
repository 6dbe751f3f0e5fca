"""jbn: batch normalization for JAX, done right.

One pure function (:func:`batch_norm`) with its initializer (:func:`init`);
Flax wrappers live in :mod:`jbn.linen` and :mod:`jbn.nnx` (imported on
demand, so ``import jbn`` does not import Flax).
"""

from jbn._decay import decay_mask
from jbn._fold import fold_batch_norm
from jbn._functional import batch_norm
from jbn._functional import init

__version__ = "0.1.0"

__all__ = (
    "batch_norm",
    "decay_mask",
    "fold_batch_norm",
    "init",
)
