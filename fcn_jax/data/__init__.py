"""Data: TFDS builders for VOC / SBD (registered on import), synthetic VOC-format trees, and the grain pipeline.

    source = get_data_source('sbd', 'train', data_dir='~/tensorflow_datasets', manual_dir='/data/manual')
    image, label = decode_example(source[0])      # uint8 (H, W, 3) RGB, uint8 (H, W) with 255 = void
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from fcn_jax.data.builders import (CLASS_NAMES, IGNORE_LABEL, NUM_CLASSES, DataError, MissingDataError, Sbd,
                                   VocSegmentation)

DATASETS = ('voc_segmentation/2012', 'voc_segmentation/2011', 'sbd')
# The splits each builder writes (known before preparing, so that a typo stops before any work).
SPLITS = {'voc_segmentation/2012': ('train', 'val', 'trainval'),
          'voc_segmentation/2011': ('train', 'val', 'trainval', 'seg11valid'),
          'sbd': ('train', 'val')}

__all__ = ['CLASS_NAMES', 'DATASETS', 'DataError', 'IGNORE_LABEL', 'MissingDataError', 'NUM_CLASSES',
           'SPLITS', 'check_split', 'decode_example', 'get_builder', 'get_data_source', 'decode_image', 'decode_mask']


def get_builder(name: str, *, data_dir: str, download: bool = False):
  """The TFDS builder for `name` ('voc_segmentation/2012' | 'voc_segmentation/2011' | 'sbd')."""
  base, _, config = name.partition('/')
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if base == 'voc_segmentation' and config in ('2012', '2011'):
    return VocSegmentation(config=config, data_dir=data_dir, allow_download=download)
  if base == 'sbd' and not config:
    return Sbd(data_dir=data_dir, allow_download=download)
  raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')


def check_split(name: str, split: str) -> None:
  """Raises DataError for an unknown dataset or split, before anything is prepared."""
  if name not in SPLITS:
    raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
  if split not in SPLITS[name]:
    raise DataError(f'{name} has no split {split!r}; choose one of {", ".join(SPLITS[name])}')


def get_data_source(name: str, split: str, *, data_dir: str, manual_dir: str | None = None,
                    download: bool = False):
  """Prepares `name` to array_record under data_dir if not yet prepared, then returns its random-access source.

  Sources: `manual_dir` (official archives or extracted trees; see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS), or
  the official URLs when download=True. Records hold the undecoded JPEG / PNG bytes (decoding is done by
  `decode_example`, in the grain worker processes), so `source[i]` is cheap and the JPEG bytes are the original.
  """
  import tensorflow_datasets as tfds
  check_split(name, split)
  builder = get_builder(name, data_dir=data_dir, download=download)
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(os.fspath(manual_dir)) if manual_dir is not None else None,
        try_download_gcs=False)
    builder.download_and_prepare(download_config=config, file_format='array_record')
  splits = builder.info.splits
  if split not in splits:
    raise DataError(f'{name} has no split {split!r}; it has {sorted(splits)}')
  return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding(),
                                                 'segmentation_mask': tfds.decode.SkipDecoding()})


def decode_image(data) -> np.ndarray:
  """JPEG bytes (or an already decoded array) -> uint8 RGB (H, W, 3)."""
  if isinstance(data, np.ndarray) and data.dtype != object:
    return data if data.ndim == 3 else np.repeat(data[..., None], 3, axis=-1)
  with Image.open(io.BytesIO(bytes(data))) as im:
    if im.mode != 'RGB':
      im = im.convert('RGB')
    return np.asarray(im)


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
