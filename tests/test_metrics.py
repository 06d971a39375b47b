"""Metrics against hand-computed confusion matrices (FCN_REFERENCE section 2 / score.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax import metrics


def test_confusion_matrix_by_hand():
  labels = np.array([[0, 0, 1, 1],
                     [2, 2, 255, 1]])
  preds = np.array([[0, 1, 1, 1],
                    [2, 0, 2, 0]])
  expected = np.array([[1, 1, 0],   # gt 0: one right, one as 1
                       [1, 2, 0],   # gt 1: two right, one as 0
                       [1, 0, 1]])  # gt 2: one right, one as 0; the 255 pixel is ignored
  cm = metrics.confusion_matrix(labels, preds, 3)
  assert cm.dtype == jnp.int32 and cm.shape == (3, 3)
  np.testing.assert_array_equal(cm, expected)
  # Batched (N, H, W) input, as the evaluation loop passes it.
  cm2 = metrics.confusion_matrix(np.stack([labels, labels]), np.stack([preds, preds]), num_classes=3)
  np.testing.assert_array_equal(cm2, 2 * expected)


def test_confusion_matrix_ignores_out_of_range_labels_and_custom_ignore():
  labels = jnp.array([0, 1, 3, -1, 255, 2])
  preds = jnp.array([0, 1, 0, 1, 1, 2])
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, 3), np.diag([1, 1, 1]))
  # ignore_label inside the class range is ignored too.
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, 3, ignore_label=2),
                                np.diag([1, 1, 0]))


def test_confusion_matrix_under_jit_and_random_against_numpy():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 22, size=(3, 17, 19))
  labels[labels == 21] = 255
  preds = rng.integers(0, 21, size=labels.shape)

  @jax.jit
  def step(lab, pred):
    return metrics.confusion_matrix(lab, pred, num_classes=21)

  cm = np.asarray(step(labels, preds))
  ref = np.zeros((21, 21), np.int64)
  for t, p in zip(labels.ravel(), preds.ravel()):
    if t != 255:
      ref[t, p] += 1
  np.testing.assert_array_equal(cm, ref)
  total = metrics.accumulate(None, cm)
  total = metrics.accumulate(total, cm)
  assert total.dtype == np.int64
  np.testing.assert_array_equal(total, 2 * ref)


def test_scores_by_hand():
  hist = np.array([[1, 1, 0],
                   [1, 2, 0],
                   [1, 0, 1]])
  s = metrics.segmentation_scores(hist)
  assert s['pixel_acc'] == pytest.approx(4 / 7)
  assert s['mean_acc'] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
  iu = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]
  assert s['per_class_iu'] == pytest.approx(iu)
  assert s['mean_iu'] == pytest.approx(sum(iu) / 3)
  assert s['fw_iu'] == pytest.approx((2 * iu[0] + 3 * iu[1] + 2 * iu[2]) / 7)
  assert all(isinstance(s[k], float) for k in ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'))


def test_nan_handling_absent_and_false_positive_classes():
  # Class 2 appears nowhere (skipped in the means); class 3 is predicted but absent from the
  # ground truth (IU 0, counted in mean IU; no accuracy, skipped in mean accuracy).
  hist = np.array([[3, 1, 0, 1],
                   [0, 4, 0, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
  s = metrics.segmentation_scores(hist)
  iu0, iu1 = 3 / (5 + 3 - 3), 4 / (4 + 5 - 4)
  assert math.isnan(s['per_class_iu'][2])
  assert s['per_class_iu'][3] == 0.0
  assert s['per_class_iu'][:2] == pytest.approx([iu0, iu1])
  assert s['mean_iu'] == pytest.approx((iu0 + iu1 + 0.0) / 3)
  assert s['mean_acc'] == pytest.approx((3 / 5 + 4 / 4) / 2)
  assert s['pixel_acc'] == pytest.approx(7 / 9)
  assert s['fw_iu'] == pytest.approx((5 * iu0 + 4 * iu1) / 9)
  assert math.isnan(s['per_class_acc'][2]) and math.isnan(s['per_class_acc'][3])


def test_matches_score_py_formulas_on_random_matrix():
  rng = np.random.default_rng(1)
  hist = rng.integers(0, 50, size=(21, 21)).astype(np.int64)
  hist[5, :] = 0
  hist[:, 5] = 0
  hist[7, :] = 0  # predicted, never in gt
  s = metrics.segmentation_scores(hist)
  with np.errstate(divide='ignore', invalid='ignore'):
    acc = np.diag(hist).sum() / hist.sum()
    acc_cls = np.nanmean(np.diag(hist) / hist.sum(1))
    iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    mean_iu = np.nanmean(iu)
    freq = hist.sum(1) / hist.sum()
    fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
  assert s['pixel_acc'] == pytest.approx(acc)
  assert s['mean_acc'] == pytest.approx(acc_cls)
  assert s['mean_iu'] == pytest.approx(mean_iu)
  assert s['fw_iu'] == pytest.approx(fwavacc)


def test_empty_confusion_gives_nan_without_warnings():
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    s = metrics.segmentation_scores(np.zeros((3, 3), np.int64))
  assert all(math.isnan(s[k]) for k in ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'))


def test_excluded_classes_leave_the_means():
  # Class 2 never occurs in the ground truth but is predicted once: IU 0 counts in the mean
  # unless excluded (SIFT Flow's cow, desert and moon in its test set).
  confusion = np.array([[5, 0, 1], [0, 4, 0], [0, 0, 0]])
  plain = metrics.segmentation_scores(confusion)
  kept = metrics.segmentation_scores(confusion, exclude=(2,))
  assert plain['per_class_iu'][2] == 0.0
  assert kept['mean_iu'] == pytest.approx((5 / 6 + 1.0) / 2)
  assert plain['mean_iu'] == pytest.approx((5 / 6 + 1.0 + 0.0) / 3)
  assert kept['pixel_acc'] == plain['pixel_acc'] and kept['fw_iu'] == plain['fw_iu']


# --------------------------------------------------------------------------------------------------
# Per-class precision / recall / F1 / Dice, mmsegmentation's names, per-image matrices


def _random_split(seed: int, num_classes: int = 7, shape=(5, 23, 29)):
  """Random labels with 255 ignored pixels, and predictions right 60% of the time: class 3 is
  predicted but never true, class 5 true but never predicted, class 6 neither (0/0)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=shape)
  labels[rng.uniform(size=shape) < 0.15] = 255
  preds = np.where(rng.uniform(size=shape) < 0.6, labels, rng.integers(0, num_classes, size=shape))
  preds[preds == 255] = 0
  labels[labels == 3] = 255
  preds[preds == 5] = 1
  labels[labels == 6] = 2
  preds[preds == 6] = 2
  return labels, preds


