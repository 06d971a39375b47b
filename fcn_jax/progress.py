"""Progress of long work, in one place: a tqdm bar on a terminal, plain lines otherwise (a bar
redrawn into a log file grows it by ~100 bytes per update, and CI logs and `> run.log` are files).

- `track(items, desc=, unit=)`: iterate with progress (evaluation, preparing and checking data,
  counting pixels, extracting archives); lines at every 10% of a known total, else every 30 s.
- `Progress`: the training loop's steps, with the loss and speed at each metrics flush.
- `ByteProgress`: a download's bytes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

T = TypeVar('T')
LINE_EVERY_S = 30.0  # plain lines when the total is unknown


def interactive() -> bool:
  """Whether progress goes to a terminal (bars) or to a file / pipe (plain lines)."""
  return sys.stderr.isatty()


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def track(items: Iterable[T], *, desc: str, unit: str, total: int | None = None,
          enabled: bool = True, log=_log, bar: bool | None = None) -> Iterator[T]:
  """Yields `items`, showing progress: a bar on a terminal (`bar` overrides), else a line per 10%
  of `total` (len(items) when it has one) or per LINE_EVERY_S seconds, and a last line."""
  if not enabled:
    yield from items
    return
  if total is None and hasattr(items, '__len__'):
    total = len(items)
  if interactive() if bar is None else bar:
    from tqdm.auto import tqdm
    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, mininterval=1.0,
                    dynamic_ncols=True)
    return
  t0 = last = time.perf_counter()
  done, next_share = 0, 0.1
  for item in items:
    yield item
    done += 1
    now = time.perf_counter()
    if total and done < total and done / total >= next_share:
      log(f'{desc}: {done}/{total} {unit} ({100 * done / total:.0f}%, '
          f'{done / max(now - t0, 1e-9):.1f} {unit}/s)')
      next_share = (int(10 * done / total) + 1) / 10
    elif not total and now - last >= LINE_EVERY_S:
      log(f'{desc}: {done} {unit} ({done / max(now - t0, 1e-9):.1f} {unit}/s)')
      last = now
  if done >= 10 or time.perf_counter() - t0 >= LINE_EVERY_S:
    log(f'{desc}: {done} {unit} in {duration(time.perf_counter() - t0)}')


class Progress:
  """Training progress: a tqdm bar on a terminal; plain lines at each metrics flush otherwise."""

  def __init__(self, total: int, start: int, *, desc: str, enabled: bool = True,
               log=print, interactive: bool | None = None):
    self.total, self.start, self.log, self.enabled = total, start, log, enabled
    self.interactive = sys.stderr.isatty() if interactive is None else interactive
    self._t0, self._bar = time.perf_counter(), None
    if enabled and self.interactive:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=min(start, total), desc=desc, unit='step',
                       dynamic_ncols=True)

  def update(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def metrics(self, step: int, values: Mapping[str, float]) -> None:
    if self._bar is not None:
      self._bar.set_postfix(loss=f'{values["loss"]:.4f}', img_s=f'{values["images_per_sec"]:.1f}')
    elif self.enabled:
      done = max(step - self.start, 1)
      eta = (time.perf_counter() - self._t0) / done * max(self.total - step, 0)
      self.log(f'step {step}/{self.total}: loss {values["loss"]:.4f}, pixel_acc '
               f'{100 * values["pixel_acc"]:.1f}, {values["images_per_sec"]:.1f} img/s, '
               f'eta {duration(eta)}')

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class ByteProgress:
  """A download's bytes: a tqdm bar (size, speed) on a terminal; a line per 10% otherwise."""

  def __init__(self, desc: str, total: int | None, initial: int, enabled: bool, log):
    self.total, self.done, self.log, self.enabled = total, initial, log, enabled
    self._next = 0.1
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit='B', unit_scale=True,
                       unit_divisor=1024, dynamic_ncols=True)
    self._t0 = time.perf_counter()

  def update(self, n: int) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
    elif self.enabled and self.total and self.done / self.total >= self._next:
      rate = self.done / max(time.perf_counter() - self._t0, 1e-6)
      self.log(f'  {self.done / 2**20:.1f} of {self.total / 2**20:.1f} MiB '
               f'({100 * self.done / self.total:.0f}%, {rate / 2**20:.1f} MiB/s)')
      self._next = (int(10 * self.done / self.total) + 1) / 10

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
