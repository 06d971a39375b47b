"""A non-deep per-pixel baseline for a folder-format dataset: gradient boosting on hand-made features.

  python -m benchmarks.pixel_baseline --root ROOT [--ignore-label 11] [--split test]

Each pixel, at half resolution, is described by its colour (RGB and HSV), the local mean and
standard deviation of the RGB channels and the gradient magnitude of the gray image over square
windows of a few sizes (texture), and its normalised position (row, column). An
sklearn HistGradientBoostingClassifier is fit on a random subsample of the labelled pixels of the
training split; each evaluated image is predicted at half resolution, upsampled (nearest) to the
label's size and scored with fcn_jax.metrics (one confusion matrix over the split, as the FCN
evaluation): mean IU, pixel accuracy and per-class IU.

ROOT is the library's folder format: ROOT/images/<id>.png|jpg, ROOT/masks/<id>.png (index masks),
ROOT/classes.txt, ROOT/splits/<split>.txt. scikit-learn is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
from PIL import Image
from scipy import ndimage

WINDOWS = (3, 7, 15, 31)  # texture window sides, at the (half) working resolution


def read_split(root: pathlib.Path, split: str) -> list[str]:
  path = root / 'splits' / f'{split}.txt'
  if not path.is_file():
    raise SystemExit(f'{path}: no such split file')
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def image_path(root: pathlib.Path, image_id: str) -> pathlib.Path:
  for ext in ('.png', '.jpg', '.jpeg', '.PNG', '.JPG', '.JPEG'):
    p = root / 'images' / f'{image_id}{ext}'
    if p.exists():
      return p
  raise SystemExit(f'no image for id {image_id!r} in {root / "images"}')


def load(root: pathlib.Path, image_id: str, ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 RGB (H, W, 3), int32 labels (H, W) with the ignore label as -1)."""
  image = np.asarray(Image.open(image_path(root, image_id)).convert('RGB'))
  label = np.asarray(Image.open(root / 'masks' / f'{image_id}.png'), np.int32)
  if label.ndim == 3:
    label = label[..., 0]
  return image, np.where(label == ignore_label, -1, label)


def features(image: np.ndarray, scale: float = 0.5) -> np.ndarray:
  """(h, w, F) float32 per-pixel features at `scale` of the image's resolution."""
  pil = Image.fromarray(image)
  h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
  small = pil.resize((w, h), Image.BILINEAR)
  rgb = np.asarray(small, np.float32) / 255.0
  hsv = np.asarray(small.convert('HSV'), np.float32) / 255.0
  gray = rgb.mean(-1)
  grad = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))
  feats = [rgb, hsv]
  for size in WINDOWS:
    mean = ndimage.uniform_filter(rgb, size=(size, size, 1), mode='reflect')
    sq = ndimage.uniform_filter(rgb * rgb, size=(size, size, 1), mode='reflect')
    feats += [mean, np.sqrt(np.maximum(sq - mean * mean, 0))]
    feats.append(ndimage.uniform_filter(grad, size=size, mode='reflect')[..., None])
  rows, cols = np.meshgrid(np.linspace(0, 1, h, dtype=np.float32),
                           np.linspace(0, 1, w, dtype=np.float32), indexing='ij')
  feats += [rows[..., None], cols[..., None]]
  return np.concatenate(feats, -1).astype(np.float32)


