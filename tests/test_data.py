"""TFDS builders (VOC 2012 / 2011 / SBD) built from synthetic trees, extracted and archived; bad-input errors."""

from __future__ import annotations

import io
import pathlib
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image

import fcn_jax.data as data
from fcn_jax.data import synthetic

VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL = 5, 5, 7, 3
# Ids: VOC train 0..4, val 5..9; SBD train 0..6, val 7..9 -> seg11valid = {7, 8, 9}.
SEG11VALID = [synthetic.image_id(i) for i in (7, 8, 9)]


def names(source) -> list[str]:
  return [data.file_name(source[i]) for i in range(len(source))]


@pytest.fixture(scope='module')
def manual(tmp_path_factory) -> pathlib.Path:
  return synthetic.write_manual_dir(tmp_path_factory.mktemp('manual'), voc_train=VOC_TRAIN, voc_val=VOC_VAL,
                                    sbd_train=SBD_TRAIN, sbd_val=SBD_VAL, seed=0)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def archived(tmp_path_factory) -> pathlib.Path:
  return synthetic.write_manual_dir(tmp_path_factory.mktemp('archived'), voc_train=VOC_TRAIN, voc_val=VOC_VAL,
                                    sbd_train=SBD_TRAIN, sbd_val=SBD_VAL, seed=0, archived=True)


def small_voc(root, **kw) -> pathlib.Path:
  """A fresh 2+2 VOC2012 tree to corrupt; returns VOCdevkit/VOC2012."""
  return synthetic.write_voc_tree(root, num_train=2, num_val=2, seed=5, min_size=32, max_size=40, **kw) / 'VOC2012'


# -------------------------------------------------------------------------------------------- synthetic trees

def test_synthetic_is_deterministic_and_variable(tmp_path):
  a = synthetic.write_voc_tree(tmp_path / 'a', num_train=3, num_val=2, seed=3)
  b = synthetic.write_voc_tree(tmp_path / 'b', num_train=3, num_val=2, seed=3)
  c = synthetic.write_voc_tree(tmp_path / 'c', num_train=3, num_val=2, seed=4)
  files = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file())
  assert len(files) == 5 * 2 + 3
  for f in files:
    assert (a / f).read_bytes() == (b / f).read_bytes(), f
  assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes() or len({(a / f).read_bytes() != (c / f).read_bytes()
                                                                              for f in files}) > 1
  sizes = set()
  for p in (a / 'VOC2012' / 'SegmentationClass').glob('*.png'):
    im = Image.open(p)
    assert im.mode == 'P'
    m = np.asarray(im)
    sizes.add(m.shape)
    assert 64 <= m.shape[0] <= 96 and 64 <= m.shape[1] <= 96
    assert set(np.unique(m)) <= set(range(21)) | {255}
    assert (m == 255).any() and (m > 0).any() and (m == 0).any()
  assert len(sizes) > 1
  assert (a / 'VOC2012/ImageSets/Segmentation/train.txt').read_text().split() == \
      [synthetic.image_id(i) for i in range(3)]


def test_synthetic_scenes_have_thin_parts_and_void_bands():
  """Thin/small structures exist: some labelled pixels vanish under a 3x3 erosion + 8x downsampling."""
  from scipy import ndimage
  thin_fraction = []
  for i in range(20):
    image, classes, void = synthetic.render_scene(0, i)
    assert image.dtype == np.uint8 and image.shape[:2] == classes.shape == void.shape
    fg = classes > 0
    # void band straddles every boundary, 2..3 px wide
    boundary = fg ^ ndimage.binary_erosion(fg)
    assert void[boundary].all()
    opened = ndimage.binary_opening(fg, iterations=3)
    thin_fraction.append((fg & ~opened).sum() / max(fg.sum(), 1))
  assert max(thin_fraction) > 0.5        # some scenes are dominated by thin / small parts
  assert min(thin_fraction) < 0.3        # others by large blobs
  # every class appears with its own colour
  seen = set()
  for i in range(60):
    seen |= set(np.unique(synthetic.render_scene(1, i)[1]).tolist())
  assert seen == set(range(21))


