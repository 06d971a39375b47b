"""Data: TFDS builders for VOC / SBD and for a user's own data (folder, coco, voc_like; see
fcn_jax.data.custom), synthetic trees, and the grain pipeline.

    source = get_data_source('sbd', 'train', data_dir='~/tensorflow_datasets',
                             manual_dir='/data/manual')
    image, label = decode_example(source[0])  # uint8 (H, W, 3) RGB, uint8 (H, W) with 255 = void
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib

import numpy as np
from PIL import Image

from fcn_jax import images as images_lib
from fcn_jax import progress as progress_lib
from fcn_jax.data.builders import (CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, DataError,
                                   MissingDataError, Sbd, VocSegmentation)

from fcn_jax.data import custom, reference
from fcn_jax.data.classes import VOC, ClassInfo



class _QuietPreparation(logging.Filter):
  """Drops TFDS warnings that are normal here: a user dataset's generated builder config, and a
  dataset directory that has no dataset_info.json yet (before its first preparation)."""

  EXPECTED = ('Using custom data configuration', 'has no dataset_info.json')

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in self.EXPECTED)


logging.getLogger('absl').addFilter(_QuietPreparation())

CUSTOM_FORMATS = custom.FORMATS
REFERENCE_DATASETS = tuple(reference.BUILDERS)  # pascal_context, sift_flow, nyud_v2
DATASETS = (('voc_segmentation/2012', 'voc_segmentation/2011', 'sbd') + REFERENCE_DATASETS
            + CUSTOM_FORMATS)
# Where each dataset is evaluated when config.dataset.eval_name / eval_split are '' (the default):
# the paper trains on SBD train and evaluates on VOC2011 seg11valid; other datasets on their val.
DEFAULT_EVAL = {'sbd': ('voc_segmentation/2011', 'seg11valid'),
                'voc_segmentation/2011': ('voc_segmentation/2011', 'seg11valid'),
                'sift_flow': ('sift_flow', 'test'), 'nyud_v2': ('nyud_v2', 'test')}
# The splits each builder writes (known before preparing, so that a typo stops before any work).
SPLITS = {'voc_segmentation/2012': ('train', 'val', 'trainval'),
          'voc_segmentation/2011': ('train', 'val', 'trainval', 'seg11valid'),
          'sbd': ('train', 'val'), **reference.SPLITS}

__all__ = ['CLASS_NAMES', 'CUSTOM_FORMATS', 'ClassInfo', 'DATASETS', 'REFERENCE_DATASETS',
           'class_info', 'head_classes', 'eval_dataset', 'DataError', 'IGNORE_LABEL',
           'MissingDataError', 'NUM_CLASSES', 'SPLITS', 'SOURCE_OPTIONS', 'check_split',
           'image_sizes', 'source_options', 'decode_example', 'get_builder', 'get_data_source',
           'decode_image', 'decode_input', 'decode_mask', 'input_format', 'channel_statistics']


def eval_dataset(name: str, eval_name: str = '', eval_split: str = '') -> tuple[str, str]:
  """(dataset, split) to evaluate a model trained on `name`; '' fields take the defaults."""
  default_name, default_split = DEFAULT_EVAL.get(name, (name, 'val'))
  eval_name = eval_name or default_name
  if not eval_split:
    eval_split = default_split if eval_name == default_name else 'val'
  return eval_name, eval_split


# The fields of config.dataset that say how to read a user dataset (besides its name and root).
SOURCE_OPTIONS = ('val_fraction', 'ignore_label', 'classes_file', 'image_suffix', 'mask_suffix')


def source_options(dataset_config) -> dict:
  """The keyword arguments of get_data_source for a config.dataset (or a checkpoint's 'data')."""
  get = dataset_config.get
  return {'root': get('root', '') or '', 'val_fraction': get('val_fraction', 0.1),
          'ignore_label': get('ignore_label', IGNORE_LABEL),
          'classes_file': get('classes_file', '') or '',
          'image_suffix': get('image_suffix', '') or '',
          'mask_suffix': get('mask_suffix', '') or ''}


def get_builder(name: str, *, data_dir: str, download: bool = False, root: str = '',
                val_fraction: float = 0.1, ignore_label: int = IGNORE_LABEL, **options):
  """The TFDS builder for `name`: 'voc_segmentation/2012' | 'voc_segmentation/2011' | 'sbd', a
  reference dataset, or a user dataset layout (CUSTOM_FORMATS, with its `root`; `options`:
  classes_file, image_suffix, mask_suffix)."""
  base, _, config = name.partition('/')
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if name in CUSTOM_FORMATS:
    return custom.get_builder(name, root=root, data_dir=data_dir, val_fraction=val_fraction,
                              ignore_label=ignore_label, **options)
  if base == 'voc_segmentation' and config in ('2012', '2011'):
    return VocSegmentation(config=config, data_dir=data_dir, allow_download=download)
  if base == 'sbd' and not config:
    return Sbd(data_dir=data_dir, allow_download=download)
  if name in reference.BUILDERS:
    return reference.BUILDERS[name](data_dir=data_dir, allow_download=download)
  raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')


def check_split(name: str, split: str, *, root: str = '', val_fraction: float = 0.1,
                **options) -> None:
  """Raises DataError for an unknown dataset or split, before anything is prepared (a user
  dataset's splits are listed from its root: no image is read)."""
  if name in CUSTOM_FORMATS:
    if not root:
      raise DataError(f'dataset {name!r} needs its root directory: config.dataset.root=DIR (--root '
                      'DIR)')
    if not os.path.isdir(os.path.expanduser(root)):
      raise MissingDataError(f'dataset root {root} does not exist (config.dataset.root / --root)')
    names = custom.source_split_names(name, root, val_fraction)
  elif name in SPLITS:
    names = SPLITS[name]
  else:
    raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
  if split not in names:
    raise DataError(f'{name} has no split {split!r}; choose one of '
                    f'{", ".join(names) or "(none found)"}')


def get_data_source(name: str, split: str, *, data_dir: str, manual_dir: str | None = None,
                    download: bool = False, root: str = '', val_fraction: float = 0.1,
                    ignore_label: int = IGNORE_LABEL, **options):
  """Prepares `name` to array_record under data_dir if not yet prepared, then returns its
  random-access source.

  Sources: `manual_dir` (official archives or extracted trees; see the builder's
  MANUAL_DOWNLOAD_INSTRUCTIONS), or the official URLs when download=True; a user dataset reads its
  `root`. Records hold the undecoded image / PNG bytes (decoding is done by `decode_example`, in the
  grain worker processes), so `source[i]` is cheap and the image bytes are the original. The
  source's `.dataset_info` is the builder's DatasetInfo (see `class_info`).
  """
  import tensorflow_datasets as tfds
  check_split(name, split, root=root, val_fraction=val_fraction)
  builder = get_builder(name, data_dir=data_dir, download=download, root=root,
                        val_fraction=val_fraction, ignore_label=ignore_label, **options)
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(os.fspath(manual_dir)) if manual_dir is not None else None,
        try_download_gcs=False)
    # TFDS's own bars (its splits, its writers) only on a terminal: in a log file they are ANSI
    # redraws; our checking and preparing lines say the progress there (fcn_jax.progress).
    tfds.display_progress_bar(progress_lib.interactive())
    with _removing_new_empty_dirs(os.path.expanduser(os.fspath(data_dir))):
      builder.download_and_prepare(download_config=config, file_format='array_record')
  splits = builder.info.splits
  if split not in splits:
    raise DataError(f'{name} has no split {split!r}; it has {sorted(splits)}')
  images = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
  source = builder.as_data_source(split, decoders={k: tfds.decode.SkipDecoding() for k in images})
  return source


