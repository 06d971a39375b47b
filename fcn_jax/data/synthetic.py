"""Synthetic PASCAL-VOC-format data: VOCdevkit and SBD trees (and their official archive names).

The trees are fed through the SAME TFDS builders as the real data (via the manual directory), so tests and the CPU
demo run the real code path. Scenes are small (min_size..max_size px, variable), deterministic from (seed, image
index), and built so that resolution matters:

- a textured, low-saturation background (smooth colour field + stripes + noise);
- 1..4 objects of the 20 classes; each class has its own hue, texture (solid / stripes / checker / dots) and shape
  family: large blobs (ellipse, rectangle, triangle) as well as thin or small parts (thin bars, narrow rings, small
  dot clusters, thin crosses, a blob with a thin tail) that a stride-32 output cannot resolve but stride 8 can;
- VOC-style void (255) bands ~2-3 px wide along every object boundary (VOC tree only; SBD masks have no void).

The same (seed, index) renders the same scene in the VOC and in the SBD tree, and both use the ids
'2008_%06d' % index: VOC train = indices [0, num_train), val = [num_train, num_train + num_val); likewise for SBD.
So SBD train overlaps VOC val whenever SBD's num_train > VOC's num_train, which exercises the seg11valid derivation.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fcn_jax import cli as cli_lib
from fcn_jax import viz

NUM_CLASSES = 21
SHAPES = ('ellipse', 'bars', 'rect', 'ring', 'triangle', 'dots', 'cross', 'tail')
TEXTURES = ('solid', 'stripes', 'checker', 'dots')
VOC_ARCHIVE_NAMES = {'2012': 'VOCtrainval_11-May-2012.tar', '2011': 'VOCtrainval_25-May-2011.tar'}
SBD_ARCHIVE_NAME = 'benchmark.tgz'


def class_style(c: int) -> dict:
  """Fixed appearance of class c in 1..20 (independent of the seed)."""
  k = c - 1
  hue = (k * 7 % 20) / 20.0                 # spread neighbouring ids around the colour wheel
  value = 0.95 if k % 2 == 0 else 0.7
  base = np.array(colorsys.hsv_to_rgb(hue, 0.9, value)) * 255
  return dict(colour=base.astype(np.float32), shape=SHAPES[k % len(SHAPES)],
              texture=TEXTURES[(k // len(SHAPES) + k) % len(TEXTURES)], orient=k % 3)


def _texture(kind: str, orient: int, h: int, w: int, phase: int) -> np.ndarray:
  yy, xx = np.mgrid[:h, :w]
  if kind == 'solid':
    return np.zeros((h, w), bool)
  if kind == 'stripes':
    t = (yy, xx, yy + xx)[orient] + phase
    return (t // 3) % 2 == 0
  if kind == 'checker':
    return ((yy + phase) // 4 + (xx + phase) // 4) % 2 == 0
  return ((yy + phase) % 5 < 2) & ((xx + phase) % 5 < 2)   # dots


def _draw_shape(shape: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A boolean mask of one object (thin parts >= 4 px wide so a labelled core survives the void band)."""
  im = Image.new('L', (w, h), 0)
  d = ImageDraw.Draw(im)
  s = min(h, w)
  cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
  ry, rx = rng.uniform(0.15, 0.32) * s, rng.uniform(0.15, 0.32) * s
  thin = int(rng.integers(4, 7))
  if shape == 'ellipse':
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
  elif shape == 'rect':
    d.rectangle([cx - rx, cy - ry * 0.7, cx + rx, cy + ry * 0.7], fill=1)
  elif shape == 'triangle':
    d.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=1)
  elif shape == 'ring':
    r = max(rx, ry) + 2
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, width=thin)
  elif shape == 'bars':
    vertical = rng.random() < 0.5
    for j in range(int(rng.integers(2, 4))):
      off = (j - 1) * (thin + rng.integers(5, 9))
      if vertical:
        d.rectangle([cx + off, cy - ry * 1.3, cx + off + thin - 1, cy + ry * 1.3], fill=1)
      else:
        d.rectangle([cx - rx * 1.3, cy + off, cx + rx * 1.3, cy + off + thin - 1], fill=1)
  elif shape == 'dots':
    for _ in range(int(rng.integers(3, 7))):
      r = rng.uniform(2.5, 4.5)
      y, x = cy + rng.uniform(-1, 1) * ry * 1.2, cx + rng.uniform(-1, 1) * rx * 1.2
      d.ellipse([x - r, y - r, x + r, y + r], fill=1)
  elif shape == 'cross':
    d.rectangle([cx - rx * 1.2, cy - thin / 2, cx + rx * 1.2, cy + thin / 2], fill=1)
    d.rectangle([cx - thin / 2, cy - ry * 1.2, cx + thin / 2, cy + ry * 1.2], fill=1)
  elif shape == 'tail':
    d.ellipse([cx - rx * 0.6, cy - ry * 0.6, cx + rx * 0.6, cy + ry * 0.6], fill=1)
    ang = rng.uniform(0, 2 * np.pi)
    d.line([(cx, cy), (cx + np.cos(ang) * s * 0.45, cy + np.sin(ang) * s * 0.45)], fill=1, width=thin)
  else:
    raise ValueError(shape)
  return np.asarray(im, bool)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  base = rng.uniform(70, 190, size=(3, 3, 1)) + rng.uniform(-20, 20, size=(3, 3, 3))  # muted colours
  field = np.stack([np.asarray(Image.fromarray(base[..., k].astype(np.float32), mode='F').resize((w, h),
                                                                                               Image.BILINEAR))
                    for k in range(3)], -1)
  yy, xx = np.mgrid[:h, :w]
  period = rng.uniform(6, 14)
  ang = rng.uniform(0, np.pi)
  stripes = 12 * np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / period)
  return field + stripes[..., None] + rng.normal(0, 6, size=(h, w, 3))


