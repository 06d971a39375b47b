"""Your own segmentation data: three source formats, one TFDS builder (prepared to array_record).

Formats (`config.dataset.name`, with `config.dataset.root=ROOT`):

- `folder`: ROOT/images/<id>.jpg|jpeg|png, ROOT/masks/<id>.png, ROOT/classes.txt, optional
  ROOT/splits/<split>.txt (one id per line). Without splits/, a deterministic `train` / `val` split by
  `val_fraction` (ids ordered by a hash of the id, so adding images keeps the others where they were).
- `voc_like`: a VOCdevkit-style tree: ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png,
  ROOT/ImageSets/Segmentation/<split>.txt, and ROOT/classes.txt.
- `coco`: ROOT/annotations/instances_<split>.json with the images in ROOT/images/ (or at the json's
  `file_name` paths, relative to ROOT or absolute). Semantic masks from each instance's category
  (polygons and RLE, through pycocotools); class ids follow the order of `categories`, with 0 =
  background; `iscrowd` regions are ignored. Overlaps: instances are painted from the largest area
  to the smallest, so a smaller instance (usually the one in front) wins where two overlap; an
  instance wins over a crowd region.

classes.txt: one class per line in id order, `name` or `name R G B`; a line `ignore R G B` maps that
colour to the ignore label; blank lines and `#` comments are skipped. Masks are index PNGs (8-bit L
or P: pixel = class id) or RGB colour masks (each colour one of the listed colours). The source's
`ignore_label` value (default 255) is ignored; prepared masks always use 255 for it.

Preparation validates every example first (unreadable image, missing mask, size mismatch, values or
colours not in classes.txt with their pixel counts, empty split, duplicate id) and raises DataError
listing the problems; TFDS writes into an `incomplete.*` directory that is renamed only when every
split is written, so nothing that looks complete is left on failure. The class names, palette,
ignore label and per-class pixel counts of every split are kept in the dataset's metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fcn_jax.data.builders import IGNORE_LABEL, DataError, MissingDataError, encode_mask_png
from fcn_jax.data.classes import ClassInfo, default_palette

FORMATS = ('folder', 'coco', 'voc_like')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
MAX_PROBLEMS = 20  # listed in one error; the count of the rest is given


# --------------------------------------------------------------------------------------------------
# classes.txt


def read_classes_txt(path: pathlib.Path, *, ignore_label: int = IGNORE_LABEL) -> ClassInfo:
  """ClassInfo from a classes.txt (see the module docstring)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise MissingDataError(f'{path} does not exist: list the classes there, one per line in id '
                           f'order (`name` or `name R G B`; 0 is usually `background`)')
  names, colors, ignore_colors = [], [], []
  for number, raw in enumerate(path.read_text().splitlines(), 1):
    line = raw.split('#', 1)[0].strip()
    if not line:
      continue
    parts = line.split()
    rgb = None
    if len(parts) >= 4 and all(re.fullmatch(r'\d+', p) for p in parts[-3:]):
      rgb = tuple(int(p) for p in parts[-3:])
      if max(rgb) > 255:
        raise DataError(f'{path}:{number}: colour {rgb} outside 0..255')
      parts = parts[:-3]
    name = ' '.join(parts)
    if not name:
      raise DataError(f'{path}:{number}: expected `name` or `name R G B`, got {raw!r}')
    if name == 'ignore':
      if rgb is None:
        raise DataError(f'{path}:{number}: `ignore` needs a colour: `ignore R G B`')
      ignore_colors.append(rgb)
      continue
    if name in names:
      raise DataError(f'{path}:{number}: class {name!r} is listed twice')
    names.append(name)
    colors.append(rgb)
  if len(names) < 2:
    raise DataError(f'{path}: needs at least 2 classes (e.g. background and one object class), '
                    f'found {len(names)}')
  if len(names) > 255:
    raise DataError(f'{path}: at most 255 classes (255 is the ignore label), found {len(names)}')
  given = [c is not None for c in colors]
  if any(given) and not all(given):
    missing = [n for n, c in zip(names, colors) if c is None]
    raise DataError(f'{path}: give every class a colour or none; no colour for {missing[:10]}')
  if all(given):
    if len(set(colors)) != len(colors):
      raise DataError(f'{path}: two classes share a colour')
    palette = np.asarray(colors, np.uint8)
  else:
    palette = default_palette(len(names))
  return ClassInfo(names=tuple(names), palette=palette, ignore_label=ignore_label,
                   has_colors=all(given), ignore_colors=tuple(ignore_colors))


