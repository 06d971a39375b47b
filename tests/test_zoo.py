"""The fifteen reference nets: a random-weight .caffemodel of each, laid out as the reference training
net (every layer, blobs on the parameter layers), converted with no --arch, run through
fcn_jax.predict, equals an independent PyTorch executor of the reference layer list
(tests/caffe_reference.py) on odd input sizes."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from fcn_jax import caffe_pb, checkpoint, convert, predict, zoo
from tests import caffe_reference

WIDTH = 1 / 16
SIZE = (45, 61)  # odd H, W

TWO_HEADS = {'siftflow-fcn32s', 'siftflow-fcn16s', 'siftflow-fcn8s'}


def write_caffemodel(tmp_path: pathlib.Path, name: str, seed: int = 0):
  layers, outputs = caffe_reference.build(name, WIDTH, seed)
  path = tmp_path / caffe_reference.NETS[name][1]
  caffe_pb.write_net(path, name, caffe_reference.caffemodel_layers(layers))
  return path, layers, outputs


def write_inputs(tmp_path: pathlib.Path, seed: int = 0):
  rng = np.random.default_rng(seed)
  h, w = SIZE
  rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  hha = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  depth = rng.integers(400, 9000, (h, w), dtype=np.uint16)
  for sub in ('images', 'hha', 'depth'):
    (tmp_path / sub).mkdir()
  Image.fromarray(rgb).save(tmp_path / 'images' / 'img_5001.png')
  Image.fromarray(hha).save(tmp_path / 'hha' / 'img_5001.png')
  Image.fromarray(depth).save(tmp_path / 'depth' / 'img_5001.png')
  return rgb, hha, depth


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.max(np.abs(ours.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-12))


@pytest.mark.parametrize('name', list(zoo.ZOO))
def test_reference_net_parity(tmp_path, capsys, name):
  net = zoo.ZOO[name]
  src, layers, outputs = write_caffemodel(tmp_path, name)
  ckpt = tmp_path / 'ckpt'
  assert convert.main([str(src), '--out', str(ckpt)]) == 0
  printed = capsys.readouterr().out
  assert f'recognised {name} ' in printed, printed
  meta = checkpoint.read_metadata(ckpt)
  assert meta['zoo_name'] == name and meta['arch'] == net.arch
  assert [m['name'] for m in meta['modalities']] == [m for m, _ in net.modalities]
  assert meta['head_names'] == [h for h, _ in net.heads]

  rgb, hha, depth = write_inputs(tmp_path)
  modalities = [m for m, _ in net.modalities]
  first = {'color': 'images', 'hha': 'hha'}[modalities[0]]
  argv = ['--checkpoint', str(ckpt), '--out', str(tmp_path / 'out'), '--exact', '--save-scores',
          str(tmp_path / first / 'img_5001.png')]
  for extra in modalities[1:]:
    argv += [f'--{extra}-dir', str(tmp_path / extra)]
  assert predict.main(argv) == 0

  ref = caffe_reference.run(layers, caffe_reference.data_tops(name, rgb, hha, depth), outputs)
  for head in ref:
    suffix = f'_{head}' if name in TWO_HEADS else ''
    ours = np.load(tmp_path / 'out' / f'img_5001{suffix}_scores.npy')
    assert ours.shape == ref[head].shape == (*SIZE, len(dict(net.heads)[head]))
    err = relative_error(ours, ref[head])
    print(f'{name} {head}: max relative error {err:.2e}')
    assert err < 1e-5, (name, head, err)
    assert (tmp_path / 'out' / f'img_5001{suffix}.png').is_file()


def test_nyud_colour_and_hha_need_the_file_name_or_modality(tmp_path, capsys):
  src, _, _ = write_caffemodel(tmp_path, 'nyud-fcn32s-hha')
  anonymous = tmp_path / 'weights.caffemodel'
  src.rename(anonymous)
  out = tmp_path / 'ckpt'
  assert convert.main([str(anonymous), '--out', str(out)]) == 2
  err = capsys.readouterr().err
  assert '--modality color or --modality hha' in err and 'nothing was written' in err
  assert not out.exists()
  assert convert.main([str(anonymous), '--out', str(out), '--modality', 'hha']) == 0
  assert 'hha from --modality' in capsys.readouterr().out
  meta = checkpoint.read_metadata(out)
  assert meta['zoo_name'] == 'nyud-fcn32s-hha' and meta['preprocessing'] == 'nyud_hha'


def test_a_file_that_fits_no_reference_net_says_what_it_saw(tmp_path, capsys):
  layers, _ = caffe_reference.build('voc-fcn32s', WIDTH)
  for layer in layers:  # a 7-class VGG16 FCN-32s: no reference net has 7 classes
    if layer.name in ('score_fr', 'upscore'):
      layer.blobs = [b[:7] if layer.name == 'score_fr' else b[:7, :7] for b in layer.blobs]
  path = tmp_path / 'mine.caffemodel'
  caffe_pb.write_net(path, 'mine', caffe_reference.caffemodel_layers(layers))
  assert convert.main([str(path), '--out', str(tmp_path / 'ckpt')]) == 2
  err = capsys.readouterr().err
  assert 'FCN-32s with 7 classes' in err and '--arch' in err
  assert not (tmp_path / 'ckpt').exists()
  # --arch still converts it.
  assert convert.main([str(path), '--out', str(tmp_path / 'ckpt'), '--arch', 'fcn32s']) == 0
  assert checkpoint.read_metadata(tmp_path / 'ckpt')['num_classes'] == 7


def test_late_fusion_needs_the_hha_dir(tmp_path, capsys):
  src, _, _ = write_caffemodel(tmp_path, 'nyud-fcn32s-color-hha')
  ckpt = tmp_path / 'ckpt'
  assert convert.main([str(src), '--out', str(ckpt)]) == 0
  write_inputs(tmp_path)
  image = str(tmp_path / 'images' / 'img_5001.png')
  with pytest.raises(SystemExit, match='2'):
    predict.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'o1'), image])
  assert 'pass --hha_dir' in capsys.readouterr().err
  with pytest.raises(SystemExit, match='2'):
    predict.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'o2'), image,
                  '--depth-dir', str(tmp_path / 'depth'), '--hha-dir', str(tmp_path / 'hha')])
  assert 'leave --depth_dir out' in capsys.readouterr().err
  (tmp_path / 'hha' / 'img_5001.png').unlink()
  assert predict.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'o3'), image,
                       '--hha-dir', str(tmp_path / 'hha')]) == 1
  assert 'no hha image for it' in capsys.readouterr().err


def test_readme_lists_every_reference_net():
  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  assert zoo.markdown_table() in readme, 'README table out of date: python -m fcn_jax.zoo'


def _numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean softmax cross-entropy over the pixels labelled with a class (255 ignored)."""
  z = logits.astype(np.float64)
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  valid = labels != 255
  picked = np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return float(-(picked * valid).sum() / max(valid.sum(), 1))


