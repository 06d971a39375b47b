"""Progress in one place (fcn_jax.progress): bars on a terminal, a few plain lines in a log file."""

from __future__ import annotations

import subprocess
import sys

from fcn_jax import progress


def test_track_logs_every_tenth_and_a_last_line_when_not_a_terminal(monkeypatch):
  clock = iter(range(0, 10_000, 3))  # 3 s per item: every 10% mark is 5 s or more after the last
  monkeypatch.setattr(progress.time, 'perf_counter', lambda: next(clock))
  lines = []
  out = list(progress.track(range(50), desc='eval', unit='images', log=lines.append, bar=False))
  assert out == list(range(50))
  assert len(lines) == 10, lines  # 10%, 20%, ... 90%, then the total with its time
  assert lines[0].startswith('eval: 5/50 images (10%') and lines[-1].startswith('eval: 50 images in')
  monkeypatch.undo()
  lines.clear()  # quick work: only the last line
  assert len(list(progress.track(range(50), desc='eval', unit='images', log=lines.append,
                                 bar=False))) == 50
  assert len(lines) == 1 and lines[0].startswith('eval: 50 images in'), lines
  lines.clear()
  assert list(progress.track(iter(range(3)), desc='x', unit='files', log=lines.append,
                             bar=False)) == [0, 1, 2]
  assert lines == []  # short and quick: nothing to say
  assert list(progress.track([1, 2], desc='x', unit='i', enabled=False, log=lines.append)) == [1, 2]


def test_a_log_file_gets_lines_not_a_redrawn_bar():
  code = ('from fcn_jax import progress\n'
          'progress.LINE_GAP_S = 0\n'
          'for _ in progress.track(range(200), desc="eval", unit="images"): pass\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert '\r' not in proc.stderr and proc.stderr.count('\n') == 10, proc.stderr


def test_byte_counts_are_shown_in_mib_from_where_a_resumed_download_starts(monkeypatch):
  clock = iter(range(0, 10_000, 6))
  monkeypatch.setattr(progress.time, 'perf_counter', lambda: next(clock))
  lines = []
  counter = progress.Counter(10 * 2**20, desc='vgg16.pth', initial=4 * 2**20, in_bytes=True,
                             log=lines.append, bar=False)
  for _ in range(6):
    counter.update(2**20)
  counter.close()
  # 50%, 60%, ... 90% (each 6 s after the last), then the total; the rate counts this run's bytes.
  assert lines[0] == 'vgg16.pth: 5.0/10.0 MiB (50%, 0.2 MiB/s)', lines
  assert len(lines) == 6 and lines[-1].startswith('vgg16.pth: 10.0 MiB in'), lines