def render_scene(seed: int, index: int, min_size: int = 64, max_size: int = 96):
  """-> (image uint8 (H, W, 3), classes uint8 (H, W) in 0..20 without void, void bool (H, W))."""
  rng = np.random.default_rng([seed, index])
  h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
  img = _background(rng, h, w)
  classes = np.zeros((h, w), np.uint8)
  void = np.zeros((h, w), bool)
  n_obj = int(rng.integers(1, 5))
  for _ in range(n_obj):
    c = int(rng.integers(1, NUM_CLASSES))
    st = class_style(c)
    mask = _draw_shape(st['shape'], rng, h, w)
    if mask.sum() < 12:
      continue
    tex = _texture(st['texture'], st['orient'], h, w, int(rng.integers(0, 5)))
    colour = st['colour'] * rng.uniform(0.9, 1.1)
    obj = np.where(tex[..., None], colour * 0.45 + 20, colour) + rng.normal(0, 4, size=(h, w, 3))
    img = np.where(mask[..., None], obj, img)
    classes[mask] = c
  for c in np.unique(classes):
    if c == 0:
      continue
    region = classes == c
    # VOC-style void band along the boundary: 1 px inside + 1..2 px outside.
    void |= ndimage.binary_dilation(region, iterations=2 if (c % 2) else 1) & ~ndimage.binary_erosion(region)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), classes, void


def image_id(index: int) -> str:
  return f'2008_{index:06d}'


def _save_jpeg(path: pathlib.Path, image: np.ndarray) -> None:
  Image.fromarray(image).save(path, format='JPEG', quality=95, subsampling=0)


def write_voc_tree(root, *, num_train: int, num_val: int, seed: int = 0, min_size: int = 64, max_size: int = 96,
                   year: str = '2012') -> pathlib.Path:
  """Writes root/VOCdevkit/VOC{year}/{JPEGImages, SegmentationClass, ImageSets/Segmentation}; returns root/VOCdevkit."""
  devkit = pathlib.Path(root) / 'VOCdevkit'
  voc = devkit / f'VOC{year}'
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    (voc / sub).mkdir(parents=True, exist_ok=True)
  palette = viz.PALETTE.ravel().tolist()
  ids = [image_id(i) for i in range(num_train + num_val)]
  for i, name in enumerate(ids):
    image, classes, void = render_scene(seed, i, min_size, max_size)
    _save_jpeg(voc / 'JPEGImages' / f'{name}.jpg', image)
    label = Image.fromarray(np.where(void, 255, classes).astype(np.uint8), mode='P')
    label.putpalette(palette)
    label.save(voc / 'SegmentationClass' / f'{name}.png')
  lists = voc / 'ImageSets' / 'Segmentation'
  (lists / 'train.txt').write_text(''.join(f'{n}\n' for n in ids[:num_train]))
  (lists / 'val.txt').write_text(''.join(f'{n}\n' for n in ids[num_train:]))
  (lists / 'trainval.txt').write_text(''.join(f'{n}\n' for n in ids))
  return devkit


