"""Devices for everyone: the 1-D data mesh, sharded batches, replicated state, host copies, the
device prefetcher and the per-process data-iterator state (train, evaluation, benchmarks)."""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fcn_jax import distributed
from fcn_jax.distributed import log

PREFETCH = 2  # batches sharded on the devices ahead of the train step


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes): batch on 'data', state replicated."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ('data',))

def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded on the batch axis."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if isinstance(v, np.ndarray)}

def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` replicated on every device of `mesh` (of all processes), as a copy.

  Always a copy: the train step donates its state, which must not delete the caller's arrays. With
  several processes every process must pass the same values (host arrays, process-local arrays or
  arrays already replicated over any mesh); each builds its own devices' copies.
  """
  sharding = NamedSharding(mesh, P())
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding, may_alias=False)

  def put(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)  # process-local or fully replicated arrays: readable on every process
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)

def host_copy(tree: Any) -> Any:
  """NumPy copies of a (replicated) tree, PRNG keys as their raw key data: what checkpoints store.

  Host arrays carry no device layout, so a checkpoint written by N processes restores anywhere
  (one CPU, another mesh); orbax writes them from process 0 only.
  """
  def get(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)  # replicated arrays are readable on every process
  return jax.tree.map(get, tree)

class DevicePrefetcher:
  """Keeps `size` batches already sharded on the devices ahead of the train step (host decoding and
  host-to-device copies overlap the running step), each with the iterator state after it, so that a
  checkpoint records exactly the batches the model has consumed."""

  def __init__(self, iterator, mesh: Mesh, size: int = 2):
    self._iterator, self._mesh, self._size = iterator, mesh, max(size, 1)
    self._queue: collections.deque = collections.deque()
    self.consumed_state = iterator.get_state()

  def __next__(self) -> dict:
    while len(self._queue) < self._size:
      batch = shard_batch(next(self._iterator), self._mesh)
      self._queue.append((batch, self._iterator.get_state()))
    batch, self.consumed_state = self._queue.popleft()
    return batch

def gather_data_state(local_state: bytes) -> Any:
  """The data-iterator state to checkpoint: this process's own with one process, otherwise every
  process's (each reads its own shard), gathered so that process 0 writes them all."""
  if jax.process_count() == 1:
    return local_state
  return {'process_count': jax.process_count(),
          'per_process': distributed.allgather_bytes(bytes(local_state))}

def local_data_state(data_state: Any) -> Any:
  """This process's iterator state from a checkpoint's (None: restart the data order)."""
  if isinstance(data_state, dict) and 'per_process' in data_state:
    states = data_state['per_process']
    if len(states) == jax.process_count():
      return states[jax.process_index()]
    log(f'the checkpoint was written by {len(states)} processes, this run has '
         f'{jax.process_count()}: the data order restarts (the model state is restored)')
    return None
  if jax.process_count() == 1:
    return data_state
  log('the checkpoint was written by one process: the data order restarts (the model state is '
       'restored)')
  return None
