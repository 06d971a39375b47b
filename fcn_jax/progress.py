"""Progress of long work, in one place: a tqdm bar on a terminal, plain lines otherwise (a bar
redrawn into a log file grows it by ~100 bytes per update, and CI logs and `> run.log` are files).

- `track(items, desc=, unit=)`: iterate with progress (evaluation, preparing and checking data,
  counting pixels, extracting archives); `Counter` when the work is counted as it goes (predict,
  downloads in bytes).
- `Progress`: the training loop's steps, with the loss and speed at each metrics flush.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

T = TypeVar('T')
LINE_EVERY_S = 30.0  # plain lines when the total is unknown
LINE_GAP_S = 5.0  # at least this long between two lines of a known total (quick work: the last one)


def interactive() -> bool:
  """Whether progress goes to a terminal (bars) or to a file / pipe (plain lines)."""
  return sys.stderr.isatty()


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


class Counter:
  """Counted progress (`update(n)` as work is done): a bar on a terminal (`bar` overrides), else a
  line at each 10% of `total` reached LINE_GAP_S or more after the previous line, or per
  LINE_EVERY_S seconds without a total, and at `close()` a last line with the time taken.
  `in_bytes`: amounts shown in MiB (downloads); `initial`: what was done before (a resumed one)."""

  def __init__(self, total: int | None, *, desc: str, unit: str = 'B', enabled: bool = True,
               log=_log, bar: bool | None = None, initial: int = 0, in_bytes: bool = False):
    self.total, self.desc, self.enabled, self.log = total, desc, enabled, log
    self.unit = 'MiB' if in_bytes else unit
    self._scale = 2.0**-20 if in_bytes else 1.0
    self.done, self._initial, self._next_share, self._bar = initial, initial, 0.1, None
    if enabled and (interactive() if bar is None else bar):
      from tqdm.auto import tqdm
      scaled = dict(unit='B', unit_scale=True, unit_divisor=1024) if in_bytes else dict(unit=unit)
      self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, mininterval=1.0,
                       dynamic_ncols=True, **scaled)
    self._t0 = self._last = time.perf_counter()

  def _amount(self, n: float) -> str:
    return f'{n * self._scale:.1f}' if self._scale != 1.0 else str(n)

  def _rate(self, now: float) -> str:
    rate = (self.done - self._initial) * self._scale / max(now - self._t0, 1e-9)
    return f'{rate:.1f} {self.unit}/s'

  def update(self, n: int = 1) -> None:
    self.done += n
    if self._bar is not None:
      self._bar.update(n)
      return
    if not self.enabled:
      return
    now, total, done = time.perf_counter(), self.total, self.done
    if total and done < total and done / total >= self._next_share:
      self._next_share = (int(10 * done / total) + 1) / 10
      if now - self._last >= LINE_GAP_S:
        self.log(f'{self.desc}: {self._amount(done)}/{self._amount(total)} {self.unit} '
                 f'({100 * done / total:.0f}%, {self._rate(now)})')
        self._last = now
    elif not total and now - self._last >= LINE_EVERY_S:
      self.log(f'{self.desc}: {self._amount(done)} {self.unit} ({self._rate(now)})')
      self._last = now

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self.enabled:
      seconds = time.perf_counter() - self._t0
      if self.done - self._initial >= 10 or seconds >= LINE_EVERY_S:
        self.log(f'{self.desc}: {self._amount(self.done)} {self.unit} in {duration(seconds)}')


def track(items: Iterable[T], *, desc: str, unit: str, total: int | None = None,
          enabled: bool = True, log=_log, bar: bool | None = None) -> Iterator[T]:
  """Yields `items` with a Counter's progress (total: len(items) when it has one)."""
  if not enabled:
    yield from items
    return
  if total is None and hasattr(items, '__len__'):
    total = len(items)
  counter = Counter(total, desc=desc, unit=unit, log=log, bar=bar)
  try:
    for item in items:
      yield item
      counter.update()
  finally:
    counter.close()


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