def _per_class_loops(labels, preds, num_classes):
  """TP, FP, FN per class by explicit loops over the counted pixels."""
  tp, fp, fn = [np.zeros(num_classes) for _ in range(3)]
  for t, p in zip(labels.ravel(), preds.ravel()):
    if t == 255:
      continue
    if t == p:
      tp[t] += 1
    else:
      fn[t] += 1
      fp[p] += 1
  return tp, fp, fn


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_class_scores_against_loops_and_scikit_learn(seed):
  import sklearn.metrics as skm
  n = 7
  labels, preds = _random_split(seed, n)
  hist = metrics.accumulate(None, metrics.confusion_matrix(labels, preds, n))
  kept = labels != 255
  # The confusion matrix itself, against scikit-learn's (rows truth, columns prediction).
  np.testing.assert_array_equal(hist, skm.confusion_matrix(labels[kept], preds[kept],
                                                           labels=list(range(n))))
  s = metrics.class_scores(hist)
  tp, fp, fn = _per_class_loops(labels, preds, n)
  with np.errstate(divide='ignore', invalid='ignore'):
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    dice = 2 * tp / (2 * tp + fp + fn)
    iu = tp / (tp + fp + fn)
  np.testing.assert_allclose(s['per_class_precision'], precision, equal_nan=True)
  np.testing.assert_allclose(s['per_class_recall'], recall, equal_nan=True)
  np.testing.assert_allclose(s['per_class_f1'], dice, equal_nan=True)
  np.testing.assert_allclose(s['per_class_dice'], dice, equal_nan=True)
  np.testing.assert_allclose(s['per_class_iu'], iu, equal_nan=True)
  assert np.isnan(s['per_class_precision'][5]) and s['per_class_recall'][5] == 0.0
  assert np.isnan(s['per_class_f1'][6]) and s['per_class_f1'][3] == 0.0
  p_sk, r_sk, f_sk, support = skm.precision_recall_fscore_support(
      labels[kept], preds[kept], labels=list(range(n)), average=None, zero_division=np.nan)
  np.testing.assert_allclose(s['per_class_precision'], p_sk, equal_nan=True)
  np.testing.assert_allclose(s['per_class_recall'], r_sk, equal_nan=True)
  np.testing.assert_allclose(s['per_class_f1'], f_sk, equal_nan=True)
  assert s['per_class_gt_pixels'] == support.tolist()
  assert s['per_class_pred_pixels'] == np.bincount(preds[kept], minlength=n).tolist()
  # Means: nanmeans over the classes, as mean IU.
  assert s['mean_precision'] == pytest.approx(np.nanmean(precision))
  assert s['mean_recall'] == pytest.approx(np.nanmean(recall)) == pytest.approx(s['mean_acc'])
  assert s['mean_f1'] == pytest.approx(np.nanmean(dice)) == s['mean_dice']
  # mmsegmentation's names are the same numbers.
  assert s['aAcc'] == s['pixel_acc'] == pytest.approx(tp.sum() / kept.sum())
  assert (s['mIoU'], s['mAcc'], s['mDice'], s['mFscore'], s['mPrecision'], s['mRecall']) == (
      s['mean_iu'], s['mean_acc'], s['mean_dice'], s['mean_f1'], s['mean_precision'],
      s['mean_recall'])
  # The paper's scores are those of segmentation_scores, unchanged.
  plain = metrics.segmentation_scores(hist)
  for key, value in plain.items():
    np.testing.assert_array_equal(s[key], value)


