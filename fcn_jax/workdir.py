"""A training workdir's integrity: one run at a time (a lock file), and resuming only with a config
that fits the checkpoints already there.

The lock is `<workdir>/.fcn_jax.lock`, a JSON file naming the host, pid and start time of the run
holding it. A run killed without cleaning up (SIGKILL, a crashed machine) leaves it behind: on the
same host it is taken over when that pid is no longer running (or runs another program started
later); from another host it cannot be checked, and the message says which file to delete.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from typing import Any, Callable

from fcn_jax.errors import UserError

LOCK_NAME = '.fcn_jax.lock'

# Checkpoint metadata fields a resumed run must match: they fix the shapes and the tree structure of
# what is restored (model variables, optimiser state) or what the inputs mean.
COMPATIBILITY_FIELDS = ('arch', 'num_classes', 'width', 'learnable_upsampling', 'skip_scaling',
                        'preprocessing', 'class_names', 'optimizer', 'accumulate_steps', 'backbone')


class WorkdirBusyError(UserError):
  """Another live run holds the workdir's lock."""


class IncompatibleResumeError(UserError):
  """The workdir's checkpoints were written by a run with another model or optimiser."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot; Linux), to tell a reused pid
  apart."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  return stat.rsplit(')', 1)[1].split()[19]  # field 22 of stat; the name may contain spaces


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by someone else
  current = _process_start(pid)
  return start is None or current is None or current == start


class WorkdirLock:
  """Exclusive use of a workdir by one run (process 0 of it). Use as a context manager."""

  def __init__(self, workdir: str | os.PathLike, log: Callable[[str], None] = print):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self._log = log
    self._record: dict[str, Any] | None = None

  def _mine(self) -> dict[str, Any]:
    pid = os.getpid()
    return {'host': socket.gethostname(), 'pid': pid, 'start': _process_start(pid),
            'since': time.strftime('%Y-%m-%d %H:%M:%S')}

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    record = self._mine()
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(record, f)
      self._record = record
      return
    raise WorkdirBusyError(f'could not take the lock {self.path}; another run keeps taking it')

  def _take_over_if_stale(self) -> None:
    try:
      holder = json.loads(self.path.read_text() or '{}')
    except FileNotFoundError:
      return  # released meanwhile: retry
    except (OSError, ValueError):
      holder = {}
    workdir = self.path.parent
    if holder.get('host') == socket.gethostname():
      pid = int(holder.get('pid', -1))
      if pid > 0 and _alive(pid, holder.get('start')):
        raise WorkdirBusyError(
            f'{workdir} is in use by another run (pid {pid} on this host, since '
            f'{holder.get("since", "?")}). Wait for it to finish, stop it, or use another '
            f'--workdir.')
      self._log(f'{workdir}: taking over the lock of a run that is no longer running (pid {pid})')
    elif holder.get('host'):
      raise WorkdirBusyError(
          f'{workdir} is in use by a run on host {holder["host"]} (pid {holder.get("pid")}, since '
          f'{holder.get("since", "?")}), which cannot be checked from here. If that run is no '
          f'longer running, delete {self.path} and start again; otherwise use another --workdir.')
    else:
      self._log(f'{workdir}: replacing an unreadable lock file {self.path}')
    try:
      self.path.unlink()
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if self._record is None:
      return
    try:
      if json.loads(self.path.read_text()) == self._record:
        self.path.unlink()
    except (OSError, ValueError):
      pass
    self._record = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def check_resume_compatible(checkpoint_metadata: dict, run_metadata: dict, *, workdir: Any,
                            step: int) -> None:
  """Raises IncompatibleResumeError naming every field where this run differs from the checkpoint.

  Fields missing from the checkpoint's metadata (older checkpoints) are not compared.
  """
  differences = []
  for field in COMPATIBILITY_FIELDS:
    if field not in checkpoint_metadata or field not in run_metadata:
      continue
    old, new = checkpoint_metadata[field], run_metadata[field]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
      old, new = list(old), list(new)
    if old != new:
      differences.append(f'  {field}: checkpoint {_short(old)}, this run {_short(new)}')
  if differences:
    raise IncompatibleResumeError(
        f'{workdir} holds checkpoints of another run (latest step {step}) that this config cannot '
        f'resume:\n' + '\n'.join(differences) + '\nNothing was changed. Use a new --workdir, or '
        f'start from those weights with --workdir NEW --config.init_from={workdir}/checkpoints '
        f'(the layers that fit are copied).')


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + '...'
