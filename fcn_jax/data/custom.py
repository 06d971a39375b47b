"""Your own segmentation data: five on-disk layouts (fcn_jax.data.layouts), one TFDS builder
(prepared to array_record).

Layouts (`config.dataset.name`, with `config.dataset.root=ROOT`): folder, voc_like, coco, pairs
(lists of `image mask` paths) and split_folders (CamVid's train/ + trainannot/, mmsegmentation's
img_dir/ + ann_dir/); see fcn_jax.data.layouts. coco: semantic masks from each instance's category
(polygons and RLE, through pycocotools); class ids follow the order of `categories`, with 0 =
background; `iscrowd` regions are ignored. Overlaps: instances are painted from the largest area
to the smallest, so a smaller instance (usually the one in front) wins where two overlap; an
instance wins over a crowd region.

classes.txt (ROOT/classes.txt, or `config.dataset.classes_file`): one class per line in id order,
`name` or `name R G B`; a line `ignore R G B` maps that colour to the ignore label, a line
`ignore V` the index-mask value V (CamVid's void 11); blank lines and `#` comments are skipped.
Masks are index PNGs (8-bit L or P: pixel = class id) or RGB colour masks (each colour one of the
listed colours). The source's `ignore_label` value (default 255) is ignored too; prepared masks
always use 255 for it. Two classes with masks holding only 0 and 255 (how binary masks usually
ship) read 255 as class 1, never as ignored; the log and the dataset's metadata say so.

Images: JPEG and 8-bit PNG are photographs (decoded to uint8 RGB, as always); TIFF (any band
count) and 16-bit PNG are read as stored, uint16 staying uint16 (fcn_jax.images). Records keep the
original file bytes, so nothing is lost. Every image of a dataset must decode to the same channel
count and type (DataError listing which differ). The per-channel mean and std of every split are
computed while preparing (float64, streamed; `preprocessing='dataset'` trains with them).

Preparation validates every example first (unreadable image, missing mask, size mismatch, values or
colours not in classes.txt with their pixel counts, empty split, duplicate id) and raises DataError
listing the problems; TFDS writes into an `incomplete.*` directory that is renamed only when every
split is written, so nothing that looks complete is left on failure. The class names, palette,
ignore label, per-class pixel counts and channel statistics of every split and the images' format
are kept in the dataset's metadata.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import re
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from fcn_jax import images as images_lib
from fcn_jax import progress as progress_lib
from fcn_jax.data import layouts
from fcn_jax.data.builders import (IGNORE_LABEL, DataError, LocalDatasetInfo, MissingDataError,
                                   encode_mask_png)
from fcn_jax.data.classes import ClassInfo, default_palette
from fcn_jax.data.layouts import FORMATS, Example, Options
from fcn_jax.data.masks import (INDEX_MODES, MAX_PROBLEMS, MaskValuesError, coco_semantic_mask,
                                mask_to_ids, read_classes_txt)

# --------------------------------------------------------------------------------------------------
# Reading and validating one example


def _unreadable(path, what: str, error: Exception) -> DataError:
  """A DataError naming the file (PIL's own message names an in-memory buffer)."""
  reason = (f'not a {what} that PIL can read' if isinstance(error, UnidentifiedImageError)
            else f'{type(error).__name__}: {error}')
  return DataError(f'{path}: unreadable {what} ({reason})')


def read_image(example: Example) -> tuple[bytes, np.ndarray]:
  """(the image file's bytes, the image as the model takes it: uint8 RGB for JPEG / 8-bit PNG,
  (H, W, C) as stored for TIFF / 16-bit PNG) of one example."""
  if not example.image.is_file():
    raise DataError(f'id {example.id!r}: image {example.image} does not exist')
  data = example.image.read_bytes()
  if images_lib.stored_as_is(data):
    try:
      return data, images_lib.decode_stored(data, example.image)
    except images_lib.ImageError as e:
      raise DataError(str(e)) from None
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.format not in ('JPEG', 'PNG'):
        raise DataError(f'{example.image}: a {im.format} image; use JPEG, PNG or TIFF')
      return data, np.asarray(im if im.mode == 'RGB' else im.convert('RGB'))
  except DataError:
    raise
  except Exception as e:
    raise _unreadable(example.image, 'image', e) from None


def read_example(example: Example, classes: ClassInfo, category_ids: dict | None = None
                 ) -> tuple[bytes, np.ndarray, np.ndarray]:
  """(the image file's bytes, uint8 (H, W) class ids, the image as the model takes it) of one
  example, validated."""
  data, image = read_image(example)
  height, width = image.shape[:2]
  if example.coco is not None:
    path, record, annotations = example.coco
    if (record.get('height'), record.get('width')) not in ((height, width), (None, None)):
      raise DataError(f'size mismatch for {example.id!r}: image {example.image} is '
                      f'{height}x{width} (HxW) but {path} says '
                      f'{record.get("height")}x{record.get("width")}')
    return data, coco_semantic_mask(annotations, height, width, category_ids, path), image
  if not example.mask.is_file():
    raise DataError(f'id {example.id!r}: mask {example.mask} does not exist')
  try:
    with Image.open(example.mask) as m:
      m.load()
      ids = mask_to_ids(m, classes, example.mask)
  except DataError:
    raise
  except Exception as e:
    raise _unreadable(example.mask, 'mask', e) from None
  if ids.shape != (height, width):
    raise DataError(f'size mismatch for {example.id!r}: image {example.image} is {height}x{width} '
                    f'(HxW) but mask {example.mask} is {ids.shape[0]}x{ids.shape[1]}')
  return data, ids, image


def binary_remap(classes: ClassInfo, splits: dict[str, list[Example]]) -> ClassInfo:
  """Two classes whose index masks hold only 0 and 255: 255 is class 1 (binary masks stored as
  0/255), not the ignore label; a ClassInfo that reads it so. Anything else is returned as is."""
  if classes.num_classes != 2 or 255 not in classes.ignored or 1 in classes.ignored:
    return classes
  seen: set[int] = set()
  for examples in splits.values():
    for example in examples:
      if example.mask is None or not example.mask.is_file():
        return classes  # coco, or a missing mask: validation names it
      try:
        with Image.open(example.mask) as m:
          if m.mode not in INDEX_MODES:
            return classes
          seen.update(int(v) for v in np.unique(np.asarray(m)))
      except Exception:  # validation names the file
        return classes
      if not seen <= {0, 255}:
        return classes
  if 255 not in seen:
    return classes
  return dataclasses.replace(classes, remap=((255, 1),))


def _values_summary(errors: list[MaskValuesError], masks_read: int) -> str:
  """One paragraph for every mask with values outside classes.txt, with the fix."""
  totals: dict[int, list[int]] = {}
  for e in errors:
    for value, count in zip(e.values.tolist(), e.counts.tolist()):
      entry = totals.setdefault(int(value), [0, 0])
      entry[0] += 1
      entry[1] += int(count)
  values = sorted(totals, key=lambda v: -totals[v][0])
  listed = ', '.join(f'{v} in {totals[v][0]} masks ({totals[v][1]} px)' for v in values[:8])
  example = values[0]
  files = ''.join(f'\n    {e}' for e in errors[:3])
  return (f'mask values not in classes.txt in {len(errors)} of {masks_read} masks: {listed}; '
          f'e.g.{files}\n  Fix: if {example} marks unlabelled / void pixels, add the line '
          f'`ignore {example}` to classes.txt (or pass --config.dataset.ignore_label={example}; '
          f'--ignore_label {example} for inspect and evaluate); if it is a class, add its name to '
          f'classes.txt at line {example + 1}.')


class ChannelStatistics:
  """Per-channel mean and standard deviation over many images, streamed: each block of pixels'
  mean and centred sum of squares merged in float64 (Chan et al.), so that 16-bit data with a
  small spread loses nothing to cancellation."""

  BLOCK = 1 << 20  # pixels per block (bounds the float64 copy of a large image)

  def __init__(self):
    self.count, self.mean, self.m2 = 0, None, None

  def add(self, image: np.ndarray) -> None:
    if self.mean is not None and image.shape[-1] != len(self.mean):
      return  # another channel count: image_format stops the preparation
    pixels = image.reshape(-1, image.shape[-1])
    for start in range(0, len(pixels), self.BLOCK):
      x = pixels[start:start + self.BLOCK].astype(np.float64)
      n, mean = len(x), x.mean(axis=0)
      m2 = np.square(x - mean).sum(axis=0)
      if not self.count:
        self.count, self.mean, self.m2 = n, mean, m2
        continue
      total = self.count + n
      delta = mean - self.mean
      self.mean = self.mean + delta * (n / total)
      self.m2 = self.m2 + m2 + np.square(delta) * (self.count * n / total)
      self.count = total

  def to_json(self) -> dict:
    """{'mean', 'std' (population: numpy's default), 'pixels'}; empty when nothing was added."""
    if not self.count:
      return {}
    std = np.sqrt(self.m2 / self.count)
    return {'mean': self.mean.tolist(), 'std': std.tolist(), 'pixels': int(self.count)}


def image_format(kinds: dict[tuple, list], fmt: str, root, stored: bool) -> dict:
  """{'channels', 'dtype', 'stored'} shared by a dataset's images (`kinds`: (channels, dtype) ->
  image paths; `stored`: some are TIFF / 16-bit PNG); DataError when they differ (a model takes
  one kind of input)."""
  if len(kinds) > 1:
    listed = '\n  '.join(
        f'{len(paths)} image(s) of {c} channel(s), {d}: e.g. ' + ', '.join(map(str, paths[:3]))
        for (c, d), paths in sorted(kinds.items(), key=lambda kv: -len(kv[1])))
    raise DataError(f'{fmt} dataset {root}: the images differ in channel count or type; nothing '
                    f'was prepared:\n  {listed}\n  Fix: save every image with the same bands '
                    f'and bit depth (TIFF and 16-bit PNG are read as stored; JPEG and 8-bit PNG '
                    f'as RGB).')
  if not kinds:
    return {}
  (channels, dtype), = kinds
  return {'channels': int(channels), 'dtype': dtype, 'stored': bool(stored)}


def _checked_example(example: Example, *, classes: ClassInfo, category_ids: dict | None):
  """read_example and the mask's PNG, or the DataError that refuses the example."""
  try:
    data, ids_map, image = read_example(example, classes, category_ids)
  except DataError as e:
    return e
  return data, ids_map, image, encode_mask_png(ids_map)


def _in_threads(read, items: list, workers: int = min(4, os.cpu_count() or 1)) -> Iterator:
  """(item, read(item)) in order, `workers` reads at a time: decoding and encoding PNGs release
  the GIL, so checking a dataset uses every core; at most 2 x workers results wait in memory."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending: collections.deque = collections.deque()
    for item in items:
      pending.append((item, pool.submit(read, item)))
      if len(pending) > 2 * workers:
        done, future = pending.popleft()
        yield done, future.result()
    while pending:
      done, future = pending.popleft()
      yield done, future.result()


def validate(fmt: str, root: pathlib.Path, classes: ClassInfo, splits: dict[str, list[Example]],
             progress: bool = True
             ) -> tuple[dict, dict[str, list[int]], dict[str, list[int]], dict]:
  """Reads every example once: (split -> [(example, encoded mask PNG)], split -> per-class pixel
  counts, split -> [images, max height, max width, min height, min width], the inputs:
  {'image_format': image_format(...), 'channel_stats': split -> ChannelStatistics.to_json()}).
  Raises one DataError counting every problem and listing up to MAX_PROBLEMS of them."""
  problems: list[str] = []
  value_errors: list[MaskValuesError] = []
  if not splits:
    problems.append(f'{root}: no splits found')
  category_ids = None
  if fmt == 'coco':
    category_ids = {c['id']: i + 1 for i, c in enumerate(layouts.coco_categories(root))}
  out, counts, sizes, stats = {}, {}, {}, {}
  kinds: dict[tuple, list] = {}
  stored = False
  masks_read = 0
  for split, examples in splits.items():
    if not examples:
      problems.append(f'split {split!r} is empty')
    ids = [e.id for e in examples]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
      problems.append(f'split {split!r}: duplicate ids {dupes[:10]}')
    hist = np.zeros(len(classes.names), np.int64)
    rows, shapes, channel_stats = [], [], ChannelStatistics()
    read = functools.partial(_checked_example, classes=classes, category_ids=category_ids)
    for example, result in progress_lib.track(_in_threads(read, examples), desc=f'checking {split}',
                                              unit='images', total=len(examples),
                                              enabled=progress):
      masks_read += 1
      if isinstance(result, MaskValuesError):
        value_errors.append(result)
        continue
      if isinstance(result, DataError):
        problems.append(str(result))
        continue
      data, ids_map, image, mask_png = result
      labelled = ids_map[ids_map != IGNORE_LABEL].ravel()
      hist += np.bincount(labelled, minlength=len(classes.names))[:len(hist)]
      rows.append((example, mask_png))
      shapes.append(ids_map.shape)
      kinds.setdefault((image.shape[-1], image.dtype.name), []).append(example.image)
      stored = stored or images_lib.stored_as_is(data)
      channel_stats.add(image)
    out[split], counts[split], stats[split] = rows, hist.tolist(), channel_stats.to_json()
    h, w = (np.asarray(shapes).T if shapes else (np.zeros(1, int), np.zeros(1, int)))
    sizes[split] = [len(shapes), int(h.max()), int(w.max()), int(h.min()), int(w.min())]
  total = len(problems) + len(value_errors)
  if total:
    shown = problems[:MAX_PROBLEMS]
    if value_errors:
      shown.append(_values_summary(value_errors, masks_read))
    more = len(problems) - MAX_PROBLEMS
    more = f'\n  ... and {more} more' if more > 0 else ''
    raise DataError(f'{fmt} dataset {root}: {total} problem(s) in {masks_read} examples; nothing '
                    f'was prepared:\n  ' + '\n  '.join(shown) + more)
  inputs = {'image_format': image_format(kinds, fmt, root, stored), 'channel_stats': stats}
  absent_everywhere = [n for i, n in enumerate(classes.names)
                       if i > 0 and not any(c[i] for c in counts.values())]
  if len(absent_everywhere) == len(classes.names) - 1:
    raise DataError(
        f'{fmt} dataset {root}: no mask holds any class but {classes.names[0]!r} (ignored: '
        f'{", ".join(map(str, classes.ignored))}); the classes {", ".join(absent_everywhere[:6])} '
        f'never appear. Masks stored as 0/255 with more than 2 classes? List the 2 classes in '
        f'classes.txt (255 is then read as class 1), or fix the masks.')
  return out, counts, sizes, inputs


# --------------------------------------------------------------------------------------------------
# The TFDS builder


def fingerprint(root: pathlib.Path) -> str:
  """A hash of every file's path, size and mtime under root: edited data is prepared again."""
  h = hashlib.md5()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d != '.git')
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      h.update(f'{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:12]


def classes_path(root: str | pathlib.Path, classes_file: str = '') -> pathlib.Path:
  """classes.txt of a dataset: `classes_file` when given, else ROOT/classes.txt."""
  return pathlib.Path(classes_file or pathlib.Path(root) / layouts.CLASSES_TXT).expanduser()


class CustomSegmentationConfig(tfds.core.BuilderConfig):

  def __init__(self, *, fmt: str, root: str, ignore_label: int, options: Options,
               classes_file: str = ''):
    root = os.path.abspath(os.path.expanduser(root))
    classes = classes_path(root, classes_file)
    classes_text = classes.read_text() if classes.is_file() else ''
    # Keyed by the real path: the run records its root resolved (metadata['data']), so evaluation
    # and prediction reach the data prepared through a symlinked root instead of preparing again.
    key = json.dumps([fmt, os.path.realpath(root), options.val_fraction, ignore_label,
                      fingerprint(pathlib.Path(root)), options.image_suffix, options.mask_suffix,
                      classes_text])
    slug = re.sub(r'[^a-zA-Z0-9]+', '_', os.path.basename(root.rstrip('/')))[:40] or 'root'
    super().__init__(name=f'{fmt}_{slug}_{hashlib.md5(key.encode()).hexdigest()[:10]}',
                     description=f'{fmt} dataset at {root}')
    self.fmt, self.root, self.ignore_label, self.options = fmt, root, ignore_label, options
    self.classes_file = str(classes) if classes_file else ''


class CustomSegmentation(tfds.core.GeneratorBasedBuilder):
  """A user's dataset in one of FORMATS; one builder config per (format, root, options,
  contents)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original image bytes (JPEG, PNG, TIFF); class-id PNG masks (255 = '
                            'ignore); class metadata; the images\' format and per-channel '
                            'statistics.'}

  def __init__(self, *, config: CustomSegmentationConfig, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(config=config, **kwargs)

  def _info(self):
    return LocalDatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'segmentation_mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'segmentation_mask'),
        description=self.builder_config.description,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    c = self.builder_config
    root = pathlib.Path(c.root)
    splits = layouts.source_splits(c.fmt, root, c.options)
    classes = class_info(c.fmt, root, c.ignore_label, c.classes_file)
    binary = binary_remap(classes, splits)
    if binary is not classes:
      print(f'{root}: the masks hold only 0 and 255 and classes.txt lists 2 classes: reading 255 '
            f'as class 1 ({classes.names[1]!r}), not as ignored (binary masks stored as 0/255)',
            flush=True)
    rows, counts, sizes, inputs = validate(c.fmt, root, binary, splits)
    self.info.metadata.update(binary.to_json())
    self.info.metadata['pixel_counts'] = counts
    self.info.metadata['image_sizes'] = sizes
    self.info.metadata.update(inputs)  # image_format, channel_stats
    self.info.metadata['format'] = c.fmt
    self.info.metadata['root'] = c.root
    return {split: self._generate_examples(items) for split, items in rows.items()}

  def _generate_examples(self, items) -> Iterator:
    for example, mask_png in items:
      yield example.id, {'image': example.image.read_bytes(), 'segmentation_mask': mask_png,
                         'file_name': example.id}


def class_info(fmt: str, root: pathlib.Path, ignore_label: int = IGNORE_LABEL,
               classes_file: str = '') -> ClassInfo:
  """The classes of a source: classes.txt (every layout but coco) or the json's categories."""
  if fmt == 'coco':
    cats = layouts.coco_categories(pathlib.Path(root))
    names = ('background',) + tuple(c['name'] for c in cats)
    return ClassInfo(names=names, palette=default_palette(len(names)), ignore_label=IGNORE_LABEL)
  return read_classes_txt(classes_path(root, classes_file), ignore_label=ignore_label)


def get_builder(fmt: str, *, root: str, data_dir: str, val_fraction: float = 0.1,
                ignore_label: int = IGNORE_LABEL, classes_file: str = '', image_suffix: str = '',
                mask_suffix: str = '') -> CustomSegmentation:
  if fmt not in FORMATS:
    raise DataError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
  if not root:
    raise DataError(f'dataset {fmt!r} needs its root directory: config.dataset.root=DIR (--root '
                    'DIR)')
  if not os.path.isdir(os.path.expanduser(root)):
    raise MissingDataError(f'dataset root {root} does not exist (config.dataset.root / --root)')
  options = Options(val_fraction=val_fraction, image_suffix=image_suffix, mask_suffix=mask_suffix)
  config = CustomSegmentationConfig(fmt=fmt, root=root, ignore_label=ignore_label, options=options,
                                    classes_file=classes_file)
  return CustomSegmentation(config=config, data_dir=os.path.expanduser(data_dir))


def source_splits(fmt: str, root: pathlib.Path, val_fraction: float = 0.1,
                  **options) -> dict[str, list[Example]]:
  """{split: [Example]} of a user dataset (see fcn_jax.data.layouts)."""
  return layouts.source_splits(fmt, root, Options(val_fraction=val_fraction, **options))


def source_split_names(fmt: str, root: str, val_fraction: float = 0.1) -> list[str]:
  """The split names a source will have (cheap: lists files, reads no image)."""
  del val_fraction
  return layouts.split_names(fmt, root)
