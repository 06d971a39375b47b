"""Experiment tracking (config.tracking): metrics.jsonl mirrored to TensorBoard, MLflow (its local
file store) and W&B (offline), each read back from its own files; a resumed run continues the same
MLflow and W&B runs, a run from step 0 starts new ones; an unknown tracker or a missing package is
refused with the config, before any data is prepared. No network: W&B offline without an API key,
MLflow's store under tmp_path, telemetry off."""

from __future__ import annotations

import json
import pathlib
import struct
import sys

import ml_collections
import pytest

from fcn_jax import config_checks, report, tracking, train
from fcn_jax.data import synthetic
from fcn_jax.errors import Preempted, UserError

INSTALL_HINT = "pip install -e '.[tracking]'"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
  monkeypatch.delenv('MLFLOW_ALLOW_FILE_STORE', raising=False)  # fcn_jax.tracking sets it
  for name in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR'):
    monkeypatch.setenv(name, str(tmp_path / 'wandb-home' / name.lower()))
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('MLFLOW_DISABLE_TELEMETRY', 'true')
  monkeypatch.setenv('DO_NOT_TRACK', 'true')


@pytest.fixture(scope='module')
def tiny_voc(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('voc')
  synthetic.write_voc_tree(root, num_train=8, num_val=4, seed=1, min_size=40, max_size=56)
  return root


def _config(tiny_voc, data_dir, steps: int) -> ml_collections.ConfigDict:
  from experiments import common
  c = common.load_config('fcn32s', 'demo')
  c.model.width = 0.0625
  c.dataset.manual_dir, c.dataset.data_dir = str(tiny_voc), str(data_dir)
  c.batch_size, c.crop_size, c.eval_batch_size, c.eval_pad_to = 2, 48, 4, 64
  c.num_train_steps, c.log_every, c.eval_every, c.checkpoint_every = steps, 1, 2, 2
  c.num_figure_examples = 0  # no score-map figure: one compiled program less
  c.tracking = 'tensorboard,mlflow,wandb'
  return c


def _rows(work: pathlib.Path, kind: str, key: str) -> dict[int, float]:
  return {r['step']: r[key] for r in report.read_metrics(work) if r['kind'] == kind}


def _tensorboard(folder: pathlib.Path, tag: str) -> list[tuple[int, float]]:
  """(step, value) of a scalar in tensorboardX's event files (TFRecord-framed Event protos)."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(folder.glob('events.*')):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  return out


def _wandb_history(path: pathlib.Path) -> list[dict]:
  """The history rows of an offline W&B run file (run-<id>.wandb): W&B's LevelDB-style log of
  Record protos in 32 KiB blocks after a 7-byte header."""
  from wandb.proto import wandb_internal_pb2
  data = path.read_bytes()
  assert data[:4] == b':W&B'
  pos, pending, rows = 7, b'', []
  while pos + 7 <= len(data):
    left = 32768 - pos % 32768
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    if left < 7 or (kind == 0 and length == 0):
      pos += left  # the rest of a block is padding
      continue
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
    if kind in (1, 4):
      record = wandb_internal_pb2.Record.FromString(pending)
      if record.WhichOneof('record_type') == 'history':
        rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item})
  return rows


def _mlflow(workdir: pathlib.Path):
  from mlflow.tracking import MlflowClient
  return MlflowClient(tracking_uri=(workdir / 'mlruns').resolve().as_uri())


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
  return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _wandb_attempts(workdir: pathlib.Path, run_id: str) -> list[pathlib.Path]:
  """The offline run folders of W&B run `run_id` (offline-run-<time>-<id>[-<n>], one per attempt)."""
  return list((workdir / 'wandb').glob(f'offline-run-*-{run_id}*'))


def _wandb_rows(workdir: pathlib.Path, run_id: str) -> list[dict]:
  """The history rows of every attempt of W&B run `run_id`, in logging order."""
  rows = [row for d in _wandb_attempts(workdir, run_id)
          for row in _wandb_history(d / f'run-{run_id}.wandb')]
  return sorted(rows, key=lambda row: row['_timestamp'])


def test_tracked_run_reads_back_from_each_store(tiny_voc, tmp_path):
  """A short training run with the three trackers: each store holds metrics.jsonl's values."""
  pytest.importorskip('mlflow', reason=INSTALL_HINT)
  pytest.importorskip('wandb', reason=INSTALL_HINT)
  work = tmp_path / 'run'
  train.train_and_evaluate(_config(tiny_voc, tmp_path / 'tfds', steps=2), work)
  loss, mean_iu = _rows(work, 'train', 'loss'), _rows(work, 'eval', 'mean_iu')
  assert sorted(loss) == [1, 2] and sorted(mean_iu) == [2]

  ids = tracking.read_state(work)
  client = _mlflow(work)
  run = client.get_run(ids['mlflow']['run_id'])
  assert run.info.status == 'FINISHED' and run.info.run_name == 'run'
  assert client.get_experiment(run.info.experiment_id).name == 'fcn32s'
  params = run.data.params
  assert params['batch_size'] == '2' and params['model.width'] == '0.0625'
  assert params['tracking'] == 'tensorboard,mlflow,wandb' and params['scale_range'] == '[]'
  assert _history(client, run.info.run_id, 'train/loss') == sorted(loss.items())
  assert _history(client, run.info.run_id, 'eval/mean_iu') == sorted(mean_iu.items())

  rows = _wandb_rows(work, ids['wandb']['id'])
  assert {r['step']: r['train/loss'] for r in rows if 'train/loss' in r} == loss
  assert {r['step']: r['eval/mean_iu'] for r in rows if 'eval/mean_iu' in r} == mean_iu

  scalars = _tensorboard(work / 'tensorboard', 'train/loss')
  assert dict(scalars) == pytest.approx(loss, rel=1e-6)  # float32 in the event files
  assert dict(_tensorboard(work / 'tensorboard', 'eval/mean_iu')) == pytest.approx(mean_iu,
                                                                                  rel=1e-6)


def _tracked(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='demo', arch='fcn32s', num_train_steps=2, tracking='tensorboard,mlflow,wandb',
      tracking_uri='', wandb_project='', wandb_mode='offline') | fields)