def test_sbd_tree_matches_voc_scene(tmp_path):
  release = synthetic.write_sbd_tree(tmp_path, num_train=2, num_val=1, seed=0)
  mat = scipy.io.loadmat(release / 'dataset/cls/2008_000001.mat', squeeze_me=True, struct_as_record=False)
  seg = mat['GTcls'].Segmentation
  _, classes, _ = synthetic.render_scene(0, 1)
  np.testing.assert_array_equal(seg, classes)
  assert (release / 'dataset/val.txt').read_text().split() == ['2008_000002']


# ----------------------------------------------------------------------------------------------- builders

def test_voc2012_counts_and_exact_content(manual, data_dir):
  counts = {}
  for split in ('train', 'val', 'trainval'):
    src = data.get_data_source('voc_segmentation/2012', split, data_dir=str(data_dir), manual_dir=str(manual))
    counts[split] = len(src)
  assert counts == {'train': VOC_TRAIN, 'val': VOC_VAL, 'trainval': VOC_TRAIN + VOC_VAL}
  voc = manual / 'VOCdevkit' / 'VOC2012'
  src = data.get_data_source('voc_segmentation/2012', 'trainval', data_dir=str(data_dir))  # already prepared
  assert sorted(names(src)) == [synthetic.image_id(i) for i in range(VOC_TRAIN + VOC_VAL)]
  for i in range(len(src)):
    record = src[i]
    name = data.file_name(record)
    assert bytes(record['image']) == (voc / 'JPEGImages' / f'{name}.jpg').read_bytes()   # byte-exact JPEG
    image, label = data.decode_example(record)
    expected = np.asarray(Image.open(voc / 'SegmentationClass' / f'{name}.png'))
    np.testing.assert_array_equal(label, expected)                                    # pixel-exact mask
    np.testing.assert_array_equal(image, np.asarray(Image.open(voc / 'JPEGImages' / f'{name}.jpg')))
    assert image.dtype == label.dtype == np.uint8 and image.shape == label.shape + (3,)


def test_voc2011_seg11valid_is_val_minus_sbd_train(manual, data_dir):
  src = data.get_data_source('voc_segmentation/2011', 'seg11valid', data_dir=str(data_dir), manual_dir=str(manual))
  assert sorted(names(src)) == SEG11VALID
  val = data.get_data_source('voc_segmentation/2011', 'val', data_dir=str(data_dir))
  assert len(val) == VOC_VAL


def test_sbd_counts_and_masks(manual, data_dir):
  train = data.get_data_source('sbd', 'train', data_dir=str(data_dir), manual_dir=str(manual))
  val = data.get_data_source('sbd', 'val', data_dir=str(data_dir))
  assert (len(train), len(val)) == (SBD_TRAIN, SBD_VAL)
  ds = manual / 'benchmark_RELEASE' / 'dataset'
  for i in range(len(val)):
    record = val[i]
    name = data.file_name(record)
    assert bytes(record['image']) == (ds / 'img' / f'{name}.jpg').read_bytes()
    _, label = data.decode_example(record)
    seg = scipy.io.loadmat(ds / 'cls' / f'{name}.mat', squeeze_me=True, struct_as_record=False)['GTcls'].Segmentation
    np.testing.assert_array_equal(label, seg)
    assert 255 not in label


def test_archived_manual_dir(archived, tmp_path):
  assert sorted(p.name for p in archived.iterdir()) == sorted(
      ['VOCtrainval_11-May-2012.tar', 'VOCtrainval_25-May-2011.tar', 'benchmark.tgz'])
  tree = synthetic.write_voc_tree(tmp_path / 'ref', num_train=VOC_TRAIN, num_val=VOC_VAL, seed=0) / 'VOC2012'
  kw = dict(data_dir=str(tmp_path / 'tfds'), manual_dir=str(archived))
  src = data.get_data_source('voc_segmentation/2012', 'val', **kw)
  assert len(src) == VOC_VAL
  for i in range(len(src)):
    name = data.file_name(src[i])
    assert bytes(src[i]['image']) == (tree / 'JPEGImages' / f'{name}.jpg').read_bytes()
    np.testing.assert_array_equal(data.decode_example(src[i])[1],
                                  np.asarray(Image.open(tree / 'SegmentationClass' / f'{name}.png')))
  # VOC2011 tar uses TrainVal/VOCdevkit/VOC2011; the SBD train list is read from inside benchmark.tgz.
  assert sorted(names(data.get_data_source('voc_segmentation/2011', 'seg11valid', **kw))) == SEG11VALID
  assert len(data.get_data_source('sbd', 'train', **kw)) == SBD_TRAIN


