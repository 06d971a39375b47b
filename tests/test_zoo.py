"""The fifteen reference nets: a random-weight .caffemodel of each, laid out as the reference training
net (every layer, blobs on the parameter layers), converted with no --arch, run through
fcn_jax.predict, equals an independent PyTorch executor of the reference layer list
(tests/caffe_reference.py) on odd input sizes."""

from __future__ import annotations

import json
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
  assert 'pass --hha-dir' in capsys.readouterr().err
  with pytest.raises(SystemExit, match='2'):
    predict.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'o2'), image,
                  '--depth-dir', str(tmp_path / 'depth'), '--hha-dir', str(tmp_path / 'hha')])
  assert 'leave --depth-dir out' in capsys.readouterr().err
  (tmp_path / 'hha' / 'img_5001.png').unlink()
  assert predict.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'o3'), image,
                       '--hha-dir', str(tmp_path / 'hha')]) == 1
  assert 'no hha image for it' in capsys.readouterr().err


def test_readme_lists_every_reference_net():
  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  assert zoo.markdown_table() in readme, 'README table out of date: python -m fcn_jax.zoo'
