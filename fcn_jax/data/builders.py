"""TFDS builders for PASCAL VOC segmentation (2011, 2012) and SBD, prepared to array_record
without TensorFlow.

TFDS ships neither; these are ours. Registered as `voc_segmentation/2012`, `voc_segmentation/2011`
and `sbd` when this module is imported (`import fcn_jax.data` does that).

Features of every example:
  image:             the original JPEG bytes (never re-encoded); decoded to uint8 RGB (H, W, 3)
  segmentation_mask: (H, W, 1) uint8 PNG of class ids 0..20, 255 = void (VOC borders / "difficult")
  file_name:         the image id, e.g. '2008_000002'

Sources, in this order: `manual_dir` holding the official archives or their extracted trees (see
MANUAL_DOWNLOAD_INSTRUCTIONS of each builder), or -- only when the builder is constructed with
`allow_download=True` -- the official URLs, whose MD5 is checked before extraction.

Every example is validated while preparing (readable JPEG, readable index PNG / .mat, equal sizes,
mask values in {0..20, 255}, every listed id present). Any failure raises `DataError` naming the
file; TFDS writes into an `incomplete.*` directory and only renames it into place after every split
has been written, so a failed preparation never leaves a dataset that looks complete.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fcn_jax import progress as progress_lib
from fcn_jax.data.archives import (DataError, MissingDataError, download_checked,  # noqa: F401
                                   download_file, extract_archive, extract_manual, manual_dir,
                                   md5sum)
from fcn_jax.data.classes import IGNORE_LABEL, VOC_CLASS_NAMES

CLASS_NAMES = VOC_CLASS_NAMES
NUM_CLASSES = len(CLASS_NAMES)

# Official archives. MD5s are the published ones (also used by torchvision.datasets).
VOC_ARCHIVES = {
    '2012': dict(url='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar',
                 filename='VOCtrainval_11-May-2012.tar', md5='6cd6e144f989b92b3379bac3b3de84fd'),
    '2011': dict(url='http://host.robots.ox.ac.uk/pascal/VOC/voc2011/VOCtrainval_25-May-2011.tar',
                 filename='VOCtrainval_25-May-2011.tar', md5='6c3384ef61512963050cb5d687e5bf1e'),
}
SBD_ARCHIVE = dict(
    url=('http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/'
         'benchmark.tgz'),
    filename='benchmark.tgz', md5='82b4d87ceb2ed10f6038a1cba92111cb')
# Reference list (derived here, not downloaded): VOC2011 segmentation val minus SBD train.
SEG11VALID_URL = ('https://github.com/shelhamer/fcn.berkeleyvision.org/blob/master/data/pascal/'
                  'seg11valid.txt')


# --------------------------------------------------------------------------------------------------
# Validation / encoding helpers (shared by the builders and the tests).
# --------------------------------------------------------------------------------------------------

def _read_bytes(path: epath.Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise DataError(f'cannot read {path}: {e}') from e


def check_jpeg(data: bytes, path) -> tuple[int, int]:
  """Fully decodes a JPEG to catch truncation; returns (height, width)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.format != 'JPEG':
        raise DataError(f'{path}: expected a JPEG image, got {im.format}')
      im.load()
      return im.height, im.width
  except DataError:
    raise
  except Exception as e:  # PIL raises many types
    raise DataError(f'unreadable image {path}: {e}') from e