def test_voc2011_trainval_layout_and_sbd_train_list_file(tmp_path):
  devkit = synthetic.write_voc_tree(tmp_path / 'gen', num_train=2, num_val=3, seed=0, min_size=32, max_size=40,
                                    year='2011')
  manual = tmp_path / 'manual'
  (manual / 'TrainVal').mkdir(parents=True)
  shutil.move(devkit, manual / 'TrainVal' / 'VOCdevkit')
  (manual / 'sbd_train.txt').write_text('2008_000000\n2008_000003\n')
  src = data.get_data_source('voc_segmentation/2011', 'seg11valid', data_dir=str(tmp_path / 'tfds'),
                             manual_dir=str(manual))
  assert sorted(names(src)) == ['2008_000002', '2008_000004']


def test_unknown_names():
  with pytest.raises(ValueError, match='unknown dataset'):
    data.get_builder('voc_segmentation/2007', data_dir='/nonexistent')


# -------------------------------------------------------------------------------------------- bad inputs

def assert_not_prepared(name, data_dir):
  builder = data.get_builder(name, data_dir=str(data_dir))
  assert not builder.is_prepared()
  assert not list(pathlib.Path(data_dir).rglob('dataset_info.json'))


def test_missing_data_gives_instructions_with_paths(tmp_path):
  empty = tmp_path / 'manual'
  empty.mkdir()
  (empty / 'README').write_text('nothing here')
  with pytest.raises(data.MissingDataError) as e:
    data.get_data_source('voc_segmentation/2012', 'train', data_dir=str(tmp_path / 'tfds'), manual_dir=str(empty))
  msg = str(e.value)
  assert str(empty / 'VOCtrainval_11-May-2012.tar') in msg and 'VOCdevkit/VOC2012' in msg
  with pytest.raises(data.MissingDataError, match='benchmark.tgz'):
    data.get_data_source('sbd', 'train', data_dir=str(tmp_path / 'tfds'), manual_dir=str(empty))
  with pytest.raises(data.MissingDataError, match='download=True'):
    data.get_data_source('sbd', 'train', data_dir=str(tmp_path / 'tfds2'))
  assert_not_prepared('sbd', tmp_path / 'tfds')


def test_seg11valid_without_sbd_list_says_so(tmp_path):
  synthetic.write_voc_tree(tmp_path / 'manual', num_train=1, num_val=1, seed=0, min_size=32, max_size=40,
                           year='2011')
  with pytest.raises(data.MissingDataError) as e:
    data.get_data_source('voc_segmentation/2011', 'val', data_dir=str(tmp_path / 'tfds'),
                         manual_dir=str(tmp_path / 'manual'))
  assert 'seg11valid' in str(e.value) and 'benchmark_RELEASE/dataset/train.txt' in str(e.value)
  assert_not_prepared('voc_segmentation/2011', tmp_path / 'tfds')


def _truncate_jpeg(voc):
  p = voc / 'JPEGImages' / '2008_000003.jpg'
  p.write_bytes(p.read_bytes()[:200])
  return p


def _mismatched_size(voc):
  p = voc / 'SegmentationClass' / '2008_000003.png'
  im = Image.open(p)
  im.crop((0, 0, im.width - 3, im.height)).save(p)
  return p


def _bad_mask_value(voc):
  p = voc / 'SegmentationClass' / '2008_000003.png'
  m = np.asarray(Image.open(p)).copy()
  m[0, 0] = 30
  Image.fromarray(m, mode='L').save(p)
  return p


def _rgb_mask(voc):
  p = voc / 'SegmentationClass' / '2008_000003.png'
  Image.open(p).convert('RGB').save(p)
  return p


def _listed_id_without_file(voc):
  with open(voc / 'ImageSets/Segmentation/val.txt', 'a') as f:
    f.write('2008_999999\n')
  return voc / 'JPEGImages' / '2008_999999.jpg'


def _unreadable_mask(voc):
  p = voc / 'SegmentationClass' / '2008_000003.png'
  p.write_bytes(b'not a png at all')
  return p


