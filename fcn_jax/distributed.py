"""Multi-host runs: `jax.distributed` set-up and the few cross-process helpers the training loop
needs.

Every process runs the same program. Once `initialize` has connected them, `jax.devices()` lists the
devices of all processes: the training mesh spans them, each process feeds its share of every global
batch (grain per-process sharding) and the jitted steps communicate across hosts.

Where the parameters come from (first match wins, per parameter):

1. arguments (the experiments' --coordinator_address / --num_processes / --process_id /
   --local_device_ids flags);
2. the environment: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES,
   JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS (comma-separated);
3. jax's cluster detection: Cloud TPU VMs (pod slices, GCE or GKE), SLURM and Open MPI jobs fill in
   everything (on a TPU pod slice: `jax.distributed.initialize()` with no arguments).

mode='auto' initialises when 1. or 2. name more than one process or a coordinator, or a
multi-process cluster is detected; otherwise the run stays single-process (nothing to connect). 'on'
always calls `jax.distributed.initialize` (so jax must find the missing values itself); 'off' never
does.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence, TypeVar

import jax
import numpy as np

__all__ = ['initialize', 'is_main', 'main_process_first', 'barrier', 'allgather_bytes',
           'sum_across_processes']

_log = logging.getLogger(__name__)
T = TypeVar('T')
MODES = ('auto', 'on', 'off')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, '').strip()
  return int(value) if value else None


def _parse_ids(ids: str | int | Sequence[int] | None) -> list[int] | None:
  if ids is None or ids == '':
    return None
  if isinstance(ids, int):
    return [ids]
  if isinstance(ids, str):
    return [int(x) for x in ids.split(',') if x.strip()]
  return [int(x) for x in ids]


def _detected_cluster() -> str | None:
  """The name of a multi-process cluster environment jax can configure itself from, if any.

  Only environments that identify a multi-process job: Cloud TPU VMs (GCE metadata / GKE env vars;
  a single-host TPU VM is harmless to initialise), SLURM with more than one task, Open MPI with more
  than one rank. Not mpi4py or Kubernetes, which jax would detect from a mere installed package.
  """
  if (_env_int('SLURM_NTASKS') or 1) > 1 and 'SLURM_PROCID' in os.environ:
    return 'slurm'
  if (_env_int('OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return 'openmpi'
  try:
    from jax._src.clusters import cloud_tpu_cluster
    if cloud_tpu_cluster.running_in_cloud_tpu_vm:
      if (cloud_tpu_cluster.GkeTpuCluster.is_env_present()
          or cloud_tpu_cluster.GceTpuCluster.is_env_present()):
        return 'cloud_tpu'
  except Exception:  # private API: its absence only disables auto-detection
    _log.debug('Cloud TPU detection unavailable', exc_info=True)
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: str | int | Sequence[int] | None = None,
               *, mode: str = 'auto', initialization_timeout: int = 300) -> bool:
  """Connects this process to the others (before any JAX computation); True if multi-process.

  Idempotent: a second call (or one after jax.distributed.initialize was called elsewhere) only
  reports. See the module docstring for where the parameters come from.
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if mode == 'off':
    return False
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  num_processes = num_processes if num_processes is not None else _env_int('JAX_NUM_PROCESSES')
  process_id = process_id if process_id is not None else _env_int('JAX_PROCESS_ID')
  local_device_ids = (_parse_ids(local_device_ids)
                      or _parse_ids(os.environ.get('JAX_LOCAL_DEVICE_IDS')))
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if mode == 'auto':
    if num_processes == 1:
      return False
    cluster = None if explicit else _detected_cluster()
    if not explicit and cluster is None:
      return False
  if explicit and coordinator_address is None and _detected_cluster() is None:
    raise ValueError('multi-process run without a coordinator: pass '
                     '--coordinator_address=HOST:PORT (process 0\'s address) or set '
                     'JAX_COORDINATOR_ADDRESS')
  if coordinator_address is not None and (num_processes is None or process_id is None):
    if _detected_cluster() is None:
      raise ValueError(f'coordinator {coordinator_address} given, but not num_processes and '
                       f'process_id (--num_processes / --process_id, or JAX_NUM_PROCESSES / '
                       f'JAX_PROCESS_ID)')
  _use_gloo_on_cpu()
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)
  _log.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def _use_gloo_on_cpu() -> None:
  """Cross-process collectives on CPU need an implementation (gloo is the default in recent jax)."""
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, '', 'none'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:
    pass


def is_main() -> bool:
  """Process 0: the one that writes logs, metrics, figures and results."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def main_process_first(fn: Callable[[], T], name: str) -> T:
  """Runs `fn` on process 0, then (after a barrier) on the others: for idempotent preparation steps
  (writing the demo set, preparing TFDS data) that would race on a shared filesystem. With
  host-local disks the others redo the work for themselves; with a shared one they find it done."""
  if jax.process_count() == 1:
    return fn()
  if is_main():
    result = fn()
    barrier(name)
    return result
  barrier(name)
  return fn()


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (the data-iterator states of a checkpoint)."""
  if jax.process_count() == 1:
    return [bytes(data)]
  from jax.experimental import multihost_utils
  lengths = np.asarray(
      multihost_utils.process_allgather(np.asarray([len(data)], np.int64))).reshape(-1)
  buf = np.zeros(int(lengths.max()), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
  return [gathered[i, :int(n)].tobytes() for i, n in enumerate(lengths)]


def sum_across_processes(x: np.ndarray) -> np.ndarray:
  """Element-wise sum of a host array over all processes (the evaluation confusion matrix)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).reshape(
      (jax.process_count(),) + x.shape).sum(0)


def log(message: str) -> None:
  """A line for the user, from process 0 only (written above a progress bar, if one is drawn)."""
  if jax.process_index() == 0:
    from tqdm.auto import tqdm
    tqdm.write(message)
