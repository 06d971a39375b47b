"""Checkpointer: round trips, latest + best retention, crash leftovers, inference bundles."""

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcn_jax import checkpoint
from fcn_jax import models


@flax.struct.dataclass
class TrainState:
  params: Any
  batch_stats: Any
  opt_state: Any
  step: Any
  rng: Any


def _state(offset=0.0):
  params = {'conv': {'kernel': jnp.full((3, 3, 2, 4), 1.0 + offset), 'bias': jnp.arange(4.0) + offset},
            'up': {'kernel': jnp.ones((4, 4, 4, 4)) * offset}}
  tx = optax.MultiSteps(optax.chain(optax.trace(0.9), optax.scale(-0.1)), 2)
  opt_state = tx.init(params)
  opt_state = opt_state._replace(mini_step=jnp.int32(1))
  return TrainState(params=params, batch_stats={}, opt_state=opt_state, step=jnp.int32(int(offset)),
                    rng=jax.random.key(int(offset)))


def _assert_tree_equal(a, b):
  a_leaves, a_def = jax.tree.flatten(a)
  b_leaves, b_def = jax.tree.flatten(b)
  assert a_def == b_def
  for x, y in zip(a_leaves, b_leaves):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(y))
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {'arch': 'fcn8s', 'num_classes': 21, 'width': 1 / 16, 'class_names': ['a', 'b']}


def test_round_trip_struct_state_data_state_metadata(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / 'run')
  state = _state(3.0)
  data_state = {'iterator': b'{"next_index": 7}\x00\xff', 'epoch': 2, 'nested': [b'x', 1.5]}
  ckpt.save(3, state, metadata=META, data_state=data_state)
  assert ckpt.latest_step() == 3
  restored, restored_data, metadata = ckpt.restore(_state(0.0))
  _assert_tree_equal(restored, state)
  assert isinstance(restored, TrainState)
  assert isinstance(restored.opt_state, optax.MultiStepsState)
  assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
  assert restored_data == data_state
  assert metadata == META
  # The same step again is a no-op (resumed runs), not an error.
  ckpt.save(3, _state(9.0), metadata=META)
  _assert_tree_equal(ckpt.restore(_state(0.0))[0], state)
  ckpt.close()


def test_no_data_state_restores_none(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(1.0), metadata=META)
    _, data_state, _ = ckpt.restore(_state(0.0), step=1)
  assert data_state is None


