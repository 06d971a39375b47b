"""experiments.evaluate's analysis outputs: the confusion matrix (CSV and figure), per-image scores,
the gallery of the worst images and per-class precision / recall / F1 / Dice, from a tiny trained
run evaluated from its checkpoint; the figures' pieces on their own."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import types

import numpy as np
import pytest
from PIL import Image

from fcn_jax import checkpoint, metrics, train, viz
from fcn_jax import data as data_lib
from fcn_jax.data import synthetic
from fcn_jax.data.classes import VOC_CLASS_NAMES
from fcn_jax.errors import UserError
from fcn_jax.train.evaluation import ImageAnalysis

NUM_VAL = 6


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> dict:
  """fcn32s at 1/16 width, 2 SGD steps on a synthetic VOC tree (6 val images of 48x48: one
  native shape, one compilation)."""
  from experiments import common
  base = tmp_path_factory.mktemp('analysis')
  synthetic.write_voc_tree(base / 'voc', num_train=4, num_val=NUM_VAL, seed=3, min_size=48,
                           max_size=48)
  c = common.load_config('fcn32s', 'demo')
  c.model.width = 0.0625
  c.dataset.manual_dir = str(base / 'voc')
  c.dataset.data_dir = str(base / 'tfds')
  c.batch_size, c.crop_size, c.eval_batch_size, c.eval_pad_to = 2, 48, 4, 64
  c.num_train_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 2, 2
  c.num_figure_examples = 0
  c.compilation_cache_dir = ''
  train.train_and_evaluate(c, base / 'run')
  return {'base': base, 'work': base / 'run', 'data_dir': base / 'tfds'}


def flags(trained: dict, out: pathlib.Path, **overrides) -> types.SimpleNamespace:
  values = dict(checkpoint=str(trained['work']), dataset='voc_segmentation/2012', split='val',
                data_dir=str(trained['data_dir']), manual_dir='', download=False, root='',
                val_fraction=0.1, ignore_label=255, batch_size=1, pad_to=0, which='latest',
                out=str(out), overwrite=False, compilation_cache_dir='', worst=3, tta='',
                mode='whole', tile=512, stride=384)
  values.update(overrides)
  return types.SimpleNamespace(**values)


def read_csv(path: pathlib.Path) -> list[list[str]]:
  with path.open(newline='') as f:
    return list(csv.reader(f))


def test_evaluate_writes_confusion_per_image_scores_and_worst_images(trained, tmp_path):
  from experiments import evaluate
  out = tmp_path / 'eval'
  evaluate.evaluate(flags(trained, out))  # native size, one image at a time
  for name in ('results.json', 'results.md', 'confusion.csv', 'confusion.png', 'per_image.csv',
               'worst.png'):
    assert (out / name).is_file(), name
  results = json.loads((out / 'results.json').read_text())
  names = list(VOC_CLASS_NAMES)

  # confusion.csv: class names as header, rows ground truth; the scores are this matrix's.
  rows = read_csv(out / 'confusion.csv')
  assert rows[0] == ['ground truth \\ prediction', *names]
  assert [r[0] for r in rows[1:]] == names
  hist = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
  assert hist.shape == (21, 21)
  assert results['pixel_acc'] == pytest.approx(np.trace(hist) / hist.sum())
  plain = metrics.segmentation_scores(hist)
  for key in ('mean_acc', 'mean_iu', 'fw_iu'):
    assert results[key] == pytest.approx(plain[key])
  assert list(results['per_class_gt_pixels'].values()) == hist.sum(1).tolist()
  # Per-class precision / recall / F1 / Dice from the CSV's matrix, by explicit formulas.
  tp, gt, pred = np.diag(hist), hist.sum(1), hist.sum(0)
  for c, name in enumerate(names):
    want = {'precision': tp[c] / pred[c] if pred[c] else None,
            'recall': tp[c] / gt[c] if gt[c] else None,
            'f1': 2 * tp[c] / (gt[c] + pred[c]) if gt[c] + pred[c] else None}
    want['dice'] = want['f1']
    for key, value in want.items():
      got = results[f'per_class_{key}'][name]
      assert (got is None) == (value is None) and (value is None or got == pytest.approx(value)), (
          key, name)
  # mmsegmentation's names alias the same numbers.
  for alias, key in metrics.MMSEG_NAMES.items():
    assert results[alias] == pytest.approx(results[key]), alias
  assert results['mFscore'] == results['mDice']

  # per_image.csv: one row per val image in split order, adding up to the split.
  rows = read_csv(out / 'per_image.csv')
  assert rows[0] == ['index', 'image', 'pixel_acc', 'mean_iu', 'pixels', 'correct', 'classes']
  images = [dict(zip(rows[0], r)) for r in rows[1:]]
  source = data_lib.get_data_source('voc_segmentation/2012', 'val',
                                    data_dir=str(trained['data_dir']))
  assert [r['image'] for r in images] == [data_lib.file_name(source[i]) for i in range(NUM_VAL)]
  pixels = np.array([int(r['pixels']) for r in images])
  correct = np.array([int(r['correct']) for r in images])
  assert pixels.sum() == hist.sum() and correct.sum() == np.trace(hist)
  for r in images:
    assert float(r['pixel_acc']) == pytest.approx(int(r['correct']) / int(r['pixels']))

  # Each image's mean IU, recomputed from the checkpoint's own prediction of that image.
  model, variables, meta = checkpoint.load_inference(trained['work'] / 'checkpoints',
                                                     which='latest')
  for i, r in enumerate(images):
    image, label = data_lib.decode_example(source[i])
    prediction = viz.predict_scores(model, variables, image, meta['preprocessing']).argmax(-1)
    valid = label != 255
    t, p = label[valid], prediction[valid]
    ius = [((t == c) & (p == c)).sum() / ((t == c) | (p == c)).sum()
           for c in range(21) if ((t == c) | (p == c)).any()]
    assert float(r['mean_iu']) == pytest.approx(np.mean(ius), abs=1e-12), r['image']
    assert int(r['pixels']) == valid.sum() and int(r['correct']) == (t == p).sum()

  # The gallery: the 3 images of lowest mean IU, lowest first, in results.json and worst.png.
  order = sorted(images, key=lambda r: (float(r['mean_iu']), int(r['index'])))[:3]
  assert [w['image'] for w in results['worst_images']] == [r['image'] for r in order]
  ious = [w['mean_iu'] for w in results['worst_images']]
  assert ious == sorted(ious) and ious[-1] <= min(float(r['mean_iu']) for r in images
                                                  if r not in order)
  with Image.open(out / 'worst.png') as im:
    assert im.size[1] > 3 * 150 and im.size[0] > im.size[1] * 0.8
  with Image.open(out / 'confusion.png') as im:
    assert min(im.size) > 400

  text = (out / 'results.md').read_text()
  assert '| class | IU | precision | recall | F1 / Dice | ground-truth pixels |' in text
  assert f'| background | {100 * plain["per_class_iu"][0]:.1f} |' in text
  assert 'mIoU' in text and 'Also here: confusion.csv, confusion.png, per_image.csv, worst.png' in text


def test_padded_batches_count_no_padding_and_outputs_are_never_overwritten(trained, tmp_path,
                                                                             monkeypatch):
  """--pad_to / --batch_size: padding pixels and the last batch's filler examples count nowhere;
  the gallery shows the images cut to their size. A file evaluate would write stops it unless
  --overwrite; other files in --out are left alone."""
  from experiments import evaluate
  out = tmp_path / 'eval'
  out.mkdir()
  mine = out / 'worst.png'
  mine.write_bytes(b'a figure of my own')
  (out / 'notes.txt').write_text('keep me')
  with pytest.raises(UserError, match='worst.png exists'):
    evaluate.evaluate(flags(trained, out, pad_to=64, batch_size=4))
  with pytest.raises(UserError, match='--worst -1'):
    evaluate.evaluate(flags(trained, out, pad_to=64, batch_size=4, worst=-1, overwrite=True))
  assert mine.read_bytes() == b'a figure of my own' and not (out / 'results.json').exists()
  drawn, gallery = [], viz.worst_gallery

  def recording_gallery(rows, *args, **kwargs):
    drawn.extend(rows)
    return gallery(rows, *args, **kwargs)

  monkeypatch.setattr(viz, 'worst_gallery', recording_gallery)
  evaluate.evaluate(flags(trained, out, pad_to=64, batch_size=4, overwrite=True, worst=2))
  results = json.loads((out / 'results.json').read_text())
  rows = read_csv(out / 'per_image.csv')[1:]
  assert len(rows) == NUM_VAL  # 2 batches of 4: the 2 filler examples are not images
  assert sum(int(r[4]) for r in rows) == sum(results['per_class_gt_pixels'].values())
  lowest = sorted(rows, key=lambda r: (float(r[3]), int(r[0])))[:2]
  assert [w['image'] for w in results['worst_images']] == [r[1] for r in lowest]
  assert [r['file_name'] for r in drawn] == [r[1] for r in lowest]
  for r in drawn:  # 48x48 images, evaluated padded to 64: shown at 48x48
    assert r['image'].shape == (48, 48, 3)
    assert r['label'].shape == r['prediction'].shape == (48, 48)
  assert mine.read_bytes() != b'a figure of my own'  # replaced, as --overwrite asked
  evaluate.evaluate(flags(trained, out, pad_to=64, batch_size=4, overwrite=True, worst=0))
  assert not mine.exists()  # --worst 0: no stale gallery left behind
  assert json.loads((out / 'results.json').read_text())['worst_images'] == []
  assert (out / 'notes.txt').read_text() == 'keep me'
  with pytest.raises(UserError, match='results.json exists'):
    evaluate.evaluate(flags(trained, out, pad_to=64, batch_size=4))


def test_image_analysis_skips_padding_examples_and_keeps_the_worst_in_order():
  analysis = ImageAnalysis(worst=2)
  labels = np.full((4, 3, 4), 255, np.int32)
  labels[:3, :2, :2] = [[0, 1], [1, 1]]
  preds = np.zeros((4, 3, 4), np.int32)
  preds[1, :2, :2] = [[0, 1], [1, 1]]  # image 1 right
  preds[2, :2, :2] = [[1, 0], [0, 0]]  # image 2 all wrong
  analysis.add(labels, preds, ['a', 'b', 'c', ''], 2)
  analysis.add(labels[:1], preds[:1], None, 2)  # no names: kept, it has counted pixels
  assert [r['file_name'] for r in analysis.images] == ['a', 'b', 'c', '']
  assert [r['index'] for r in analysis.images] == [0, 1, 2, 3]
  assert [r['mean_iu'] for r in analysis.images] == pytest.approx([0.25 / 2, 1.0, 0.0, 0.125])
  assert [(r['file_name'], r['index']) for r in analysis.worst_images] == [('c', 2), ('a', 0)]
  np.testing.assert_array_equal(analysis.worst_images[0]['prediction'], preds[2])
  analysis.check(metrics.accumulate(None, metrics.confusion_matrix(labels, preds, 2))
                 + metrics.confusion_matrix(labels[:1], preds[:1], 2))
  with pytest.raises(RuntimeError, match='do not add up'):
    analysis.check(np.zeros((2, 2), np.int64))


def test_error_map_marks_wrong_and_ignored_pixels_apart():
  label = np.array([[0, 1, 255], [2, 7, 1]])
  prediction = np.array([[0, 0, 1], [2, 2, 1]])
  colors = viz.error_map(label, prediction, num_classes=3)
  expect = [['correct', 'wrong', 'ignored'], ['correct', 'ignored', 'correct']]
  for i, row in enumerate(expect):
    for j, kind in enumerate(row):
      assert tuple(colors[i, j]) == viz.ERROR_COLORS[kind], (i, j)
  assert len(set(viz.ERROR_COLORS.values())) == 3


@pytest.mark.parametrize('n', [21, 60])
def test_confusion_figure_names_every_class(tmp_path, n):
  rng = np.random.default_rng(n)
  hist = rng.integers(0, 100, size=(n, n)) + np.diag(rng.integers(100, 1000, size=n))
  hist[3] = 0  # a class absent from the ground truth: a blank row, no warning
  names = [f'class{i:02d}' for i in range(n)]
  path = viz.confusion_figure(hist, names, tmp_path / 'confusion.png')
  with Image.open(path) as im:
    width, height = im.size
  assert min(width, height) >= (500 if n == 21 else 1500)  # room for 60 names
  assert math.isclose(width / height, 1.0, rel_tol=0.35)


def test_evaluate_through_the_segmenter_keeps_the_protocol(trained, tmp_path):
  """--tta 1 (one view) and --mode slide with tiles larger than the images go through the
  Segmenter one image at a time: the same confusion matrix as the reference evaluation; a flip
  TTA writes the same files with its own scores."""
  from experiments import evaluate
  evaluate.evaluate(flags(trained, tmp_path / 'ref'))
  reference = read_csv(tmp_path / 'ref' / 'confusion.csv')
  for name, extra in (('one_view', dict(tta='1')), ('slide', dict(mode='slide', tile=64, stride=32))):
    evaluate.evaluate(flags(trained, tmp_path / name, **extra))
    assert read_csv(tmp_path / name / 'confusion.csv') == reference, name
  evaluate.evaluate(flags(trained, tmp_path / 'flip', tta='flip'))
  results = json.loads((tmp_path / 'flip' / 'results.json').read_text())
  rows = read_csv(tmp_path / 'flip' / 'confusion.csv')[1:]
  assert sum(int(v) for row in rows for v in row[1:]) == sum(
      int(v) for row in reference[1:] for v in row[1:])  # the same pixels count
  assert 0 <= results['mean_iu'] <= 1


def test_native_size_batches_give_the_one_at_a_time_results(trained, tmp_path):
  """--batch_size 4 at native size (--pad_to 0): the 48x48 images go 4 together, the other 2 alone;
  nothing is padded, so the confusion matrix and the per-image rows are those of one at a time."""
  from experiments import evaluate
  evaluate.evaluate(flags(trained, tmp_path / 'one'))
  evaluate.evaluate(flags(trained, tmp_path / 'four', batch_size=4))
  hist = {k: np.array([[int(v) for v in r[1:]] for r in read_csv(tmp_path / k / 'confusion.csv')[1:]])
          for k in ('one', 'four')}
  np.testing.assert_array_equal(hist['four'], hist['one'])
  assert hist['one'].sum() > 0
  rows = {k: sorted(read_csv(tmp_path / k / 'per_image.csv')[1:], key=lambda r: r[1])
          for k in ('one', 'four')}
  assert [r[1:] for r in rows['four']] == [r[1:] for r in rows['one']]
  assert len(rows['one']) == NUM_VAL
  with pytest.raises(UserError, match='one image at a time'):
    evaluate.evaluate(flags(trained, tmp_path / 'tta', batch_size=4, tta='flip'))
