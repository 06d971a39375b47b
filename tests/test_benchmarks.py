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


def test_cpu_ab_runs_every_kind_of_variant():
  # The interleaved A/B (one process per variant): this machine's forms, a named set, a spec and
  # PyTorch, each printing which CPU forms ran; at width 1/16 on 32x32 inputs. Forward passes
  # (quick to compile); the training step's setup is benchmarks.run's, run by test_smoke_table.
  step = 'forward'
  pytest.importorskip('torch')
  env = dict(os.environ, JAX_PLATFORMS='cpu', FCN_JAX_CPU_FORMS='default')
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.cpu_ab', '--arch', 'fcn32s', '--size', '32', '--width',
       '0.0625', '--rounds', '2', '--step', step, '--variants', 'jax', 'jax-baseline',
       'forms:conv_library=eigen,shifted_dw=0', 'torch'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert 'jax: CPU forms conv_library=ynnpack,im2col=1' in out  # FCN_JAX_CPU_FORMS=default
  assert 'jax-baseline: CPU forms conv_library=ynnpack,im2col=0,shifted_dw=0,pool_grad=0' in out
  assert 'forms:conv_library=eigen,shifted_dw=0: CPU forms conv_library=eigen' in out
  rows = {l.split('|')[1].strip(): l for l in out.splitlines() if l.startswith('| ')}
  assert set(rows) >= {'jax', 'jax-baseline', 'forms:conv_library=eigen,shifted_dw=0', 'torch'}
  assert ('training step' if step == 'train' else 'forward pass') in out
  bad = subprocess.run([sys.executable, '-m', 'benchmarks.cpu_ab', '--variants', 'jax-fast'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "unknown variant 'jax-fast'" in bad.stderr


def test_cpu_ab_scratch_preset_compares_the_same_net_on_both_sides():
  # --preset scratch times the scratch preset's net against benchmarks.torch_models.ScratchFCN8s:
  # the same trainable parameters, layer by layer in count, and the same output shape.
  torch = pytest.importorskip('torch')
  import jax
  import numpy as np
  from benchmarks import cpu_ab, run, torch_models
  from fcn_jax import models
  options = cpu_ab.preset_model_options('fcn8s_atonce', 'scratch')
  assert dict(options)['backbone'] == 'vgg16_bn'
  model, variables = run._model_and_variables('fcn8s_atonce', 0.125, 'float32', options)
  frozen = models.frozen_mask(model, variables['params'])
  jax_sizes = sorted(int(np.size(x)) for x, f in zip(jax.tree.leaves(variables['params']),
                                                     jax.tree.leaves(frozen)) if not f)
  net = torch_models.build('fcn8s_atonce', 0.125, preset='scratch')
  trained = [p for g in torch_models.make_optimizer(net).param_groups for p in g['params']]
  assert sorted(p.numel() for p in trained) == jax_sizes
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((2, 96, 96, 3), np.float32))
  assert tuple(net(torch.zeros(2, 3, 96, 96)).shape) == (2, out.shape[-1], 96, 96)
  assert out.shape[:3] == (2, 96, 96)
  with pytest.raises(SystemExit):
    cpu_ab.main(['--preset', 'scratch', '--arch', 'fcn8s'])


def test_conv_layers_and_bf16_matmul_run():
  env = dict(os.environ, JAX_PLATFORMS='cpu', FCN_JAX_CPU_FORMS='default')
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.conv_layers', '--size', '8', '--layers',
                         'conv5_2', 'fc6', '--repeats', '1', '--no-torch'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [l for l in proc.stdout.splitlines() if l.startswith('| conv5_2') or l.startswith('| fc6')]
  assert len(rows) == 6 and 'CPU forms conv_library=ynnpack' in proc.stdout
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.bf16_matmul', '--n', '64', '--repeats',
                         '1'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [l for l in proc.stdout.splitlines() if l.startswith('| bfloat16 |')]
  assert len(rows) >= 4  # every XLA option ran (and PyTorch's, where installed)
