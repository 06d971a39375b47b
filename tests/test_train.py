"""The training loop end to end on tiny configs: sharded step equivalence, resume after SIGKILL,
non-finite stop, staged initialisation, the experiments / evaluate / predict command lines."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from PIL import Image

from fcn_jax import checkpoint, models, train
from fcn_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}

TINY_OVERRIDES = [
    '--config.model.width=0.0625', '--config.batch_size=2', '--config.crop_size=48',
    '--config.eval_batch_size=4', '--config.eval_pad_to=64', '--config.log_every=2',
    '--config.num_figure_examples=1',
]


@pytest.fixture(scope='module')
def tiny_voc(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('voc')
  synthetic.write_voc_tree(root, num_train=8, num_val=4, seed=1, min_size=40, max_size=56)
  return root


def tiny_config(arch: str, tiny_voc: pathlib.Path, data_dir: pathlib.Path, **overrides):
  from experiments import common
  c = common.load_config(arch, 'demo')
  c.model.width = 0.0625
  c.dataset.manual_dir = str(tiny_voc)
  c.dataset.data_dir = str(data_dir)
  c.batch_size, c.crop_size, c.eval_batch_size, c.eval_pad_to = 2, 48, 4, 64
  c.num_train_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 4, 2
  c.num_figure_examples = 1
  c.update_from_flattened_dict(overrides)
  return c


def cli(arch: str, workdir, tiny_voc, data_dir, *extra, preset='demo') -> list[str]:
  return [sys.executable, '-m', f'experiments.{arch}', f'--workdir={workdir}',
          f'--config={REPO}/experiments/configs/{arch}.py:{preset}', *TINY_OVERRIDES,
          f'--config.dataset.manual_dir={tiny_voc}', f'--config.dataset.data_dir={data_dir}', *extra]


def test_sharded_step_equals_single_device():
  """One train step over a mesh of 8 simulated devices equals the single-device step."""
  script = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      from fcn_jax import models, train
      assert jax.device_count() == 8, jax.devices()
      model = models.build('fcn8s', width=1/16)
      rng = jax.random.key(0)
      variables = models.init_variables(model, rng)
      # Non-zero score layers so that every layer receives gradient.
      params = jax.tree_util.tree_map_with_path(
          lambda p, x: 0.01 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
          if 'score' in str(p[0]) else x, variables['params'])
      variables = {'params': jax.device_get(params)}  # host copies: the step donates its inputs
      params = variables['params']
      from fcn_jax import optim
      tx = optim.make_optimizer(learning_rate=1e-3, momentum=0.9, weight_decay=5e-4, params=params,
                                frozen=models.frozen_mask(model, params))
      r = np.random.default_rng(0)
      batch = {'image': r.normal(size=(8, 37, 45, 3)).astype(np.float32),
               'label': r.integers(0, 21, size=(8, 37, 45)).astype(np.int32)}
      batch['label'][:, :3] = 255
      out = {}
      for name, devices in (('one', jax.devices()[:1]), ('eight', jax.devices())):
        mesh = train.make_mesh(devices)
        state = train.replicate(train.create_train_state(model, tx, variables, rng), mesh)
        step = train.compile_train_step(model, tx, mesh, normalize_loss=True)
        for _ in range(2):
          state, m = step(state, train.shard_batch(batch, mesh))
        out[name] = (jax.device_get(state.params), float(m['loss']))
        if name == 'eight':
          assert len(state.params['fc6']['kernel'].sharding.device_set) == 8
      a, b = out['one'], out['eight']
      assert abs(a[1] - b[1]) < 1e-5 * max(1, abs(a[1])), (a[1], b[1])
      worst = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
                  for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])))
      assert worst < 1e-5, worst
      print('OK', worst)
  ''')
  env = {**ENV, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'OK' in proc.stdout


def test_transfer_params_keeps_new_layers_at_init():
  m32, m16 = models.build('fcn32s', width=1 / 16), models.build('fcn16s', width=1 / 16)
  p32 = models.init_variables(m32, jax.random.key(1))['params']
  p32 = jax.tree.map(lambda x: x + 1.0, p32)
  p16 = models.init_variables(m16, jax.random.key(2))['params']
  out, copied, kept = train.transfer_params(p16, p32)
  assert 'score_fr' in copied and 'conv1_1' in copied and 'fc7' in copied
  assert set(kept) == {'score_pool4', 'upscore2', 'upscore16'}
  np.testing.assert_array_equal(out['score_pool4']['kernel'], 0)
  np.testing.assert_array_equal(out['fc6']['kernel'], p32['fc6']['kernel'])


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_voc, tmp_path):
  # 1e6 makes the loss blow up within a few steps; checkpoints are written every step until then.
  config = tiny_config('fcn32s', tiny_voc, tmp_path / 'tfds', **{
      'optim.learning_rate': 1e6, 'num_train_steps': 30, 'checkpoint_every': 1, 'log_every': 1,
      'eval_every': 0})
  with pytest.raises(train.NonFiniteLossError, match='non-finite loss'):
    train.train_and_evaluate(config, tmp_path / 'run')
  _, variables, _ = checkpoint.load_inference(tmp_path / 'run' / 'checkpoints', which='latest')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_training_evaluates_native_size_several_images_at_a_time(tiny_voc, tmp_path):
  """eval_batch_size > 1 without eval_pad_to: native size, the images of one size batched (the
  one-at-a-time protocol's scores; tests/test_data_pipeline.py checks the batches)."""
  config = tiny_config('fcn32s', tiny_voc, tmp_path / 'tfds', eval_batch_size=3, eval_pad_to=0,
                       num_train_steps=2, eval_every=2, checkpoint_every=2)
  scores = train.train_and_evaluate(config, tmp_path / 'run')
  assert 0 <= scores['mean_iu'] <= 1
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert results['step'] == 2 and results['mean_iu'] == scores['mean_iu']


def test_staged_net_without_init_says_which_command(tiny_voc, tmp_path):
  cmd = cli('fcn16s', tmp_path / 'runs' / 'fcn16s', tiny_voc, tmp_path / 'tfds', preset='paper')
  proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode != 0
  assert 'python -m experiments.fcn32s' in proc.stderr
  assert 'train_predecessor' in proc.stderr


def test_missing_data_points_to_instructions_and_demo(tmp_path):
  cmd = [sys.executable, '-m', 'experiments.fcn32s', f'--workdir={tmp_path / "run"}',
         f'--config.dataset.data_dir={tmp_path / "tfds"}', f'--config.dataset.manual_dir={tmp_path / "empty"}']
  (tmp_path / 'empty').mkdir()
  proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode != 0
  assert 'make demo' in proc.stderr and 'benchmark' in proc.stderr.lower(), proc.stderr[-2000:]


def _params(workdir: pathlib.Path, weights: str = 'params'):
  _, variables, _ = checkpoint.load_inference(workdir / 'checkpoints', which='latest',
                                              weights=weights)
  return variables['params']


def test_cli_resume_after_sigkill_matches_uninterrupted_run(tiny_voc, tmp_path):
  cache = tmp_path / 'xla_cache'
  # With a warmed-up cosine schedule and the moving average of the weights: the schedule's position
  # and the average resume with the rest (tests/test_schedule_resume.py: every schedule).
  steps = ['--config.num_train_steps=24', '--config.checkpoint_every=3', '--config.eval_every=24',
           f'--config.compilation_cache_dir={cache}', '--config.optim.schedule=cosine',
           '--config.optim.warmup_steps=4', '--config.ema_decay=0.9']
  data_dir = tmp_path / 'tfds'
  # Uninterrupted reference run (also prepares the dataset once).
  ref = subprocess.run(cli('fcn32s', tmp_path / 'ref', tiny_voc, data_dir, *steps),
                       env={**ENV, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'},
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert cache.is_dir() and any(cache.iterdir()), 'the persistent compilation cache stayed empty'
  results = json.loads((tmp_path / 'ref' / 'results.json').read_text())
  assert 0 <= results['mean_iu'] <= 1 and len(results['per_class_iu']) == 21
  for name in ('results.md', 'metrics.jsonl', 'figures/training_curves.png', 'figures/score_maps.png'):
    assert (tmp_path / 'ref' / name).exists(), name
  assert list((tmp_path / 'ref' / 'tensorboard').glob('events.*'))

  # Killed run: SIGKILL as soon as the first checkpoint is on disk, then the same command again.
  work = tmp_path / 'killed'
  proc = subprocess.Popen(cli('fcn32s', work, tiny_voc, data_dir, *steps), env=ENV, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (work / 'checkpoints').exists() and any(p.name.isdigit() for p in (work / 'checkpoints').iterdir()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (work / 'results.json').exists(), 'the run finished before it could be killed'
  again = subprocess.run(cli('fcn32s', work, tiny_voc, data_dir, *steps), env=ENV,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from' in again.stderr + again.stdout
  for weights in ('params', 'ema'):
    a, b = _params(tmp_path / 'ref', weights), _params(work, weights)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)

  # Inference from the checkpoint alone.
  image = (np.random.default_rng(0).uniform(size=(45, 61, 3)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'photo.jpg')
  out = tmp_path / 'pred'
  pred = subprocess.run([sys.executable, '-m', 'fcn_jax.predict', '--checkpoint', str(work / 'checkpoints'),
                         '--out', str(out), '--save-scores', str(tmp_path / 'photo.jpg')],
                        env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert pred.returncode == 0, pred.stderr[-3000:]
  with Image.open(out / 'photo.png') as im:
    assert im.mode == 'P' and im.size == (61, 45)
    labels = np.asarray(im)
  scores = np.load(out / 'photo_scores.npy')
  assert scores.shape == (45, 61, 21) and scores.dtype == np.float32
  np.testing.assert_array_equal(labels, scores.argmax(-1))
  assert (out / 'photo_overlay.jpg').exists()

  # Standalone evaluation gives the training run's final scores (same split, same padding).
  ev = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--checkpoint={work / "checkpoints"}',
                       '--dataset=voc_segmentation/2012', '--split=val', f'--data_dir={data_dir}',
                       '--pad_to=64', '--batch_size=4', '--which=latest', f'--out={tmp_path / "eval"}',
                       f'--compilation_cache_dir={cache}'],
                      env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert ev.returncode == 0, ev.stderr[-3000:]
  got = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  want = json.loads((work / 'results.json').read_text())
  assert got['mean_iu'] == pytest.approx(want['mean_iu'], abs=1e-6)
