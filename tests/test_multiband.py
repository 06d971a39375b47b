"""Inputs beyond RGB: 4-band 16-bit TIFF and 16-bit PNG datasets prepared without loss, their
per-channel statistics against numpy, the first convolution adapted from RGB weights, and a 4-band
TIFF dataset trained, evaluated and predicted end to end (the CLI, predict and the Segmenter)."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image

from fcn_jax import checkpoint, config_checks, export, images, models, preprocessing
from fcn_jax import data as data_lib
from fcn_jax.data import pipeline
from fcn_jax.errors import UserError
from fcn_jax.segmenter import Segmenter
from fcn_jax.train import transfer

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ('background', 'square', 'disc')
BANDS = 4


def env(tmp_path) -> dict:
  return {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
          'FCN_JAX_CACHE_DIR': str(tmp_path / 'cache')}


def scene(rng: np.random.Generator, height: int, width: int, bands: int,
          dtype=np.uint16) -> tuple[np.ndarray, np.ndarray]:
  """(H, W, bands) image, (H, W) mask: a square (1) and a disc (2) whose bands differ from the
  background's, with noise, over most of the 16-bit range."""
  mask = np.zeros((height, width), np.uint8)
  y, x = rng.integers(4, height - 20), rng.integers(4, width // 2 - 16)
  mask[y:y + 16, x:x + 16] = 1
  cy, cx = rng.integers(12, height - 12), rng.integers(width // 2 + 10, width - 10)
  yy, xx = np.mgrid[:height, :width]
  mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = 2
  level = np.array([[9000, 20000, 30000, 40000], [30000, 8000, 52000, 12000],
                    [50000, 45000, 9000, 60000]], np.float64)[:, np.arange(bands) % 4]
  image = level[mask] + rng.normal(0, 1500, (height, width, bands))
  top = np.iinfo(dtype).max
  return np.clip(image * (top / 65535), 0, top).astype(dtype), mask


def write_tiff_dataset(root: pathlib.Path, num_train: int = 6, num_val: int = 2,
                       size=(48, 64), bands: int = BANDS, seed: int = 0) -> dict[str, list]:
  """A folder dataset of (H, W, bands) uint16 TIFFs with index-PNG masks and splits/; returns
  {split: [(id, image array)]}."""
  rng = np.random.default_rng(seed)
  for sub in ('images', 'masks', 'splits'):
    (root / sub).mkdir(parents=True, exist_ok=True)
  (root / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
  out = {}
  for split, count in (('train', num_train), ('val', num_val)):
    out[split] = []
    for i in range(count):
      name = f'{split}_{i:02d}'
      image, mask = scene(rng, *size, bands)
      tifffile.imwrite(root / 'images' / f'{name}.tif', image, photometric='minisblack',
                       planarconfig='contig')
      Image.fromarray(mask, 'L').save(root / 'masks' / f'{name}.png')
      out[split].append((name, image))
    (root / 'splits' / f'{split}.txt').write_text('\n'.join(n for n, _ in out[split]) + '\n')
  return out


def png16(array: np.ndarray, filters=(0, 1, 2, 3, 4)) -> bytes:
  """A 16-bit PNG of (H, W, C) uint16, its rows filtered by each PNG filter type in turn (an
  encoder written from the specification, independent of the decoder under test)."""
  h, w, c = array.shape
  raw = array.astype('>u2').view(np.uint8).reshape(h, w * c * 2).astype(np.int64)
  bpp, rows = 2 * c, []
  for i in range(h):
    cur = raw[i]
    up = raw[i - 1] if i else np.zeros_like(cur)
    left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
    upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    kind = filters[i % len(filters)]
    pred = [np.zeros_like(cur), left, up, (left + up) // 2, paeth][kind]
    rows.append(bytes([kind]) + ((cur - pred) & 255).astype(np.uint8).tobytes())

  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack('>I', len(body)) + kind + body
            + struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
  color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, color, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(b''.join(rows))) + chunk(b'IEND', b''))


def source(fmt, root, split, data_dir):
  return data_lib.get_data_source(fmt, split, data_dir=str(data_dir), root=str(root))


def numpy_statistics(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  pixels = np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays]).astype(np.float64)
  return pixels.mean(axis=0), pixels.std(axis=0)


# --------------------------------------------------------------------------------------------------
# Decoding and preparation


def test_png16_and_tiff_decode_as_stored():
  rng = np.random.default_rng(1)
  for channels in (1, 2, 3, 4):
    array = rng.integers(0, 65536, (13, 17, channels)).astype(np.uint16)
    got = images.decode_input(png16(array))
    assert got.dtype == np.uint16 and np.array_equal(got, array), channels
  # PIL's own 16-bit greyscale PNG, and a photograph that stays RGB as always.
  grey = rng.integers(0, 65536, (9, 11)).astype(np.uint16)
  path = pathlib.Path(os.environ.get('TMPDIR', '/tmp')) / f'grey16_{os.getpid()}.png'
  Image.fromarray(grey).save(path)
  assert np.array_equal(images.read_image(path)[..., 0], grey)
  path.unlink()
  rgba = Image.fromarray(rng.integers(0, 256, (5, 6, 4)).astype(np.uint8), 'RGBA')
  import io
  buffer = io.BytesIO()
  rgba.save(buffer, format='PNG')
  assert images.decode_input(buffer.getvalue()).shape == (5, 6, 3)
  # Planar TIFF bands read as (H, W, C).
  planar = rng.integers(0, 65536, (5, 8, 9)).astype(np.uint16)
  buffer = io.BytesIO()
  tifffile.imwrite(buffer, planar, photometric='minisblack', planarconfig='separate')
  assert np.array_equal(images.decode_input(buffer.getvalue()), np.moveaxis(planar, 0, -1))


def test_tiff_folder_and_pairs_prepare_losslessly_with_numpy_statistics(tmp_path):
  written = write_tiff_dataset(tmp_path / 'tiff')
  train_source = source('folder', tmp_path / 'tiff', 'train', tmp_path / 'tfds')
  assert data_lib.input_format(train_source) == {'channels': 4, 'dtype': 'uint16', 'stored': True}
  by_name = dict(written['train'])
  for i in range(len(train_source)):
    record = train_source[i]
    got = data_lib.decode_input(record['image'])
    assert got.dtype == np.uint16 and np.array_equal(got, by_name[data_lib.file_name(record)])
    assert data_lib.decode_image(record['image']).shape == (48, 64, 3)  # for figures
  stats = data_lib.channel_statistics(train_source)
  mean, std = numpy_statistics([a for _, a in written['train']])
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-12)
  np.testing.assert_allclose(stats['std'], std, rtol=1e-10)
  assert stats['pixels'] == 6 * 48 * 64
  # The pairs layout over the same files: the same records and statistics.
  lists = tmp_path / 'tiff' / 'lists'
  lists.mkdir()
  for split in ('train', 'val'):
    (lists / f'{split}.txt').write_text(''.join(f'images/{n}.tif masks/{n}.png\n'
                                                for n, _ in written[split]))
  pairs = source('pairs', tmp_path / 'tiff', 'val', tmp_path / 'tfds')
  assert len(pairs) == 2
  for i in range(len(pairs)):
    want = dict(written['val'])[data_lib.file_name(pairs[i])]
    assert np.array_equal(data_lib.decode_input(pairs[i]['image']), want)
  np.testing.assert_allclose(data_lib.channel_statistics(pairs)['mean'],
                             numpy_statistics([a for _, a in written['val']])[0], rtol=1e-12)


