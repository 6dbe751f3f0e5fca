"""``decay_mask``: the optax weight-decay mask that skips batch norm params.

Works on plain pytrees and never imports Flax: Flax containers (``nnx.State``,
``FrozenDict``) are walked as the pytrees they are, and Flax variable wrappers
(``nnx.Param``, ``nn.Partitioned``) are recognised only when Flax is already
imported (they cannot be in the tree otherwise).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import jax

_NORM_PARAMS = frozenset({"scale", "bias"})
# Running statistics may sit next to them when a whole nnx state is passed.
_NORM_SIBLINGS = _NORM_PARAMS | {"mean", "var"}


def decay_mask(params: Any, *, exclude_biases: bool = False) -> Any:
  """A boolean pytree for ``optax``'s ``mask=``: False for batch norm params.

  Weight decay on batch norm's ``scale`` and ``bias`` only fights the
  normalization (it shrinks gamma toward 0 for no regularization benefit),
  so common practice skips them. This mask is True (decay) everywhere except:

  * **normalization parameters**: a leaf named ``'scale'`` or ``'bias'``
    whose siblings (the other entries of the same module or dict) are all
    named ``'scale'``, ``'bias'``, ``'mean'`` or ``'var'``. That is every
    batch norm layer, jbn's or Flax's, linen or nnx, whatever the layer is
    called (``BatchNorm_0``, ``bn1``, a ``jbn.init`` dict), and also
    ``LayerNorm``, ``GroupNorm`` and ``RMSNorm``, which are by the same
    practice not decayed. A ``Dense`` / ``Conv`` ``'bias'`` sits next to a
    ``'kernel'`` and is decayed;
  * with ``exclude_biases=True``, every leaf named ``'bias'`` as well.

  Use it with ``optax.adamw(..., mask=jbn.decay_mask)`` (optax calls it on
  the params), ``optax.add_decayed_weights(wd, mask=...)`` or
  ``optax.masked``; for ``exclude_biases``, pass
  ``functools.partial(jbn.decay_mask, exclude_biases=True)`` or a mask
  computed up front. It works on linen ``params`` dicts (or ``FrozenDict``)
  and on ``nnx.state(model, nnx.Param)``, so
  ``nnx.Optimizer(model, optax.adamw(lr, mask=jbn.decay_mask),
  wrt=nnx.Param)`` just works. Variable wrappers (``nnx.Param``,
  ``nn.Partitioned``) count as leaves: the mask holds a plain bool in their
  place, a prefix of the params tree with or without the wrappers, which is
  what optax needs both when the optimizer is created and when it updates.

  Args:
    params: the parameter pytree (nested mappings, sequences, ``nnx.State``).
    exclude_biases: also skip every ``'bias'`` (Dense, Conv, ...).

  Returns:
    A pytree of Python bools with the structure of ``params`` (wrappers
    replaced by their bool): True where weight decay applies.

  Example:
    >>> import jax.numpy as jnp, jbn, optax
    >>> params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4)),
    ...                    'bias': jnp.zeros(4)},
    ...           'bn': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}}
    >>> jbn.decay_mask(params)
    {'bn': {'bias': False, 'scale': False},
     'conv': {'bias': True, 'kernel': True}}
    >>> jbn.decay_mask(params, exclude_biases=True)['conv']
    {'bias': False, 'kernel': True}
    >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=jbn.decay_mask)
  """
  is_leaf = _flax_wrapper_is_leaf()
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
  names = [_name(path) for path, _ in flat]
  siblings = defaultdict(set)
  for (path, _), name in zip(flat, names):
    siblings[path[:-1]].add(name)

  def decay(path, name) -> bool:
    if exclude_biases and name == "bias":
      return False
    return not (name in _NORM_PARAMS
                and siblings[path[:-1]] <= _NORM_SIBLINGS)

  return jax.tree_util.tree_unflatten(
      treedef, [decay(path, name) for (path, _), name in zip(flat, names)])


def _name(path) -> Any:
  """The last key of a pytree path, as a string where it is one."""
  if not path:
    return None
  key = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _flax_wrapper_is_leaf():
  """``is_leaf`` for Flax's variable wrappers, if Flax is already imported."""
  wrappers = []
  if "flax.nnx" in sys.modules:
    wrappers.append(sys.modules["flax.nnx"].Variable)
  if "flax.core.meta" in sys.modules:
    wrappers.append(sys.modules["flax.core.meta"].AxisMetadata)
  if not wrappers:
    return None
  wrappers = tuple(wrappers)
  return lambda node: isinstance(node, wrappers)
