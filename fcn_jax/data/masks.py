"""classes.txt and the masks of your own data: the class list (names, colours, ignored values or
colours) and each mask read as class ids (index PNG, colour PNG, COCO annotations), with every value
that is neither a class nor ignored counted (MaskValuesError)."""

from __future__ import annotations

import pathlib
import re

import numpy as np
from PIL import Image

from fcn_jax.data.builders import IGNORE_LABEL, DataError, MissingDataError
from fcn_jax.data.classes import ClassInfo, default_palette

MAX_PROBLEMS = 20  # listed in one error; the count of the rest is given
INDEX_MODES = ('L', 'P', 'I;16', 'I')


class MaskValuesError(DataError):
  """An index mask holds values that are neither a class nor ignored."""

  def __init__(self, path, values: np.ndarray, counts: np.ndarray, classes: ClassInfo):
    self.path, self.values, self.counts = path, values, counts
    n = len(classes.names)
    super().__init__(f'{path}: mask values not in classes.txt (ids 0..{n - 1}, ignored '
                     f'{", ".join(map(str, classes.ignored))}): ' +
                     _counts_text(values, counts, int))


# --------------------------------------------------------------------------------------------------
# classes.txt


def read_classes_txt(path: pathlib.Path, *, ignore_label: int = IGNORE_LABEL) -> ClassInfo:
  """ClassInfo from a classes.txt (see the module docstring)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise MissingDataError(f'{path} does not exist: list the classes there, one per line in id '
                           f'order (`name` or `name R G B`; 0 is usually `background`)')
  names, colors, ignore_colors, ignore_values = [], [], [], []
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
    if name == 'ignore' or (len(parts) == 2 and parts[0] == 'ignore' and parts[1].isdigit()):
      if rgb is not None:
        ignore_colors.append(rgb)
      elif len(parts) == 2 and int(parts[1]) <= 255:
        ignore_values.append(int(parts[1]))
      else:
        raise DataError(f'{path}:{number}: `ignore` needs a colour (`ignore R G B`) or an '
                        f'index-mask value 0..255 (`ignore 11`), got {raw.strip()!r}')
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
                   has_colors=all(given), ignore_colors=tuple(ignore_colors),
                   ignore_values=tuple(v for v in ignore_values if v != ignore_label))


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
  if mask.mode in INDEX_MODES:
    raw = np.asarray(mask).astype(np.int64)
    ids = raw.copy()
    for value, class_id in classes.remap:
      ids[raw == value] = class_id
    ignore = np.isin(raw, [v for v in classes.ignored if v not in dict(classes.remap)])
    bad = ~ignore & ((ids < 0) | (ids >= n))
    if bad.any():
      values, counts = np.unique(ids[bad], return_counts=True)
      raise MaskValuesError(path, values, counts, classes)
    return np.where(ignore, IGNORE_LABEL, ids).astype(np.uint8)
  if mask.mode in ('RGB', 'RGBA'):
    if not classes.has_colors:
      raise DataError(f'{path}: an RGB colour mask, but classes.txt gives no colours: write '
                      f'`name R G B` lines (or save the masks as index PNGs)')
    rgb = np.asarray(mask.convert('RGB')).astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(int(r) << 16) | (int(g) << 8) | int(b): i
             for i, (r, g, b) in enumerate(classes.palette)}
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
  raise DataError(f'{path}: mask mode {mask.mode} is neither an index (L / P) nor an RGB colour '
                  'mask')


def coco_semantic_mask(annotations: list[dict], height: int, width: int,
                       category_ids: dict[int, int], path) -> np.ndarray:
  """uint8 (H, W) class ids from one image's COCO instances (see the module docstring for
  overlaps)."""
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
      counts = seg['counts']
      rle = dict(seg, counts=counts.encode() if isinstance(counts, str) else counts)
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