def test_16bit_single_channel_png_dataset(tmp_path):
  root = tmp_path / 'png16'
  rng = np.random.default_rng(2)
  for sub in ('images', 'masks'):
    (root / sub).mkdir(parents=True)
  (root / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
  arrays = {}
  for i in range(4):
    image, mask = scene(rng, 40, 48, 1)
    Image.fromarray(image[..., 0]).save(root / 'images' / f'im{i}.png')  # PIL: I;16
    Image.fromarray(mask, 'L').save(root / 'masks' / f'im{i}.png')
    arrays[f'im{i}'] = image
  src = source('folder', root, 'train', tmp_path / 'tfds')
  assert data_lib.input_format(src) == {'channels': 1, 'dtype': 'uint16', 'stored': True}
  train_arrays = [arrays[data_lib.file_name(src[i])] for i in range(len(src))]
  mean, std = numpy_statistics(train_arrays)
  np.testing.assert_allclose(data_lib.channel_statistics(src)['std'], std, rtol=1e-10)
  # 'dataset' resolves to those statistics and a one-channel first convolution.
  from experiments import common
  c = common.load_config('fcn32s', 'demo')
  c.dataset.name, c.dataset.root, c.preprocessing = 'folder', str(root), 'dataset'
  config_checks.check_inputs_against_data(c, src, log=lambda m: None)
  p = preprocessing.get(c.preprocessing)
  assert c.model.in_channels == 1 and p.stored and p.dtype == 'uint16'
  np.testing.assert_allclose(p.mean, mean, rtol=1e-8)
  # The training pipeline normalises the stored values by them (no crop: 40x48 in a 48 canvas).
  transform = pipeline.TrainTransform(crop_size=48, preprocessing=c.preprocessing, flip=False)
  out = transform.random_map(src[0], np.random.default_rng(0))
  want = (train_arrays[0][..., 0].astype(np.float64) - mean[0]) / std[0]
  got = out['image'][..., 0]
  rows, cols = np.nonzero(out['label'] != 255)
  window = got[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  np.testing.assert_allclose(window, want, rtol=1e-5, atol=1e-5)
  # An RGB preset cannot take 16-bit data: the fix is named.
  c.preprocessing, c.model.in_channels = 'caffe_bgr', 0
  with pytest.raises(UserError, match=r"1 channel\(s\) of uint16.*--config.preprocessing=dataset"):
    config_checks.check_inputs_against_data(c, src, log=lambda m: None)


def test_images_of_another_channel_count_stop_preparation(tmp_path):
  root = tmp_path / 'mixed'
  write_tiff_dataset(root, num_train=3, num_val=1)
  image, _ = scene(np.random.default_rng(3), 48, 64, 3)
  tifffile.imwrite(root / 'images' / 'train_01.tif', image, photometric='minisblack',
                   planarconfig='contig')
  with pytest.raises(UserError, match=r'differ in channel count or type(.|\n)*3 channel\(s\), '
                     r'uint16: e.g. .*train_01.tif'):
    source('folder', root, 'train', tmp_path / 'tfds')
  assert not list((tmp_path / 'tfds').rglob('*.array_record*'))


# --------------------------------------------------------------------------------------------------
# The first convolution from RGB weights


def test_first_convolution_adapted_from_rgb_weights(tmp_path):
  old = np.random.default_rng(4).normal(size=(3, 3, 3, 8))
  # The rule of timm and segmentation_models_pytorch: channel c from c % 3, times 3 / C; one
  # channel: the sum over R, G, B.
  four = np.stack([old[:, :, 0], old[:, :, 1], old[:, :, 2], old[:, :, 0]], axis=2) * 0.75
  np.testing.assert_allclose(transfer.adapt_first_conv(old, 4), four, rtol=1e-12)
  five = np.stack([old[:, :, c % 3] for c in range(5)], axis=2) * 0.6
  np.testing.assert_allclose(transfer.adapt_first_conv(old, 5), five, rtol=1e-12)
  np.testing.assert_allclose(transfer.adapt_first_conv(old, 1), old.sum(2, keepdims=True))
  # A first convolution with its BatchNorm (GoogLeNet, ResNet): the kernel alone is adapted.
  f32 = lambda shape, value=0.0: np.full(shape, value, np.float32)
  target = {'conv1': {'conv': {'kernel': f32((7, 7, 4, 8))},
                      'bn': {'scale': f32(8), 'bias': f32(8)}},
            'conv2': {'kernel': f32((3, 3, 8, 8))}}
  source = {'conv1': {'conv': {'kernel': f32((7, 7, 3, 8), 1.0)},
                      'bn': {'scale': f32(8, 2.0), 'bias': f32(8, 3.0)}},
            'conv2': {'kernel': f32((3, 3, 6, 8), 1.0)}}
  out, copied, kept = transfer.transfer_params(target, source, {'conv1': 4})
  assert copied == ['conv1 (3 -> 4 channels)'] and kept == ['conv2']  # only the first conv adapts
  np.testing.assert_allclose(out['conv1']['conv']['kernel'], 0.75)
  np.testing.assert_allclose(out['conv1']['bn']['scale'], 2.0)
  # Through a run's initialisation: see test_4band_tiff_trains_evaluates_and_predicts (init_from).


# --------------------------------------------------------------------------------------------------
# End to end: train (CLI), evaluate (CLI), predict (CLI and Segmenter)


def test_4band_tiff_trains_evaluates_and_predicts(tmp_path):
  data = tmp_path / 'tiff'
  written = write_tiff_dataset(data)
  e = env(tmp_path)
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], env=e, cwd=tmp_path,
                                     capture_output=True, text=True, timeout=600)
  # RGB weights to start from (Caffe-preprocessed, random values): the first convolution adapts.
  rgb = models.build('fcn32s', num_classes=3, width=1 / 16)
  shapes = jax.eval_shape(lambda: models.init_variables(rgb, jax.random.key(0)))
  rng = np.random.default_rng(5)
  variables = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
  checkpoint.save_inference(tmp_path / 'rgb', variables, {
      'arch': 'fcn32s', 'num_classes': 3, 'width': 1 / 16, 'preprocessing': 'caffe_bgr'})
  work = tmp_path / 'run'
  proc = run('experiments.fcn32s', f'--workdir={work}',
             f'--config={REPO}/experiments/configs/fcn32s.py:demo', '--config.dataset.name=folder',
             f'--config.dataset.root={data}', f'--config.dataset.data_dir={tmp_path / "tfds"}',
             '--config.preprocessing=dataset', '--config.model.width=0.0625',
             '--config.num_train_steps=4', '--config.eval_every=4', '--config.batch_size=2',
             '--config.crop_size=48', '--config.eval_pad_to=64', '--config.log_every=2',
             '--config.num_figure_examples=2', f'--config.init_from={tmp_path / "rgb"}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stdout + proc.stderr
  assert 'per-channel statistics of \'train\' (4 channels, uint16)' in log, log[-3000:]
  assert 'first convolution takes the data\'s 4 channels' in log
  assert 'conv1_1 (3 -> 4 channels)' in log and 'old[..., c % S, :] * S / C' in log, log[-3000:]
  assert "trained on 'caffe_bgr' inputs; this run normalises by its data's own statistics" in log
  meta = checkpoint.read_metadata(work)
  assert meta['model']['in_channels'] == 4 and meta['input_channels'] == 4
  p = preprocessing.get(meta['preprocessing'])
  mean, std = numpy_statistics([a for _, a in written['train']])
  np.testing.assert_allclose(p.mean, mean, rtol=1e-8)
  np.testing.assert_allclose(p.std, std, rtol=1e-8)
  results = json.loads((work / 'results.json').read_text())
  assert list(results['per_class_iu']) == list(CLASSES)

  proc = run('experiments.evaluate', f'--checkpoint={work}', '--split=val', '--pad_to=64',
             '--batch_size=2', '--compilation_cache_dir=')
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads(next((work / 'eval').glob('folder_val_step*/results.json')).read_text())
  assert evaluated['mean_iu'] == pytest.approx(results['mean_iu'], abs=1e-6)

  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  names = [n for n, _ in written['val']]
  for name in names:
    (inputs / f'{name}.tif').write_bytes((data / 'images' / f'{name}.tif').read_bytes())
  proc = run('fcn_jax.predict', '--checkpoint', str(work), '--out', str(tmp_path / 'pred'),
             '--exact', '--save_scores', str(inputs))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(tmp_path / 'pred' / f'{names[0]}_overlay.jpg') as im:
    assert im.size[0] == 64
  seg = Segmenter.load(work)
  arrays = dict(written['val'])
  for name in names:
    with Image.open(tmp_path / 'pred' / f'{name}.png') as im:
      predicted = np.asarray(im)
    scores = np.load(tmp_path / 'pred' / f'{name}_scores.npy')
    from_array = seg(arrays[name], scores=True, exact=True)
    np.testing.assert_array_equal(from_array['labels'], predicted)
    np.testing.assert_allclose(from_array['scores'], scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(seg(str(inputs / f'{name}.tif'), exact=True), predicted)
  with pytest.raises(UserError, match=r'4 channel\(s\) of uint16'):
    seg(arrays[names[0]].astype(np.uint8))
  with pytest.raises(UserError, match='4-band images as stored'):
    seg.require_single_colour_net('fcn_jax.serve')
  with pytest.raises(UserError, match='fcn_jax.export .* 4-band images as stored'):
    export.export_checkpoint(work, tmp_path / 'm.fcnx')  # refused before any tracing
  assert not (tmp_path / 'm.fcnx').exists()