def test_resume_continues_the_runs_and_a_run_from_step_0_starts_new_ones(tmp_path):
  """The writer as the loop drives it (resume_step = the checkpoint a run restarts from)."""
  pytest.importorskip('mlflow', reason=INSTALL_HINT)
  pytest.importorskip('wandb', reason=INSTALL_HINT)
  writer = report.MetricWriter(tmp_path, config=_tracked())
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': 1.0 / step, 'note': 'text', 'nan': float('nan')})
  with pytest.raises(Preempted):  # a kill after the step-2 checkpoint, step 3 already logged
    try:
      raise Preempted('SIGTERM: saved step 2', 'SIGTERM')
    finally:
      writer.close()
  first = tracking.read_state(tmp_path)
  client = _mlflow(tmp_path)
  run_id = first['mlflow']['run_id']
  assert client.get_run(run_id).info.status == 'KILLED'

  writer = report.MetricWriter(tmp_path, resume_step=2, config=_tracked(num_train_steps=4))
  assert tracking.read_state(tmp_path) == first
  assert sorted(_rows(tmp_path, 'train', 'loss')) == [1, 2]  # step 3 is logged again
  for step in (3, 4):
    writer.write(step, 'train', {'loss': 0.1 * step})
  writer.close()
  writer.write(5, 'eval', {'mean_iu': 0.1})  # after close: metrics.jsonl alone
  loss = _rows(tmp_path, 'train', 'loss')
  run = client.get_run(run_id)
  assert run.info.status == 'FINISHED' and set(run.data.metrics) == {'train/loss'}
  assert run.data.params['num_train_steps'] == '2'  # MLflow params never change: a tag says so
  assert run.data.tags['resumed_at_2.num_train_steps'] == '4'
  history = _history(client, run_id, 'train/loss')  # append-only: step 3 twice, the latest last
  assert [s for s, _ in history] == [1, 2, 3, 3, 4] and dict(history) == loss
  rows = _wandb_rows(tmp_path, first['wandb']['id'])
  assert len(_wandb_attempts(tmp_path, first['wandb']['id'])) == 2
  assert [r['step'] for r in rows] == [1, 2, 3, 3, 4]
  assert {r['step']: r['train/loss'] for r in rows} == loss
  assert 'nan' not in rows[0] and 'note' not in rows[0]

  writer = report.MetricWriter(tmp_path, resume_step=None, config=_tracked())  # from step 0
  writer.close()
  second = tracking.read_state(tmp_path)
  assert second['mlflow']['run_id'] != run_id and second['wandb']['id'] != first['wandb']['id']
  assert [json.loads(p.read_text()) for p in tmp_path.glob('tracking.before-*.json')] == [first]
  assert report.read_metrics(tmp_path) == []


def test_unknown_tracker_or_missing_package_is_refused_before_any_data(tiny_voc, tmp_path,
                                                                       monkeypatch):
  c = _config(tiny_voc, tmp_path / 'tfds', steps=2)
  c.tracking = 'tensorboard, neptune'
  with pytest.raises(UserError, match="config.tracking='tensorboard, neptune': unknown tracker "
                                      "'neptune'; a comma-separated list of tensorboard, mlflow"):
    train.train_and_evaluate(c, tmp_path / 'run')
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'tfds').exists()

  monkeypatch.setitem(sys.modules, 'wandb', None)  # as if not installed
  c.tracking = 'tensorboard,wandb'
  with pytest.raises(UserError) as refused:
    train.train_and_evaluate(c, tmp_path / 'run')
  assert "config.tracking='tensorboard,wandb': wandb needs wandb, which is not installed: " \
         f'{INSTALL_HINT}' in str(refused.value)
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'tfds').exists()
  with pytest.raises(UserError, match='wandb needs wandb'):
    report.MetricWriter(tmp_path / 'direct', config=_tracked(tracking='wandb'))

  c.tracking, c.wandb_mode = '', 'cloud'
  problems = config_checks._problems(c)
  assert any(p.startswith("config.wandb_mode='cloud': one of offline") for p in problems)
  assert not any('config.tracking=' in p for p in problems)  # '' = metrics.jsonl alone
