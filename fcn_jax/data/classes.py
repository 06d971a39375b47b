"""What a dataset's labels mean: class names, their colours (palette) and the ignore label.

Lives with the data: each builder provides its ClassInfo (PASCAL VOC's here; a user dataset's from
its classes.txt or COCO categories), training copies it into every checkpoint's metadata, and
prediction, evaluation and figures read it from there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

IGNORE_LABEL = 255  # the label value training and evaluation ignore (PASCAL VOC's void)

VOC_CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')


def voc_palette(num_colors: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (bit-interleaved class ids); (num_colors, 3) uint8. 255 is void."""
  palette = np.zeros((num_colors, 3), np.uint8)
  for i in range(num_colors):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    palette[i] = (r, g, b)
  return palette


def default_palette(num_classes: int) -> np.ndarray:
  """Colours for classes that come without any: the VOC colour map's first entries."""
  return voc_palette(256)[:num_classes].copy()


def full_palette(palette: np.ndarray | list | None) -> np.ndarray:
  """A (256, 3) palette: the classes' colours, then the VOC map (255 = void, light beige)."""
  out = voc_palette(256)
  if palette is not None:
    colors = np.asarray(palette, np.uint8).reshape(-1, 3)[:255]
    out[:len(colors)] = colors
  return out


@dataclasses.dataclass(frozen=True)
class ClassInfo:
  names: tuple[str, ...]
  palette: np.ndarray                 # (num_classes, 3) uint8
  ignore_label: int = IGNORE_LABEL    # the source masks' ignore value (prepared masks use 255)
  has_colors: bool = False            # classes.txt gave every class a colour (colour masks allowed)
  ignore_colors: tuple = ()           # colours mapped to the ignore label
  ignore_values: tuple = ()           # index-mask values ignored besides ignore_label (`ignore 11`)
  # (source value, class id) pairs: binary 0/255 masks read 255 as 1
  remap: tuple = ()

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def to_json(self) -> dict[str, Any]:
    out = {'class_names': list(self.names), 'palette': np.asarray(self.palette).tolist(),
           'ignore_label': int(self.ignore_label)}
    if self.ignore_values:
      out['ignore_values'] = [int(v) for v in self.ignore_values]
    if self.remap:
      out['mask_remap'] = [[int(a), int(b)] for a, b in self.remap]
    return out

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'ClassInfo':
    return cls(names=tuple(data['class_names']), palette=np.asarray(data['palette'], np.uint8),
               ignore_label=int(data.get('ignore_label', IGNORE_LABEL)),
               ignore_values=tuple(int(v) for v in data.get('ignore_values') or ()),
               remap=tuple((int(a), int(b)) for a, b in data.get('mask_remap') or ()))

  @property
  def ignored(self) -> tuple[int, ...]:
    """Every index-mask value read as ignored."""
    return tuple(sorted({int(self.ignore_label), *map(int, self.ignore_values)}))


VOC = ClassInfo(names=VOC_CLASS_NAMES, palette=voc_palette(21), ignore_label=IGNORE_LABEL,
                has_colors=True)


# The reference nets' classes, in their output order (fcn.berkeleyvision.org data/*/classes*.txt).
# PASCAL-Context's 59-class task: 0 = everything else ("background"), then the 59 classes.
PASCAL_CONTEXT_CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor', 'bag', 'bed', 'bench', 'book', 'building', 'cabinet', 'ceiling',
    'clothes', 'computer', 'cup', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground',
    'keyboard', 'light', 'mountain', 'mouse', 'curtain', 'platform', 'sign', 'plate', 'road',
    'rock', 'shelves', 'sidewalk', 'sky', 'snow', 'bedcloth', 'track', 'tree', 'truck', 'wall',
    'water', 'window', 'wood',
)
# SIFT Flow: 33 semantic classes (0 = awning; void 255) and 3 geometric classes.
SIFT_FLOW_SEMANTIC_CLASS_NAMES = (
    'awning', 'balcony', 'bird', 'boat', 'bridge', 'building', 'bus', 'car', 'cow', 'crosswalk',
    'desert', 'door', 'fence', 'field', 'grass', 'moon', 'mountain', 'person', 'plant', 'pole',
    'river', 'road', 'rock', 'sand', 'sea', 'sidewalk', 'sign', 'sky', 'staircase', 'streetlight',
    'sun', 'tree', 'window',
)
SIFT_FLOW_GEOMETRIC_CLASS_NAMES = (
    'sky', 'horizontal', 'vertical',
)
# NYUDv2, the 40-class task of Gupta et al. (0 = wall; void 255).
NYUD_CLASS_NAMES = (
    'wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window', 'bookshelf',
    'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain', 'dresser', 'pillow', 'mirror',
    'floor mat', 'clothes', 'ceiling', 'books', 'refridgerator', 'television', 'paper', 'towel',
    'shower curtain', 'box', 'whiteboard', 'person', 'night stand', 'toilet', 'sink', 'lamp',
    'bathtub', 'bag', 'otherstructure', 'otherfurniture', 'otherprop',
)