def write_sbd_tree(root, *, num_train: int, num_val: int, seed: int = 0, min_size: int = 64,
                   max_size: int = 96) -> pathlib.Path:
  """Writes root/benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, train.txt, val.txt}; returns root/benchmark_RELEASE."""
  import scipy.io
  release = pathlib.Path(root) / 'benchmark_RELEASE'
  ds = release / 'dataset'
  (ds / 'img').mkdir(parents=True, exist_ok=True)
  (ds / 'cls').mkdir(parents=True, exist_ok=True)
  ids = [image_id(i) for i in range(num_train + num_val)]
  for i, name in enumerate(ids):
    image, classes, _ = render_scene(seed, i, min_size, max_size)
    _save_jpeg(ds / 'img' / f'{name}.jpg', image)
    present = np.unique(classes[classes > 0]).astype(np.uint8)
    scipy.io.savemat(ds / 'cls' / f'{name}.mat', {'GTcls': {
        'Segmentation': classes, 'CategoriesPresent': present,
        'Boundaries': np.zeros((NUM_CLASSES - 1, 1))}}, do_compression=True)
  (ds / 'train.txt').write_text(''.join(f'{n}\n' for n in ids[:num_train]))
  (ds / 'val.txt').write_text(''.join(f'{n}\n' for n in ids[num_train:]))
  return release


def pack_voc_archive(devkit, dest_dir, *, year: str = '2012') -> pathlib.Path:
  """Packs a VOCdevkit tree into the official archive name/layout: VOCtrainval_11-May-2012.tar holds
  VOCdevkit/VOC2012/...; VOCtrainval_25-May-2011.tar holds TrainVal/VOCdevkit/VOC2011/..."""
  devkit = pathlib.Path(devkit)
  dest = pathlib.Path(dest_dir) / VOC_ARCHIVE_NAMES[year]
  dest.parent.mkdir(parents=True, exist_ok=True)
  prefix = 'TrainVal/VOCdevkit' if year == '2011' else 'VOCdevkit'
  with tarfile.open(dest, 'w') as tar:
    tar.add(devkit / f'VOC{year}', arcname=f'{prefix}/VOC{year}')
  return dest


def pack_sbd_archive(release, dest_dir) -> pathlib.Path:
  """Packs a benchmark_RELEASE tree into benchmark.tgz (which extracts to benchmark_RELEASE/...)."""
  dest = pathlib.Path(dest_dir) / SBD_ARCHIVE_NAME
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(dest, 'w:gz', compresslevel=1) as tar:
    tar.add(pathlib.Path(release), arcname='benchmark_RELEASE')
  return dest


def write_manual_dir(root, *, voc_train: int, voc_val: int, sbd_train: int, sbd_val: int, seed: int = 0,
                     min_size: int = 64, max_size: int = 96, archived: bool = False) -> pathlib.Path:
  """A manual dir serving all three builders: VOC2012 + VOC2011 trees (or archives) and SBD.

  Never replaces a file: everything is written to a temporary directory first and moved into `root`
  only if none of its files exists there already (else FileExistsError lists them, nothing moved).
  """
  root = pathlib.Path(root)
  kw = dict(seed=seed, min_size=min_size, max_size=max_size)

  def write(staging: pathlib.Path) -> None:
    trees = staging / '_trees' if archived else staging
    for year in ('2012', '2011'):
      devkit = write_voc_tree(trees, num_train=voc_train, num_val=voc_val, year=year, **kw)
      if archived:
        pack_voc_archive(devkit, staging, year=year)
    release = write_sbd_tree(trees, num_train=sbd_train, num_val=sbd_val, **kw)
    if archived:
      pack_sbd_archive(release, staging)
      shutil.rmtree(trees)  # inside the staging directory: ours

  move_new_files(root, write)
  return root