def test_two_heads_train_on_the_summed_loss_and_evaluate_both():
  import jax
  import optax
  from fcn_jax import models, train
  model = models.build('fcn16s_two_heads', num_classes=(5, 3), width=1 / 16, dropout_rate=0.0)
  variables = models.init_variables(model, jax.random.key(0))
  # Non-zero score layers, so that both heads' scores (and losses) depend on the input.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.normal(0, 0.1, x.shape).astype(np.float32)
                       if str(path[0].key).startswith('score_') else x), variables['params'])
  tx = optax.sgd(1e-3)
  state = train.create_train_state(model, tx, {'params': params}, jax.random.key(1))
  labels = rng.integers(0, 5, (2, 37, 41)).astype(np.int32)
  geometric = rng.integers(0, 3, (2, 37, 41)).astype(np.int32)
  geometric[:, :5] = 255
  batch = {'image': rng.normal(0, 1, (2, 37, 41, 3)).astype(np.float32),
           'label_semantic': labels, 'label_geometric': geometric}
  outputs = model.apply({'params': params}, batch['image'])
  assert set(outputs) == {'semantic', 'geometric'}
  assert outputs['semantic'].shape == (2, 37, 41, 5) and outputs['geometric'].shape == (2, 37, 41, 3)
  expected = (_numpy_cross_entropy(np.asarray(outputs['semantic']), labels)
              + _numpy_cross_entropy(np.asarray(outputs['geometric']), geometric))
  import functools
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, normalize_loss=True))
  new_state, step_metrics = step(state, batch)
  assert float(step_metrics['loss']) == pytest.approx(expected, rel=1e-5)
  for layer in ('score_fr_sem', 'score_fr_geo', 'score_pool4_geo', 'fc7'):
    assert not np.allclose(new_state.params[layer]['kernel'], params[layer]['kernel']), layer
  for frozen in ('upscore16_sem', 'upscore16_geo'):
    assert frozen in model.frozen_modules()
  scores, _ = train.evaluate(model, {'params': params}, [batch], num_classes=5)
  assert set(scores['heads']) == {'semantic', 'geometric'}
  predicted = np.argmax(np.asarray(outputs['geometric']), -1)
  valid = geometric != 255
  assert scores['heads']['geometric']['pixel_acc'] == pytest.approx(
      (predicted == geometric)[valid].mean())
  assert scores['mean_iu'] == scores['heads']['semantic']['mean_iu']