@pytest.mark.parametrize('corrupt, match', [
    (_truncate_jpeg, 'unreadable image'),
    (_mismatched_size, 'size mismatch'),
    (_bad_mask_value, r'mask values \[30\]'),
    (_rgb_mask, 'mode RGB'),
    (_listed_id_without_file, "'2008_999999'"),
    (_unreadable_mask, 'unreadable segmentation mask'),
])
def test_bad_voc_input_fails_atomically(tmp_path, corrupt, match):
  voc = small_voc(tmp_path / 'manual')
  path = corrupt(voc)
  with pytest.raises(data.DataError, match=match) as e:
    data.get_data_source('voc_segmentation/2012', 'train', data_dir=str(tmp_path / 'tfds'),
                         manual_dir=str(tmp_path / 'manual'))
  assert str(path) in str(e.value)
  assert_not_prepared('voc_segmentation/2012', tmp_path / 'tfds')


def test_bad_sbd_mat_fails(tmp_path):
  release = synthetic.write_sbd_tree(tmp_path / 'manual', num_train=2, num_val=1, seed=0, min_size=32, max_size=40)
  p = release / 'dataset' / 'cls' / '2008_000002.mat'
  seg = np.full((33, 33), 255, np.uint16)  # SBD has no void; 255 is allowed by the contract, 300 is not
  seg[0, 0] = 300
  scipy.io.savemat(p, {'GTcls': {'Segmentation': seg}})
  with pytest.raises(data.DataError, match=r'2008_000002\.mat.*300'):
    data.get_data_source('sbd', 'val', data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'manual'))
  assert_not_prepared('sbd', tmp_path / 'tfds')
  p.write_bytes(b'garbage')
  with pytest.raises(data.DataError, match='unreadable SBD annotation'):
    data.get_data_source('sbd', 'val', data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'manual'))


def test_failed_preparation_then_fixed_input_succeeds(tmp_path):
  voc = small_voc(tmp_path / 'manual')
  good = (voc / 'JPEGImages' / '2008_000003.jpg').read_bytes()
  _truncate_jpeg(voc)
  kw = dict(data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'manual'))
  with pytest.raises(data.DataError):
    data.get_data_source('voc_segmentation/2012', 'val', **kw)
  (voc / 'JPEGImages' / '2008_000003.jpg').write_bytes(good)
  assert len(data.get_data_source('voc_segmentation/2012', 'val', **kw)) == 2


def test_md5_helper(tmp_path):
  from fcn_jax.data import builders
  p = tmp_path / 'x'
  p.write_bytes(b'abc')
  assert builders.md5sum(p) == '900150983cd24fb0d6963f7d28e17f72'


def test_decode_example_accepts_decoded_arrays():
  img = np.zeros((4, 5, 3), np.uint8)
  mask = np.ones((4, 5, 1), np.uint8)
  out_img, out_mask = data.decode_example({'image': img, 'segmentation_mask': mask})
  assert out_img.shape == (4, 5, 3) and out_mask.shape == (4, 5)
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 5), 128, np.uint8)).save(buf, 'JPEG')  # grayscale JPEG -> RGB
  assert data.decode_image(buf.getvalue()).shape == (4, 5, 3)


def test_download_path_checks_md5(archived, tmp_path, monkeypatch):
  """download=True through a file:// URL (no network): MD5 checked, archive extracted, dataset prepared."""
  from fcn_jax.data import builders
  tar = archived / 'VOCtrainval_11-May-2012.tar'
  good = dict(builders.VOC_ARCHIVES['2012'], url=tar.as_uri(), md5=builders.md5sum(tar))
  monkeypatch.setitem(builders.VOC_ARCHIVES, '2012', dict(good, md5='0' * 32))
  with pytest.raises(data.DataError, match='MD5'):
    data.get_data_source('voc_segmentation/2012', 'val', data_dir=str(tmp_path / 'tfds'), download=True)
  assert_not_prepared('voc_segmentation/2012', tmp_path / 'tfds')
  monkeypatch.setitem(builders.VOC_ARCHIVES, '2012', good)
  src = data.get_data_source('voc_segmentation/2012', 'val', data_dir=str(tmp_path / 'tfds'), download=True)
  assert len(src) == VOC_VAL
  assert (tmp_path / 'tfds' / 'downloads' / 'VOCtrainval_11-May-2012.tar').exists()
