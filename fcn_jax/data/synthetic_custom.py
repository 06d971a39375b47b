"""Synthetic data in the your-own-data layouts (fcn_jax.data.custom): colour-shape scenes a
per-pixel colour classifier solves, written as a `folder` or a `coco` dataset."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image
from scipy import ndimage

from fcn_jax.data.synthetic_voc import save_jpeg

COLOUR_CLASSES = (('background', (0, 0, 0)), ('square', (220, 40, 40)), ('triangle', (40, 200, 60)),
                  ('disc', (50, 80, 230)), ('bar', (230, 200, 30)), ('star', (200, 60, 220)),
                  ('ring', (40, 210, 210)), ('hexagon', (250, 140, 20)))
IGNORE_COLOUR = (255, 255, 255)


def _polygon(kind: int, rng: np.random.Generator, h: int, w: int) -> list[tuple[float, float]]:
  """A polygon of the class's shape family, somewhere in an (h, w) image."""
  cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
  r = rng.uniform(0.12, 0.25) * min(h, w)
  sides = {1: 4, 2: 3, 3: 16, 4: 4, 5: 10, 6: 12, 7: 6}.get(kind, 5)
  angles = np.linspace(0, 2 * np.pi, sides, endpoint=False) + rng.uniform(0, np.pi)
  radii = np.full(sides, r)
  if kind == 4:  # a bar: a long thin rectangle
    radii = np.array([r * 1.6, r * 0.35, r * 1.6, r * 0.35])
    angles = np.array([0, np.pi / 2, np.pi, 3 * np.pi / 2]) + rng.uniform(0, np.pi)
  if kind == 5:  # a star
    radii = np.where(np.arange(sides) % 2 == 0, r, r * 0.45)
  return [(float(cx + rr * np.cos(a)), float(cy + rr * np.sin(a))) for rr, a in zip(radii, angles)]


def render_colour_scene(seed: int, index: int, num_classes: int, height: int = 96, width: int = 128,
                        border: int = 2):
  """A scene a per-pixel colour classifier solves: 1-3 objects, each class in its own colour with
  noise, over a noisy background; VOC-style ignore (255) borders `border` px wide around objects.

  Returns (uint8 RGB image, uint8 ids with 255 borders, [(class, polygon), ...] in drawing order).
  """
  from PIL import ImageDraw
  rng = np.random.default_rng([seed, index, 7])
  colours = np.asarray([c for _, c in COLOUR_CLASSES[:num_classes]], np.float32)
  ids = Image.new('L', (width, height), 0)
  draw = ImageDraw.Draw(ids)
  objects = []
  for _ in range(rng.integers(1, 4)):
    c = int(rng.integers(1, num_classes))
    poly = _polygon(c, rng, height, width)
    draw.polygon(poly, fill=c)
    objects.append((c, poly))
  ids = np.asarray(ids).copy()
  background = rng.uniform(60, 160, size=3)
  img = np.where((ids > 0)[..., None], colours[ids], background)
  img = img + rng.normal(0, 18, size=img.shape)
  edges = np.zeros_like(ids, bool)
  if border:
    grown = ndimage.grey_dilation(ids, size=2 * border + 1)
    shrunk = ndimage.grey_erosion(ids, size=2 * border + 1)
    edges = (grown != ids) | (shrunk != ids)
  labels = np.where(edges, 255, ids).astype(np.uint8)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, objects


def write_classes_txt(path: pathlib.Path, num_classes: int, colours: bool) -> None:
  lines = [f'{name} {r} {g} {b}' if colours else name
           for name, (r, g, b) in COLOUR_CLASSES[:num_classes]]
  if colours:
    lines.append('ignore {} {} {}'.format(*IGNORE_COLOUR))
  path.write_text('# class names in id order (0 = background)\n' + '\n'.join(lines) + '\n')


