"""Multi-host training on one machine: two processes on 127.0.0.1 (jax.distributed, CPU, gloo) train a
tiny config through the experiments command line and must end with the parameters of ONE process
fed the same global batches; their checkpoint restores in a single process.

The runs compile with XLA's backend optimisation off (the same for all of them): compiling, not
running, is what a tiny model costs, and this makes it several times cheaper.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from fcn_jax import checkpoint, distributed, models, train
from fcn_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
       'XLA_FLAGS': '--xla_backend_optimization_level=0'}
for _name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'JAX_LOCAL_DEVICE_IDS'):
  ENV.pop(_name, None)
TIMEOUT = 300

STEPS = 2
# Global batch 4: two processes x 2 images, one CPU device each. Native-size evaluation (the reference
# protocol) over 3 validation images: the processes' shards differ in length (2 and 1).
SETTINGS = {
    'model.width': 0.0625, 'batch_size': 4, 'crop_size': 40, 'flip': True, 'scale_range': (0.75, 1.25),
    'eval_batch_size': 1, 'eval_pad_to': 0, 'log_every': 1, 'num_train_steps': STEPS,
    'checkpoint_every': 1, 'eval_every': STEPS, 'num_figure_examples': 1,
}


def _flag(value) -> str:
  return f'({value[0]}, {value[1]})' if isinstance(value, tuple) else str(value)


# One process with two devices (the same device layout) fed the concatenation of what processes 0 and
# 1 of 2 read, i.e. the same global batches, through the same command line.
REFERENCE = textwrap.dedent('''
    import json, sys
    import jax
    import numpy as np
    from fcn_jax import train
    from fcn_jax.train import loop
    shard_iterator = train.train_iterator

    class Concatenated:
      def __init__(self, iterators):
        self.iterators = iterators
      def __iter__(self):
        return self
      def __next__(self):
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      def get_state(self):
        return json.dumps([it.get_state().decode() for it in self.iterators]).encode()

    def as_two_processes(config, source, *, batch_size, shard_index, shard_count):
      assert (shard_index, shard_count) == (0, 1)
      return Concatenated([shard_iterator(config, source, batch_size=batch_size // 2, shard_index=k,
                                          shard_count=2) for k in range(2)])

    loop.train_iterator = as_two_processes  # where the training loop looks it up
    assert jax.device_count() == 2 and jax.process_count() == 1, jax.devices()
    from experiments import common
    sys.argv = ['fcn32s'] + sys.argv[1:]
    common.main('fcn32s')
''')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A tiny synthetic VOC tree, prepared once (the runs then only read it)."""
  root = tmp_path_factory.mktemp('mh')
  synthetic.write_voc_tree(root / 'voc', num_train=12, num_val=3, seed=3, min_size=40, max_size=40)
  from fcn_jax import data as data_lib
  for split in ('train', 'val'):
    data_lib.get_data_source('voc_segmentation/2012', split, data_dir=str(root / 'tfds'),
                             manual_dir=str(root / 'voc'))
  return root


def _config(root: pathlib.Path):
  from experiments import common
  c = common.load_config('fcn32s', 'demo')
  c.dataset.manual_dir, c.dataset.data_dir = str(root / 'voc'), str(root / 'tfds')
  c.update_from_flattened_dict(SETTINGS)
  c.model.num_classes = 21  # what training resolves from the VOC-format data
  return c


def _flags(workdir, root) -> list[str]:
  return [f'--workdir={workdir}', f'--config={REPO}/experiments/configs/fcn32s.py:demo',
          *(f'--config.{k}={_flag(v)}' for k, v in SETTINGS.items()),
          f'--config.dataset.manual_dir={root / "voc"}', f'--config.dataset.data_dir={root / "tfds"}']


