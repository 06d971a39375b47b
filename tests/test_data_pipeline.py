"""grain pipeline: shapes, dtypes, determinism, padding semantics, sharding, resume-from-state, eval coverage."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import fcn_jax.data as data
from fcn_jax import preprocessing
from fcn_jax.data import pipeline, synthetic

N_TRAIN, N_VAL = 10, 5


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipe')
  synthetic.write_voc_tree(root / 'manual', num_train=N_TRAIN, num_val=N_VAL, seed=2, min_size=40, max_size=72)
  kw = dict(data_dir=str(root / 'tfds'), manual_dir=str(root / 'manual'))
  return (data.get_data_source('voc_segmentation/2012', 'train', **kw),
          data.get_data_source('voc_segmentation/2012', 'val', **kw))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


@pytest.mark.parametrize('preset', ['caffe_bgr', 'torchvision_rgb'])
def test_train_shapes_dtypes_values(sources, preset):
  train, _ = sources
  it = iter(pipeline.train_loader(train, batch_size=3, crop_size=56, preprocessing=preset, seed=0,
                                  scale_range=(0.5, 1.5)))
  for batch in take(it, 4):   # > 1 epoch of 10 examples with batch 3, variable-size images
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (3, 56, 56, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (3, 56, 56) and batch['label'].dtype == np.int32
    assert set(np.unique(batch['label'])) <= set(range(21)) | {255}
    # un-preprocessing the non-padded pixels gives valid uint8 colours
    rgb = preprocessing.get(preset).invert(batch['image'])
    assert rgb.dtype == np.uint8


def test_train_is_deterministic_and_reshuffles(sources):
  train, _ = sources
  make = lambda seed: iter(pipeline.train_loader(train, batch_size=2, crop_size=48, preprocessing='caffe_bgr',
                                                 seed=seed, scale_range=(0.8, 1.2), num_epochs=2))
  a, b, c = list(make(0)), list(make(0)), list(make(1))
  assert len(a) == 2 * N_TRAIN // 2
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  # second epoch is a different order / different augmentation of the same examples
  epoch1, epoch2 = a[:N_TRAIN // 2], a[N_TRAIN // 2:]
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(epoch1, epoch2))


def test_train_resume_from_state(sources):
  train, _ = sources
  loader = pipeline.train_loader(train, batch_size=2, crop_size=40, preprocessing='caffe_bgr', seed=7,
                                 scale_range=(0.7, 1.3))
  it = iter(loader)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 5)   # crosses the epoch boundary (5 batches / epoch)
  resumed = iter(pipeline.train_loader(train, batch_size=2, crop_size=40, preprocessing='caffe_bgr', seed=7,
                                       scale_range=(0.7, 1.3)))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), expected)


def test_crop_or_pad_semantics():
  pre = preprocessing.get('caffe_bgr')
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 30, 3), np.uint8)
  label = rng.integers(0, 21, (20, 30)).astype(np.uint8)
  # pad on both axes (crop 40 > 20, 30): content somewhere inside, the rest 0 / 255
  out_img, out_lab = pipeline.crop_or_pad(image, label, 40, np.random.default_rng(1), pre)
  inside = out_lab != 255
  assert inside.sum() == 20 * 30
  ys, xs = np.nonzero(inside)
  y0, x0 = ys.min(), xs.min()
  np.testing.assert_array_equal(out_lab[y0:y0 + 20, x0:x0 + 30], label)
  np.testing.assert_allclose(out_img[y0:y0 + 20, x0:x0 + 30], pre(image))
  assert (out_img[~inside] == 0).all()                       # padded with the mean (0 after preprocessing)
  np.testing.assert_array_equal(pre.invert(out_img[~inside]), np.tile(np.rint(
      np.asarray(preprocessing.CAFFE_BGR_MEAN)[::-1]).astype(np.uint8), ((~inside).sum(), 1)))
  # crop on one axis, pad on the other
  out_img, out_lab = pipeline.crop_or_pad(image, label, 25, np.random.default_rng(2), pre)
  assert out_img.shape == (25, 25, 3) and out_lab.shape == (25, 25)
  assert (out_lab == 255).sum() == 5 * 25
  # exact crop when smaller
  out_img, out_lab = pipeline.crop_or_pad(image, label, 10, None, pre)
  np.testing.assert_array_equal(out_lab, label[5:15, 10:20])


def test_train_pads_small_images_with_ignore(sources):
  train, _ = sources
  it = iter(pipeline.train_loader(train, batch_size=2, crop_size=100, preprocessing='caffe_bgr', seed=0,
                                  flip=False))
  batch = next(it)
  pad = batch['label'] == 255
  assert pad.any()
  # all-255 rows/cols (pure padding) have zero image
  for img, lab in zip(batch['image'], batch['label']):
    rows = (lab == 255).all(axis=1)
    assert rows.sum() >= 100 - 72
    assert (img[rows] == 0).all()


def test_train_sharding(sources):
  train, _ = sources
  kw = dict(batch_size=1, crop_size=32, preprocessing='caffe_bgr', seed=3, num_epochs=1, flip=False)
  shards = [list(iter(pipeline.train_loader(train, shard_index=i, shard_count=3, **kw))) for i in range(3)]
  assert [len(s) for s in shards] == [3, 3, 3]     # 10 // 3 each, remainder dropped
  # shards are disjoint: no identical crops across shards
  keys = [x['label'].tobytes() + x['image'].tobytes() for s in shards for x in s]
  assert len(set(keys)) == len(keys)
  with pytest.raises(ValueError):
    pipeline.train_loader(train, shard_index=3, shard_count=3, **kw)


def test_bad_arguments(sources):
  train, val = sources
  with pytest.raises(ValueError, match='unknown preprocessing'):
    pipeline.train_loader(train, batch_size=1, crop_size=8, preprocessing='nope', seed=0)
  with pytest.raises(ValueError, match='batch_size 0'):
    pipeline.eval_batches(val, preprocessing='caffe_bgr', batch_size=0)


def test_eval_native(sources):
  _, val = sources
  pre = preprocessing.get('torchvision_rgb')
  batches = list(pipeline.eval_batches(val, preprocessing='torchvision_rgb'))
  assert len(batches) == N_VAL
  assert sorted(b['file_name'][0] for b in batches) == [synthetic.image_id(i) for i in range(N_TRAIN,
                                                                                              N_TRAIN + N_VAL)]
  sizes = set()
  for i, b in enumerate(batches):
    image, label = data.decode_example(val[i])
    assert b['image'].shape == (1,) + image.shape and b['label'].shape == (1,) + label.shape
    assert b['label'].dtype == np.int32 and b['image'].dtype == np.float32
    np.testing.assert_array_equal(b['label'][0], label)
    np.testing.assert_allclose(b['image'][0], pre(image))
    sizes.add(label.shape)
  assert len(sizes) > 1
  again = list(pipeline.eval_batches(val, preprocessing='torchvision_rgb'))
  assert [b['file_name'] for b in again] == [b['file_name'] for b in batches]


def test_eval_padded_batches_and_shards(sources):
  _, val = sources
  pre = preprocessing.get('caffe_bgr')
  batches = list(pipeline.eval_batches(val, preprocessing='caffe_bgr', batch_size=2, pad_to=72))
  assert len(batches) == 3
  names = [n for b in batches for n in b['file_name']]
  assert names[-1] == '' and sorted(n for n in names if n) == sorted(data.file_name(val[i]) for i in range(N_VAL))
  for b in batches:
    assert b['image'].shape == (2, 72, 72, 3) and b['label'].shape == (2, 72, 72)
  dummy_img, dummy_lab = batches[-1]['image'][1], batches[-1]['label'][1]
  assert (dummy_lab == 255).all() and (dummy_img == 0).all()
  first = batches[0]
  image, label = data.decode_example(val[0])
  h, w = label.shape
  np.testing.assert_array_equal(first['label'][0, :h, :w], label)
  np.testing.assert_allclose(first['image'][0, :h, :w], pre(image))
  assert (first['label'][0, h:] == 255).all() and (first['label'][0, :, w:] == 255).all()
  assert (first['image'][0, h:] == 0).all() and (first['image'][0, :, w:] == 0).all()
  # sharded: same number of batches on every shard, every example exactly once overall
  per_shard = [list(pipeline.eval_batches(val, preprocessing='caffe_bgr', batch_size=2, pad_to=72,
                                          shard_index=i, shard_count=2)) for i in range(2)]
  assert len(per_shard[0]) == len(per_shard[1]) == 2
  all_names = [n for s in per_shard for b in s for n in b['file_name'] if n]
  assert sorted(all_names) == sorted(n for n in names if n)
  native = [list(pipeline.eval_batches(val, preprocessing='caffe_bgr', shard_index=i, shard_count=2))
            for i in range(2)]
  assert sorted(b['file_name'][0] for s in native for b in s) == sorted(all_names)
  with pytest.raises(ValueError, match='larger than pad_to'):
    list(pipeline.eval_batches(val, preprocessing='caffe_bgr', batch_size=2, pad_to=41))


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def test_native_batches_by_size_hold_each_image_once_as_decoded():
  """batch_size > 1 at native size: images of one size go together, the rest alone, nothing
  padded: every example exactly once, each equal to its one-at-a-time batch."""
  rng = np.random.default_rng(0)
  sizes = [(40, 50), (40, 50), (30, 20), (40, 50), (30, 20), (40, 50), (40, 50), (33, 35)]
  records = [{'image': _png(rng.integers(0, 256, (h, w, 3), np.uint8)),
              'segmentation_mask': _png(rng.integers(0, 21, (h, w), np.uint8)),
              'file_name': f'im{i}'} for i, (h, w) in enumerate(sizes)]
  batches = list(pipeline.eval_batches(records, preprocessing='caffe_bgr', batch_size=2))
  assert [b['file_name'] for b in batches] == [['im0', 'im1'], ['im3', 'im5'], ['im6'],
                                               ['im2', 'im4'], ['im7']]
  single = {b['file_name'][0]: b for b in pipeline.eval_batches(records, preprocessing='caffe_bgr')}
  assert list(single) == [f'im{i}' for i in range(len(sizes))]  # batch 1: source order
  for b in batches:
    assert b['label'].dtype == np.int32 and b['image'].shape[0] == len(b['file_name'])
    for j, name in enumerate(b['file_name']):
      np.testing.assert_array_equal(b['image'][j], single[name]['image'][0])
      np.testing.assert_array_equal(b['label'][j], single[name]['label'][0])


def test_train_worker_processes_give_same_examples(sources):
  """worker_count > 0 decodes in processes; per-example results equal the in-process ones (grain batches within a
  worker, so the batch composition may differ)."""
  train, _ = sources
  kw = dict(batch_size=1, crop_size=32, preprocessing='caffe_bgr', seed=5, num_epochs=1, scale_range=(0.8, 1.2))
  inproc = list(iter(pipeline.train_loader(train, worker_count=0, **kw)))
  workers = list(iter(pipeline.train_loader(train, worker_count=1, **kw)))
  assert_batches_equal(inproc, workers)


def test_color_jitter_against_pil_enhance():
  """Brightness, contrast, saturation in that order, as PIL's ImageEnhance (an independent
  implementation; PIL rounds to uint8 after each stage and takes the mean grey as a whole number,
  hence the tolerance of a few levels)."""
  from PIL import ImageEnhance
  rng = np.random.default_rng(3)
  image = rng.integers(30, 220, size=(24, 32, 3), dtype=np.uint8)
  factors = np.float32([1.2, 0.7, 1.3])
  ours = pipeline.color_jitter(image, factors)
  ref = Image.fromarray(image)
  ref = ImageEnhance.Brightness(ref).enhance(1.2)
  ref = ImageEnhance.Contrast(ref).enhance(0.7)
  ref = ImageEnhance.Color(ref).enhance(1.3)
  assert ours.dtype == np.float32 and 0 <= ours.min() and ours.max() <= 255
  assert np.abs(ours - np.asarray(ref, np.float32)).max() <= 3
  np.testing.assert_allclose(pipeline.color_jitter(image, np.float32([1, 1, 1])), image, atol=1e-3)
  grey = image[..., 0]  # one-channel images: brightness and contrast only
  np.testing.assert_allclose(pipeline.color_jitter(grey, np.float32([1, 1, 0.1])), grey, atol=1e-3)


def test_train_color_jitter(sources):
  """Jitter changes the colours the net sees, not the labels' classes or the pipeline's
  determinism; 0 leaves the random stream as it was."""
  train, _ = sources
  make = lambda jitter: list(iter(pipeline.train_loader(
      train, batch_size=2, crop_size=48, preprocessing='torchvision_rgb', seed=4, num_epochs=1,
      color_jitter=jitter)))
  plain, default = make(0.0), list(iter(pipeline.train_loader(
      train, batch_size=2, crop_size=48, preprocessing='torchvision_rgb', seed=4, num_epochs=1)))
  assert_batches_equal(plain, default)
  a, b = make(0.4), make(0.4)
  assert_batches_equal(a, b)
  assert any(not np.allclose(x['image'], y['image']) for x, y in zip(a, plain))
  rgb = preprocessing.get('torchvision_rgb').invert(np.concatenate([x['image'] for x in a]))
  assert rgb.dtype == np.uint8
  with pytest.raises(ValueError, match='color_jitter'):
    pipeline.train_loader(train, batch_size=1, crop_size=8, preprocessing='caffe_bgr', seed=0,
                          color_jitter=1.5)
