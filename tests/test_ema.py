"""Moving average of the weights (config.ema_decay), early stopping and the score that picks "best":
the average is optax.ema's bias-corrected one, updated once per optimiser update, checkpointed and
read by inference; a run stops early cleanly and stays stopped when run again."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcn_jax import checkpoint, config_checks, models, optim, train
from fcn_jax.data import synthetic
from fcn_jax.errors import UserError
from fcn_jax.train import monitor
from fcn_jax.train.step import TrainState, update_ema

META = {'arch': 'fcn32s', 'num_classes': 3, 'width': 1 / 16, 'class_names': ['a', 'b', 'c']}


def _tree(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {'params': {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                              'bias': jnp.asarray(rng.normal(size=4), jnp.float32)},
                     'frozen': jnp.linspace(-1.3, 2.7, 7, dtype=jnp.float32)}}


def test_ema_is_optax_bias_corrected_average_and_leaves_constants_exact():
  decay = 0.9
  tx = optax.ema(decay, debias=True)
  reference = tx.init(_tree(0))
  ema = jax.tree.map(jnp.copy, _tree(0))
  update = jax.jit(update_ema, static_argnums=2)
  for count in range(1, 9):
    new = _tree(count)
    new['params']['frozen'] = _tree(0)['params']['frozen']  # a layer that never trains
    want, reference = tx.update(new, reference)
    ema = update(ema, new, decay, jnp.int32(count))
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(ema['params']['frozen'], _tree(0)['params']['frozen'])


def test_train_step_moves_the_average_once_per_update_with_batchnorm():
  model = models.build('fcn32s', num_classes=3, width=1 / 16, backbone='vgg16_bn', dropout_rate=0.0)
  variables = models.init_variables(model, jax.random.key(0))
  tx = optim.make_optimizer(learning_rate=1e-2, momentum=0.9, weight_decay=0.0,
                            params=variables['params'],
                            frozen=models.frozen_mask(model, variables['params']),
                            algorithm='adam', accumulate_steps=2)
  state = train.create_train_state(model, tx, variables, jax.random.key(1), ema=True)
  assert set(state.ema) == {'params', 'batch_stats'}
  assert all(a is not b for a, b in zip(jax.tree.leaves(state.ema),
                                        jax.tree.leaves(state.variables())))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(2, 24, 24, 3)).astype(np.float32),
           'label': rng.integers(0, 3, size=(2, 24, 24)).astype(np.int32)}
  decay = 0.5
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, normalize_loss=True,
                                               ema_decay=decay, accumulate_steps=2))
  start = state.ema
  state, _ = step(state, batch)  # mid-accumulation: the parameters and the average stay
  for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(start)):
    np.testing.assert_array_equal(a, b)
  state, _ = step(state, batch)  # update 1: the average is the weights (bias-corrected)
  first = state.variables()
  for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(first)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first['params']),
                                                   jax.tree.leaves(variables['params'])))
  state, _ = step(state, batch)
  state, _ = step(state, batch)  # update 2: w = (1 - d) / (1 - d^2) on the new weights
  w = (1 - decay) / (1 - decay ** 2)
  want = jax.tree.map(lambda a, b: a + w * (b - a), first, state.variables())
  for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@flax.struct.dataclass
class OldState:  # a train state from before the `ema` field
  params: Any
  batch_stats: Any
  opt_state: Any
  step: Any
  rng: Any


def _state(offset: float, ema: bool) -> TrainState:
  params = jax.tree.map(lambda x: x + offset, _tree(0)['params'])
  tx = optax.sgd(0.1, momentum=0.9)
  average = {'params': jax.tree.map(lambda x: x * 0.5, params)} if ema else {}
  return TrainState(step=jnp.int32(int(offset)), params=params, batch_stats={},
                    opt_state=tx.init(params), rng=jax.random.key(int(offset)), ema=average)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert jax.tree.structure(a) == jax.tree.structure(b)


def test_checkpoint_keeps_the_average_loop_state_and_the_chosen_best(tmp_path):
  meta = {**META, 'inference_weights': 'ema', 'ema_decay': 0.9}
  with checkpoint.Checkpointer(tmp_path / 'run', max_to_keep=1) as ckpt:
    # best_score ranks the steps, whatever their mean IU.
    ckpt.save(1, _state(1.0, True), metadata=meta, metrics={'mean_iu': 0.9, 'best_score': 0.1},
              loop_state={'early_stopping': {'waited': 2, 'best': 0.25}})
    ckpt.save(2, _state(2.0, True), metadata=meta, metrics={'mean_iu': 0.1, 'best_score': 0.7})
    ckpt.save(3, _state(3.0, True), metadata=meta, metrics={'mean_iu': 0.8, 'best_score': None})
    assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 3]
    assert ckpt.has_ema(2) and ckpt.loop_state(2) is None
    restored, _, _ = ckpt.restore(_state(0.0, True), step=2)
    _assert_same(restored, _state(2.0, True))
    # A run that turned the average off reads the rest and leaves the average on disk.
    restored, _, _ = ckpt.restore(_state(0.0, False), step=2)
    _assert_same(restored, _state(2.0, False))
  assert checkpoint.resolve_step(tmp_path / 'run')[1] == 2
  _, variables, metadata = checkpoint.load_inference(tmp_path / 'run')
  _assert_same(variables, _state(2.0, True).ema)
  assert metadata['inference_weights'] == 'ema'
  _, variables, _ = checkpoint.load_inference(tmp_path / 'run', weights='params')
  _assert_same(variables, {'params': _state(2.0, True).params})

  with checkpoint.Checkpointer(tmp_path / 'plain') as ckpt:
    ckpt.save(1, _state(1.0, False), metadata=META, loop_state={'early_stopping': None})
    assert not ckpt.has_ema(1) and ckpt.loop_state(1) == {'early_stopping': None}
    with pytest.raises(ValueError, match='moving average'):
      ckpt.restore(_state(0.0, True), step=1)
  with pytest.raises(UserError, match='ema_decay=0'):
    checkpoint.load_inference(tmp_path / 'plain', weights='ema')

  # Checkpoints written before the state had an `ema` field restore into today's state.
  old = _state(4.0, False)
  with checkpoint.Checkpointer(tmp_path / 'old') as ckpt:
    ckpt.save(4, OldState(old.params, {}, old.opt_state, old.step, old.rng), metadata=META,
              metrics={'mean_iu': 0.3})
    _assert_same(ckpt.restore(_state(0.0, False))[0], old)
    assert ckpt.best_step() == 4


def test_early_stopping_counts_evaluations_without_a_gain():
  choice = monitor.Choice('mean_iu', 'geometric', 'ema')
  stop = monitor.EarlyStopping(choice, patience=2, min_delta=0.01)

  def scores(v):
    return {'mean_iu': 0.0, 'heads': {'semantic': {'mean_iu': 0.0}, 'geometric': {'mean_iu': v}}}
  assert not stop.update(10, scores(0.5))
  assert not stop.update(20, scores(0.505))  # within min_delta: no gain
  assert not stop.update(30, scores(0.52))  # a gain: the count starts again
  assert (stop.best, stop.best_step, stop.waited) == (0.52, 30, 0)
  assert not stop.update(40, scores(float('nan')))
  assert stop.update(50, scores(0.3))
  assert 'mean_iu of the geometric head (EMA weights)' in stop.reason('semantic')
  again = monitor.EarlyStopping(choice, patience=2, min_delta=0.01)
  assert again.restore(json.loads(json.dumps(stop.state()))) and again.stopped
  other = monitor.EarlyStopping(monitor.Choice('pixel_acc', '', 'ema'), patience=2)
  assert not other.restore(stop.state()) and other.waited == 0
  best = monitor.best_metrics({'mean_iu': 0.4, 'pixel_acc': 0.8}, monitor.Choice('pixel_acc', '',
                                                                                 'params'), 'x')
  assert best['best_score'] == 0.8 and best['best_by'] == 'pixel_acc'


def test_selection_fields_are_checked_with_the_rest_of_the_config():
  from experiments import common
  c = common.load_config('siftflow_fcn16s', 'demo')
  c.ema_decay, c.best_metric, c.best_head = 1.0, 'iou', 'depth'
  c.early_stopping_metric, c.early_stopping_patience = 'loss', 0
  c.early_stopping_min_delta, c.eval_every = -1, 0
  problems = '\n'.join(config_checks._problems(c))
  for field in ('ema_decay=1.0', "best_metric='iou'", "best_head='depth'",
                "early_stopping_metric='loss'"):
    assert f'config.{field}' in problems, (field, problems)
  assert 'semantic, geometric' in problems
  c.early_stopping_metric = 'mean_iu'
  problems = '\n'.join(config_checks._problems(c))
  for field in ('early_stopping_patience=0', 'early_stopping_min_delta=-1', 'eval_every=0'):
    assert f'config.{field}' in problems, (field, problems)
  c.ema_decay, c.best_metric, c.best_head = 0.999, 'fw_iu', 'geometric'
  c.early_stopping_patience, c.early_stopping_min_delta, c.eval_every = 3, 0.001, 100
  assert not any(f in p for p in config_checks._problems(c)
                 for f in ('ema_decay', 'best_', 'early_stopping', 'eval_every'))


@pytest.fixture(scope='module')
def tiny_voc(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('voc')
  synthetic.write_voc_tree(root, num_train=8, num_val=4, seed=1, min_size=40, max_size=56)
  return root


def _config(tiny_voc, data_dir):
  from experiments import common
  c = common.load_config('fcn32s', 'demo')
  c.model.width = 0.0625
  c.dataset.manual_dir, c.dataset.data_dir = str(tiny_voc), str(data_dir)
  c.batch_size, c.crop_size, c.eval_batch_size, c.eval_pad_to = 2, 48, 4, 64
  c.num_train_steps, c.log_every, c.eval_every, c.checkpoint_every = 8, 1, 2, 8
  c.num_figure_examples = 1
  c.ema_decay, c.best_metric = 0.5, 'pixel_acc'
  # No gain can exceed 1: the second evaluation (step 4) ends the run.
  c.early_stopping_metric, c.early_stopping_patience, c.early_stopping_min_delta = 'mean_iu', 1, 1.0
  return c


def test_ema_run_stops_early_and_stays_stopped(tiny_voc, tmp_path, capsys):
  work = tmp_path / 'run'
  scores = train.train_and_evaluate(_config(tiny_voc, tmp_path / 'tfds'), work)
  out = capsys.readouterr().out
  assert 'EMA of the weights, decay 0.5' in out
  assert 'early stopping: mean_iu (EMA weights) has not improved by more than 1 for 1 ' in out
  assert 'stopped at step 4 of 8' in out and 'val (EMA weights): pixel_acc' in out
  rows = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['kind'] == 'train'] == [1, 2, 3, 4]
  assert [r['step'] for r in rows if r['kind'] == 'eval'] == [2, 4]
  ema_rows = [r for r in rows if r['kind'] == 'eval_ema']
  assert [r['step'] for r in ema_rows] == [2, 4]
  assert scores['mean_iu'] == ema_rows[-1]['mean_iu']
  assert scores['raw_weights']['mean_iu'] == [r for r in rows if r['kind'] == 'eval'][-1]['mean_iu']

  results = json.loads((work / 'results.json').read_text())
  assert results['step'] == 4 and results['weights'] == 'ema' and results['ema_decay'] == 0.5
  assert results['early_stopping']['step'] == 4
  assert results['raw_weights']['pixel_acc'] == scores['raw_weights']['pixel_acc']
  assert 'Stopped early at step 4' in (work / 'results.md').read_text()
  assert (work / 'figures' / 'score_maps.png').exists()

  ckpt = checkpoint.Checkpointer(work / 'checkpoints')
  assert ckpt.latest_step() == 4 and ckpt.has_ema(4)
  by_step = {s: ckpt.metrics(s) for s in ckpt.all_steps()}
  best = ckpt.best_step()
  assert by_step[best]['pixel_acc'] == max(m['pixel_acc'] for m in by_step.values() if m)
  assert results['best_checkpoint'] == {'step': best, 'by': 'pixel_acc (EMA weights)'}
  assert by_step[4]['best_score'] == by_step[4]['pixel_acc'] == ema_rows[-1]['pixel_acc']
  assert by_step[4]['best_by'] == 'pixel_acc (EMA weights)'
  assert ckpt.loop_state(4)['early_stopping']['waited'] == 1
  ckpt.close()
  _, variables, metadata = checkpoint.load_inference(work / 'checkpoints', which='latest')
  _, raw, _ = checkpoint.load_inference(work / 'checkpoints', which='latest', weights='params')
  assert metadata['inference_weights'] == 'ema' and metadata['best_metric'] == 'pixel_acc'
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables),
                                                      jax.tree.leaves(raw)))

  # The same command again: the run stays stopped, and says how to go on.
  again = train.train_and_evaluate(_config(tiny_voc, tmp_path / 'tfds'), work)
  out = capsys.readouterr().out
  assert 'stopped early at step 4' in out and 'early_stopping_patience' in out
  assert again['mean_iu'] == scores['mean_iu']
  rows = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['kind'] == 'train'] == [1, 2, 3, 4]
  assert json.loads((work / 'results.json').read_text())['step'] == 4