def _worker(workdir, root, port: int, process_id: int) -> tuple[list[str], dict]:
  return ([sys.executable, '-m', 'experiments.fcn32s', *_flags(workdir, root),
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={process_id}'],
          ENV)


def _reference(workdir, root) -> tuple[list[str], dict]:
  env = {**ENV, 'XLA_FLAGS': ENV['XLA_FLAGS'] + ' --xla_force_host_platform_device_count=2'}
  return [sys.executable, '-c', REFERENCE, *_flags(workdir, root)], env


class Workers:
  """Processes started together; stopped (killed if need be) on leaving the block."""

  def __init__(self, commands, logs):
    self.procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open('w'), stderr=subprocess.STDOUT)
                  for (cmd, env), log in zip(commands, logs)]
    self.logs = logs

  def wait(self, timeout: float, expected: tuple[int, ...] = (0,)) -> list[int | None]:
    """Until all exit, one exits with a status not in `expected`, or the time is up (the rest are
    then killed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      codes = [p.poll() for p in self.procs]
      if all(c is not None for c in codes) or any(c not in (None, *expected) for c in codes):
        break
      time.sleep(0.2)
    self.stop()
    return [p.returncode for p in self.procs]

  def stop(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
      p.wait()

  def output(self, n: int = 3000) -> str:
    return '\n'.join(f'--- {log.name} ---\n' + log.read_text(errors='replace')[-n:] for log in self.logs)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_two_processes_match_one_process_over_the_same_global_batches(prepared, tmp_path):
  two, ref = tmp_path / 'two', tmp_path / 'ref'
  port = free_port()
  logs = [tmp_path / f'process{k}.log' for k in range(2)] + [tmp_path / 'reference.log']
  commands = [_worker(two, prepared, port, k) for k in range(2)] + [_reference(ref, prepared)]
  with Workers(commands, logs) as workers:
    codes = workers.wait(TIMEOUT)
    assert codes == [0, 0, 0], f'exit codes {codes}\n{workers.output()}'

  # The same parameters, up to the order of floating-point sums (across hosts vs within a process).
  _, two_vars, meta = checkpoint.load_inference(two / 'checkpoints', which='latest')  # in one process
  _, ref_vars, _ = checkpoint.load_inference(ref / 'checkpoints', which='latest')
  model = checkpoint.build_from_metadata(meta)
  init = models.init_variables(model, jax.random.split(jax.random.key(0))[0])['params']
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref_vars['params']))
  diff = _max_abs_diff(two_vars['params'], ref_vars['params'])
  moved = _max_abs_diff(ref_vars['params'], init)
  assert jax.tree.structure(two_vars) == jax.tree.structure(ref_vars)
  assert diff <= 1e-5 * scale, (diff, scale)
  assert moved > 1e3 * max(diff, 1e-6 * scale), (moved, diff)  # training changed what is compared

  # Evaluation reduced across hosts (shards of 2 and 1 images) gives the single-process scores.
  two_results = json.loads((two / 'results.json').read_text())
  ref_results = json.loads((ref / 'results.json').read_text())
  for key in ('pixel_acc', 'mean_iu'):
    assert two_results[key] == pytest.approx(ref_results[key], abs=1e-4), key

  # Logs, metrics and figures from process 0 only: every record once.
  records = [json.loads(line) for line in (two / 'metrics.jsonl').read_text().splitlines()]
  assert sorted((r['kind'], r['step']) for r in records) == [('eval', 2), ('train', 1), ('train', 2)]
  assert (two / 'figures' / 'score_maps.png').exists() and (two / 'figures' / 'training_curves.png').exists()
  assert logs[0].read_text().count(f'step {STEPS}: val: pixel_acc') == 1
  assert logs[1].read_text().count(f'step {STEPS}: val: pixel_acc') == 0

  # The full training state restores in one process, with both processes' data-iterator states.
  config = _config(prepared)
  model = train.model_from_config(config)
  variables = models.init_variables(model, jax.random.key(1))
  tx = train.optimizer_from_config(config, model, variables['params'])
  target = train.create_train_state(model, tx, variables, jax.random.key(2))
  with checkpoint.Checkpointer(two / 'checkpoints') as ckpt:
    assert ckpt.all_steps() == [1, 2]
    state, data_state, _ = ckpt.restore(target, STEPS)
  assert int(state.step) == STEPS
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(two_vars['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert data_state['process_count'] == 2 and len(data_state['per_process']) == 2
  samplers = [json.loads(s)['sampler'] for s in data_state['per_process']]
  assert 'shard_index=0, shard_count=2' in samplers[0] and 'shard_index=1, shard_count=2' in samplers[1]


def test_initialize_stays_single_process_without_a_cluster(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
               'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize(mode='auto') is False
  assert distributed.initialize(num_processes=1) is False
  assert distributed.initialize(mode='off', coordinator_address='127.0.0.1:1', num_processes=2,
                                process_id=0) is False
  with pytest.raises(ValueError, match='coordinator'):
    distributed.initialize(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match='mode'):
    distributed.initialize(mode='sometimes')
  assert distributed.allgather_bytes(b'abc') == [b'abc']
  np.testing.assert_array_equal(distributed.sum_across_processes(np.eye(2)), np.eye(2))
  assert distributed.main_process_first(lambda: 7, 'x') == 7


def test_sigterm_to_one_process_saves_all_at_one_step_and_resumes(prepared, tmp_path):
  """SIGTERM to process 1 only (a preempted host): both processes agree on the step through jax's
  preemption sync point, save it and exit 143; the same commands then finish the run, which ends
  with the parameters of an uninterrupted one-process run over the same global batches."""
  steps = ['--config.num_train_steps=12', '--config.eval_every=12', '--config.checkpoint_every=6']
  two, ref = tmp_path / 'two', tmp_path / 'ref'
  logs = [tmp_path / f'process{k}.log' for k in range(2)]

  def workers(port):
    return [(cmd + steps, env) for cmd, env in (_worker(two, prepared, port, k) for k in range(2))]

  with Workers(workers(free_port()), logs) as w:
    metrics = two / 'metrics.jsonl'
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and all(p.poll() is None for p in w.procs):
      if metrics.exists() and metrics.read_text().count('\n') >= 1:
        break
      time.sleep(0.05)
    w.procs[1].send_signal(signal.SIGTERM)
    codes = w.wait(TIMEOUT, expected=(143,))
  assert codes == [143, 143], f'exit codes {codes}\n{w.output()}'
  saved = [int(log.read_text().split('SIGTERM: saved step ')[1].split()[0]) for log in logs]
  assert saved[0] == saved[1] and 0 < saved[0] < 12, w.output()
  assert saved[0] in [int(p.name) for p in (two / 'checkpoints').iterdir() if p.name.isdigit()]

  ref_cmd, ref_env = _reference(ref, prepared)
  with Workers(workers(free_port()) + [(ref_cmd + steps, ref_env)],
               logs + [tmp_path / 'reference.log']) as w:
    codes = w.wait(TIMEOUT)
    assert codes == [0, 0, 0], f'exit codes {codes}\n{w.output()}'
  assert f'at step {saved[0]}' in logs[0].read_text()
  _, two_vars, _ = checkpoint.load_inference(two / 'checkpoints', which='latest')
  _, ref_vars, _ = checkpoint.load_inference(ref / 'checkpoints', which='latest')
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref_vars['params']))
  assert _max_abs_diff(two_vars['params'], ref_vars['params']) <= 1e-5 * scale
