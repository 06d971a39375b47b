"""The benchmark suite runs end to end (smoke profile) and prints the expected table.

Timings are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_table(tmp_path):
  pytest.importorskip('torch')
  nets = ['fcn_alexnet', 'fcn8s']
  measures = ['fwd-latency', 'train']
  out_json = tmp_path / 'rows.json'
  out_md = tmp_path / 'results.md'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--profile', 'smoke', '--nets', *nets,
       '--measures', *measures, '--json', str(out_json), '--output', str(out_md)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from benchmarks import run
  lines = [l for l in proc.stdout.splitlines() if l.startswith('|')]
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  assert header == list(run.COLUMNS)
  cells = [[c.strip() for c in l.strip('|').split('|')] for l in lines[2:]]
  assert [(c[0], c[1], c[2]) for c in cells] == [(n, m, 'float32') for n in nets for m in measures]
  for c in cells:
    assert len(c) == len(run.COLUMNS)
    float(c[header.index('jax ms')])          # measured, not an error
    float(c[header.index('torch ms')])        # the PyTorch side ran too
    float(c[header.index('torch/jax')])
  data = json.loads(out_json.read_text())
  assert data['env']['backend'] == 'cpu'
  assert all(r['jax_ms'] > 0 and r['compile_s'] > 0 for r in data['rows'])
  assert out_md.read_text().count('\n|') >= len(cells) + 1
