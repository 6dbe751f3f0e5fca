"""jbn: batch normalization for JAX, done right.

One pure function (:func:`batch_norm`) with its initializer (:func:`init`),
its building blocks (:func:`moments`, :func:`merge_moments`,
:func:`moments_mean_var`), training modes (:class:`RenormClip`,
:func:`renorm_clip`) and tools for inference (:func:`fold_batch_norm`) and
optimizers (:func:`decay_mask`). Flax wrappers live in :mod:`jbn.linen` and
:mod:`jbn.nnx` (imported on demand, so ``import jbn`` does not import Flax).
"""

from jbn._decay import decay_mask
from jbn._fold import fold_batch_norm
from jbn._functional import batch_norm
from jbn._functional import init
from jbn._modes import RenormClip
from jbn._modes import renorm_clip
from jbn._moments import Moments
from jbn._moments import merge_moments
from jbn._moments import moments
from jbn._moments import moments_mean_var
from jbn._recalibrate import recalibrate
from jbn._running import upgrade_state

__version__ = "0.2.0"

__all__ = (
    "Moments",
    "RenormClip",
    "batch_norm",
    "decay_mask",
    "fold_batch_norm",
    "init",
    "merge_moments",
    "moments",
    "moments_mean_var",
    "recalibrate",
    "renorm_clip",
    "upgrade_state",
)
