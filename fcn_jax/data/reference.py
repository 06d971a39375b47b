"""TFDS builders for the paper's other datasets: `pascal_context`, `sift_flow` and `nyud_v2`
(array_record, no TensorFlow), read from a manual directory holding the official archives or their
extracted trees. Facts: ../shared/reference/ZOO.md sec. 5 and the reference data layers.

Features (beside `file_name`):
  pascal_context  image (VOC2010 JPEG), segmentation_mask: the 59-class task, 0 = everything else
                  ("background"), 1..59 in the reference output order (60 outputs, no void)
  sift_flow       image (JPEG), segmentation_mask_semantic (0..32, void 255) and
                  segmentation_mask_geometric (0 sky, 1 horizontal, 2 vertical, void 255)
  nyud_v2         image (colour PNG), hha (PNG), depth (16-bit PNG), segmentation_mask (0..39,
                  void 255)

Every example is validated while preparing (readable files, equal sizes, label values in range,
every listed id present); a failure raises DataError naming the file, and TFDS only renames a
dataset into place once every split is written.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fcn_jax import progress as progress_lib
from fcn_jax.data import archives, builders
from fcn_jax.data.builders import DataError, LocalDatasetInfo, MissingDataError
from fcn_jax.data.classes import (IGNORE_LABEL, NYUD_CLASS_NAMES, PASCAL_CONTEXT_CLASS_NAMES,
                                  SIFT_FLOW_GEOMETRIC_CLASS_NAMES, SIFT_FLOW_SEMANTIC_CLASS_NAMES,
                                  ClassInfo, voc_palette)

LISTS = epath.Path(__file__).parent / 'lists'

# Three of the 59 names are spelled differently in PASCAL-Context's labels.txt.
PASCAL_CONTEXT_LABELS_TXT_NAMES = {'diningtable': 'table', 'bedcloth': 'bedclothes',
                                   'clothes': 'cloth'}
# Absent from the SIFT Flow test set: left out of the semantic metrics (the reference README).
SIFT_FLOW_ABSENT_FROM_TEST = ('cow', 'desert', 'moon')


@dataclasses.dataclass(frozen=True)
class HeadClasses:
  """A head's classes and the classes its metrics leave out."""
  name: str | None  # None: the single head ('segmentation_mask' / 'label')
  classes: ClassInfo
  eval_exclude: tuple[int, ...] = ()


def _info(names) -> ClassInfo:
  return ClassInfo(names=tuple(names), palette=voc_palette(len(names)), ignore_label=IGNORE_LABEL)


HEADS: dict[str, tuple[HeadClasses, ...]] = {
    'pascal_context': (HeadClasses(None, _info(PASCAL_CONTEXT_CLASS_NAMES)),),
    'sift_flow': (HeadClasses('semantic', _info(SIFT_FLOW_SEMANTIC_CLASS_NAMES),
                              tuple(SIFT_FLOW_SEMANTIC_CLASS_NAMES.index(c)
                                    for c in SIFT_FLOW_ABSENT_FROM_TEST)),
                  HeadClasses('geometric', _info(SIFT_FLOW_GEOMETRIC_CLASS_NAMES))),
    'nyud_v2': (HeadClasses(None, _info(NYUD_CLASS_NAMES)),),
}
SPLITS = {'pascal_context': ('train', 'val'), 'sift_flow': ('trainval', 'test'),
          'nyud_v2': ('train', 'test', 'reference_train', 'reference_val')}
# The modalities each dataset's records hold, in the pipelines' names.
MODALITIES = {'pascal_context': ('color',), 'sift_flow': ('color',),
              'nyud_v2': ('color', 'hha', 'depth')}


def read_list(name: str, root: epath.Path | None = None, local: str = '') -> list[str]:
  """A reference split list shipped with the package (fcn_jax/data/lists/`name`), or the tree's own
  `root`/`local` when it has one (a subset, or a synthetic tree)."""
  path = root / local if root is not None and local and (root / local).exists() else LISTS / name
  return builders.read_id_list(path)