def write_folder_dataset(root, *, num_train: int, num_val: int, num_classes: int = 4, seed: int = 0,
                         height: int = 96, width: int = 128, mask: str = 'colour',
                         splits: bool = True, image_format: str = 'jpg') -> pathlib.Path:
  """The `folder` format: images/, masks/ (colour masks or index PNGs), classes.txt, splits/."""
  if not 2 <= num_classes <= len(COLOUR_CLASSES):
    raise ValueError(f'num_classes must be in 2..{len(COLOUR_CLASSES)}')
  root = pathlib.Path(root)
  for sub in ('images', 'masks'):
    (root / sub).mkdir(parents=True, exist_ok=True)
  write_classes_txt(root / 'classes.txt', num_classes, colours=mask == 'colour')
  palette = np.asarray([c for _, c in COLOUR_CLASSES[:num_classes]] + [IGNORE_COLOUR], np.uint8)
  ids = [f'scene_{i:05d}' for i in range(num_train + num_val)]
  for i, name in enumerate(ids):
    image, labels, _ = render_colour_scene(seed, i, num_classes, height, width)
    if image_format == 'png':
      Image.fromarray(image).save(root / 'images' / f'{name}.png')
    else:
      save_jpeg(root / 'images' / f'{name}.jpg', image)
    if mask == 'colour':
      colours = palette[np.where(labels == 255, num_classes, labels)]
      Image.fromarray(colours).save(root / 'masks' / f'{name}.png')
    else:
      Image.fromarray(labels, mode='L').save(root / 'masks' / f'{name}.png')
  if splits:
    (root / 'splits').mkdir(exist_ok=True)
    (root / 'splits' / 'train.txt').write_text(''.join(f'{n}\n' for n in ids[:num_train]))
    (root / 'splits' / 'val.txt').write_text(''.join(f'{n}\n' for n in ids[num_train:]))
  return root


def write_coco_dataset(root, *, num_train: int, num_val: int, num_classes: int = 4, seed: int = 0,
                       height: int = 96, width: int = 128) -> pathlib.Path:
  """The `coco` format: images/ and annotations/instances_{train,val}.json. Objects are polygons;
  every third image stores its first object as a compressed RLE, and every fourth adds an
  `iscrowd` RLE region (a corner block), to be ignored."""
  from pycocotools import mask as mask_utils
  root = pathlib.Path(root)
  (root / 'images').mkdir(parents=True, exist_ok=True)
  (root / 'annotations').mkdir(exist_ok=True)
  categories = [{'id': 10 * (c + 1), 'name': name, 'supercategory': 'shape'}
                for c, (name, _) in enumerate(COLOUR_CLASSES[1:num_classes])]
  index = 0
  for split, count in (('train', num_train), ('val', num_val)):
    images, annotations = [], []
    for _ in range(count):
      image, _, objects = render_colour_scene(seed, index, num_classes, height, width, border=0)
      file_name = f'{split}_{index:05d}.jpg'
      save_jpeg(root / 'images' / file_name, image)
      images.append({'id': index + 1, 'file_name': file_name, 'height': height, 'width': width})
      for k, (c, poly) in enumerate(objects):
        flat = [v for xy in poly for v in xy]
        ann = {'id': len(annotations) + 1 + 1000 * index, 'image_id': index + 1,
               'category_id': categories[c - 1]['id'], 'iscrowd': 0, 'segmentation': [flat]}
        rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
        ann['area'] = float(mask_utils.area(rle))
        if index % 3 == 0 and k == 0:
          ann['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode()}
        annotations.append(ann)
      if index % 4 == 0:
        block = np.zeros((height, width), np.uint8, order='F')
        block[:height // 5, :width // 5] = 1
        rle = mask_utils.encode(np.asfortranarray(block))
        annotations.append({'id': len(annotations) + 1 + 1000 * index, 'image_id': index + 1,
                            'category_id': categories[0]['id'], 'iscrowd': 1,
                            'area': float(mask_utils.area(rle)),
                            'segmentation': {'size': rle['size'],
                                             'counts': rle['counts'].decode()}})
      index += 1
    (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(
        {'images': images, 'annotations': annotations, 'categories': categories}))
  return root
