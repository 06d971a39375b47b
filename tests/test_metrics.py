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