@contextlib.contextmanager
def _removing_new_empty_dirs(data_dir: str):
  """A preparation that fails leaves no directory it created (TFDS makes <name>/<config>/ and
  downloads/ before it reads a file); directories that existed, and anything holding files, stay."""
  top = pathlib.Path(data_dir)
  new_top = [p for p in (top, *top.parents) if not p.exists()]
  existed = {pathlib.Path(d) for d, _, _ in os.walk(top)} if top.exists() else set()
  try:
    yield
  except BaseException:
    for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])) if top.exists() else ():
      if pathlib.Path(d) not in existed:
        try:
          os.rmdir(d)  # only when empty
        except OSError:
          pass
    for p in new_top:
      try:
        p.rmdir()
      except OSError:
        break
    raise


# Splits up to this many images without recorded sizes have their image headers read instead.
MAX_SIZE_SCAN = 20_000


def image_sizes(source, scan: bool = True) -> tuple[int, int] | None:
  """(largest height, largest width) of a split: from its prepared metadata (user datasets), else
  (`scan`) from its images' headers (no pixel is decoded); None for a larger split without
  metadata."""
  metadata = getattr(getattr(source, 'dataset_info', None), 'metadata', None) or {}
  sizes = (metadata.get('image_sizes') or {}).get(str(getattr(source, 'split', '')))
  if sizes:
    return int(sizes[1]), int(sizes[2])
  if not scan or not len(source) or len(source) > MAX_SIZE_SCAN:
    return None
  height = width = 0
  for i in range(len(source)):
    data = source[i]['image']
    if isinstance(data, np.ndarray) and data.dtype != object:
      h, w = data.shape[:2]
    else:
      with Image.open(io.BytesIO(bytes(data))) as im:
        w, h = im.size
    height, width = max(height, h), max(width, w)
  return height, width