def test_fusion_nets_take_their_modalities_concatenated():
  import jax
  from fcn_jax import models
  early = models.build('fcn32s_early_fusion', width=1 / 16)
  assert early.arch.input_channels == 4
  late = models.build('fcn32s_late_fusion', width=1 / 16)
  variables = models.init_variables(late, jax.random.key(0))
  assert {'conv1_1color', 'conv1_1hha', 'score_frcolor', 'score_frhha', 'upscore'} <= set(
      variables['params'])
  with pytest.raises(ValueError, match=r'\(N, H, W, 6\)'):
    late.apply(variables, np.zeros((1, 33, 33, 3), np.float32))


def test_caffenet_alexnet_under_the_torchvision_arch_names_the_reference_net(tmp_path, capsys):
  src, _, _ = write_caffemodel(tmp_path, 'voc-fcn-alexnet')
  assert convert.main([str(src), '--out', str(tmp_path / 'ckpt'), '--arch', 'fcn_alexnet']) == 2
  err = capsys.readouterr().err
  assert 'the reference net voc-fcn-alexnet' in err and 'fcn_alexnet_caffe' in err
  assert 'width 1.5' not in err


def test_export_and_serve_refuse_two_heads_clearly(tmp_path):
  from fcn_jax import export, segmenter
  from fcn_jax.errors import UserError
  src, _, _ = write_caffemodel(tmp_path, 'siftflow-fcn32s')
  assert convert.main([str(src), '--out', str(tmp_path / 'ckpt')]) == 0
  with pytest.raises(UserError, match='single-headed colour nets'):
    export.export_checkpoint(tmp_path / 'ckpt', tmp_path / 'model.fcnx')
  seg = segmenter.Segmenter.load(tmp_path / 'ckpt')
  with pytest.raises(UserError, match='heads semantic, geometric'):
    seg.require_single_colour_net('fcn_jax.serve')
  labels = seg([np.zeros((33, 35, 3), np.uint8)])
  assert set(labels[0]) == {'semantic', 'geometric'} and labels[0]['geometric'].shape == (33, 35)
  assert seg.class_names_of('geometric') == ['sky', 'horizontal', 'vertical']