# --------------------------------------------------------------------------------------------------
# Masks


def _counts_text(values: np.ndarray, counts: np.ndarray, fmt) -> str:
  order = np.argsort(-counts)[:8]
  more = f', ... ({len(values) - 8} more)' if len(values) > 8 else ''
  return ', '.join(f'{fmt(values[i])}: {int(counts[i])} px' for i in order) + more


def mask_to_ids(mask: Image.Image, classes: ClassInfo, path) -> np.ndarray:
  """A mask image -> uint8 (H, W) class ids with 255 = ignore. Index masks (L / P) hold class ids;
  RGB(A) masks hold the classes' colours. Raises DataError with the offending values and counts."""
  n = len(classes.names)
  if mask.mode in ('L', 'P', 'I;16', 'I'):
    ids = np.asarray(mask).astype(np.int64)
    ignore = ids == classes.ignore_label
    bad = ~ignore & ((ids < 0) | (ids >= n))
    if bad.any():
      values, counts = np.unique(ids[bad], return_counts=True)
      raise DataError(f'{path}: mask values not in classes.txt (ids 0..{n - 1}, ignore '
                      f'{classes.ignore_label}): ' + _counts_text(values, counts, int))
    return np.where(ignore, IGNORE_LABEL, ids).astype(np.uint8)
  if mask.mode in ('RGB', 'RGBA'):
    if not classes.has_colors:
      raise DataError(f'{path}: an RGB colour mask, but classes.txt gives no colours: write '
                      f'`name R G B` lines (or save the masks as index PNGs)')
    rgb = np.asarray(mask.convert('RGB')).astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(classes.palette)}
    for r, g, b in classes.ignore_colors:
      table[(r << 16) | (g << 8) | b] = IGNORE_LABEL
    values, inverse = np.unique(code, return_inverse=True)
    mapped = np.asarray([table.get(int(v), -1) for v in values])
    if (mapped < 0).any():
      bad = mapped < 0
      counts = np.bincount(inverse.ravel(), minlength=len(values))
      raise DataError(f'{path}: mask colours not in classes.txt: ' + _counts_text(
          values[bad], counts[bad], lambda v: f'({v >> 16}, {(v >> 8) & 255}, {v & 255})'))
    return mapped[inverse].reshape(code.shape).astype(np.uint8)
  raise DataError(f'{path}: mask mode {mask.mode} is neither an index (L / P) nor an RGB colour mask')


def coco_semantic_mask(annotations: list[dict], height: int, width: int,
                       category_ids: dict[int, int], path) -> np.ndarray:
  """uint8 (H, W) class ids from one image's COCO instances (see the module docstring for overlaps)."""
  from pycocotools import mask as mask_utils
  out = np.zeros((height, width), np.uint8)

  def decode(ann) -> np.ndarray:
    seg = ann.get('segmentation')
    if isinstance(seg, list):  # polygons
      if not seg:
        return np.zeros((height, width), bool)
      rles = mask_utils.frPyObjects(seg, height, width)
      rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get('counts'), list):  # uncompressed RLE
      rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict):
      rle = dict(seg, counts=seg['counts'].encode() if isinstance(seg['counts'], str) else seg['counts'])
    else:
      raise DataError(f'{path}: annotation {ann.get("id")} has no polygon or RLE segmentation')
    m = mask_utils.decode(rle)
    if m.shape[:2] != (height, width):
      raise DataError(f'{path}: annotation {ann.get("id")} is {m.shape[0]}x{m.shape[1]}, its image '
                      f'{height}x{width}')
    return m.astype(bool) if m.ndim == 2 else m.any(-1)

  crowd = [a for a in annotations if a.get('iscrowd')]
  instances = [a for a in annotations if not a.get('iscrowd')]
  for ann in crowd:
    out[decode(ann)] = IGNORE_LABEL
  for ann in sorted(instances, key=lambda a: -float(a.get('area') or 0)):
    if ann['category_id'] not in category_ids:
      raise DataError(f'{path}: annotation {ann.get("id")} has category_id {ann["category_id"]}, '
                      f'not in the json\'s categories')
    out[decode(ann)] = category_ids[ann['category_id']]
  return out


# --------------------------------------------------------------------------------------------------
# Sources: (split -> list of Example) for each format


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  image: pathlib.Path
  mask: pathlib.Path | None = None              # folder / voc_like
  coco: tuple | None = None                     # (json path, image record, annotations)