def read_index_png(data: bytes, path) -> np.ndarray:
  """Palette ('P') or grayscale ('L') PNG of class ids -> uint8 (H, W). Never maps colours."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.mode not in ('P', 'L'):
        raise DataError(f'{path}: segmentation PNG must be a palette (P) or grayscale (L) image of '
                        f'class ids, got mode {im.mode}')
      return np.asarray(im, dtype=np.uint8).copy()
  except DataError:
    raise
  except Exception as e:
    raise DataError(f'unreadable segmentation mask {path}: {e}') from e


def read_sbd_mat(path: epath.Path) -> np.ndarray:
  """SBD cls/*.mat (struct GTcls, field Segmentation) -> uint8 (H, W)."""
  import scipy.io
  try:
    with path.open('rb') as f:
      mat = scipy.io.loadmat(f, squeeze_me=True, struct_as_record=False)
    seg = np.asarray(mat['GTcls'].Segmentation)
  except Exception as e:
    raise DataError(f'unreadable SBD annotation {path} (need struct GTcls with field '
                    f'Segmentation): {e}') from e
  if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
    raise DataError(f'{path}: GTcls.Segmentation must be a 2-D integer array, got {seg.dtype} '
                    f'{seg.shape}')
  check_mask_values(seg, path)
  return seg.astype(np.uint8)


def check_mask_values(mask: np.ndarray, path) -> None:
  values = np.unique(mask)
  bad = values[(values >= NUM_CLASSES) & (values != IGNORE_LABEL) | (values < 0)]
  if bad.size:
    raise DataError(f'{path}: mask values {bad.tolist()[:10]} outside {{0..{NUM_CLASSES - 1}, '
                    f'{IGNORE_LABEL}}}')


def encode_mask_png(mask: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(mask, np.uint8), mode='L').save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def make_example(image_id: str, jpeg_path: epath.Path, mask: np.ndarray | None = None,
                 mask_path: epath.Path | None = None) -> dict[str, Any]:
  """Reads + validates one (image, mask) pair. `mask` given (SBD) or read from `mask_path` (VOC
  PNG)."""
  if not jpeg_path.exists():
    raise DataError(f'id {image_id!r} is listed in the split but its image {jpeg_path} does not '
                    'exist')
  if mask is None:
    if not mask_path.exists():
      raise DataError(f'id {image_id!r} is listed in the split but its mask {mask_path} does not '
                      'exist')
    mask = read_index_png(_read_bytes(mask_path), mask_path)
    check_mask_values(mask, mask_path)
  jpeg = _read_bytes(jpeg_path)
  hw = check_jpeg(jpeg, jpeg_path)
  if tuple(mask.shape[:2]) != hw:
    raise DataError(f'size mismatch for {image_id!r}: image {jpeg_path} is {hw[0]}x{hw[1]} (HxW) '
                    f'but mask {mask_path} is {mask.shape[0]}x{mask.shape[1]}')
  return {'image': jpeg, 'segmentation_mask': encode_mask_png(mask), 'file_name': image_id}


def read_id_list(path: epath.Path) -> list[str]:
  if not path.exists():
    raise MissingDataError(f'split list {path} does not exist')
  ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
  if len(set(ids)) != len(ids):
    raise DataError(f'{path}: duplicate ids in split list')
  return ids


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that never looks for precomputed metadata on Google's bucket: these datasets are
  not there, and TFDS's lookup leaves an empty temporary directory (/tmp/tmp*tfds) behind for
  every builder made before its data is prepared."""

  def initialize_from_bucket(self) -> None:
    pass


def _features():
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'segmentation_mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'file_name': tfds.features.Text(),
  })


class _Base(tfds.core.GeneratorBasedBuilder):
  """Common: the `allow_download` switch and array_record as the default file format."""

  def __init__(self, *, allow_download: bool = False, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    self._allow_download = allow_download
    super().__init__(**kwargs)

  def _find_root(self, dl_manager, archive: dict,
                 find: Callable[[epath.Path], epath.Path | None], *,
                 what: str, contents: str, tree: str) -> epath.Path:
    """The data root: an extracted tree in the manual dir, else its archive there (extracted once),
    else the download (if allowed); otherwise MissingDataError with the instructions."""
    manual = manual_dir(dl_manager)
    if manual is not None:
      root = find(manual)
      if root is not None:
        return root
      if (manual / archive['filename']).exists():
        root = find(extract_manual(dl_manager, manual / archive['filename']))
        if root is None:
          raise MissingDataError(f'{manual / archive["filename"]} does not contain {contents}')
        return root
      raise MissingDataError(
          f'{what} not found in manual dir {manual}: expected {manual / archive["filename"]} or '
          f'{manual}/{tree}.\n\n' + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    if self._allow_download:
      root = find(download_checked(dl_manager, archive))
      if root is None:
        raise MissingDataError(f'downloaded {archive["url"]} does not contain {contents}')
      return root
    raise MissingDataError(
        f'no {what} data: give a manual_dir (default {getattr(dl_manager, "_manual_dir", None)} is '
        'missing or empty) or download=True.\n\n' + self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def _files(self, root: epath.Path, image_id: str) -> tuple[epath.Path, epath.Path]:
    """(image, annotation) paths of one id."""
    raise NotImplementedError

  def _checked_splits(self, root: epath.Path, splits: dict[str, list[str]], lists) -> dict:
    """Checks that every listed file exists before anything is written; the split generators."""
    for split, ids in splits.items():
      for image_id in ids:
        for path in self._files(root, image_id):
          if not path.exists():
            raise DataError(f'id {image_id!r} in split {split} ({lists}) has no file {path}')
    return {split: self._generate_examples(root, ids, split) for split, ids in splits.items()}

  def _generate_examples(self, root: epath.Path, ids: list[str], split: str = ''):
    yield from self._generate_examples_checked([(i, *self._files(root, i)) for i in ids], split)

  def _generate_examples_checked(self, items: list[tuple[str, epath.Path, Any]],
                                 split: str) -> Iterator:
    for image_id, jpeg_path, mask_source in progress_lib.track(
        items, desc=f'preparing {self.name}/{split}', unit='images'):
      if isinstance(mask_source, epath.Path) and mask_source.suffix == '.mat':
        if not mask_source.exists():
          raise DataError(f'id {image_id!r} is listed in the split but its annotation '
                          f'{mask_source} does not exist')
        yield image_id, make_example(image_id, jpeg_path, mask=read_sbd_mat(mask_source),
                                     mask_path=mask_source)
      else:
        yield image_id, make_example(image_id, jpeg_path, mask_path=mask_source)


# --------------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------------

VOC_MANUAL_INSTRUCTIONS = """\
Put ONE of these into the manual directory (`manual_dir`):

  VOC2012 (config voc_segmentation/2012):
    <manual_dir>/VOCtrainval_11-May-2012.tar   (the official archive, as downloaded), or
    <manual_dir>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}
                                               (its extracted tree)
  VOC2011 (config voc_segmentation/2011):
    <manual_dir>/VOCtrainval_25-May-2011.tar, or
    <manual_dir>/TrainVal/VOCdevkit/VOC2011/...  or  <manual_dir>/VOCdevkit/VOC2011/...
  plus, for the VOC2011 `seg11valid` split (VOC2011 seg val minus SBD train), the SBD train list,
  one of:
    <manual_dir>/benchmark_RELEASE/dataset/train.txt   (extracted SBD),
    <manual_dir>/benchmark.tgz                         (the SBD archive; only train.txt is read), or
    <manual_dir>/sbd_train.txt              (a copy of benchmark_RELEASE/dataset/train.txt)

Archives:
  http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar
  http://host.robots.ox.ac.uk/pascal/VOC/voc2011/VOCtrainval_25-May-2011.tar
  http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
Or pass download=True to fetch them (MD5-checked).
"""


class VocSegmentationConfig(tfds.core.BuilderConfig):

  def __init__(self, *, year: str, **kwargs):
    super().__init__(name=year, **kwargs)
    self.year = year


def _find_voc_root(base: epath.Path, year: str) -> epath.Path | None:
  for rel in (f'VOCdevkit/VOC{year}', f'TrainVal/VOCdevkit/VOC{year}', f'VOC{year}', '.'):
    cand = base / rel
    if (cand / 'ImageSets' / 'Segmentation').is_dir() and (cand / 'JPEGImages').is_dir():
      return cand
  return None


def _sbd_train_ids_from_manual(manual: epath.Path | None) -> list[str] | None:
  if manual is None:
    return None
  for rel in ('benchmark_RELEASE/dataset/train.txt', 'dataset/train.txt', 'sbd_train.txt'):
    if (manual / rel).exists():
      return read_id_list(manual / rel)
  tgz = manual / SBD_ARCHIVE['filename']
  if tgz.exists():
    with tarfile.open(os.fspath(tgz), 'r:*') as tar:
      for member in tar:
        name = member.name.rstrip('/')
        if member.isfile() and name.endswith('benchmark_RELEASE/dataset/train.txt'):
          text = tar.extractfile(member).read().decode()
          return [line.split()[0] for line in text.splitlines() if line.strip()]
    raise MissingDataError(f'{tgz} holds no benchmark_RELEASE/dataset/train.txt')
  return None


class VocSegmentation(_Base):
  """PASCAL VOC semantic segmentation (SegmentationClass), 2012 and 2011."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original JPEG bytes; index-PNG masks with 255 borders; seg11valid '
                            'for 2011.'}
  BUILDER_CONFIGS = [
      VocSegmentationConfig(year='2012', description='VOC2012 segmentation: train 1464, val 1449, '
                                                     'trainval 2913.'),
      VocSegmentationConfig(year='2011', description='VOC2011 segmentation: train 1112, val 1111, '
                                                     'trainval, and seg11valid (val minus SBD '
                                                     'train, 736).'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = VOC_MANUAL_INSTRUCTIONS

  def _info(self):
    return LocalDatasetInfo(
        builder=self, features=_features(), supervised_keys=('image', 'segmentation_mask'),
        homepage='http://host.robots.ox.ac.uk/pascal/VOC/',
        description='PASCAL VOC segmentation (class masks; 255 = void).')

  def _voc_root(self, dl_manager) -> epath.Path:
    year = self.builder_config.year
    return self._find_root(
        dl_manager, VOC_ARCHIVES[year], lambda base: _find_voc_root(base, year),
        what=f'VOC{year}', contents=f'VOCdevkit/VOC{year}',
        tree='VOCdevkit/VOC{year}/ImageSets/Segmentation (+ JPEGImages, '
             'SegmentationClass)'.format(year=year))

  def _sbd_train_ids(self, dl_manager) -> list[str]:
    ids = _sbd_train_ids_from_manual(manual_dir(dl_manager))
    if ids is not None:
      return ids
    if self._allow_download:
      root = download_checked(dl_manager, SBD_ARCHIVE)
      return read_id_list(root / 'benchmark_RELEASE' / 'dataset' / 'train.txt')
    manual = manual_dir(dl_manager) or getattr(dl_manager, '_manual_dir', None)
    raise MissingDataError(
        'voc_segmentation/2011 split seg11valid (VOC2011 seg val minus SBD train) needs the SBD '
        'train list, which was not found: put one of '
        f'{manual}/benchmark_RELEASE/dataset/train.txt, {manual}/benchmark.tgz or '
        f'{manual}/sbd_train.txt in place (or pass download=True).')

  def _split_generators(self, dl_manager):
    year = self.builder_config.year
    root = self._voc_root(dl_manager)
    lists = root / 'ImageSets' / 'Segmentation'
    train, val = read_id_list(lists / 'train.txt'), read_id_list(lists / 'val.txt')
    has_trainval = (lists / 'trainval.txt').exists()
    trainval = read_id_list(lists / 'trainval.txt') if has_trainval else train + val
    splits = {'train': train, 'val': val, 'trainval': trainval}
    if year == '2011':
      sbd_train = set(self._sbd_train_ids(dl_manager))
      splits['seg11valid'] = [i for i in val if i not in sbd_train]
    return self._checked_splits(root, splits, lists)

  def _files(self, root: epath.Path, image_id: str) -> tuple[epath.Path, epath.Path]:
    return root / 'JPEGImages' / f'{image_id}.jpg', root / 'SegmentationClass' / f'{image_id}.png'


# --------------------------------------------------------------------------------------------------
# SBD
# --------------------------------------------------------------------------------------------------

SBD_MANUAL_INSTRUCTIONS = """\
Put ONE of these into the manual directory (`manual_dir`):
    <manual_dir>/benchmark.tgz          (the official SBD archive, as downloaded), or
    <manual_dir>/benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, train.txt, val.txt}
                                        (its extracted tree)
Archive:
  http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
Or pass download=True to fetch it (MD5-checked).
"""


def _find_sbd_root(base: epath.Path) -> epath.Path | None:
  for rel in ('benchmark_RELEASE/dataset', 'dataset', '.'):
    cand = base / rel
    if (cand / 'img').is_dir() and (cand / 'cls').is_dir():
      return cand
  return None


class Sbd(_Base):
  """Semantic Boundaries Dataset (Hariharan et al. 2011), class segmentation (cls/*.mat
  GTcls.Segmentation)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original JPEG bytes; GTcls.Segmentation as index PNG (no void '
                            'borders in SBD).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = SBD_MANUAL_INSTRUCTIONS

  def _info(self):
    return LocalDatasetInfo(
        builder=self, features=_features(), supervised_keys=('image', 'segmentation_mask'),
        homepage='http://home.bharathh.info/pubs/codes/SBD/download.html',
        description='SBD class segmentation: train 8498, val 2857.')

  def _sbd_root(self, dl_manager) -> epath.Path:
    return self._find_root(dl_manager, SBD_ARCHIVE, _find_sbd_root, what='SBD',
                           contents='benchmark_RELEASE/dataset',
                           tree='benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}')

  def _split_generators(self, dl_manager):
    root = self._sbd_root(dl_manager)
    splits = {s: read_id_list(root / f'{s}.txt') for s in ('train', 'val')}
    return self._checked_splits(root, splits, root / '{train,val}.txt')

  def _files(self, root: epath.Path, image_id: str) -> tuple[epath.Path, epath.Path]:
    return root / 'img' / f'{image_id}.jpg', root / 'cls' / f'{image_id}.mat'