def _png(array: np.ndarray) -> bytes:
  import io
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


@pytest.mark.parametrize('scale_range', [None, (0.7, 1.4)])
def test_training_transform_crops_every_modality_and_label_alike(scale_range):
  from fcn_jax import preprocessing
  from fcn_jax.data import pipeline
  h, w = 57, 83
  # Every plane encodes its own pixel position, so a plane cropped elsewhere shows.
  rows, cols = np.mgrid[0:h, 0:w]
  rgb = np.stack([rows * 4 % 256, cols * 3 % 256, (rows + cols) % 256], -1).astype(np.uint8)
  hha = rgb[..., ::-1].copy()
  depth = (1000 + rows * 100 + cols).astype(np.uint16)
  semantic = ((rows // 4 + cols // 4) % 33).astype(np.uint8)
  geometric = ((rows // 8) % 3).astype(np.uint8)
  record = {'image': _png(rgb), 'hha': _png(hha), 'depth': _png(depth), 'file_name': b'x',
            'segmentation_mask_semantic': _png(semantic), 'segmentation_mask_geometric': _png(geometric)}
  modalities = [('color', 'nyud_bgr'), ('hha', 'nyud_hha'), ('depth', 'nyud_log_depth')]
  transform = pipeline.TrainTransform(crop_size=40, preprocessing='nyud_bgr', flip=True,
                                      scale_range=scale_range, modalities=modalities,
                                      heads=['semantic', 'geometric'])
  for seed in range(6):
    out = transform.random_map(record, np.random.default_rng(seed))
    assert out['image'].shape == (40, 40, 7)
    assert set(out) == {'image', 'label_semantic', 'label_geometric'}
    if scale_range is None:  # exact: undo each preprocessing and compare with the same window
      color = preprocessing.get('nyud_bgr')
      back = out['image'][..., :3][..., ::-1] + np.asarray(color.mean[::-1], np.float32)
      hha_back = out['image'][..., 3:6] + np.asarray(preprocessing.get('nyud_hha').mean, np.float32)
      depth_back = np.exp(out['image'][..., 6] + 7.844)
      ys, xs = np.nonzero(out['label_semantic'] != 255)
      assert len(ys), 'the window holds no pixel of the image'
      # Each plane's pixel says where in the image it came from: they must agree everywhere.
      assert np.allclose(hha_back[..., ::-1], back, atol=1e-3)
      r, c = np.round(back[..., 0] / 4).astype(int), np.round(back[..., 1] / 3).astype(int)
      d = np.round(depth_back).astype(int) - 1000
      assert np.array_equal(d[ys, xs] // 100, r[ys, xs]) and np.array_equal(d[ys, xs] % 100, c[ys, xs])
      assert np.array_equal(out['label_geometric'][ys, xs], (r[ys, xs] // 8) % 3)
      assert np.array_equal(out['label_semantic'][ys, xs], (r[ys, xs] // 4 + c[ys, xs] // 4) % 33)
    else:  # resampled: the labels and modalities still share one window
      valid = out['label_geometric'] != 255
      assert np.array_equal(valid, out['label_semantic'] != 255)
      assert np.array_equal(valid, np.any(out['image'] != 0, axis=-1) | valid)
  # Evaluation: the same modalities and heads, native size and padded.
  for pad_to in (None, 96):
    (batch,) = list(pipeline.eval_batches([record], preprocessing='nyud_bgr', pad_to=pad_to,
                                          modalities=modalities, heads=['semantic', 'geometric']))
    side = (h, w) if pad_to is None else (96, 96)
    assert batch['image'].shape == (1, *side, 7)
    assert np.array_equal(batch['label_geometric'][0, :h, :w], geometric)
    assert np.array_equal(batch['label_semantic'][0, :h, :w], semantic)
    assert np.allclose(np.exp(batch['image'][0, :h, :w, 6] + 7.844), depth, rtol=1e-5)