def move_new_files(root: pathlib.Path, write) -> list[pathlib.Path]:
  """Calls write(staging) on a fresh directory beside `root`, then moves the files it wrote into
  `root` (same relative paths). Refuses, before moving anything, if any of them exists in `root`."""
  root = pathlib.Path(root)
  if root.exists() and not root.is_dir():
    raise FileExistsError(f'{root} is a file, not a directory')
  root.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{root.name}.tmp-', dir=root.parent))
  try:
    write(staging)
    files = sorted(p.relative_to(staging) for p in staging.rglob('*') if not p.is_dir())
    existing = [root / f for f in files if os.path.lexists(root / f)]
    if existing:
      shown = '\n  '.join(map(str, existing[:10]))
      more = f'\n  ... and {len(existing) - 10} more' if len(existing) > 10 else ''
      raise FileExistsError(f'{len(existing)} of the {len(files)} files to write already exist; '
                            f'nothing was written:\n  {shown}{more}\nChoose an empty or new '
                            f'directory.')
    for f in files:
      (root / f).parent.mkdir(parents=True, exist_ok=True)
      os.rename(staging / f, root / f)
    return [root / f for f in files]
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def write_voc_tree_atomically(root, **kwargs) -> pathlib.Path:
  """`write_voc_tree` into a temporary directory, renamed to root/VOCdevkit when complete (a
  killed or concurrent writer never leaves a partial tree there). Returns root/VOCdevkit."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix='.VOCdevkit.tmp-', dir=root))
  try:
    write_voc_tree(staging, **kwargs)
    try:
      os.rename(staging / 'VOCdevkit', root / 'VOCdevkit')
    except OSError:
      if not (root / 'VOCdevkit').is_dir():
        raise  # not written by a concurrent writer: a real failure
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return root / 'VOCdevkit'


# --------------------------------------------------------------------------------------------------
# A user's own data: folder and COCO layouts (see fcn_jax.data.custom)

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
      _save_jpeg(root / 'images' / f'{name}.jpg', image)
    if mask == 'colour':
      Image.fromarray(palette[np.where(labels == 255, num_classes, labels)]).save(root / 'masks' / f'{name}.png')
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
      _save_jpeg(root / 'images' / file_name, image)
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
                            'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}})
      index += 1
    (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(
        {'images': images, 'annotations': annotations, 'categories': categories}))
  return root


# ---------------------------------------------------------------------------------------------
# The paper's other datasets, in their official on-disk formats (tests and demos).

_SIFT_FLOW_SUBDIR = 'spatial_envelope_256x256_static_8outdoorcategories'
# render_colour_scene classes -> SIFT Flow semantic ids (1-based: sky, building, tree, person, car)
# and geometric ids (1 sky, 2 horizontal, 3 vertical).
_SIFT_SEMANTIC = (28, 6, 32, 18, 8)
_SIFT_GEOMETRIC = (1, 2, 3, 3, 2)


def _save_jpeg_in(path: pathlib.Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  _save_jpeg(path, image)


def _savemat(path: pathlib.Path, **arrays) -> None:
  import scipy.io
  path.parent.mkdir(parents=True, exist_ok=True)
  scipy.io.savemat(path, arrays)


def _write_list(path: pathlib.Path, ids) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(f'{i}\n' for i in ids))


def write_sift_flow_tree(root, *, num_trainval: int, num_test: int, seed: int = 0,
                         size: int = 64) -> dict[str, list[str]]:
  """The SiftFlowDataset.zip layout: Images/<sub>/<id>.jpg, SemanticLabels/<sub>/<id>.mat and
  GeoLabels/<sub>/<id>.mat (key S; semantic 0 void, 1..33; geometric -1 void, 1..3), plus
  trainval.txt / test.txt lists (which replace the reference lists for this tree)."""
  root = pathlib.Path(root)
  splits = {'trainval': [f'coast_syn{i}' for i in range(num_trainval)],
            'test': [f'street_syn{i}' for i in range(num_test)]}
  for index, image_id in enumerate(splits['trainval'] + splits['test']):
    image, ids, _ = render_colour_scene(seed, index, len(_SIFT_SEMANTIC), size, size)
    void = ids == 255
    semantic = np.where(void, 0, np.asarray(_SIFT_SEMANTIC)[np.minimum(ids, 4)]).astype(np.uint8)
    geometric = np.where(void, -1, np.asarray(_SIFT_GEOMETRIC)[np.minimum(ids, 4)]).astype(np.int16)
    _save_jpeg_in(root / 'Images' / _SIFT_FLOW_SUBDIR / f'{image_id}.jpg', image)
    _savemat(root / 'SemanticLabels' / _SIFT_FLOW_SUBDIR / f'{image_id}.mat', S=semantic)
    _savemat(root / 'GeoLabels' / _SIFT_FLOW_SUBDIR / f'{image_id}.mat', S=geometric)
  for split, ids in splits.items():
    _write_list(root / f'{split}.txt', ids)
  return splits


def write_nyud_tree(root, *, num_train: int, num_val: int, num_test: int, seed: int = 0,
                    height: int = 48, width: int = 64) -> dict[str, list[str]]:
  """The reference's nyud.tar.gz layout: data/{images,depth,hha}/img_<id>.png (colour, 16-bit
  depth, HHA) and segmentation/img_<id>.mat (key segmentation, 0 void, 1..40), ids from 5001,
  plus train.txt / val.txt / test.txt (which replace the reference lists for this tree). Depth and
  HHA carry the class too (depth 1000 + 700 * class, HHA a second colouring)."""
  root = pathlib.Path(root)
  counts = {'train': num_train, 'val': num_val, 'test': num_test}
  splits, next_id = {}, 5001
  for split, count in counts.items():
    splits[split] = [str(next_id + i) for i in range(count)]
    next_id += count
  for index, image_id in enumerate(i for ids in splits.values() for i in ids):
    image, ids, _ = render_colour_scene(seed, index, 5, height, width)
    classes = np.minimum(ids, 4).astype(np.int64)
    rng = np.random.default_rng([seed, index, 11])
    depth = (1000 + 700 * classes + rng.integers(0, 50, classes.shape)).astype(np.uint16)
    hha = np.stack([(classes * 60) % 256, 255 - classes * 50, np.full_like(classes, 128)],
                   -1).astype(np.uint8)
    label = np.where(ids == 255, 0, classes + 1).astype(np.uint8)  # wall, floor, cabinet, ...
    name = f'img_{image_id}.png'
    for sub, array in (('images', image), ('hha', hha), ('depth', depth)):
      (root / 'data' / sub).mkdir(parents=True, exist_ok=True)
      Image.fromarray(array).save(root / 'data' / sub / name)
    _savemat(root / 'segmentation' / f'img_{image_id}.mat', segmentation=label)
  for split, ids in splits.items():
    _write_list(root / f'{split}.txt', ids)
  return splits


# PASCAL-Context labels.txt: 459 labels, 1-based; the 59 kept ones spelled as labels.txt spells them.
def _context_labels() -> list[str]:
  from fcn_jax.data.classes import PASCAL_CONTEXT_CLASS_NAMES
  from fcn_jax.data.reference import PASCAL_CONTEXT_LABELS_TXT_NAMES
  kept = [PASCAL_CONTEXT_LABELS_TXT_NAMES.get(n, n) for n in PASCAL_CONTEXT_CLASS_NAMES[1:]]
  others = [f'unused{i}' for i in range(459 - len(kept))]
  return sorted(kept + others)  # alphabetical, as labels.txt (accordion, aeroplane, ...)


# render_colour_scene classes -> labels.txt names: background stuff, then objects (three of them
# spelled differently from the 59-class names: table, bedclothes, cloth).
_CONTEXT_OBJECTS = ('unused7', 'table', 'bedclothes', 'cloth', 'person')


def write_pascal_context_tree(root, *, num_train: int, num_val: int, seed: int = 0,
                              height: int = 48, width: int = 64) -> dict[str, list[str]]:
  """VOCdevkit/VOC2010/{JPEGImages, ImageSets/Main/train.txt, val.txt}, PASCAL-Context's
  trainval/<id>.mat (key LabelMap: ids into labels.txt) and labels.txt ("id: name")."""
  root = pathlib.Path(root)
  voc = root / 'VOCdevkit' / 'VOC2010'
  labels = _context_labels()
  root.mkdir(parents=True, exist_ok=True)
  (root / 'labels.txt').write_text(''.join(f'{i}: {n}\n' for i, n in enumerate(labels, 1)))
  number = {n: i for i, n in enumerate(labels, 1)}
  splits = {'train': [f'2008_{i:06d}' for i in range(num_train)],
            'val': [f'2009_{i:06d}' for i in range(num_val)]}
  for index, image_id in enumerate(splits['train'] + splits['val']):
    image, ids, _ = render_colour_scene(seed, index, len(_CONTEXT_OBJECTS), height, width)
    # PASCAL-Context labels every pixel (no void): the borders take the object's label.
    filled = np.where(ids == 255, ndimage.grey_dilation(np.where(ids == 255, 0, ids), size=5), ids)
    label_map = np.asarray([number[n] for n in _CONTEXT_OBJECTS], np.uint16)[np.minimum(filled, 4)]
    _save_jpeg_in(voc / 'JPEGImages' / f'{image_id}.jpg', image)
    _savemat(root / 'trainval' / f'{image_id}.mat', LabelMap=label_map)
  for split, ids in splits.items():
    _write_list(voc / 'ImageSets' / 'Main' / f'{split}.txt', ids)
  return splits


def main(argv=None) -> int:
  p = cli_lib.ArgumentParser(
      prog='python -m fcn_jax.data.synthetic',
      description='Write a synthetic dataset: by default a manual directory in the official PASCAL '
      'VOC 2012 / 2011 and SBD formats (VOCdevkit/ and benchmark_RELEASE/ trees, or the official '
      'archive names), for the builders\' manual_dir; with --format folder|coco a small dataset in '
      'the your-own-data layouts (fcn_jax.data.custom). Never replaces an existing file: if any of the files to write exists '
      'in --out, nothing is written.')
  p.add_argument('--format', choices=('voc', 'folder', 'coco', 'sift_flow', 'nyud', 'pascal_context'),
                 default='voc',
                 help='voc: the PASCAL VOC / SBD manual directory (default); folder or coco: a small '
                 'dataset of your-own-data kind (colour shapes; see fcn_jax.data.custom); sift_flow, '
                 'nyud, pascal_context: a manual directory in that dataset\'s official layout '
                 '(--num_train / --num_val images; nyud also --num_val as its test split)')
  p.add_argument('--out', required=True, help='directory to write into (created if missing)')
  p.add_argument('--num_train', type=int, default=40, help='folder / coco: training images')
  p.add_argument('--num_val', type=int, default=10, help='folder / coco: validation images')
  p.add_argument('--classes', type=int, default=4,
                 help='folder / coco: classes including background (2..8; default %(default)s)')
  p.add_argument('--mask', choices=('colour', 'index'), default='colour',
                 help='folder: colour masks (classes.txt with colours) or index PNGs')
  p.add_argument('--voc_train', type=int, default=200, help='VOC segmentation train images (per year)')
  p.add_argument('--voc_val', type=int, default=100, help='VOC segmentation val images (per year)')
  p.add_argument('--sbd_train', type=int, default=400, help='SBD train images')
  p.add_argument('--sbd_val', type=int, default=100, help='SBD val images')
  p.add_argument('--seed', type=int, default=0, help='scene generator seed')
  p.add_argument('--min_size', type=int, default=64, help='smallest image side, pixels')
  p.add_argument('--max_size', type=int, default=96, help='largest image side, pixels')
  p.add_argument('--archived', action='store_true',
                 help='write the official archive files (VOCtrainval_*.tar, benchmark.tgz) instead of trees')
  a = p.parse_args(argv)
  for name in ('voc_train', 'voc_val', 'sbd_train', 'sbd_val'):
    if getattr(a, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be >= 1')
  if not 1 <= a.min_size <= a.max_size:
    p.error('need 1 <= --min_size <= --max_size')
  try:
    if a.format == 'voc':
      out = write_manual_dir(a.out, voc_train=a.voc_train, voc_val=a.voc_val, sbd_train=a.sbd_train,
                             sbd_val=a.sbd_val, seed=a.seed, min_size=a.min_size,
                             max_size=a.max_size, archived=a.archived)
    else:
      if not 2 <= a.classes <= len(COLOUR_CLASSES):
        p.error(f'--classes must be in 2..{len(COLOUR_CLASSES)}')
      kw = dict(num_train=a.num_train, num_val=a.num_val, num_classes=a.classes, seed=a.seed)
      if a.format == 'folder':
        write = lambda d: write_folder_dataset(d, mask=a.mask, **kw)
      elif a.format == 'coco':
        write = lambda d: write_coco_dataset(d, **kw)
      elif a.format == 'sift_flow':
        write = lambda d: write_sift_flow_tree(d, num_trainval=a.num_train, num_test=a.num_val,
                                               seed=a.seed)
      elif a.format == 'nyud':
        write = lambda d: write_nyud_tree(d, num_train=a.num_train, num_val=a.num_val,
                                          num_test=a.num_val, seed=a.seed)
      else:
        write = lambda d: write_pascal_context_tree(d, num_train=a.num_train, num_val=a.num_val,
                                                    seed=a.seed)
      move_new_files(pathlib.Path(a.out), write)
      out = pathlib.Path(a.out)
  except FileExistsError as e:
    print(f'error: --out {a.out}: {e}', file=sys.stderr)
    return 2
  print(os.fspath(out))
  return 0


if __name__ == '__main__':
  sys.exit(main())