def _split_by_fraction(ids: list[str], val_fraction: float) -> dict[str, list[str]]:
  order = sorted(ids, key=lambda i: hashlib.md5(i.encode()).hexdigest())
  n_val = int(round(len(ids) * val_fraction))
  if val_fraction > 0 and len(ids) > 1:
    n_val = min(max(n_val, 1), len(ids) - 1)
  val = set(order[:n_val])
  return {'train': sorted(i for i in ids if i not in val), 'val': sorted(val)}


def _read_split_lists(directory: pathlib.Path) -> dict[str, list[str]]:
  splits = {}
  for path in sorted(directory.glob('*.txt')):
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
      raise DataError(f'{path}: duplicate ids {dupes[:10]}')
    splits[path.stem] = ids
  return splits


def _files_by_stem(directory: pathlib.Path, suffixes, what: str) -> dict[str, pathlib.Path]:
  out: dict[str, pathlib.Path] = {}
  for path in sorted(directory.iterdir()):
    if path.is_file() and path.suffix.lower() in suffixes:
      if path.stem in out:
        raise DataError(f'duplicate id {path.stem!r}: {out[path.stem]} and {path} are both {what}')
      out[path.stem] = path
  return out


def folder_source(root: pathlib.Path, val_fraction: float) -> dict[str, list[Example]]:
  images_dir, masks_dir = root / 'images', root / 'masks'
  for d in (images_dir, masks_dir):
    if not d.is_dir():
      raise MissingDataError(f'{d} does not exist: the folder format is ROOT/images/<id>.jpg|png, '
                             f'ROOT/masks/<id>.png, ROOT/classes.txt[, ROOT/splits/<split>.txt]')
  images = _files_by_stem(images_dir, IMAGE_SUFFIXES, 'images')
  masks = {p.stem: p for p in sorted(masks_dir.glob('*.png'))}
  if (root / 'splits').is_dir():
    split_ids = _read_split_lists(root / 'splits')
  else:
    split_ids = _split_by_fraction(sorted(images), val_fraction)
  return {s: [Example(i, images.get(i, images_dir / f'{i}.jpg'), masks.get(i, masks_dir / f'{i}.png'))
              for i in ids] for s, ids in split_ids.items()}


def voc_like_source(root: pathlib.Path) -> dict[str, list[Example]]:
  lists = root / 'ImageSets' / 'Segmentation'
  for d in (root / 'JPEGImages', root / 'SegmentationClass', lists):
    if not d.is_dir():
      raise MissingDataError(f'{d} does not exist: the voc_like format is ROOT/JPEGImages/<id>.jpg, '
                             f'ROOT/SegmentationClass/<id>.png, ROOT/ImageSets/Segmentation/'
                             f'<split>.txt and ROOT/classes.txt')
  images = _files_by_stem(root / 'JPEGImages', IMAGE_SUFFIXES, 'images')
  return {s: [Example(i, images.get(i, root / 'JPEGImages' / f'{i}.jpg'),
                      root / 'SegmentationClass' / f'{i}.png') for i in ids]
          for s, ids in _read_split_lists(lists).items()}


def coco_categories(root: pathlib.Path) -> list[dict]:
  """The categories of the first instances json (every split must list the same)."""
  files = sorted((root / 'annotations').glob('instances_*.json'))
  if not files:
    raise MissingDataError(f'no {root}/annotations/instances_<split>.json: the coco format is '
                           f'ROOT/annotations/instances_<split>.json with the images in ROOT/images/')
  return _load_json(files[0])['categories']


