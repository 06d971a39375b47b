"""Large images by tiles and test-time augmentation (fcn_jax.segmenter): the blending and the
averaging checked against independent NumPy accounts of the same windows and views, labels identical
to whole-image inference where an image fits one tile, and a 12000x9000 JPEG through
`fcn_jax.predict` on the CPU."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from fcn_jax import checkpoint, models, predict
from fcn_jax.errors import UserError
from fcn_jax.segmenter import TTA, Segmenter, tile_starts

WIDTH = 1 / 16
CLASSES = 5


@pytest.fixture(scope='module')
def net():
  model = models.build('fcn8s', num_classes=CLASSES, width=WIDTH)
  variables = jax.device_get(models.init_variables(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  # Score layers start at zero: perturb every weight so that the scores depend on the image.
  variables = jax.tree.map(lambda a: a + 0.02 * rng.standard_normal(a.shape).astype(a.dtype),
                           variables)
  metadata = {'arch': 'fcn8s', 'num_classes': CLASSES, 'width': WIDTH,
              'preprocessing': 'caffe_bgr'}
  return model, variables, metadata


def _image(h: int, w: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_tile_starts_cover_every_pixel_with_the_last_tile_flush():
  for size, tile, stride in [(1000, 512, 384), (512, 512, 384), (513, 512, 384), (100, 512, 1),
                             (1300, 256, 256), (777, 100, 33)]:
    starts = tile_starts(size, min(tile, size), stride)
    covered = np.zeros(size, bool)
    for s in starts:
      covered[s:s + min(tile, size)] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def test_an_image_that_fits_one_tile_gives_the_whole_image_labels(net):
  image = _image(70, 90)
  whole = Segmenter(*net, mode='whole')(image, scores=True)
  tiled = Segmenter(*net, mode='slide', tile=90, tile_stride=64)(image, scores=True)
  np.testing.assert_array_equal(tiled['labels'], whole['labels'])
  np.testing.assert_array_equal(tiled['scores'], whole['scores'])


def test_slide_scores_are_the_average_of_the_overlapping_windows(net):
  image = _image(150, 230)
  tile, stride = 96, 64
  tiled = Segmenter(*net, mode='slide', tile=tile, tile_stride=stride, batch_size=3)
  scores = tiled.scores(image)
  labels_only = tiled(image)  # the banded path that never holds the whole score map
  # Independently: every window run alone at its native size, summed and counted by hand.
  single = Segmenter(*net, mode='whole')
  total = np.zeros((150, 230, CLASSES))
  count = np.zeros((150, 230, 1))
  for y in tile_starts(150, tile, stride):
    for x in tile_starts(230, tile, stride):
      total[y:y + tile, x:x + tile] += single.scores(image[y:y + tile, x:x + tile], exact=True)
      count[y:y + tile, x:x + tile] += 1
  assert count.min() >= 1 and count.max() > 2  # overlaps, corners included
  np.testing.assert_allclose(scores, total / count, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(labels_only, np.argmax(scores, -1))
  assert tiled.compiled_shapes == {(3, tile, tile, 3)}  # one compile for every tile


def test_tta_averages_the_probabilities_of_every_scale_and_flip(net):
  image = _image(64, 80)
  plain = Segmenter(*net, mode='whole')
  np.testing.assert_array_equal(Segmenter(*net, mode='whole', tta='1')(image), plain(image))
  out = Segmenter(*net, mode='whole', tta='flip,0.5,1.5')(image, probabilities=True)
  softmax = lambda s: np.exp(s - s.max(-1, keepdims=True)) / np.exp(
      s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)
  expected = np.zeros((64, 80, CLASSES))
  for scale in (0.5, 1.5):
    size = (round(64 * scale), round(80 * scale))
    scaled = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    for flip in (False, True):
      view = scaled[:, ::-1] if flip else scaled
      s = plain.scores(np.ascontiguousarray(view))
      s = s[:, ::-1] if flip else s
      back = np.asarray(jax.image.resize(s, (64, 80, CLASSES), 'bilinear'))
      expected += softmax(back) / 4
  np.testing.assert_allclose(out['probabilities'].sum(-1), 1, atol=1e-5)
  # PIL resizes the uint8 image, the Segmenter the prepared float image: close, not equal.
  assert np.abs(out['probabilities'] - expected).mean() < 0.01
  assert (out['labels'] == np.argmax(expected, -1)).mean() > 0.9


def test_bad_tile_and_tta_options_say_what_to_use(net):
  with pytest.raises(UserError, match='stride <= tile'):
    Segmenter(*net, tile=64, tile_stride=65)
  with pytest.raises(UserError, match='neither "flip" nor a scale'):
    Segmenter(*net, tta='flip,big')
  with pytest.raises(UserError, match='one of auto, whole, slide'):
    Segmenter(*net, mode='tiles')
  assert TTA.parse('1.25, flip ,0.75') == TTA((1.25, 0.75), True) and TTA.parse('') is None


def test_a_12000x9000_jpeg_predicts_by_tiles(net, tmp_path, monkeypatch):
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)  # reading the labels back here
  model, variables, metadata = net
  checkpoint.save_inference(tmp_path / 'ckpt', variables, metadata)
  h, w = 9000, 12000
  ramp = (np.arange(w, dtype=np.uint16)[None, :] * 255 // w).astype(np.uint8)
  image = np.broadcast_to(ramp[:, :, None], (h, w, 3)).copy()
  image[: h // 2, :, 1] = 200  # two halves the labels can tell apart
  (tmp_path / 'in').mkdir()
  Image.fromarray(image).save(tmp_path / 'in' / 'aerial.jpg', quality=80)
  del image
  refused = predict.main(['--checkpoint', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'o1'),
                          '--max_pixels', '100000000', str(tmp_path / 'in')])
  assert refused == 1 and not (tmp_path / 'o1' / 'aerial.png').exists()
  assert predict.main(['--checkpoint', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'out'),
                       '--tile', '1024', '--stride', '1024', str(tmp_path / 'in')]) == 0
  with Image.open(tmp_path / 'out' / 'aerial.png') as labels:
    assert labels.size == (w, h) and labels.mode == 'P'
