"""How checkpoints store a training state: JSON for metadata / loop state (bytes as tagged base64),
the state dict split into its variables ({'params', 'batch_stats'}) and the rest, typed PRNG keys as
their raw data, and abstract (shape / dtype / sharding) trees for restoring."""

from __future__ import annotations

import base64
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

VARIABLE_COLLECTIONS = ('params', 'batch_stats')
_BYTES_TAG = '__bytes_b64__'


def to_json(obj: Any) -> Any:
  """Makes `obj` JSON-able: numpy/jax scalars and arrays -> python, bytes -> tagged base64."""
  if isinstance(obj, (bytes, bytearray)):
    return {_BYTES_TAG: base64.b64encode(bytes(obj)).decode('ascii')}
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
    return to_json(np.asarray(obj).tolist())
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if hasattr(obj, 'item') and callable(obj.item):
    return obj.item()
  raise TypeError(f'cannot store {type(obj).__name__} as JSON: {obj!r}')


def from_json(obj: Any) -> Any:
  if isinstance(obj, dict):
    if set(obj) == {_BYTES_TAG}:
      return base64.b64decode(obj[_BYTES_TAG])
    return {k: from_json(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [from_json(v) for v in obj]
  return obj


# --------------------------------------------------------------------------------------------------
# State <-> (variables, train_state) trees


def is_prng_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def storable(tree: Any) -> Any:
  """State dict of `tree` with typed PRNG keys replaced by their raw uint32 data."""
  state_dict = flax.serialization.to_state_dict(tree)
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, state_dict)


def split_variables(state_dict: Any) -> tuple[dict | None, Any]:
  """{'params', 'batch_stats'} (non-empty ones) vs. everything else."""
  if not isinstance(state_dict, dict) or 'params' not in state_dict:
    return None, state_dict
  variables = {k: state_dict[k] for k in VARIABLE_COLLECTIONS
               if k in state_dict and jax.tree.leaves(state_dict[k])}
  rest = {k: v for k, v in state_dict.items() if k not in variables}
  return variables, rest


def abstract(tree: Any) -> Any:
  def leaf(x):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      sharding = getattr(x, 'sharding', None)
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return x  # python scalars: orbax restores them as saved
  return jax.tree.map(leaf, tree)
