"""Synthetic PASCAL-VOC-format data: VOCdevkit and SBD trees (and their official archive names).

The trees are fed through the SAME TFDS builders as the real data (via the manual directory), so
tests and the CPU demo run the real code path. Scenes are small (min_size..max_size px, variable),
deterministic from (seed, image index), and built so that resolution matters:

- a textured, low-saturation background (smooth colour field + stripes + noise);
- 1..4 objects of the 20 classes; each class has its own hue, texture (solid / stripes / checker /
  dots) and shape family: large blobs (ellipse, rectangle, triangle) as well as thin or small parts
  (thin bars, narrow rings, small dot clusters, thin crosses, a blob with a thin tail) that a
  stride-32 output cannot resolve but stride 8 can;
- VOC-style void (255) bands ~2-3 px wide along every object boundary (VOC tree only; SBD masks
  have no void).

The same (seed, index) renders the same scene in the VOC and in the SBD tree, and both use the ids
'2008_%06d' % index: VOC train = indices [0, num_train), val = [num_train, num_train + num_val);
likewise for SBD. So SBD train overlaps VOC val whenever SBD's num_train > VOC's num_train, which
exercises the seg11valid derivation.
"""

from __future__ import annotations

import colorsys
import os
import pathlib
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fcn_jax.data.classes import voc_palette

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
  """A boolean mask of one object (thin parts >= 4 px wide so a labelled core survives the void
  band)."""
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
    d.line([(cx, cy), (cx + np.cos(ang) * s * 0.45, cy + np.sin(ang) * s * 0.45)], fill=1,
           width=thin)
  else:
    raise ValueError(shape)
  return np.asarray(im, bool)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  # muted colours
  base = rng.uniform(70, 190, size=(3, 3, 1)) + rng.uniform(-20, 20, size=(3, 3, 3))
  channels = [Image.fromarray(base[..., k].astype(np.float32), mode='F') for k in range(3)]
  field = np.stack([np.asarray(c.resize((w, h), Image.BILINEAR)) for c in channels], -1)
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
    grown = ndimage.binary_dilation(region, iterations=2 if (c % 2) else 1)
    void |= grown & ~ndimage.binary_erosion(region)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8), classes, void


def image_id(index: int) -> str:
  return f'2008_{index:06d}'


def save_jpeg(path: pathlib.Path, image: np.ndarray) -> None:
  Image.fromarray(image).save(path, format='JPEG', quality=95, subsampling=0)


def write_voc_tree(root, *, num_train: int, num_val: int, seed: int = 0, min_size: int = 64,
                   max_size: int = 96, year: str = '2012') -> pathlib.Path:
  """Writes root/VOCdevkit/VOC{year}/{JPEGImages, SegmentationClass, ImageSets/Segmentation};
  returns root/VOCdevkit."""
  devkit = pathlib.Path(root) / 'VOCdevkit'
  voc = devkit / f'VOC{year}'
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    (voc / sub).mkdir(parents=True, exist_ok=True)
  palette = voc_palette().ravel().tolist()
  ids = [image_id(i) for i in range(num_train + num_val)]
  for i, name in enumerate(ids):
    image, classes, void = render_scene(seed, i, min_size, max_size)
    save_jpeg(voc / 'JPEGImages' / f'{name}.jpg', image)
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
  """Writes root/benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, train.txt, val.txt}; returns
  root/benchmark_RELEASE."""
  import scipy.io
  release = pathlib.Path(root) / 'benchmark_RELEASE'
  ds = release / 'dataset'
  (ds / 'img').mkdir(parents=True, exist_ok=True)
  (ds / 'cls').mkdir(parents=True, exist_ok=True)
  ids = [image_id(i) for i in range(num_train + num_val)]
  for i, name in enumerate(ids):
    image, classes, _ = render_scene(seed, i, min_size, max_size)
    save_jpeg(ds / 'img' / f'{name}.jpg', image)
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


def write_manual_dir(root, *, voc_train: int, voc_val: int, sbd_train: int, sbd_val: int,
                     seed: int = 0, min_size: int = 64, max_size: int = 96,
                     archived: bool = False) -> pathlib.Path:
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