def class_info(source) -> tuple[ClassInfo, list[int] | None]:
  """(classes, per-class pixel counts of the source's split or None) of a data source: a user
  dataset's from its prepared metadata, PASCAL VOC's otherwise."""
  info = getattr(source, 'dataset_info', None)
  metadata = getattr(info, 'metadata', None) or {}
  if 'class_names' in metadata:
    split = str(getattr(source, 'split', ''))
    counts = (metadata.get('pixel_counts') or {}).get(split)
    return ClassInfo.from_json(dict(metadata)), counts
  return VOC, None


def input_format(source) -> dict:
  """{'channels', 'dtype', 'stored'} of a source's images: a user dataset's from its prepared
  metadata; {} for the others (VOC and the reference datasets: uint8 RGB photographs)."""
  metadata = getattr(getattr(source, 'dataset_info', None), 'metadata', None) or {}
  return dict(metadata.get('image_format') or {})


def channel_statistics(source) -> dict:
  """{'mean', 'std', 'pixels'} per channel of the source's split, computed while preparing it (a
  user dataset; {} for the others, or one prepared before the statistics were kept)."""
  metadata = getattr(getattr(source, 'dataset_info', None), 'metadata', None) or {}
  return dict((metadata.get('channel_stats') or {}).get(str(getattr(source, 'split', ''))) or {})


def head_classes(source) -> dict[str | None, tuple[ClassInfo, tuple[int, ...]]]:
  """{head name (None: a single head): (classes, class ids its metrics leave out)} of a source."""
  info = getattr(source, 'dataset_info', None)
  metadata = getattr(info, 'metadata', None) or {}
  heads = metadata.get('heads')
  if heads and len(heads) > 1:
    return {h['name']: (ClassInfo.from_json(h), tuple(h.get('eval_exclude') or ())) for h in heads}
  exclude = tuple((heads[0].get('eval_exclude') or ()) if heads else ())
  return {None: (class_info(source)[0], exclude)}


def pixel_counts(source, num_classes: int, progress: bool = True) -> list[int]:
  """Per-class pixel counts of a source (read from its metadata, else counted over its masks)."""
  _, counts = class_info(source)
  if counts is not None:
    return list(counts)
  hist = np.zeros(num_classes, np.int64)
  for i in progress_lib.track(range(len(source)), desc='counting class pixels', unit='images',
                              enabled=progress):
    mask = decode_mask(source[i]['segmentation_mask'])
    hist += np.bincount(mask[mask < num_classes].ravel(), minlength=num_classes)[:num_classes]
  return hist.tolist()


def decode_image(data) -> np.ndarray:
  """JPEG / PNG bytes (or an already decoded array) -> uint8 RGB (H, W, 3). TIFF and 16-bit PNG
  records (decoded as stored for the model: `decode_input`) give their display rendering."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    return data if data.ndim == 3 else np.repeat(data[..., None], 3, axis=-1)
  data = bytes(data)
  if images_lib.stored_as_is(data):
    return images_lib.display_rgb(images_lib.decode_stored(data))
  with Image.open(io.BytesIO(data)) as im:
    if im.mode != 'RGB':
      im = im.convert('RGB')
    return np.asarray(im)


def decode_input(data) -> np.ndarray:
  """A record's image as the model takes it: TIFF and 16-bit PNG as stored, (H, W, C) uint8 /
  uint16 (fcn_jax.images.decode_input); every other image as uint8 RGB (`decode_image`)."""
  if not isinstance(data, np.ndarray) or data.dtype == object:
    data = bytes(data)
    if images_lib.stored_as_is(data):
      return images_lib.decode_stored(data)
  return decode_image(data)


def decode_mask(data) -> np.ndarray:
  """Index PNG bytes (or an already decoded (H, W[, 1]) array) -> uint8 (H, W)."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    return data[..., 0] if data.ndim == 3 else data
  with Image.open(io.BytesIO(bytes(data))) as im:
    return np.asarray(im, np.uint8)


def decode_example(record) -> tuple[np.ndarray, np.ndarray]:
  """One source record -> (uint8 RGB image (H, W, 3), uint8 label (H, W) with 255 = void)."""
  return decode_image(record['image']), decode_mask(record['segmentation_mask'])


def file_name(record) -> str:
  name = record['file_name']
  return name.decode() if isinstance(name, bytes) else str(name)