def test_class_scores_exclude_and_empty_matrix():
  import warnings
  confusion = np.array([[5, 0, 1], [0, 4, 0], [0, 0, 0]])  # class 2 predicted, never true
  s = metrics.class_scores(confusion, exclude=(2,))
  assert s['per_class_precision'][2] == 0.0 and s['per_class_f1'][2] == 0.0
  assert s['mean_f1'] == pytest.approx((10 / 11 + 1.0) / 2)  # class 2's 0 left out
  assert s['mean_precision'] == pytest.approx((1.0 + 1.0) / 2)
  assert s['mIoU'] == metrics.segmentation_scores(confusion, exclude=(2,))['mean_iu']
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    empty = metrics.class_scores(np.zeros((3, 3), np.int64))
  assert all(math.isnan(empty[k]) for k in metrics.MMSEG_NAMES)


def test_image_confusions_are_confusion_matrix_per_image_and_add_up():
  n = 6
  labels, preds = _random_split(3, n, shape=(4, 11, 13))
  labels[1, :3] = -1       # out of range: never counted
  labels[2, :, -4:] = 255  # padding
  labels[3] = 255          # a padding example: no counted pixel
  per_image = metrics.image_confusions(labels, preds, n)
  assert per_image.shape == (4, n, n) and per_image.dtype == np.int64
  for i in range(4):
    np.testing.assert_array_equal(per_image[i], metrics.confusion_matrix(labels[i], preds[i], n))
  np.testing.assert_array_equal(per_image.sum(0), metrics.confusion_matrix(labels, preds, n))
  assert per_image[3].sum() == 0


def test_image_scores_against_per_image_loops():
  n = 6
  labels, preds = _random_split(4, n, shape=(5, 9, 10))
  labels[4] = 255
  exclude = (1,)
  got = metrics.image_scores(metrics.image_confusions(labels, preds, n), exclude)
  for i in range(5):
    valid = labels[i] != 255
    t, p = labels[i][valid], preds[i][valid]
    if not valid.any():
      assert math.isnan(got['pixel_acc'][i]) and math.isnan(got['mean_iu'][i])
      assert got['pixels'][i] == 0
      continue
    ius = [((t == c) & (p == c)).sum() / ((t == c) | (p == c)).sum()
           for c in range(n) if c not in exclude and ((t == c) | (p == c)).any()]
    assert got['mean_iu'][i] == pytest.approx(np.mean(ius))
    assert got['classes'][i] == len(ius)
    assert got['pixel_acc'][i] == pytest.approx((t == p).mean())
    assert (got['pixels'][i], got['correct'][i]) == (valid.sum(), (t == p).sum())
  # One image's scores are the split scores of that image alone.
  one = metrics.image_confusions(labels[:1], preds[:1], n)
  assert got['mean_iu'][0] == pytest.approx(metrics.segmentation_scores(one[0], exclude)['mean_iu'])
