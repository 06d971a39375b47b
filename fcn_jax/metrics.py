"""Segmentation metrics of the paper (Section 5), computed as the reference score.py does.

Accumulate ONE confusion matrix over the whole split (`confusion_matrix` per batch, summed as int64
on the host), then call `segmentation_scores` once. Rows are ground truth, columns predictions.
`class_scores` reads per-class precision, recall, F1 and Dice (and mmsegmentation's names) off the
same matrix; `image_confusions` / `image_scores` give each image its own matrix and scores, with
`confusion_matrix`'s rule for which pixels count.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['MMSEG_NAMES', 'accumulate', 'class_scores', 'confusion_matrix', 'image_confusions',
           'image_scores', 'segmentation_scores']

# mmsegmentation's IoUMetric names for our scores (the same values, as fractions, not percent).
MMSEG_NAMES = {'aAcc': 'pixel_acc', 'mIoU': 'mean_iu', 'mAcc': 'mean_acc', 'mDice': 'mean_dice',
               'mFscore': 'mean_f1', 'mPrecision': 'mean_precision', 'mRecall': 'mean_recall'}


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


def class_scores(confusion, exclude: tuple[int, ...] = ()) -> dict:
  """`segmentation_scores` plus per-class precision, recall, F1 and Dice, their means and
  mmsegmentation's names (`MMSEG_NAMES`), all read off the one confusion matrix.

  With TP_i = n_ii, FP_i = sum_j n_ji - n_ii, FN_i = t_i - n_ii: precision TP/(TP+FP) (nan for a
  class never predicted), recall TP/(TP+FN) (= per-class accuracy; nan for a class absent from the
  ground truth), F1 = Dice = 2TP/(2TP+FP+FN) (nan where IU is; 0, not nan, for a class seen but
  never hit, as scikit-learn and Dice have it; mmsegmentation's f_score gives nan there). Means are
  nanmeans over the classes not in `exclude`, as mean IU is. Also `per_class_gt_pixels` (t_i) and
  `per_class_pred_pixels`. The scores of `segmentation_scores` come out unchanged.
  """
  scores = segmentation_scores(confusion, exclude)
  hist = np.asarray(confusion, dtype=np.float64)
  diag = np.diag(hist)
  gt = hist.sum(axis=1)
  pred = hist.sum(axis=0)
  kept = np.ones(len(diag), bool)
  kept[list(exclude)] = False
  with np.errstate(divide='ignore', invalid='ignore'), warnings.catch_warnings():
    warnings.simplefilter('ignore', category=RuntimeWarning)  # nanmean of all-nan
    per_class = {'precision': diag / pred, 'recall': diag / gt, 'f1': 2 * diag / (gt + pred)}
    means = {k: float(np.nanmean(v[kept])) for k, v in per_class.items()}
  scores.update({f'per_class_{k}': [float(x) for x in v] for k, v in per_class.items()})
  scores['per_class_dice'] = list(scores['per_class_f1'])
  scores.update({f'mean_{k}': v for k, v in means.items()})
  scores['mean_dice'] = scores['mean_f1']
  scores['per_class_gt_pixels'] = [int(x) for x in np.asarray(confusion).sum(axis=1)]
  scores['per_class_pred_pixels'] = [int(x) for x in np.asarray(confusion).sum(axis=0)]
  scores.update({alias: scores[key] for alias, key in MMSEG_NAMES.items()})
  return scores


def image_confusions(labels, predictions, num_classes: int, ignore_label: int = 255) -> np.ndarray:
  """(N, num_classes, num_classes) int64: one confusion matrix per image of an (N, H, W) batch.

  On the host, with `confusion_matrix`'s rule (ignore_label, labels or predictions outside
  0..num_classes-1 never count, so padding labelled 255 does not), so that the images' matrices add
  up to the batch's. For per-image analysis, off the training-time evaluation path.
  """
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  if labels.shape != predictions.shape:
    raise ValueError(f'labels {labels.shape} and predictions {predictions.shape} differ in shape')
  n = labels.shape[0]
  labels = labels.reshape(n, -1).astype(np.int64)
  predictions = predictions.reshape(n, -1).astype(np.int64)
  valid = ((labels >= 0) & (labels < num_classes) & (labels != ignore_label)
           & (predictions >= 0) & (predictions < num_classes))
  image = np.broadcast_to(np.arange(n)[:, None], labels.shape)
  index = (image * num_classes + labels) * num_classes + predictions
  counts = np.bincount(index[valid], minlength=n * num_classes * num_classes)
  return counts.reshape(n, num_classes, num_classes)


def image_scores(confusions, exclude: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  """Each image's pixel accuracy and mean IU from (N, C, C) per-image confusion matrices.

  mean IU is taken over the classes present in the image's ground truth or prediction (the others
  are 0/0 and skipped, as in `segmentation_scores`), less `exclude`; nan for an image with no
  counted pixel. Also `pixels` (counted pixels), `correct` and `classes` (classes in the mean).
  """
  hist = np.asarray(confusions, dtype=np.int64)
  if hist.ndim != 3 or hist.shape[1] != hist.shape[2]:
    raise ValueError(f'expected (N, C, C) confusion matrices, got shape {hist.shape}')
  diag = np.diagonal(hist, axis1=1, axis2=2)
  union = hist.sum(axis=2) + hist.sum(axis=1) - diag
  pixels = hist.sum(axis=(1, 2))
  correct = diag.sum(axis=1)
  counted = union > 0
  counted[:, list(exclude)] = False
  classes = counted.sum(axis=1)
  with np.errstate(divide='ignore', invalid='ignore'):
    iu = np.where(counted, diag / np.maximum(union, 1), 0.0)
    mean_iu = np.where(classes > 0, iu.sum(axis=1) / classes, np.nan)
    pixel_acc = np.where(pixels > 0, correct / np.maximum(pixels, 1), np.nan)
  return {'pixel_acc': pixel_acc, 'mean_iu': mean_iu, 'pixels': pixels, 'correct': correct,
          'classes': classes}