def _read_mat(path: epath.Path, key: str) -> np.ndarray:
  import scipy.io
  if not path.exists():
    raise DataError(f'annotation {path} does not exist')
  try:
    with path.open('rb') as f:
      value = scipy.io.loadmat(f)[key]
  except KeyError:
    raise DataError(f'{path}: no variable {key!r} in the .mat file') from None
  except Exception as e:  # noqa: BLE001 - scipy raises several types for a corrupt file
    raise DataError(f'{path}: unreadable .mat file ({type(e).__name__}: {e})') from None
  value = np.asarray(value)
  if value.ndim != 2 or not (np.issubdtype(value.dtype, np.integer) or
                             np.issubdtype(value.dtype, np.floating)):
    raise DataError(f'{path}: {key} must be a 2-D label map, got {value.dtype} {value.shape}')
  return value


def _check_range(label: np.ndarray, low: int, high: int, path, what: str) -> None:
  values = np.unique(label)
  bad = values[(values < low) | (values > high)]
  if bad.size:
    raise DataError(f'{path}: {what} values {bad.tolist()[:10]} outside {low}..{high}')


def _image_size(data: bytes, path) -> tuple[int, int]:
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.verify()
    with Image.open(io.BytesIO(data)) as im:
      return im.size[1], im.size[0]
  except Exception as e:  # noqa: BLE001
    raise DataError(f'{path}: unreadable image ({e})') from None


def _read_image(path: epath.Path, image_id: str) -> tuple[bytes, tuple[int, int]]:
  if not path.exists():
    raise DataError(f'id {image_id!r} is listed in the split but {path} does not exist')
  data = path.read_bytes()
  return data, _image_size(data, path)


def _same_size(image_id: str, sizes: dict[str, tuple[int, int]]) -> None:
  if len(set(sizes.values())) > 1:
    raise DataError(f'size mismatch for {image_id!r}: ' + ', '.join(
        f'{name} {h}x{w}' for name, (h, w) in sizes.items()) + ' (HxW)')


def _mask_feature():
  return tfds.features.Image(shape=(None, None, 1), encoding_format='png')