def test_latest_and_best_kept(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  ious = {1: 0.1, 2: 0.5, 3: 0.2, 4: 0.3, 5: None, 6: 0.45, 7: None}
  for step, iu in ious.items():
    metrics = None if iu is None else {'mean_iu': iu, 'pixel_acc': 0.9, 'per_class_iu': [iu, float('nan')]}
    ckpt.save(step, _state(float(step)), metadata=META, metrics=metrics)
  assert ckpt.all_steps() == [2, 6, 7]
  assert ckpt.best_step() == 2
  assert ckpt.latest_step() == 7
  _assert_tree_equal(ckpt.restore(_state(0.0), step=2)[0], _state(2.0))
  ckpt.close()
  # A fresh Checkpointer (a resumed run) sees the same thing and keeps the best while rotating.
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 7
  ckpt.save(8, _state(8.0), metadata=META, metrics={'mean_iu': 0.7})
  ckpt.save(9, _state(9.0), metadata=META)
  ckpt.save(10, _state(10.0), metadata=META)
  assert ckpt.all_steps() == [8, 9, 10]
  assert ckpt.best_step() == 8
  ckpt.close()
  assert checkpoint._resolve(tmp_path, 'best')[1] == 8
  assert checkpoint._resolve(tmp_path, 'latest')[1] == 10


def test_best_ignores_nan_and_metrics_without_mean_iu(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(1, _state(1.0), metadata=META, metrics={'mean_iu': 0.2})
    ckpt.save(2, _state(2.0), metadata=META, metrics={'mean_iu': float('nan')})
    ckpt.save(3, _state(3.0), metadata=META, metrics={'loss': 1.0})
    assert ckpt.best_step() == 1
    assert ckpt.all_steps() == [1, 3]


def test_leftover_tmp_dir_does_not_break_restore(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(1, _state(1.0), metadata=META)
  ckpt.close()
  # What a kill in the middle of writing step 2 leaves behind.
  tmp = tmp_path / '2.orbax-checkpoint-tmp'
  (tmp / 'variables.orbax-checkpoint-tmp').mkdir(parents=True)
  (tmp / '_CHECKPOINT_METADATA').write_text('{"partial": ')
  assert checkpoint.read_metadata(tmp_path) == META
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 1
  _assert_tree_equal(ckpt.restore(_state(0.0))[0], _state(1.0))
  ckpt.save(2, _state(2.0), metadata=META)  # the interrupted step can be written again
  _assert_tree_equal(ckpt.restore(_state(0.0))[0], _state(2.0))
  ckpt.close()


def test_sigkill_during_save_keeps_previous(tmp_path):
  script = textwrap.dedent(f"""
      import os, signal
      import jax.numpy as jnp
      import orbax.checkpoint as ocp
      from fcn_jax import checkpoint
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r})
      ckpt.save(1, {{'params': {{'w': jnp.ones(3)}}, 'step': 1}}, metadata={{'arch': 'fcn8s'}})
      def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
      ocp.handlers.JsonCheckpointHandler.async_save = die  # after the arrays, before the JSON
      ocp.handlers.JsonCheckpointHandler.save = die
      ckpt.save(2, {{'params': {{'w': jnp.ones(3) * 2}}, 'step': 2}}, metadata={{'arch': 'fcn8s'}})
  """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
  assert any('tmp' in name for name in os.listdir(tmp_path))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    state, _, metadata = ckpt.restore({'params': {'w': jnp.zeros(3)}, 'step': 0})
  np.testing.assert_array_equal(state['params']['w'], np.ones(3))
  assert metadata == {'arch': 'fcn8s'}


def test_async_save_then_wait(tmp_path):
  with checkpoint.Checkpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(5, _state(5.0), metadata=META, metrics={'mean_iu': 0.1})
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 5
    _assert_tree_equal(ckpt.restore(_state(0.0))[0], _state(5.0))


@pytest.fixture(scope='module')
def tiny_fcn():
  model = models.build('fcn8s', width=1 / 16)
  variables = jax.jit(lambda rng: models.init_variables(model, rng))(jax.random.key(0))
  # Non-zero score layers so the outputs say something about every parameter.
  variables = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                           variables)
  images = jax.random.normal(jax.random.key(1), (2, 21, 26, 3))
  return model, variables, images


def _apply(model, variables, images):
  return jax.jit(model.apply)(variables, images)


def test_load_inference_from_save_inference(tmp_path, tiny_fcn):
  model, variables, images = tiny_fcn
  metadata = {'arch': 'fcn8s', 'num_classes': 21, 'width': 1 / 16, 'learnable_upsampling': True,
              'preprocessing': 'caffe_bgr'}
  checkpoint.save_inference(tmp_path / 'weights', variables, metadata)
  loaded_model, loaded_vars, loaded_meta = checkpoint.load_inference(tmp_path / 'weights')
  assert loaded_meta == metadata
  assert loaded_model == model
  expected = _apply(model, variables, images)
  np.testing.assert_array_equal(_apply(loaded_model, loaded_vars, images), expected)
  with pytest.raises(FileExistsError):
    checkpoint.save_inference(tmp_path / 'weights', variables, metadata)
  checkpoint.save_inference(tmp_path / 'weights', variables, metadata, overwrite=True)
  assert checkpoint.read_metadata(tmp_path / 'weights') == metadata


def test_load_inference_from_training_run(tmp_path, tiny_fcn):
  model, variables, images = tiny_fcn
  params = variables['params']
  tx = optax.sgd(0.1, momentum=0.9)
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  for step, iu in ((1, 0.3), (2, 0.1), (3, None)):
    p = jax.tree.map(lambda x: x * step, params)
    state = TrainState(params=p, batch_stats={}, opt_state=tx.init(p), step=step, rng=jax.random.key(0))
    ckpt.save(step, state, metadata=META, metrics=None if iu is None else {'mean_iu': iu})
  ckpt.close()
  for which, step in (('best', 1), ('latest', 3)):
    loaded_model, loaded_vars, loaded_meta = checkpoint.load_inference(tmp_path, which)
    assert set(loaded_vars) == {'params'}
    assert loaded_meta == META
    expected = _apply(model, {'params': jax.tree.map(lambda x: x * step, params)}, images)
    np.testing.assert_array_equal(_apply(loaded_model, loaded_vars, images), expected)
  # A step directory works too.
  assert checkpoint.load_inference(tmp_path / '3')[2] == META


def test_errors_name_the_directory(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=str(empty)):
    checkpoint.load_inference(empty)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.load_inference(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match=str(empty)):
    checkpoint.read_metadata(empty)
  # A checkpoint without metadata (written by someone else with plain orbax).
  import orbax.checkpoint as ocp
  bare = tmp_path / 'bare'
  with ocp.CheckpointManager(bare) as manager:
    manager.save(0, args=ocp.args.Composite(variables=ocp.args.StandardSave({'params': {'w': np.ones(2)}})))
  with pytest.raises(ValueError, match=f'{bare}.*metadata'):
    checkpoint.load_inference(bare)
  with pytest.raises(ValueError, match='arch'):
    checkpoint.save_inference(tmp_path / 'x', {'params': {}}, {'width': 1})
  with checkpoint.Checkpointer(tmp_path / 'run') as ckpt:
    with pytest.raises(FileNotFoundError, match='run'):
      ckpt.restore(_state(0.0))
