"""PASCAL-Context, SIFT Flow and NYUDv2: synthetic trees in the official formats through the
builders (exact labels read back), every bad input, and a reduced-width net trained a few steps on
each (two heads, two and three modalities) and evaluated with the table protocol."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fcn_jax import data as data_lib
from fcn_jax.data import pipeline, reference, synthetic
from fcn_jax.data.classes import PASCAL_CONTEXT_CLASS_NAMES, SIFT_FLOW_SEMANTIC_CLASS_NAMES


def source(tmp_path, name, tree, split):
  return data_lib.get_data_source(name, split, data_dir=str(tmp_path / 'tfds'), manual_dir=str(tree))


def test_shipped_reference_lists():
  trainval, test = reference.read_list('sift_flow_trainval.txt'), reference.read_list('sift_flow_test.txt')
  assert (len(trainval), len(test)) == (2486, 200) and not set(trainval) & set(test)
  assert not {'highway_bost181', 'street_urb506'} & set(trainval + test)  # unannotated
  train, val, nyud_test = (reference.read_list(f'nyud_{s}.txt') for s in ('train', 'val', 'test'))
  assert (len(train) + len(val), len(nyud_test)) == (795, 654)
  assert all(5001 <= int(i) <= 6449 for i in train + val + nyud_test)


def test_sift_flow_labels_read_back_exactly(tmp_path):
  tree = tmp_path / 'sift'
  splits = synthetic.write_sift_flow_tree(tree, num_trainval=4, num_test=2)
  src = source(tmp_path, 'sift_flow', tree, 'test')
  assert len(src) == 2
  sub = 'spatial_envelope_256x256_static_8outdoorcategories'
  records = {data_lib.file_name(src[i]): src[i] for i in range(len(src))}
  assert sorted(records) == sorted(splits['test'])
  for image_id, record in records.items():
    _, labels = pipeline.decode_planes(record, ['color'], ['semantic', 'geometric'])
    semantic = scipy.io.loadmat(tree / 'SemanticLabels' / sub / f'{image_id}.mat')['S']
    geometric = scipy.io.loadmat(tree / 'GeoLabels' / sub / f'{image_id}.mat')['S']
    assert (geometric == -1).any()  # the generator writes the -1 void
    # Semantic: 0 void -> 255, 1..33 -> 0..32; geometric: -1 (and 0) void -> 255, 1..3 -> 0..2.
    assert np.array_equal(labels['semantic'], np.where(semantic == 0, 255, semantic - 1))
    assert np.array_equal(labels['geometric'], np.where(geometric <= 0, 255, geometric - 1))
  heads = data_lib.head_classes(src)
  assert list(heads) == ['semantic', 'geometric']
  excluded = [SIFT_FLOW_SEMANTIC_CLASS_NAMES[c] for c in heads['semantic'][1]]
  assert excluded == ['cow', 'desert', 'moon'] and heads['geometric'][1] == ()


def test_nyud_modalities_and_label_shift(tmp_path):
  tree = tmp_path / 'nyud'
  splits = synthetic.write_nyud_tree(tree, num_train=2, num_val=1, num_test=2)
  for split, expected in (('train', splits['train'] + splits['val']), ('test', splits['test']),
                          ('reference_val', splits['val'])):
    src = source(tmp_path, 'nyud_v2', tree, split)
    assert sorted(data_lib.file_name(src[i]) for i in range(len(src))) == sorted(expected)
  src = source(tmp_path, 'nyud_v2', tree, 'test')
  image_id = data_lib.file_name(src[0])
  inputs, labels = pipeline.decode_planes(src[0], ['color', 'hha', 'depth'])
  raw = scipy.io.loadmat(tree / 'segmentation' / f'img_{image_id}.mat')['segmentation']
  assert np.array_equal(labels[None], np.where(raw == 0, 255, raw - 1))
  depth = np.asarray(Image.open(tree / 'data' / 'depth' / f'img_{image_id}.png'))
  assert inputs['depth'].dtype == np.uint16 and np.array_equal(inputs['depth'], depth)
  assert np.array_equal(inputs['hha'], np.asarray(Image.open(tree / 'data' / 'hha' / f'img_{image_id}.png')))


def test_pascal_context_59_class_mapping(tmp_path):
  tree = tmp_path / 'context'
  splits = synthetic.write_pascal_context_tree(tree, num_train=3, num_val=2)
  labels_txt = {n.split(': ')[1]: int(n.split(': ')[0])
                for n in (tree / 'labels.txt').read_text().splitlines()}
  src = source(tmp_path, 'pascal_context', tree, 'val')
  seen = set()
  assert sorted(data_lib.file_name(src[i]) for i in range(len(src))) == sorted(splits['val'])
  for i in range(len(src)):
    image_id = data_lib.file_name(src[i])
    label_map = scipy.io.loadmat(tree / 'trainval' / f'{image_id}.mat')['LabelMap']
    _, labels = pipeline.decode_planes(src[i], ['color'])
    expected = np.zeros_like(label_map, np.uint8)  # everything else: 0
    for name, renamed in (('diningtable', 'table'), ('bedcloth', 'bedclothes'), ('clothes', 'cloth'),
                          ('person', 'person')):
      expected[label_map == labels_txt[renamed]] = PASCAL_CONTEXT_CLASS_NAMES.index(name)
    assert np.array_equal(labels[None], expected)
    seen |= set(np.unique(labels[None]).tolist())
  assert 0 in seen and len(seen) >= 3
  classes, _ = data_lib.class_info(src)
  assert classes.num_classes == 60 and classes.names[11] == 'diningtable'


def _expect_data_error(tmp_path, name, tree, split, *fragments):
  import shutil
  shutil.rmtree(tmp_path / 'tfds', ignore_errors=True)
  with pytest.raises(data_lib.DataError) as info:
    source(tmp_path, name, tree, split)
  for fragment in fragments:
    assert fragment in str(info.value), str(info.value)
  assert not list((tmp_path / 'tfds').glob(f'{name}/*/dataset_info.json'))  # nothing half-written


def test_bad_inputs_name_the_file(tmp_path):
  sub = 'spatial_envelope_256x256_static_8outdoorcategories'
  sift = tmp_path / 'sift'
  splits = synthetic.write_sift_flow_tree(sift, num_trainval=2, num_test=1)
  bad = sift / 'GeoLabels' / sub / f'{splits["test"][0]}.mat'
  scipy.io.savemat(bad, {'S': np.full((64, 64), 7, np.int16)})
  _expect_data_error(tmp_path, 'sift_flow', sift, 'test', str(bad), 'geometric label values [7]')
  scipy.io.savemat(bad, {'S': np.ones((32, 64), np.int16)})
  _expect_data_error(tmp_path, 'sift_flow', sift, 'test', 'size mismatch', splits['test'][0])
  (sift / 'Images' / sub / f'{splits["test"][0]}.jpg').unlink()
  _expect_data_error(tmp_path, 'sift_flow', sift, 'test', f'{splits["test"][0]}.jpg', 'does not exist')

  nyud = tmp_path / 'nyud'
  splits = synthetic.write_nyud_tree(nyud, num_train=1, num_val=1, num_test=1)
  depth = nyud / 'data' / 'depth' / f'img_{splits["test"][0]}.png'
  Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(depth)
  _expect_data_error(tmp_path, 'nyud_v2', nyud, 'test', str(depth), '16-bit')
  scipy.io.savemat(nyud / 'segmentation' / f'img_{splits["train"][0]}.mat', {'other': np.zeros(3)})
  _expect_data_error(tmp_path, 'nyud_v2', nyud, 'train', "no variable 'segmentation'")

  context = tmp_path / 'context'
  synthetic.write_pascal_context_tree(context, num_train=1, num_val=1)
  text = (context / 'labels.txt').read_text().replace(': table\n', ': tabel\n')
  (context / 'labels.txt').write_text(text)
  _expect_data_error(tmp_path, 'pascal_context', context, 'train', "no class 'table'", 'diningtable')
  (context / 'labels.txt').unlink()
  with pytest.raises(data_lib.MissingDataError, match='labels.txt'):
    source(tmp_path, 'pascal_context', context, 'train')
  with pytest.raises(data_lib.MissingDataError, match='SiftFlowDataset.zip'):
    source(tmp_path, 'sift_flow', tmp_path / 'context', 'test')


def _recipe(name, tree, tmp_path, **overrides):
  from experiments.configs import common
  c = common.get_config(name, 'demo')
  c.dataset.manual_dir = str(tree)
  c.dataset.data_dir = str(tmp_path / 'tfds')
  c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 4, 4, 4, 2
  c.batch_size, c.crop_size, c.eval_batch_size, c.eval_pad_to = 2, 48, 1, 0
  c.num_figure_examples = 1
  c.compilation_cache_dir = ''
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.mark.parametrize('name,writer', [
    ('siftflow_fcn32s', lambda d: synthetic.write_sift_flow_tree(d, num_trainval=4, num_test=2,
                                                                  size=48)),
    ('nyud_fcn32s_color_hha', lambda d: synthetic.write_nyud_tree(d, num_train=3, num_val=1, num_test=2)),
    ('nyud_fcn32s_color_d', lambda d: synthetic.write_nyud_tree(d, num_train=3, num_val=1, num_test=2)),
    ('pascalcontext_fcn32s', lambda d: synthetic.write_pascal_context_tree(d, num_train=4, num_val=2)),
])
def test_reference_recipes_train_and_evaluate(tmp_path, name, writer):
  from experiments import common as experiments
  from fcn_jax import checkpoint
  writer(tmp_path / 'tree')
  config = _recipe(name, tmp_path / 'tree', tmp_path)
  experiments.run(config, tmp_path / 'run')
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  meta = checkpoint.read_metadata(tmp_path / 'run' / 'checkpoints')
  assert [m['name'] for m in meta['modalities']] == [m for m, _ in config.modalities]
  text = json.dumps(results)
  for key in ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'):
    assert key in text
  if name.startswith('siftflow'):
    assert meta['head_names'] == ['semantic', 'geometric'] and meta['num_classes'] == [33, 3]
    assert [h['name'] for h in meta['heads']] == ['semantic', 'geometric']
    assert set(results['heads']) == {'semantic', 'geometric'}
    # experiments.evaluate: both heads, the table protocol (absent classes left out).
    import types
    from experiments import evaluate
    flags = types.SimpleNamespace(
        checkpoint=str(tmp_path / 'run'), dataset='sift_flow', split='test',
        data_dir=str(tmp_path / 'tfds'), manual_dir='', download=False, root='', val_fraction=0.1,
        ignore_label=255, batch_size=1, pad_to=0, which='latest', out=str(tmp_path / 'eval'),
        overwrite=False, compilation_cache_dir='')
    evaluate.evaluate(flags)
    evaluated = json.loads((tmp_path / 'eval' / 'results.json').read_text())
    assert evaluated['heads']['geometric']['pixel_acc'] == pytest.approx(
        results['heads']['geometric']['pixel_acc'])
    assert evaluated['mean_iu'] == pytest.approx(results['mean_iu'])
    assert 'geometric head: pixel acc.' in (tmp_path / 'eval' / 'results.md').read_text()


def test_results_print_the_paper_row_beside_ours(tmp_path):
  from fcn_jax import report
  scores = {'pixel_acc': 0.8, 'mean_acc': 0.5, 'mean_iu': 0.4, 'fw_iu': 0.7, 'per_class_iu': [0.4] * 33,
            'heads': {'semantic': {'pixel_acc': 0.8, 'mean_acc': 0.5, 'mean_iu': 0.4, 'fw_iu': 0.7},
                      'geometric': {'pixel_acc': 0.9, 'mean_acc': 0.9, 'mean_iu': 0.8, 'fw_iu': 0.8}}}
  report.write_results(tmp_path, 'siftflow_fcn16s', scores, list(SIFT_FLOW_SEMANTIC_CLASS_NAMES))
  text = (tmp_path / 'results.md').read_text()
  assert '| siftflow_fcn16s | 80.0 | 50.0 | 40.0 | 70.0 |' in text
  assert '| paper Table 5, FCN-16s | 85.2 | 51.7 | 39.5 | 76.1 |' in text
  assert 'geometric head: pixel acc. 90.0 (paper 94.3)' in text


def test_recipe_mistakes_stop_with_the_field(tmp_path):
  from fcn_jax import config_checks
  from fcn_jax.errors import UserError
  from experiments.configs import common
  c = common.get_config('nyud_fcn32s_color_hha', 'demo')
  c.modalities = (('color', 'nyud_bgr'),)
  with pytest.raises(UserError, match=r'config.modalities=.*6 channels in all for fcn32s_late_fusion'):
    config_checks.check_train_config(c)
  c.modalities = (('colour', 'nyud_bgr'), ('hha', 'nyud_hha'))
  with pytest.raises(UserError, match='names from color, hha, depth'):
    config_checks.check_train_config(c)
  # A single-headed arch on the two-headed SIFT Flow names the heads.
  from fcn_jax import train
  sift = tmp_path / 'sift'
  synthetic.write_sift_flow_tree(sift, num_trainval=2, num_test=1)
  config = _recipe('siftflow_fcn32s', sift, tmp_path)
  config.arch = 'fcn32s'
  src = source(tmp_path, 'sift_flow', sift, 'trainval')
  classes, _ = data_lib.class_info(src)
  with pytest.raises(UserError, match='labels several heads \\(semantic, geometric\\)'):
    train.resolve_classes(config, classes, data_lib.head_classes(src))


def test_a_converted_reference_net_evaluates_on_its_dataset(tmp_path):
  """nyud-fcn32s-color-hha from a .caffemodel (random weights), evaluated on nyud_v2: its colour
  and HHA come from the dataset, as the checkpoint's modalities say."""
  import types
  from experiments import evaluate
  from fcn_jax import caffe_pb, convert
  from tests import caffe_reference
  layers, _ = caffe_reference.build('nyud-fcn32s-color-hha', 1 / 16)
  src = tmp_path / 'nyud-fcn32s-color-hha-heavy.caffemodel'
  caffe_pb.write_net(src, 'nyud', caffe_reference.caffemodel_layers(layers))
  assert convert.main([str(src), '--out', str(tmp_path / 'weights')]) == 0
  synthetic.write_nyud_tree(tmp_path / 'nyud', num_train=1, num_val=1, num_test=2)
  flags = types.SimpleNamespace(
      checkpoint=str(tmp_path / 'weights'), dataset='nyud_v2', split='test',
      data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'nyud'), download=False, root='',
      val_fraction=0.1, ignore_label=255, batch_size=1, pad_to=0, which='best',
      out=str(tmp_path / 'eval'), overwrite=False, compilation_cache_dir='')
  evaluate.evaluate(flags)
  results = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert results['name'] == 'nyud-fcn32s-color-hha' and results['images'] == 2
  assert 0 <= results['pixel_acc'] <= 1 and len(results['per_class_iu']) == 40
  assert '| paper Table 4, FCN-32s RGB-HHA | 64.3 | 44.9 | 32.8 | 48.0 |' in (
      tmp_path / 'eval' / 'results.md').read_text()
  # predict --dataset: the records supply colour and HHA.
  from fcn_jax import predict
  assert predict.main(['--checkpoint', str(tmp_path / 'weights'), '--out', str(tmp_path / 'pred'),
                       '--dataset', 'nyud_v2', '--split', 'test', '--data-dir', str(tmp_path / 'tfds'),
                       '--save-scores']) == 0
  scores = sorted((tmp_path / 'pred').glob('*_scores.npy'))
  assert len(scores) == 2 and np.load(scores[0]).shape == (48, 64, 40)


def test_sift_flow_from_its_zip_archive(tmp_path):
  import zipfile
  tree = tmp_path / 'tree'
  splits = synthetic.write_sift_flow_tree(tree, num_trainval=2, num_test=1)
  manual = tmp_path / 'manual'
  manual.mkdir()
  with zipfile.ZipFile(manual / 'SiftFlowDataset.zip', 'w') as z:
    for path in sorted(tree.rglob('*')):
      if path.is_file():
        z.write(path, pathlib.Path('SiftFlow') / path.relative_to(tree))
  src = source(tmp_path, 'sift_flow', manual, 'test')
  assert [data_lib.file_name(src[i]) for i in range(len(src))] == splits['test']
