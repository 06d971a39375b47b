"""Per-pixel multinomial logistic loss (Caffe SoftmaxWithLoss with ignore_label)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ['cross_entropy']


def cross_entropy(logits, labels, *, ignore_label: int = 255, normalize: bool = True,
                  class_weights=None) -> jax.Array:
  """Softmax cross-entropy over the pixels whose label is a class (not `ignore_label`).

  Args:
    logits: (N, H, W, C) scores of any float dtype; the loss is computed in float32.
    labels: (N, H, W) integer labels. `ignore_label` and values outside 0..C-1 contribute nothing
      (no loss, no gradient).
    ignore_label: the "void" label (255 for PASCAL VOC borders).
    normalize: True (Caffe `normalize: true`, normalization VALID): the mean over valid pixels,
      0 when no pixel is valid. False (Caffe `normalize: false`, the "heavy" FCN recipe, whose
      normalization mode is BATCH_SIZE): the loss SUMMED over the valid pixels of each image,
      averaged over the N images. With the reference's batch of 1 this is the plain pixel sum,
      and a batch of N equals N accumulated (averaged) batches of 1 (Caffe iter_size).
    class_weights: optional (C,) weights: each pixel's loss is multiplied by its label's weight, and
      the normalised loss divides by the summed weights of the valid pixels (a weighted mean).

  Returns:
    A float32 scalar.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(f'logits {logits.shape} must be labels {labels.shape} plus a class axis')
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
  safe = jnp.where(valid, labels, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  weight = valid.astype(jnp.float32)
  if class_weights is not None:
    weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
  per_pixel = jnp.where(valid, log_z - label_logit, 0.0) * weight
  total = jnp.sum(per_pixel)
  if normalize:
    count = jnp.sum(weight)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0).astype(jnp.float32)
  batch = labels.shape[0] if labels.ndim >= 1 else 1
  return (total / jnp.float32(max(batch, 1))).astype(jnp.float32)
