"""Nothing lost, clear errors: each case of the reliability pass, as a user would meet it.

Every test asserts that a user's file survived, or that the command stopped with a message naming
the file or option and no traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from fcn_jax import checkpoint, images, models, train, workdir as workdir_lib
from fcn_jax.data import synthetic
from fcn_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config.model.width=0.0625', '--config.batch_size=2', '--config.crop_size=48',
        '--config.eval_batch_size=4', '--config.eval_pad_to=64', '--config.log_every=1',
        '--config.num_figure_examples=0']


def env(tmp_path: pathlib.Path) -> dict:
  return {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
          'FCN_JAX_CACHE_DIR': str(tmp_path / 'cache')}


def run(args: list[str], tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *args], env=env(tmp_path), capture_output=True,
                        text=True, timeout=timeout, cwd=REPO)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
  """Failed with a message (containing every needle) and without a traceback."""
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def train_cmd(workdir, voc, data_dir, *extra, arch='fcn32s', preset='demo') -> list[str]:
  return [f'experiments.{arch}', f'--workdir={workdir}',
          f'--config={REPO}/experiments/configs/{arch}.py:{preset}', *TINY,
          f'--config.dataset.manual_dir={voc}', f'--config.dataset.data_dir={data_dir}', *extra]


@pytest.fixture(scope='session')  # session: not rebuilt when xdist interleaves modules
def voc(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('voc')
  synthetic.write_voc_tree(root, num_train=8, num_val=4, seed=1, min_size=40, max_size=56)
  return root


@pytest.fixture(scope='session')  # session: not rebuilt when xdist interleaves modules
def finished_run(voc, tmp_path_factory) -> dict:
  """A finished tiny training run (4 updates), shared by the tests that resume or evaluate it."""
  base = tmp_path_factory.mktemp('finished')
  work = base / 'runs' / 'fcn32s'
  proc = run(train_cmd(work, voc, base / 'tfds', '--config.num_train_steps=4',
                       '--config.checkpoint_every=2', '--config.eval_every=4'), base)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {'base': base, 'work': work, 'data_dir': base / 'tfds'}


@pytest.fixture(scope='session')  # session: not rebuilt when xdist interleaves modules
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp('weights') / 'fcn32s'
  model = models.build('fcn32s', width=1 / 16)
  variables = models.init_variables(model, jax.random.key(0))
  checkpoint.save_inference(path, jax.device_get(variables), {
      'arch': 'fcn32s', 'width': 1 / 16, 'num_classes': 21, 'preprocessing': 'caffe_bgr',
      'class_names': [f'c{i}' for i in range(21)]})
  return path


def write_image(path: pathlib.Path, size=(40, 30), seed=0) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = (np.random.default_rng(seed).uniform(size=(size[1], size[0], 3)) * 255).astype(np.uint8)
  Image.fromarray(pixels).save(path)
  return path


# --------------------------------------------------------------------------------------------------
# Data loss


def test_predict_never_overwrites_inputs_and_keeps_same_stems_apart(tiny_checkpoint, tmp_path):
  a, b = write_image(tmp_path / 'in' / 'a' / 'img.jpg'), write_image(tmp_path / 'in' / 'b' / 'img.jpg', seed=1)
  own = write_image(tmp_path / 'in' / 'a' / 'photo.png', seed=2)
  before = own.read_bytes()
  # --out is the folder of an input PNG: its label map would be that file.
  proc = run(['fcn_jax.predict', '--checkpoint', str(tiny_checkpoint), '--out', str(own.parent),
              str(own)], tmp_path)
  assert_clean_error(proc, 'would overwrite the input image', str(own))
  assert own.read_bytes() == before
  proc = run(['fcn_jax.predict', '--checkpoint', str(tiny_checkpoint), '--out', str(own.parent),
              '--overwrite', str(own)], tmp_path)
  assert_clean_error(proc, 'would overwrite the input image')
  assert own.read_bytes() == before
  # Same stem in two folders: both label maps, mirrored.
  out = tmp_path / 'out'
  proc = run(['fcn_jax.predict', '--checkpoint', str(tiny_checkpoint), '--out', str(out), str(a),
              str(b)], tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (out / 'a' / 'img.png').exists() and (out / 'b' / 'img.png').exists()
  assert 'wrote 2 label maps' in proc.stdout
  # Existing outputs are not replaced without --overwrite.
  stamp = (out / 'a' / 'img.png').read_bytes()
  proc = run(['fcn_jax.predict', '--checkpoint', str(tiny_checkpoint), '--out', str(out), str(a),
              str(b)], tmp_path)
  assert_clean_error(proc, 'exist already', '--overwrite')
  assert (out / 'a' / 'img.png').read_bytes() == stamp


def test_predict_output_plan_refuses_colliding_names(tmp_path):
  a, b = tmp_path / 'x' / 'img.jpg', tmp_path / 'x' / 'img.png'
  for p in (a, b):
    write_image(p)
  with pytest.raises(UserError, match='would both write'):
    from fcn_jax import predict
    predict.output_paths([a, b], tmp_path / 'out', save_scores=False)


def test_synthetic_never_replaces_existing_files(tmp_path):
  manual = tmp_path / 'manual'
  lists = manual / 'VOCdevkit' / 'VOC2012' / 'ImageSets' / 'Segmentation'
  lists.mkdir(parents=True)
  (lists / 'train.txt').write_text('my_real_id\n')
  proc = run(['fcn_jax.data.synthetic', '--out', str(manual), '--voc-train', '2', '--voc-val', '1',
              '--sbd-train', '2', '--sbd-val', '1'], tmp_path)
  assert_clean_error(proc, 'already exist', 'train.txt', 'nothing was written')
  assert (lists / 'train.txt').read_text() == 'my_real_id\n'
  assert sorted(p.name for p in manual.rglob('*') if p.is_file()) == ['train.txt']
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.manual.tmp')]
  # Into an empty directory it writes the whole tree.
  proc = run(['fcn_jax.data.synthetic', '--out', str(tmp_path / 'new'), '--voc-train', '2',
              '--voc-val', '1', '--sbd-train', '2', '--sbd-val', '1', '--archived'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert sorted(p.name for p in (tmp_path / 'new').iterdir()) == sorted(
      list(synthetic.VOC_ARCHIVE_NAMES.values()) + [synthetic.SBD_ARCHIVE_NAME])


def test_convert_overwrite_only_replaces_a_checkpoint(tmp_path):
  import torch
  torch.manual_seed(0)
  sys.path.insert(0, str(REPO / 'tests'))
  import torch_fcn
  src = tmp_path / 'vgg.pth'
  torch.save(torch_fcn.TorchFCN('fcn32s', width=1 / 16).state_dict(), src)
  user_dir = tmp_path / 'my_files'
  user_dir.mkdir()
  (user_dir / 'thesis.tex').write_text('precious')
  proc = run(['fcn_jax.convert', str(src), '--arch', 'fcn32s', '--out', str(user_dir), '--overwrite'],
             tmp_path)
  assert_clean_error(proc, 'not an fcn_jax checkpoint', str(user_dir))
  assert (user_dir / 'thesis.tex').read_text() == 'precious'
  out = tmp_path / 'weights'
  for _ in range(2):  # the second time replaces the checkpoint it wrote
    proc = run(['fcn_jax.convert', str(src), '--arch', 'fcn32s', '--out', str(out), '--overwrite'],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
  assert checkpoint.is_checkpoint_dir(out)
  # --out that is a file; bad numbers.
  (tmp_path / 'file').write_text('x')
  assert_clean_error(run(['fcn_jax.convert', str(src), '--arch', 'fcn32s', '--out',
                          str(tmp_path / 'file')], tmp_path), 'is a file')
  assert_clean_error(run(['fcn_jax.convert', str(src), '--arch', 'fcn32s', '--out', str(tmp_path / 'o'),
                          '--num-classes', '0'], tmp_path), '--num_classes 0')
  assert_clean_error(run(['fcn_jax.convert', str(src), '--arch', 'fcn32s', '--out', str(tmp_path / 'o'),
                          '--width', '-1'], tmp_path), '--width -1')
  assert not (tmp_path / 'o').exists()


def test_make_clean_keeps_runs(tmp_path):
  shutil.copy(REPO / 'Makefile', tmp_path / 'Makefile')
  (tmp_path / 'runs' / 'fcn32s').mkdir(parents=True)
  (tmp_path / 'runs' / 'fcn32s' / 'results.json').write_text('{}')
  (tmp_path / '.venv').mkdir()
  subprocess.run(['make', 'clean'], cwd=tmp_path, check=True, capture_output=True)
  assert (tmp_path / 'runs' / 'fcn32s' / 'results.json').exists()
  assert not (tmp_path / '.venv').exists()


@pytest.mark.xdist_group('finished_run')  # one worker builds the shared run
def test_evaluate_default_out_keeps_run_results_and_converted_results_apart(finished_run, voc,
                                                                            tiny_checkpoint, tmp_path):
  work, data_dir = finished_run['work'], finished_run['data_dir']
  run_results = (work / 'results.json').read_text()
  args = ['--dataset=voc_segmentation/2012', '--split=val', f'--data_dir={data_dir}', '--pad_to=64',
          '--batch_size=4', '--compilation_cache_dir=']
  proc = run(['experiments.evaluate', f'--checkpoint={work}', *args], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (work / 'results.json').read_text() == run_results
  out = work / 'eval' / 'voc_segmentation-2012_val_step4'
  assert json.loads((out / 'results.json').read_text())['step'] == 4
  # Again: the results are there, so it refuses without --overwrite.
  assert_clean_error(run(['experiments.evaluate', f'--checkpoint={work}', *args], tmp_path),
                     'results.json exists', '--overwrite')
  # Two converted weights under one parent: one results directory each.
  other = tiny_checkpoint.parent / 'fcn32s_copy'
  shutil.copytree(tiny_checkpoint, other, dirs_exist_ok=True)
  for ckpt in (tiny_checkpoint, other):
    proc = run(['experiments.evaluate', f'--checkpoint={ckpt}', *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tiny_checkpoint.parent / 'fcn32s_eval' / 'voc_segmentation-2012_val_step0' / 'results.json').exists()
  assert (tiny_checkpoint.parent / 'fcn32s_copy_eval' / 'voc_segmentation-2012_val_step0' / 'results.json').exists()


# --------------------------------------------------------------------------------------------------
# Workdir integrity


def test_workdir_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
  work = tmp_path / 'w'
  with workdir_lib.WorkdirLock(work):
    with pytest.raises(workdir_lib.WorkdirBusyError, match='in use by another run'):
      workdir_lib.WorkdirLock(work).acquire()
  assert not (work / workdir_lib.LOCK_NAME).exists()  # released
  # A crashed run's lock (its pid no longer runs) is taken over.
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (work / workdir_lib.LOCK_NAME).write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid}))
  messages = []
  with workdir_lib.WorkdirLock(work, log=messages.append):
    pass
  assert 'no longer running' in messages[0]
  # Another host's lock cannot be checked: the message says which file to delete.
  (work / workdir_lib.LOCK_NAME).write_text(json.dumps({'host': 'elsewhere', 'pid': 1}))
  with pytest.raises(workdir_lib.WorkdirBusyError, match='delete .*fcn_jax.lock'):
    workdir_lib.WorkdirLock(work).acquire()


def test_second_run_in_a_busy_workdir_stops_before_writing(voc, tmp_path):
  work = tmp_path / 'run'
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  try:
    work.mkdir()
    start = workdir_lib._process_start(sleeper.pid)
    (work / workdir_lib.LOCK_NAME).write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': sleeper.pid, 'start': start, 'since': 'now'}))
    proc = run(train_cmd(work, voc, tmp_path / 'tfds', '--config.num_train_steps=2'), tmp_path)
    assert_clean_error(proc, 'in use by another run', f'pid {sleeper.pid}')
    assert sorted(p.name for p in work.iterdir()) == [workdir_lib.LOCK_NAME]
  finally:
    sleeper.kill()
    sleeper.wait()


@pytest.mark.xdist_group('finished_run')  # one worker builds the shared run
def test_incompatible_resume_names_the_field_and_changes_nothing(finished_run, voc, tmp_path):
  work = finished_run['work']
  config_before = (work / 'config.json').read_text()
  steps_before = sorted(p.name for p in (work / 'checkpoints').iterdir())
  proc = run(train_cmd(work, voc, finished_run['data_dir'], '--config.num_train_steps=4',
                       '--config.model.width=0.125'), tmp_path)
  assert_clean_error(proc, 'width: checkpoint 0.0625, this run 0.125', 'Nothing was changed')
  proc = run(train_cmd(work, voc, finished_run['data_dir'], '--config.num_train_steps=4',
                       arch='fcn8s_atonce'), tmp_path)
  assert_clean_error(proc, "arch: checkpoint 'fcn32s', this run 'fcn8s_atonce'")
  assert (work / 'config.json').read_text() == config_before
  assert sorted(p.name for p in (work / 'checkpoints').iterdir()) == steps_before


@pytest.mark.xdist_group('finished_run')  # one worker builds the shared run
def test_lowering_num_train_steps_reports_the_true_step(finished_run, voc, tmp_path):
  base = tmp_path / 'copy'
  shutil.copytree(finished_run['work'], base)
  proc = run(train_cmd(base, voc, finished_run['data_dir'], '--config.num_train_steps=2'), tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'already at step 4' in proc.stderr + proc.stdout
  assert json.loads((base / 'results.json').read_text())['step'] == 4
  assert (base / 'config.before_step4.json').exists()  # the previous config kept beside


def test_epochs_resolve_at_run_time_from_the_batch_size():
  from experiments import common
  c = common.load_config('fcn32s', 'paper')
  assert c.num_train_steps == 0 and c.total_epochs == 175
  assert train.resolve_num_updates(c, 8498) == 74358  # 175 epochs of SBD train at batch 20
  c.batch_size = 8
  assert train.resolve_num_updates(c, 8498) == 185894  # ceil(175 * 8498 / 8)
  c.accumulate_steps = 2
  assert train.resolve_num_updates(c, 8498) == 92947
  c.num_train_steps = 10
  assert train.resolve_num_updates(c, 8498) == 10


def test_cadences_count_optimiser_updates_with_accumulation(voc, tmp_path):
  work = tmp_path / 'acc'
  proc = run(train_cmd(work, voc, tmp_path / 'tfds', '--config.accumulate_steps=3',
                       '--config.num_train_steps=4', '--config.log_every=2',
                       '--config.checkpoint_every=2', '--config.eval_every=4',
                       '--config.keep_checkpoints=3'), tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['kind'] == 'train'] == [2, 4]
  assert sorted(int(p.name) for p in (work / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 4]
  state = checkpoint.read_metadata(work / 'checkpoints', 'latest')
  assert state['accumulate_steps'] == 3
  assert json.loads((work / 'results.json').read_text())['step'] == 4


# --------------------------------------------------------------------------------------------------
# Preemption


def test_sigterm_saves_and_the_same_command_resumes_identically(voc, tmp_path):
  data_dir = tmp_path / 'tfds'
  # With the moving average of the weights and early stopping's count (a patience never reached):
  # both are part of what resumes bit for bit.
  steps = ['--config.num_train_steps=16', '--config.checkpoint_every=4', '--config.eval_every=8',
           '--config.log_every=1', '--config.ema_decay=0.9',
           '--config.early_stopping_metric=mean_iu', '--config.early_stopping_patience=100']
  ref = run(train_cmd(tmp_path / 'ref', voc, data_dir, *steps), tmp_path)
  assert ref.returncode == 0, ref.stderr[-3000:]
  work = tmp_path / 'preempted'
  proc = subprocess.Popen([sys.executable, '-m', *train_cmd(work, voc, data_dir, *steps)],
                          env=env(tmp_path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  metrics = work / 'metrics.jsonl'
  while time.time() < deadline and proc.poll() is None:  # training has started: a step is logged
    if metrics.exists() and metrics.read_text().count('\n') >= 1:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 143, stderr[-3000:]
  assert 'SIGTERM: saved step' in stderr and 'Traceback' not in stderr, stderr[-3000:]
  saved = int(stderr.split('SIGTERM: saved step ')[1].split()[0])
  assert 0 < saved < 16
  assert saved in [int(p.name) for p in (work / 'checkpoints').iterdir() if p.name.isdigit()]
  assert not (work / workdir_lib.LOCK_NAME).exists()
  with (work / 'metrics.jsonl').open('a') as f:  # as if killed after logging past the checkpoint
    f.write(json.dumps({'step': saved + 1, 'kind': 'train', 'loss': 1.0}) + '\n{"step": 9')
  again = run(train_cmd(work, voc, data_dir, *steps), tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'resumed from {work / "checkpoints"} at step {saved}' in again.stderr + again.stdout
  rows = [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]
  train_steps = [r['step'] for r in rows if r['kind'] == 'train']
  assert train_steps == list(range(1, 17)), train_steps  # every step once
  for weights in ('params', 'ema'):
    a = checkpoint.load_inference(tmp_path / 'ref', which='latest', weights=weights)[1]
    b = checkpoint.load_inference(work, which='latest', weights=weights)[1]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  ref_rows = [json.loads(line)
              for line in (tmp_path / 'ref' / 'metrics.jsonl').read_text().splitlines()]
  evals = lambda rs: [r for r in rs if r['kind'] in ('eval', 'eval_ema')]
  assert len(evals(rows)) == 4 and evals(rows) == evals(ref_rows)
  with checkpoint.Checkpointer(tmp_path / 'ref' / 'checkpoints') as ref_ckpt, \
       checkpoint.Checkpointer(work / 'checkpoints') as ckpt:
    assert ckpt.loop_state(16) == ref_ckpt.loop_state(16)
    assert ckpt.loop_state(16)['early_stopping']['metric'] == 'mean_iu'


# --------------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.xdist_group('finished_run')  # one worker builds the shared run
def test_checkpoint_paths_missing_empty_wrong_or_the_run_directory(finished_run, tmp_path):
  work = finished_run['work']
  assert checkpoint.resolve_directory(work) == str(work / 'checkpoints')  # the run dir just works
  assert checkpoint.load_inference(work, which='latest')[2]['arch'] == 'fcn32s'
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('x')
  (tmp_path / 'file').write_text('x')
  for path, message in ((tmp_path / 'nope', 'does not exist'), (tmp_path / 'empty', 'is empty'),
                        (tmp_path / 'other', 'holds no fcn_jax checkpoint'),
                        (tmp_path / 'file', 'is a file')):
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=message):
      checkpoint.load_inference(path)
  image = write_image(tmp_path / 'photo.jpg')
  assert_clean_error(run(['fcn_jax.predict', '--checkpoint', str(tmp_path / 'empty'), '--out',
                          str(tmp_path / 'p'), str(image)], tmp_path), 'is empty')
  assert_clean_error(run(['experiments.evaluate', f'--checkpoint={tmp_path / "other"}',
                          '--dataset=voc_segmentation/2012', '--split=val'], tmp_path),
                     'holds no fcn_jax checkpoint')


def test_predict_reports_bad_and_huge_images_and_goes_on(tiny_checkpoint, tmp_path):
  good = write_image(tmp_path / 'in' / 'good.jpg')
  bad = tmp_path / 'in' / 'broken.jpg'
  bad.write_bytes(b'not a jpeg')
  huge = tmp_path / 'in' / 'huge.png'
  Image.new('1', (20000, 10000)).save(huge)  # past PIL's decompression-bomb limit
  big = write_image(tmp_path / 'in' / 'big.png', size=(300, 200))
  (tmp_path / 'outfile').write_text('x')
  assert_clean_error(run(['fcn_jax.predict', '--checkpoint', str(tiny_checkpoint), '--out',
                          str(tmp_path / 'outfile'), str(good)], tmp_path), 'is a file')
  assert_clean_error(run(['fcn_jax.predict', '--checkpoint', str(tiny_checkpoint), '--out',
                          str(tmp_path / 'o'), str(tmp_path / 'missing.jpg')], tmp_path),
                     'missing.jpg: no such file')
  out = tmp_path / 'out'
  proc = run(['fcn_jax.predict', '--checkpoint', str(tiny_checkpoint), '--out', str(out),
              '--max-size', '256', str(tmp_path / 'in')], tmp_path)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert f'{bad}: cannot read the image' in proc.stderr
  assert f'{huge}: image is 20000x10000, larger than --max_size 256' in proc.stderr
  assert f'{big}: image is 300x200' in proc.stderr
  assert (out / 'good.png').exists() and 'wrote 1 label map to' in proc.stdout
  assert images.read_rgb(big, max_size=0).shape == (200, 300, 3)


def test_exif_orientation_is_applied(tmp_path):
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, :20] = 255  # left half white as stored
  exif = Image.Exif()
  exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
  Image.fromarray(pixels).save(tmp_path / 'rotated.jpg', exif=exif, quality=100)
  shown = images.read_rgb(tmp_path / 'rotated.jpg')
  assert shown.shape == (40, 20, 3)  # as displayed: portrait
  assert shown[:18].mean() > 200 and shown[22:].mean() < 50  # the white half is now on top


def test_training_config_mistakes_stop_before_any_work(voc, tmp_path):
  data_dir = tmp_path / 'tfds'
  cases = [
      (['--config.model.width=-1'], 'config.model.width=-1.0'),
      (['--config.model.num_classes=1'], 'config.model.num_classes=1'),
      (['--config.dataset.eval_split=vall'], "no split 'vall'"),
      (['--config.dataset.name=pascal'], "unknown dataset 'pascal'"),
      (['--config.optim.lr=1'], "config has no field 'optim.lr'"),
      (['--config.batch_size=0'], 'config.batch_size=0'),
  ]
  for extra, message in cases:
    proc = run(train_cmd(tmp_path / 'run', voc, data_dir, *extra), tmp_path)
    assert_clean_error(proc, message)
  proc = run(train_cmd(tmp_path / 'run', voc, data_dir, preset='deom'), tmp_path)
  assert_clean_error(proc, "unknown preset 'deom'", 'paper, heavy, demo')
  assert not data_dir.exists() and not (tmp_path / 'run').exists()


@pytest.mark.xdist_group('finished_run')  # one worker builds the shared run
def test_evaluate_flag_mistakes(finished_run, tmp_path):
  work, data_dir = finished_run['work'], finished_run['data_dir']
  base = [f'--checkpoint={work}', '--dataset=voc_segmentation/2012', f'--data_dir={data_dir}',
          '--compilation_cache_dir=']
  assert_clean_error(run(['experiments.evaluate', *base, '--split=val', '--batch_size=0'], tmp_path),
                     '--batch_size 0')
  assert_clean_error(run(['experiments.evaluate', *base, '--split=nope'], tmp_path), "no split 'nope'")
  (tmp_path / 'file').write_text('x')
  assert_clean_error(run(['experiments.evaluate', *base, '--split=val', f'--out={tmp_path / "file"}'],
                         tmp_path), 'is a file')
  assert_clean_error(run(['experiments.evaluate', *base, '--split=val', '--pad_to=16',
                          f'--out={tmp_path / "e"}'], tmp_path), 'larger than pad_to=16', '--pad_to')


# --------------------------------------------------------------------------------------------------
# Where things go, what the docs promise, help


def test_demo_preset_writes_only_under_its_workdir_and_the_cache(tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  proc = run(['experiments.fcn32s', f'--workdir={home / "run1"}',
              f'--config={REPO}/experiments/configs/fcn32s.py:demo', *TINY,
              '--config.num_train_steps=1', '--config.eval_every=1', '--config.synthetic.num_train=2',
              '--config.synthetic.num_val=1', '--config.synthetic.min_size=40',
              '--config.synthetic.max_size=48'], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in home.iterdir()) == ['run1']
  assert list((tmp_path / 'cache' / 'synthetic').glob('voc-2-1-40-48-seed0/VOCdevkit'))


def test_docs_install_from_a_checkout():
  for path in [REPO / 'README.md', *sorted((REPO / 'notebooks').glob('*.ipynb'))]:
    assert 'github.com/fcn-jax' not in path.read_text(), path
  assert 'pip install -e .' in (REPO / 'README.md').read_text()


def test_help_shows_flags_fields_and_outputs(tmp_path):
  proc = run(['experiments.fcn32s', '--help'], tmp_path)
  assert proc.returncode == 0
  for needle in ('--workdir', '--config:', '--config.optim.learning_rate', '--config.total_epochs',
                 'optimiser updates'):
    assert needle in proc.stdout, needle
  proc = run(['fcn_jax.predict', '--help'], tmp_path)
  assert '_overlay.jpg' in proc.stdout and '--max_size' in proc.stdout


def test_every_option_of_the_data_tools_has_help(monkeypatch):
  import argparse
  from fcn_jax.data import pipeline
  for module in (synthetic, pipeline):
    captured = {}

    def capture(self, *args, **kwargs):
      captured['parser'] = self
      raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', capture)
    with pytest.raises(SystemExit):
      module.main([])
    actions = [a for a in captured['parser']._actions if a.dest != 'help']
    assert actions and all(a.help for a in actions), module.__name__