def downsample_labels(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour labels at `shape` (the feature grid)."""
  ri = np.minimum((np.arange(shape[0]) + 0.5) * label.shape[0] / shape[0], label.shape[0] - 1)
  ci = np.minimum((np.arange(shape[1]) + 0.5) * label.shape[1] / shape[1], label.shape[1] - 1)
  return label[ri.astype(int)][:, ci.astype(int)]


def upsample_predictions(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  return np.asarray(Image.fromarray(pred.astype(np.uint8)).resize((shape[1], shape[0]),
                                                                   Image.NEAREST), np.int32)


def training_pixels(root, ids, ignore_label, max_pixels, rng, scale):
  per_image = max(1, max_pixels // len(ids))
  xs, ys = [], []
  for image_id in ids:
    image, label = load(root, image_id, ignore_label)
    f = features(image, scale)
    y = downsample_labels(label, f.shape[:2]).reshape(-1)
    f = f.reshape(-1, f.shape[-1])
    valid = np.flatnonzero(y >= 0)
    take = rng.choice(valid, size=min(per_image, valid.size), replace=False)
    xs.append(f[take])
    ys.append(y[take])
  return np.concatenate(xs), np.concatenate(ys)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', required=True, help='folder-format dataset directory')
  p.add_argument('--train-split', default='train')
  p.add_argument('--split', default='test', help='the split to score')
  p.add_argument('--ignore-label', type=int, default=255, help='mask value to ignore')
  p.add_argument('--scale', type=float, default=0.5, help='working resolution (default: half)')
  p.add_argument('--max-train-pixels', type=int, default=300_000,
                 help='labelled pixels sampled from the training split (uniformly per image)')
  # Prediction dominates: (evaluated pixels) x (iterations x classes trees); 80 x 11 trees of 31
  # leaves over CamVid test at half resolution (10M pixels) take minutes on 2 cores.
  p.add_argument('--max-iter', type=int, default=80, help='boosting iterations')
  p.add_argument('--max-leaf-nodes', type=int, default=31, help='leaves per tree')
  p.add_argument('--balanced', action='store_true',
                 help='class_weight="balanced" (inverse class frequency)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', action='store_true', help='also print the scores as one JSON line')
  a = p.parse_args(argv)
  from sklearn.ensemble import HistGradientBoostingClassifier
  import sklearn
  from fcn_jax import metrics

  root = pathlib.Path(a.root).expanduser()
  classes = [line.split()[0] for line in (root / 'classes.txt').read_text().splitlines()
             if line.strip() and line.split()[0] != 'ignore']
  n = len(classes)
  rng = np.random.default_rng(a.seed)
  t0 = time.perf_counter()
  x, y = training_pixels(root, read_split(root, a.train_split), a.ignore_label,
                         a.max_train_pixels, rng, a.scale)
  t_feat = time.perf_counter() - t0
  clf = HistGradientBoostingClassifier(max_iter=a.max_iter, learning_rate=0.1,
                                       max_leaf_nodes=a.max_leaf_nodes,
                                       early_stopping=False, random_state=a.seed,
                                       class_weight='balanced' if a.balanced else None)
  clf.fit(x, y)
  t_fit = time.perf_counter() - t0 - t_feat
  print(f'fit on {len(y)} pixels in {t_fit:.0f} s; predicting {a.split}', file=sys.stderr,
        flush=True)
  confusion = None
  for image_id in read_split(root, a.split):
    image, label = load(root, image_id, a.ignore_label)
    f = features(image, a.scale)
    pred = clf.predict(f.reshape(-1, f.shape[-1])).reshape(f.shape[:2])
    pred = upsample_predictions(pred, label.shape)
    confusion = metrics.accumulate(confusion, metrics.confusion_matrix(
        np.where(label < 0, 255, label), pred, n))
  scores = metrics.segmentation_scores(confusion)
  elapsed = time.perf_counter() - t0
  print(f'pixel baseline on {root} ({a.train_split} -> {a.split}): {len(y)} training pixels, '
        f'{x.shape[1]} features, HistGradientBoosting {a.max_iter} iterations x '
        f'{a.max_leaf_nodes} leaves '
        f'(sklearn {sklearn.__version__}); features {t_feat:.0f} s, fit {t_fit:.0f} s, '
        f'total {elapsed:.0f} s')
  print(f'mean IU {100 * scores["mean_iu"]:.2f}  pixel acc {100 * scores["pixel_acc"]:.2f}  '
        f'mean acc {100 * scores["mean_acc"]:.2f}')
  for name, iu in zip(classes, scores['per_class_iu']):
    print(f'  {name:>14s} IU {100 * iu:6.2f}')
  result = {'mean_iu': scores['mean_iu'], 'pixel_acc': scores['pixel_acc'],
            'mean_acc': scores['mean_acc'], 'per_class_iu': scores['per_class_iu'],
            'classes': classes, 'seconds': elapsed, 'split': a.split,
            'sklearn': sklearn.__version__}
  if a.json:
    sys.stdout.flush()
    print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
