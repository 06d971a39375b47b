"""Segmentation metrics of the paper (Section 5), computed as the reference score.py does.

Accumulate ONE confusion matrix over the whole split (`confusion_matrix` per batch, summed as int64
on the host), then call `segmentation_scores` once. Rows are ground truth, columns predictions.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['accumulate', 'confusion_matrix', 'segmentation_scores']


@functools.partial(jax.jit, static_argnames=('num_classes', 'ignore_label'))
def confusion_matrix(labels, predictions, num_classes: int, ignore_label: int = 255) -> jax.Array:
  """(num_classes, num_classes) int32 counts n_ij of pixels of true class i predicted as j.

  `labels` and `predictions` are integer arrays of the same shape (e.g. (N, H, W)). Pixels whose
  label is `ignore_label` or outside 0..num_classes-1 are ignored (as are predictions outside that
  range, which an argmax never produces). int32 holds up to 2^31 - 1 pixels per call (8,500
  images of 500x500); add the per-batch matrices in int64 on the host (`accumulate`).
  """
  labels = jnp.asarray(labels)
  predictions = jnp.asarray(predictions)
  if labels.shape != predictions.shape:
    raise ValueError(f'labels {labels.shape} and predictions {predictions.shape} differ in shape')
  labels = labels.reshape(-1).astype(jnp.int32)
  predictions = predictions.reshape(-1).astype(jnp.int32)
  valid = ((labels >= 0) & (labels < num_classes) & (labels != ignore_label)
           & (predictions >= 0) & (predictions < num_classes))
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def accumulate(total, batch_confusion) -> np.ndarray:
  """`total + batch_confusion` as int64 numpy (`total` may be None)."""
  batch = np.asarray(batch_confusion, dtype=np.int64)
  return batch if total is None else np.asarray(total, dtype=np.int64) + batch


def segmentation_scores(confusion, exclude: tuple[int, ...] = ()) -> dict:
  """Pixel accuracy, mean accuracy, mean IU and frequency weighted IU of a confusion matrix.

  Exactly the reference score.py: mean accuracy and mean IU are nanmeans, so a class absent from
  both ground truth and prediction (0/0) is skipped; a class predicted but absent from the ground
  truth has IU 0 (and no accuracy); f.w. IU sums over classes present in the ground truth.
  Returns python floats (nan when there is no valid pixel), plus `per_class_iu` and `per_class_acc`
  lists with nan for undefined entries. `exclude`: class ids left out of the mean accuracy and mean
  IU (SIFT Flow's classes absent from its test set, whose IU would count 0 when predicted).
  """
  hist = np.asarray(confusion, dtype=np.float64)
  if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
    raise ValueError(f'expected a square confusion matrix, got shape {hist.shape}')
  diag = np.diag(hist)
  gt = hist.sum(axis=1)      # t_i
  pred = hist.sum(axis=0)    # sum_j n_ji
  total = hist.sum()
  with np.errstate(divide='ignore', invalid='ignore'), warnings.catch_warnings():
    warnings.simplefilter('ignore', category=RuntimeWarning)  # nanmean of all-nan
    pixel_acc = diag.sum() / total if total > 0 else np.nan
    per_class_acc = diag / gt
    per_class_iu = diag / (gt + pred - diag)
    kept = np.ones(len(diag), bool)
    kept[list(exclude)] = False
    mean_acc = np.nanmean(per_class_acc[kept])
    mean_iu = np.nanmean(per_class_iu[kept])
    freq = gt / total if total > 0 else np.zeros_like(gt)
    present = freq > 0
    fw_iu = (freq[present] * per_class_iu[present]).sum() if total > 0 else np.nan
  return {
      'pixel_acc': float(pixel_acc),
      'mean_acc': float(mean_acc),
      'mean_iu': float(mean_iu),
      'fw_iu': float(fw_iu),
      'per_class_iu': [float(x) for x in per_class_iu],
      'per_class_acc': [float(x) for x in per_class_acc],
  }