def _load_json(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: not a readable COCO json ({e})') from None
  for key in ('images', 'annotations', 'categories'):
    if key not in data:
      raise DataError(f'{path}: no "{key}" list (not a COCO instances json?)')
  return data


def coco_source(root: pathlib.Path) -> dict[str, list[Example]]:
  coco_categories(root)  # the missing-annotations message
  splits, categories = {}, None
  for path in sorted((root / 'annotations').glob('instances_*.json')):
    split = path.stem[len('instances_'):]
    data = _load_json(path)
    names = [c['name'] for c in data['categories']]
    if categories is None:
      categories = names
    elif names != categories:
      raise DataError(f'{path}: categories {names[:5]}... differ from the other splits\' '
                      f'{categories[:5]}...: every json must list the same categories in one order')
    by_image: dict[Any, list] = {}
    for ann in data['annotations']:
      by_image.setdefault(ann['image_id'], []).append(ann)
    examples, seen = [], {}
    for record in data['images']:
      name = str(record['file_name'])
      candidates = [root / 'images' / name, root / 'images' / pathlib.Path(name).name, root / name,
                    pathlib.Path(name)]
      image = next((c for c in candidates if c.is_file()), candidates[0])
      image_id = pathlib.Path(name).with_suffix('').as_posix()
      if image_id in seen:
        raise DataError(f'{path}: duplicate image {name!r} (ids {seen[image_id]} and {record["id"]})')
      seen[image_id] = record['id']
      examples.append(Example(image_id, image, coco=(path, record, by_image.get(record['id'], []))))
    splits[split] = examples
  return splits


def class_info(fmt: str, root: pathlib.Path, ignore_label: int = IGNORE_LABEL) -> ClassInfo:
  """The classes of a source: classes.txt (folder, voc_like) or the json's categories (coco)."""
  if fmt == 'coco':
    cats = coco_categories(root)
    names = ('background',) + tuple(c['name'] for c in cats)
    return ClassInfo(names=names, palette=default_palette(len(names)), ignore_label=IGNORE_LABEL)
  return read_classes_txt(root / 'classes.txt', ignore_label=ignore_label)


def source_splits(fmt: str, root: pathlib.Path, val_fraction: float = 0.1) -> dict[str, list[Example]]:
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise MissingDataError(f'dataset root {root} does not exist (config.dataset.root / --root)')
  if fmt == 'folder':
    return folder_source(root, val_fraction)
  if fmt == 'voc_like':
    return voc_like_source(root)
  if fmt == 'coco':
    return coco_source(root)
  raise DataError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')


# --------------------------------------------------------------------------------------------------
# Reading and validating one example


def read_example(example: Example, classes: ClassInfo, category_ids: dict | None = None) -> tuple[bytes, np.ndarray]:
  """(the image file's bytes, uint8 (H, W) class ids) of one example, validated."""
  if not example.image.is_file():
    raise DataError(f'id {example.id!r}: image {example.image} does not exist')
  data = example.image.read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.format not in ('JPEG', 'PNG'):
        raise DataError(f'{example.image}: a {im.format} image; use JPEG or PNG')
      im.load()
      width, height = im.size
  except DataError:
    raise
  except Exception as e:
    raise DataError(f'{example.image}: unreadable image ({e})') from None
  if example.coco is not None:
    path, record, annotations = example.coco
    if (record.get('height'), record.get('width')) not in ((height, width), (None, None)):
      raise DataError(f'size mismatch for {example.id!r}: image {example.image} is {height}x{width} '
                      f'(HxW) but {path} says {record.get("height")}x{record.get("width")}')
    return data, coco_semantic_mask(annotations, height, width, category_ids, path)
  if not example.mask.is_file():
    raise DataError(f'id {example.id!r}: mask {example.mask} does not exist')
  try:
    with Image.open(example.mask) as m:
      m.load()
      ids = mask_to_ids(m, classes, example.mask)
  except DataError:
    raise
  except Exception as e:
    raise DataError(f'{example.mask}: unreadable mask ({e})') from None
  if ids.shape != (height, width):
    raise DataError(f'size mismatch for {example.id!r}: image {example.image} is {height}x{width} '
                    f'(HxW) but mask {example.mask} is {ids.shape[0]}x{ids.shape[1]}')
  return data, ids


def validate(fmt: str, root: pathlib.Path, classes: ClassInfo, splits: dict[str, list[Example]],
             progress: bool = True) -> tuple[dict[str, list[tuple[Example, bytes]]], dict[str, list[int]]]:
  """Reads every example once: (split -> [(example, encoded mask PNG)], split -> per-class pixel
  counts). Raises one DataError listing up to MAX_PROBLEMS problems."""
  problems: list[str] = []
  if not splits:
    problems.append(f'{root}: no splits found')
  category_ids = None
  if fmt == 'coco':
    category_ids = {c['id']: i + 1 for i, c in enumerate(coco_categories(root))}
  out, counts = {}, {}
  from tqdm.auto import tqdm
  for split, examples in splits.items():
    if not examples:
      problems.append(f'split {split!r} is empty')
    ids = [e.id for e in examples]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
      problems.append(f'split {split!r}: duplicate ids {dupes[:10]}')
    hist = np.zeros(len(classes.names), np.int64)
    rows = []
    for example in tqdm(examples, desc=f'checking {split}', unit='img', disable=not progress,
                        leave=False, mininterval=2.0):
      try:
        _, ids_map = read_example(example, classes, category_ids)
      except DataError as e:
        problems.append(str(e))
        if len(problems) > 5 * MAX_PROBLEMS:
          break
        continue
      hist += np.bincount(ids_map[ids_map != IGNORE_LABEL].ravel(), minlength=len(classes.names))[:len(hist)]
      rows.append((example, encode_mask_png(ids_map)))
    out[split], counts[split] = rows, hist.tolist()
  if problems:
    shown = '\n  '.join(problems[:MAX_PROBLEMS])
    more = f'\n  ... and {len(problems) - MAX_PROBLEMS} more' if len(problems) > MAX_PROBLEMS else ''
    raise DataError(f'{fmt} dataset {root}: {len(problems)} problem(s); nothing was prepared:\n  '
                    f'{shown}{more}')
  return out, counts


# --------------------------------------------------------------------------------------------------
# The TFDS builder


def fingerprint(root: pathlib.Path) -> str:
  """A hash of every file's path, size and mtime under root: edited data is prepared again."""
  h = hashlib.md5()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      h.update(f'{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:12]


class CustomSegmentationConfig(tfds.core.BuilderConfig):

  def __init__(self, *, fmt: str, root: str, val_fraction: float, ignore_label: int):
    root = os.path.abspath(os.path.expanduser(root))
    key = json.dumps([fmt, root, val_fraction, ignore_label, fingerprint(pathlib.Path(root))])
    slug = re.sub(r'[^a-zA-Z0-9]+', '_', os.path.basename(root.rstrip('/')))[:40] or 'root'
    super().__init__(name=f'{fmt}_{slug}_{hashlib.md5(key.encode()).hexdigest()[:10]}',
                     description=f'{fmt} dataset at {root}')
    self.fmt, self.root, self.val_fraction, self.ignore_label = fmt, root, val_fraction, ignore_label


class CustomSegmentation(tfds.core.GeneratorBasedBuilder):
  """A user's dataset in one of FORMATS; one builder config per (format, root, options, contents)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original image bytes; class-id PNG masks (255 = ignore); class metadata.'}

  def __init__(self, *, config: CustomSegmentationConfig, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(config=config, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
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
    classes = class_info(c.fmt, root, c.ignore_label)
    rows, counts = validate(c.fmt, root, classes, source_splits(c.fmt, root, c.val_fraction))
    self.info.metadata.update(classes.to_json())
    self.info.metadata['pixel_counts'] = counts
    self.info.metadata['format'] = c.fmt
    self.info.metadata['root'] = c.root
    return {split: self._generate_examples(items) for split, items in rows.items()}

  def _generate_examples(self, items) -> Iterator:
    for example, mask_png in items:
      yield example.id, {'image': example.image.read_bytes(), 'segmentation_mask': mask_png,
                         'file_name': example.id}


def get_builder(fmt: str, *, root: str, data_dir: str, val_fraction: float = 0.1,
                ignore_label: int = IGNORE_LABEL) -> CustomSegmentation:
  if fmt not in FORMATS:
    raise DataError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
  if not root:
    raise DataError(f'dataset {fmt!r} needs its root directory: config.dataset.root=DIR (--root DIR)')
  if not os.path.isdir(os.path.expanduser(root)):
    raise MissingDataError(f'dataset root {root} does not exist (config.dataset.root / --root)')
  config = CustomSegmentationConfig(fmt=fmt, root=root, val_fraction=val_fraction,
                                    ignore_label=ignore_label)
  return CustomSegmentation(config=config, data_dir=os.path.expanduser(data_dir))


def source_split_names(fmt: str, root: str, val_fraction: float = 0.1) -> list[str]:
  """The split names a source will have (cheap: lists files, reads no image)."""
  root_path = pathlib.Path(root).expanduser()
  if fmt == 'folder':
    splits = root_path / 'splits'
    return sorted(p.stem for p in splits.glob('*.txt')) if splits.is_dir() else ['train', 'val']
  if fmt == 'voc_like':
    return sorted(p.stem for p in (root_path / 'ImageSets' / 'Segmentation').glob('*.txt'))
  return sorted(p.stem[len('instances_'):] for p in (root_path / 'annotations').glob('instances_*.json'))