class _Reference(builders._Base):
  """Common: the info (features, classes in metadata) and one example per id."""

  FEATURES: dict[str, Any] = {}
  HOMEPAGE = ''
  DESCRIPTION = ''

  def _info(self):
    metadata = tfds.core.MetadataDict()
    heads = HEADS[self.name]
    metadata['heads'] = [{'name': h.name, **h.classes.to_json(),
                          'eval_exclude': list(h.eval_exclude)} for h in heads]
    metadata.update(heads[0].classes.to_json())
    metadata['modalities'] = list(MODALITIES[self.name])
    return LocalDatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({**self.FEATURES,
                                                           'file_name': tfds.features.Text()}),
        homepage=self.HOMEPAGE, description=self.DESCRIPTION, metadata=metadata)

  def _root(self, dl_manager, archive: dict, find, **kwargs) -> epath.Path:
    """_find_root, downloading only archives with a known checksum."""
    if self._allow_download and archive['md5'] is None and archives.manual_dir(dl_manager) is None:
      raise MissingDataError(f'{archive["url"]} has no published checksum, so fcn_jax does not '
                             f'download it: download it by hand into the manual directory.\n\n'
                             + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return self._find_root(dl_manager, archive, find, **kwargs)

  def _generate_examples(self, root: epath.Path, ids: list[str], split: str = ''):
    for image_id in progress_lib.track(ids, desc=f'preparing {self.name}/{split}',
                                       unit='images'):
      yield image_id, {**self._example(root, image_id), 'file_name': image_id}

  def _example(self, root: epath.Path, image_id: str) -> dict:
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# SIFT Flow

SIFT_FLOW_ARCHIVE = dict(filename='SiftFlowDataset.zip', md5=None,
                         url=('http://www.cs.unc.edu/~jtighe/Papers/ECCV10/siftflow/'
                              'SiftFlowDataset.zip'))
_SIFT_FLOW_SUBDIR = 'spatial_envelope_256x256_static_8outdoorcategories'
SIFT_FLOW_MANUAL_INSTRUCTIONS = f"""\
Put ONE of these into the manual directory (`manual_dir`):
    <manual_dir>/SiftFlowDataset.zip     (the official archive, as downloaded), or
    <manual_dir>/{{Images,SemanticLabels,GeoLabels}}/{_SIFT_FLOW_SUBDIR}/   (its extracted tree)
Archive: {SIFT_FLOW_ARCHIVE['url']}
The reference trainval / test lists ship with fcn_jax (fcn_jax/data/lists); a trainval.txt /
test.txt beside Images/ replaces them.
"""


def _find_sift_flow_root(base: epath.Path) -> epath.Path | None:
  for rel in ('.', 'SiftFlow', 'SiftFlowDataset', 'sift-flow', 'siftflow'):
    cand = base / rel
    if (cand / 'Images' / _SIFT_FLOW_SUBDIR).is_dir() and (cand / 'SemanticLabels').is_dir():
      return cand
  return None


class SiftFlow(_Reference):
  """SIFT Flow (Liu et al.): 2,688 256x256 outdoor images, semantic and geometric labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Reference trainval / test lists; both label maps per example.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = SIFT_FLOW_MANUAL_INSTRUCTIONS
  HOMEPAGE = 'http://people.csail.mit.edu/celiu/SIFTflow/'
  DESCRIPTION = 'SIFT Flow: trainval 2486, test 200 (the reference lists; 2 unannotated left out).'
  FEATURES = {'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
              'segmentation_mask_semantic': _mask_feature(),
              'segmentation_mask_geometric': _mask_feature()}

  def _split_generators(self, dl_manager):
    root = self._root(dl_manager, SIFT_FLOW_ARCHIVE, _find_sift_flow_root, what='SIFT Flow',
                      contents=f'Images/{_SIFT_FLOW_SUBDIR}',
                      tree=f'{{Images,SemanticLabels,GeoLabels}}/{_SIFT_FLOW_SUBDIR}')
    return {s: self._generate_examples(root, read_list(f'sift_flow_{s}.txt', root, f'{s}.txt'), s)
            for s in ('trainval', 'test')}

  def _example(self, root: epath.Path, image_id: str) -> dict:
    jpeg, size = _read_image(root / 'Images' / _SIFT_FLOW_SUBDIR / f'{image_id}.jpg', image_id)
    sem_path = root / 'SemanticLabels' / _SIFT_FLOW_SUBDIR / f'{image_id}.mat'
    geo_path = root / 'GeoLabels' / _SIFT_FLOW_SUBDIR / f'{image_id}.mat'
    semantic, geometric = _read_mat(sem_path, 'S'), _read_mat(geo_path, 'S')
    _same_size(image_id, {'image': size, 'semantic': semantic.shape, 'geometric': geometric.shape})
    _check_range(semantic, 0, 33, sem_path, 'semantic label')
    _check_range(geometric, -1, 3, geo_path, 'geometric label')
    geometric = np.where(geometric == -1, 0, geometric)  # -1 void -> 0, as the reference
    # 0 void and 1..N classes -> 255 and 0..N-1.
    shift = lambda s: (s.astype(np.int64) - 1).astype(np.uint8)
    return {'image': jpeg, 'segmentation_mask_semantic': builders.encode_mask_png(shift(semantic)),
            'segmentation_mask_geometric': builders.encode_mask_png(shift(geometric))}


# ---------------------------------------------------------------------------------------------
# NYUDv2

NYUD_ARCHIVE = dict(filename='nyud.tar.gz', md5=None,
                    url='http://dl.caffe.berkeleyvision.org/nyud.tar.gz')
NYUD_MANUAL_INSTRUCTIONS = f"""\
Put ONE of these into the manual directory (`manual_dir`):
    <manual_dir>/nyud.tar.gz     (the reference's archive: {NYUD_ARCHIVE['url']}), or
    <manual_dir>/data/{{images,depth,hha}}/img_<id>.png + <manual_dir>/segmentation/img_<id>.mat
    (its extracted tree; ids 5001..6449)
The reference train / val / test lists ship with fcn_jax (fcn_jax/data/lists); train.txt /
val.txt / test.txt beside data/ replace them.
"""


def _find_nyud_root(base: epath.Path) -> epath.Path | None:
  for rel in ('.', 'nyud', 'nyud_v2'):
    cand = base / rel
    if (cand / 'data' / 'images').is_dir() and (cand / 'segmentation').is_dir():
      return cand
  return None


class NyudV2(_Reference):
  """NYUDv2 (Silberman et al.), the 40-class task of Gupta et al.: colour, depth, HHA, labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Colour, 16-bit depth and HHA PNGs; labels 1..40 -> 0..39, void 255.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = NYUD_MANUAL_INSTRUCTIONS
  HOMEPAGE = 'https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html'
  DESCRIPTION = ('NYUDv2 40 classes: train 795 (the reference train + val), test 654, and the '
                 'reference train (381) and val (414) separately.')
  FEATURES = {'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
              'hha': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
              'depth': tfds.features.Image(shape=(None, None, 1), dtype=np.uint16,
                                           encoding_format='png'),
              'segmentation_mask': _mask_feature()}

  def _split_generators(self, dl_manager):
    root = self._root(dl_manager, NYUD_ARCHIVE, _find_nyud_root, what='NYUDv2',
                           contents='data/{images,depth,hha} and segmentation/',
                           tree='data/{images,depth,hha} + segmentation/')
    train, val, test = (read_list(f'nyud_{s}.txt', root, f'{s}.txt')
                        for s in ('train', 'val', 'test'))
    splits = {'train': train + val, 'test': test, 'reference_train': train, 'reference_val': val}
    return {s: self._generate_examples(root, ids, s) for s, ids in splits.items()}

  def _example(self, root: epath.Path, image_id: str) -> dict:
    name = f'img_{image_id}'
    color, color_size = _read_image(root / 'data' / 'images' / f'{name}.png', image_id)
    hha, hha_size = _read_image(root / 'data' / 'hha' / f'{name}.png', image_id)
    depth_path = root / 'data' / 'depth' / f'{name}.png'
    depth, depth_size = _read_image(depth_path, image_id)
    with Image.open(io.BytesIO(depth)) as im:
      if im.mode not in ('I;16', 'I', 'L'):
        raise DataError(f'{depth_path}: depth must be a 16-bit grey PNG, got mode {im.mode}')
      depth_array = np.asarray(im).astype(np.uint16)
    label_path = root / 'segmentation' / f'{name}.mat'
    label = _read_mat(label_path, 'segmentation')
    _same_size(image_id, {'image': color_size, 'hha': hha_size, 'depth': depth_size,
                          'segmentation': label.shape})
    _check_range(label, 0, 40, label_path, 'label')
    buffer = io.BytesIO()
    Image.fromarray(depth_array).save(buffer, format='PNG')
    return {'image': color, 'hha': hha, 'depth': buffer.getvalue(),
            'segmentation_mask': builders.encode_mask_png(
                (label.astype(np.int64) - 1).astype(np.uint8))}


# ---------------------------------------------------------------------------------------------
# PASCAL-Context

VOC2010_ARCHIVE = dict(filename='VOCtrainval_03-May-2010.tar',
                       md5='da459979d0c395079b5c75ee67908abb',
                       url=('http://host.robots.ox.ac.uk/pascal/VOC/voc2010/'
                            'VOCtrainval_03-May-2010.tar'))
CONTEXT_ARCHIVE = dict(filename='trainval.tar.gz', md5=None,
                       url='https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz')
PASCAL_CONTEXT_MANUAL_INSTRUCTIONS = f"""\
Put into the manual directory (`manual_dir`):
    the VOC2010 images: <manual_dir>/{VOC2010_ARCHIVE['filename']} or its extracted
        VOCdevkit/VOC2010/{{JPEGImages,ImageSets/Main/train.txt,val.txt}}
    the PASCAL-Context annotations: <manual_dir>/trainval.tar.gz or its extracted trainval/<id>.mat
    and their label list: <manual_dir>/labels.txt ("id: name", 1-based; from the PASCAL-Context
        site)
Archives: {VOC2010_ARCHIVE['url']}
          {CONTEXT_ARCHIVE['url']}  (and labels.txt beside it)
"""


def _find_voc2010(base: epath.Path) -> epath.Path | None:
  for rel in ('VOCdevkit/VOC2010', 'TrainVal/VOCdevkit/VOC2010', 'VOC2010'):
    cand = base / rel
    if (cand / 'JPEGImages').is_dir() and (cand / 'ImageSets' / 'Main').is_dir():
      return cand
  return None


def _find_context(base: epath.Path) -> epath.Path | None:
  for rel in ('trainval', 'pascal-context/trainval', '.'):
    cand = base / rel
    if cand.is_dir() and cand.name == 'trainval' and any(cand.glob('*.mat')):
      return cand
  return None


def read_context_labels(path: epath.Path) -> dict[str, int]:
  """labels.txt ("id: name" per line, 1-based) -> {name: id}."""
  if not path.exists():
    raise MissingDataError(f'{path} does not exist: PASCAL-Context labels.txt is needed to map its '
                           'labels to the 59-class task.\n\n' + PASCAL_CONTEXT_MANUAL_INSTRUCTIONS)
  labels = {}
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    key, sep, name = line.partition(':')
    if not sep or not key.strip().isdigit():
      raise DataError(f'{path} line {number}: expected "id: name", got {line!r}')
    labels[name.strip()] = int(key)
  return labels


def context_lookup(labels: dict[str, int]) -> np.ndarray:
  """The 459 -> 60 lookup table: labels.txt id -> 1..59 for the kept classes, else 0."""
  table = np.zeros(max(labels.values()) + 1, np.uint8)
  for index, name in enumerate(PASCAL_CONTEXT_CLASS_NAMES[1:], 1):
    spelled = PASCAL_CONTEXT_LABELS_TXT_NAMES.get(name, name)
    if spelled not in labels:
      raise DataError(f'labels.txt has no class {spelled!r} (the 59-class task\'s {name!r})')
    table[labels[spelled]] = index
  return table


class PascalContext(_Reference):
  """PASCAL-Context (Mottaghi et al. 2014), the 59-class task on VOC2010 trainval images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': '59 classes + 0 = everything else; VOC2010 ImageSets/Main train / val.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = PASCAL_CONTEXT_MANUAL_INSTRUCTIONS
  HOMEPAGE = 'https://cs.stanford.edu/~roozbeh/pascal-context/'
  DESCRIPTION = 'PASCAL-Context, 59 classes + background: train 4998, val 5105.'
  FEATURES = {'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
              'segmentation_mask': _mask_feature()}

  def _split_generators(self, dl_manager):
    manual = archives.manual_dir(dl_manager)
    voc = self._find_root(dl_manager, VOC2010_ARCHIVE, _find_voc2010, what='VOC2010',
                          contents='VOCdevkit/VOC2010',
                          tree='VOCdevkit/VOC2010/{JPEGImages,ImageSets}')
    context = self._root(dl_manager, CONTEXT_ARCHIVE, _find_context,
                              what='PASCAL-Context annotations', contents='trainval/<id>.mat',
                              tree='trainval/<id>.mat')
    candidates = [context.parent / 'labels.txt'] + ([manual / 'labels.txt'] if manual else [])
    labels_txt = next((p for p in candidates if p.exists()), candidates[-1])
    self._lookup = context_lookup(read_context_labels(labels_txt))
    self._context = context
    main = voc / 'ImageSets' / 'Main'
    splits = {s: builders.read_id_list(main / f'{s}.txt') for s in ('train', 'val')}
    return {s: self._generate_examples(voc, ids, s) for s, ids in splits.items()}

  def _example(self, root: epath.Path, image_id: str) -> dict:
    jpeg, size = _read_image(root / 'JPEGImages' / f'{image_id}.jpg', image_id)
    path = self._context / f'{image_id}.mat'
    label_map = _read_mat(path, 'LabelMap')
    _same_size(image_id, {'image': size, 'LabelMap': label_map.shape})
    _check_range(label_map, 0, len(self._lookup) - 1, path, 'LabelMap')
    mask = self._lookup[label_map.astype(np.int64)]
    return {'image': jpeg, 'segmentation_mask': builders.encode_mask_png(mask)}


BUILDERS = {'pascal_context': PascalContext, 'sift_flow': SiftFlow, 'nyud_v2': NyudV2}
