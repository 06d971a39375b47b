"""Your own data: the folder / coco / voc_like formats through the TFDS builder, every bad-input
error, class weights, fine-tuning across class counts, and the README walk-through end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fcn_jax import checkpoint, data as data_lib, losses, models, train
from fcn_jax.data import custom, synthetic
from fcn_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def env(tmp_path) -> dict:
  return {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
          'FCN_JAX_CACHE_DIR': str(tmp_path / 'cache')}


def source(fmt, root, split, data_dir, **kw):
  return data_lib.get_data_source(fmt, split, data_dir=str(data_dir), root=str(root), **kw)


def labels_of(src) -> dict[str, np.ndarray]:
  return {data_lib.file_name(src[i]): data_lib.decode_example(src[i])[1] for i in range(len(src))}


# --------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize('mask', ['colour', 'index'])
def test_folder_format_reads_back_the_exact_labels(tmp_path, mask):
  root = synthetic.write_folder_dataset(tmp_path / 'ds', num_train=5, num_val=2, num_classes=5,
                                        mask=mask, seed=3)
  train_src = source('folder', root, 'train', tmp_path / 'tfds')
  got = labels_of(train_src)
  assert sorted(got) == [f'scene_{i:05d}' for i in range(5)]
  counts = np.zeros(5, np.int64)
  for i in range(5):
    _, want, _ = synthetic.render_colour_scene(3, i, 5)
    np.testing.assert_array_equal(got[f'scene_{i:05d}'], want)
    counts += np.bincount(want[want < 5], minlength=5)
  classes, stored = data_lib.class_info(train_src)
  assert classes.names == ('background', 'square', 'triangle', 'disc', 'bar')
  assert stored == counts.tolist()
  if mask == 'colour':
    np.testing.assert_array_equal(classes.palette[1], synthetic.COLOUR_CLASSES[1][1])
  image, _ = data_lib.decode_example(train_src[0])
  assert image.shape == (96, 128, 3)
  # A prepared dataset reopens with its metadata (no second preparation).
  again = source('folder', root, 'val', tmp_path / 'tfds')
  assert len(again) == 2 and data_lib.class_info(again)[0].names == classes.names


def test_folder_without_splits_is_split_by_fraction_deterministically(tmp_path):
  root = synthetic.write_folder_dataset(tmp_path / 'ds', num_train=20, num_val=0, mask='index',
                                        splits=False, image_format='png')
  a = custom.source_splits('folder', root, val_fraction=0.25)
  b = custom.source_splits('folder', root, val_fraction=0.25)
  ids = lambda s: [e.id for e in s]
  assert ids(a['train']) == ids(b['train']) and ids(a['val']) == ids(b['val'])
  assert len(a['val']) == 5 and not set(ids(a['train'])) & set(ids(a['val']))
  # Adding an image keeps every other image in its split.
  synthetic.write_folder_dataset(tmp_path / 'more', num_train=21, num_val=0, mask='index', splits=False)
  c = custom.source_splits('folder', tmp_path / 'more', val_fraction=0.25)
  assert set(ids(a['val'])) <= set(ids(c['val'])) | {'scene_00020'}
  assert data_lib.check_split('folder', 'val', root=str(root)) is None


def test_ignore_label_is_configurable_and_ignore_colour_maps_to_255(tmp_path):
  root = tmp_path / 'ds'
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  Image.fromarray(np.full((4, 6, 3), 128, np.uint8)).save(root / 'images' / 'a.png')
  mask = np.zeros((4, 6), np.uint8)
  mask[0] = 1
  mask[1] = 9  # this dataset's "ignore"
  Image.fromarray(mask, mode='L').save(root / 'masks' / 'a.png')
  (root / 'classes.txt').write_text('background\nthing\n')
  (root / 'splits').mkdir()
  (root / 'splits' / 'train.txt').write_text('a\n')
  got = labels_of(source('folder', root, 'train', tmp_path / 'tfds', ignore_label=9))['a']
  assert (got[1] == 255).all() and (got[0] == 1).all() and (got[2:] == 0).all()
  # Colour masks: `ignore R G B` maps that colour to 255.
  (root / 'classes.txt').write_text('background 0 0 0\nthing 255 0 0\nignore 9 9 9\n')
  rgb = np.zeros((4, 6, 3), np.uint8)
  rgb[0] = (255, 0, 0)
  rgb[1] = (9, 9, 9)
  Image.fromarray(rgb).save(root / 'masks' / 'a.png')
  got = labels_of(source('folder', root, 'train', tmp_path / 'tfds2'))['a']
  assert (got[1] == 255).all() and (got[0] == 1).all() and (got[2:] == 0).all()


def test_voc_like_matches_the_voc_builder(tmp_path):
  devkit = synthetic.write_voc_tree(tmp_path / 'voc', num_train=3, num_val=2, min_size=40, max_size=48)
  root = devkit / 'VOC2012'
  (root / 'classes.txt').write_text('\n'.join(data_lib.CLASS_NAMES) + '\n')
  ours = labels_of(source('voc_like', root, 'val', tmp_path / 'tfds'))
  voc = labels_of(data_lib.get_data_source('voc_segmentation/2012', 'val', data_dir=str(tmp_path / 'tfds'),
                                           manual_dir=str(tmp_path / 'voc')))
  assert sorted(ours) == sorted(voc)
  for k in ours:
    np.testing.assert_array_equal(ours[k], voc[k])


def _rle(mask: np.ndarray) -> dict:
  from pycocotools import mask as mask_utils
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'size': rle['size'], 'counts': rle['counts'].decode()}


def test_coco_polygons_rle_crowd_and_overlaps(tmp_path):
  root = tmp_path / 'coco'
  (root / 'images').mkdir(parents=True)
  (root / 'annotations').mkdir()
  Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / 'images' / 'x.jpg')
  small = np.zeros((40, 50), bool)
  small[30:36, 40:46] = True
  crowd = np.zeros((40, 50), bool)
  crowd[0:6, 0:50] = True
  json.dump({
      'images': [{'id': 7, 'file_name': 'x.jpg', 'height': 40, 'width': 50}],
      'categories': [{'id': 3, 'name': 'cat'}, {'id': 5, 'name': 'dog'}],
      'annotations': [
          # a large polygon (cat) with a small polygon (dog) on top of it: the small one wins
          {'id': 1, 'image_id': 7, 'category_id': 3, 'iscrowd': 0, 'area': 400.0,
           'segmentation': [[5, 10, 25, 10, 25, 30, 5, 30]]},
          {'id': 2, 'image_id': 7, 'category_id': 5, 'iscrowd': 0, 'area': 36.0,
           'segmentation': [[10, 15, 16, 15, 16, 21, 10, 21]]},
          # a compressed RLE (dog), and a crowd region (cat) that stays ignored
          {'id': 3, 'image_id': 7, 'category_id': 5, 'iscrowd': 0, 'area': 36.0, 'segmentation': _rle(small)},
          {'id': 4, 'image_id': 7, 'category_id': 3, 'iscrowd': 1, 'area': 300.0, 'segmentation': _rle(crowd)},
      ]}, (root / 'annotations' / 'instances_train.json').open('w'))
  src = source('coco', root, 'train', tmp_path / 'tfds')
  classes, _ = data_lib.class_info(src)
  assert classes.names == ('background', 'cat', 'dog')  # categories' order, 0 = background
  label = labels_of(src)['x']
  assert label.shape == (40, 50)
  assert (label[12:28, 7:23][label[12:28, 7:23] != 2] == 1).all()  # cat polygon interior
  assert (label[16:20, 11:15] == 2).all()                           # dog wins the overlap
  np.testing.assert_array_equal(label[small], 2)                   # RLE decoded exactly
  np.testing.assert_array_equal(label[crowd], 255)                 # crowd ignored
  assert (label[38:, :] == 0).all()
  # The generator's coco set (polygons, RLE and crowd) prepares too.
  gen = synthetic.write_coco_dataset(tmp_path / 'gen', num_train=5, num_val=2)
  val = source('coco', gen, 'val', tmp_path / 'tfds')
  assert len(val) == 2 and 255 not in labels_of(val)[next(iter(labels_of(val)))][20:]


# --------------------------------------------------------------------------------------------------
# Bad input: preparation fails naming the file and the problem, and leaves nothing complete


def _good_folder(root: pathlib.Path) -> pathlib.Path:
  return synthetic.write_folder_dataset(root, num_train=3, num_val=1, num_classes=3, mask='index')


def _fails(root, data_dir, *needles, fmt='folder', **kw):
  with pytest.raises(data_lib.DataError) as info:
    source(fmt, root, 'train', data_dir, **kw)
  for needle in needles:
    assert needle in str(info.value), (needle, str(info.value))
  prepared = [p for p in pathlib.Path(data_dir).rglob('*') if p.is_dir() and p.name == '1.0.0']
  assert not prepared, prepared  # only incomplete.* directories, if anything
  return str(info.value)


def test_every_bad_input_is_named(tmp_path):
  root = _good_folder(tmp_path / 'a')
  (root / 'images' / 'scene_00000.jpg').write_bytes(b'garbage')
  _fails(root, tmp_path / 't1', 'scene_00000.jpg', 'unreadable image')

  root = _good_folder(tmp_path / 'b')
  (root / 'masks' / 'scene_00001.png').unlink()
  _fails(root, tmp_path / 't2', 'scene_00001.png', 'does not exist')

  root = _good_folder(tmp_path / 'c')
  Image.fromarray(np.zeros((10, 10), np.uint8), mode='L').save(root / 'masks' / 'scene_00002.png')
  _fails(root, tmp_path / 't3', 'size mismatch', 'scene_00002')

  root = _good_folder(tmp_path / 'd')
  bad = np.zeros((96, 128), np.uint8)
  bad[:10] = 7
  bad[10:13] = 4
  Image.fromarray(bad, mode='L').save(root / 'masks' / 'scene_00000.png')
  message = _fails(root, tmp_path / 't4', 'mask values not in classes.txt', '7: 1280 px', '4: 384 px')
  assert 'scene_00000.png' in message

  root = synthetic.write_folder_dataset(tmp_path / 'e', num_train=2, num_val=1, num_classes=3)
  rgb = np.zeros((96, 128, 3), np.uint8)
  rgb[:5] = (1, 2, 3)
  Image.fromarray(rgb).save(root / 'masks' / 'scene_00001.png')
  _fails(root, tmp_path / 't5', 'mask colours not in classes.txt', '(1, 2, 3): 640 px')

  root = _good_folder(tmp_path / 'f')
  (root / 'splits' / 'val.txt').write_text('')
  _fails(root, tmp_path / 't6', "split 'val' is empty")

  root = _good_folder(tmp_path / 'g')
  (root / 'splits' / 'train.txt').write_text('scene_00000\nscene_00000\n')
  _fails(root, tmp_path / 't7', 'duplicate ids', 'scene_00000')

  root = _good_folder(tmp_path / 'h')
  Image.open(root / 'images' / 'scene_00000.jpg').save(root / 'images' / 'scene_00000.png')
  _fails(root, tmp_path / 't8', "duplicate id 'scene_00000'")

  root = _good_folder(tmp_path / 'i')
  (root / 'classes.txt').write_text('background\n')
  _fails(root, tmp_path / 't9', 'at least 2 classes')

  root = _good_folder(tmp_path / 'j')
  (root / 'classes.txt').unlink()
  with pytest.raises(data_lib.MissingDataError, match='classes.txt does not exist'):
    source('folder', root, 'train', tmp_path / 't10')


def test_contradicting_config_and_unknown_split_stop_before_training(tmp_path):
  root = _good_folder(tmp_path / 'ds')
  from experiments import common
  c = common.load_config('fcn32s', 'demo')
  c.dataset.name, c.dataset.root, c.dataset.data_dir = 'folder', str(root), str(tmp_path / 'tfds')
  c.model.num_classes = 5
  with pytest.raises(UserError, match=r'config.model.num_classes=5, but the dataset folder at .* has 3'):
    train.train_and_evaluate(c, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not any((tmp_path / 'run' / 'checkpoints').iterdir())
  c.model.num_classes, c.dataset.eval_split = 0, 'test'
  with pytest.raises(UserError, match="folder has no split 'test'; choose one of train, val"):
    train.train_and_evaluate(c, tmp_path / 'run2')


# --------------------------------------------------------------------------------------------------
# Class weights, fine-tuning across class counts


def test_class_weighted_loss_against_numpy(tmp_path):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 5, 7)).astype(np.int32)
  labels[0, 0] = 255
  w = np.array([0.2, 1.0, 3.0], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = labels != 255
  safe = np.where(valid, labels, 0)
  nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
  pw = np.where(valid, w[safe], 0)
  want = (nll * pw).sum() / pw.sum()
  got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weights=w))
  assert got == pytest.approx(want, rel=1e-5)
  got_sum = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weights=w,
                                       normalize=False))
  assert got_sum == pytest.approx((nll * pw).sum() / 2, rel=1e-5)
  # Median-frequency weights from the dataset's stored pixel counts.
  root = synthetic.write_folder_dataset(tmp_path / 'ds', num_train=4, num_val=1, num_classes=4)
  from experiments import common
  c = common.load_config('fcn32s', 'demo')
  c.model.num_classes, c.class_names = 4, ('background', 'square', 'triangle', 'disc')
  src = source('folder', root, 'train', tmp_path / 'tfds')
  counts = np.asarray(data_lib.class_info(src)[1], np.float64)
  c.loss_class_weights = 'median_frequency'
  weights = np.asarray(train.loss_class_weights(c, src))
  freq = counts / counts.sum()
  np.testing.assert_allclose(weights, np.median(freq) / freq, rtol=1e-6)
  c.loss_class_weights = 'median_frequency:0.5'  # gentler balancing: the square roots
  np.testing.assert_allclose(train.loss_class_weights(c, src), np.sqrt(np.median(freq) / freq),
                             rtol=1e-6)
  for bad in ('median_frequency:0', 'median_frequency:x'):
    c.loss_class_weights = bad
    with pytest.raises(UserError, match='power P > 0'):
      train.loss_class_weights(c, src)
  c.loss_class_weights = '1, 2, 3, 4'
  assert train.loss_class_weights(c, src) == (1.0, 2.0, 3.0, 4.0)
  c.loss_class_weights = '1,2'
  with pytest.raises(UserError, match='2 weights for 4 classes'):
    train.loss_class_weights(c, src)


def test_finetuning_from_another_class_count_copies_the_backbone(tmp_path):
  voc_model = models.build('fcn32s', num_classes=21, width=1 / 16)
  variables = jax.device_get(models.init_variables(voc_model, jax.random.key(0)))
  variables = jax.tree.map(lambda x: x + 0.5, variables)  # distinguishable from a fresh init
  checkpoint.save_inference(tmp_path / 'voc', variables, {
      'arch': 'fcn32s', 'num_classes': 21, 'width': 1 / 16, 'preprocessing': 'torchvision_rgb'})
  from experiments import common
  c = common.load_config('fcn32s', 'demo')
  c.model.num_classes, c.init_from = 4, str(tmp_path / 'voc')
  messages = []
  model = train.model_from_config(c)
  out = train.initial_variables(model, c, jax.random.key(1), log=messages.append)
  np.testing.assert_array_equal(out['params']['conv1_1']['kernel'], variables['params']['conv1_1']['kernel'])
  np.testing.assert_array_equal(out['params']['fc7']['kernel'], variables['params']['fc7']['kernel'])
  assert out['params']['score_fr']['kernel'].shape[-1] == 4
  np.testing.assert_array_equal(out['params']['score_fr']['kernel'], 0)  # fresh: zero-initialised
  assert any('21 classes, this run 4' in m and 'score_fr' in m for m in messages), messages


# --------------------------------------------------------------------------------------------------
# The README walk-through, end to end


def test_readme_walkthrough_prepare_train_evaluate_predict(tmp_path):
  e = env(tmp_path)
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], env=e, cwd=tmp_path,
                                     capture_output=True, text=True, timeout=600)
  data = tmp_path / 'my_shapes'
  proc = run('fcn_jax.data.synthetic', '--format', 'folder', '--out', str(data), '--num-train', '12',
             '--num-val', '4', '--classes', '4')
  assert proc.returncode == 0, proc.stderr
  proc = run('fcn_jax.data.inspect', str(data), '--out', str(tmp_path / 'examples.png'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'square' in proc.stdout and '4 classes' in proc.stdout and (tmp_path / 'examples.png').exists()
  work = tmp_path / 'runs' / 'shapes'
  proc = run('experiments.fcn8s_atonce', f'--workdir={work}',
             f'--config={REPO}/experiments/configs/fcn8s_atonce.py:demo', '--config.dataset.name=folder',
             f'--config.dataset.root={data}', '--config.num_train_steps=6', '--config.eval_every=6',
             '--config.batch_size=2', '--config.crop_size=64', '--config.eval_pad_to=128',
             '--config.log_every=2', '--config.num_figure_examples=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((work / 'results.json').read_text())
  assert list(results['per_class_iu']) == ['background', 'square', 'triangle', 'disc']
  meta = checkpoint.read_metadata(work)
  assert meta['num_classes'] == 4 and meta['palette'][1] == list(synthetic.COLOUR_CLASSES[1][1])
  assert meta['skip_scaling'] is False  # the demo preset's from-scratch at-once
  proc = run('experiments.evaluate', f'--checkpoint={work}', '--dataset=folder', f'--root={data}',
             '--split=val', '--pad_to=128', '--batch_size=2', '--compilation_cache_dir=')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'square' in (work / 'eval' / 'folder_val_step6' / 'results.md').read_text()
  proc = run('fcn_jax.predict', '--checkpoint', str(work), '--out', str(tmp_path / 'pred'),
             str(data / 'images'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(tmp_path / 'pred' / 'scene_00000.png') as im:
    assert im.mode == 'P' and im.getpalette()[3:6] == list(synthetic.COLOUR_CLASSES[1][1])
  with Image.open(tmp_path / 'pred' / 'scene_00000_overlay.jpg') as im:
    assert im.size[0] == 128 and im.size[1] > 96  # the legend strip below the image


@pytest.mark.parametrize('preset', ['paper', 'heavy'])
def test_paper_and_heavy_presets_run_on_a_folder_dataset(tmp_path, preset):
  """The recipes' plumbing on a user dataset (one update at a tiny size: not their results)."""
  root = synthetic.write_folder_dataset(tmp_path / 'ds', num_train=3, num_val=2, num_classes=3)
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.fcn32s', f'--workdir={tmp_path / "run"}',
       f'--config={REPO}/experiments/configs/fcn32s.py:{preset}', '--config.dataset.name=folder',
       f'--config.dataset.root={root}', f'--config.dataset.data_dir={tmp_path / "tfds"}',
       '--config.model.width=0.0625', '--config.batch_size=1', '--config.crop_size=64',
       '--config.num_train_steps=1', '--config.eval_pad_to=128', '--config.num_figure_examples=0'],
      env=env(tmp_path), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert list(results['per_class_iu']) == ['background', 'square', 'triangle'] and results['step'] == 1


def test_preparing_leaves_no_empty_temporary_directories(tmp_path, monkeypatch):
  """TFDS looks for precomputed metadata of every unprepared builder in a fresh temporary directory
  it never removes; our builders skip that lookup, so preparing leaves the temp dir as it was."""
  import tempfile
  temp = tmp_path / 'temp'
  temp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  root = synthetic.write_folder_dataset(tmp_path / 'ds', num_train=2, num_val=1, num_classes=3)
  source('folder', root, 'train', tmp_path / 'tfds')
  voc = synthetic.write_voc_tree(tmp_path / 'voc', num_train=2, num_val=1, seed=0)
  data_lib.get_data_source('voc_segmentation/2012', 'val', data_dir=str(tmp_path / 'tfds'),
                           manual_dir=str(voc))
  assert list(temp.iterdir()) == []
