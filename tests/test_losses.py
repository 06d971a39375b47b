"""Cross-entropy: normalised vs summed (Caffe), ignore label, empty batches, bf16 inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax import losses


def _reference(logits, labels, ignore=255):
  logits = np.asarray(logits, np.float64)
  losses_, n = [], 0
  for idx in np.ndindex(labels.shape):
    label = labels[idx]
    if label == ignore or not 0 <= label < logits.shape[-1]:
      continue
    z = logits[idx]
    losses_.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[label])
    n += 1
  return float(np.sum(losses_)), n


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=(2, 5, 6))
  labels[0, 0, :] = 255
  labels[1, 2, 3] = 255
  return logits, labels


def test_normalised_is_mean_over_valid_pixels(batch):
  logits, labels = batch
  total, n = _reference(logits, labels)
  assert n == 2 * 30 - 7
  loss = losses.cross_entropy(logits, labels)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, total / n, rtol=1e-6)


def test_unnormalised_is_per_image_sum_averaged_over_batch(batch):
  logits, labels = batch
  total, _ = _reference(logits, labels)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, normalize=False), total / 2, rtol=1e-6)
  # Batch of one (the Caffe "heavy" recipe): the plain sum over pixels.
  total0, _ = _reference(logits[:1], labels[:1])
  np.testing.assert_allclose(losses.cross_entropy(logits[:1], labels[:1], normalize=False), total0,
                             rtol=1e-6)


def test_ignored_pixels_have_no_loss_and_no_gradient(batch):
  logits, labels = batch
  grad = jax.grad(lambda z: losses.cross_entropy(z, labels, normalize=False))(jnp.asarray(logits))
  assert np.all(np.asarray(grad)[labels == 255] == 0)
  assert np.all(np.abs(np.asarray(grad)[labels != 255]).sum(-1) > 0)
  # Changing the logits of ignored pixels changes nothing.
  changed = np.where((labels == 255)[..., None], 1e4, logits)
  np.testing.assert_allclose(losses.cross_entropy(changed, labels), losses.cross_entropy(logits, labels))
  # A custom ignore label and labels outside 0..C-1 are ignored as well.
  lab = labels.copy()
  lab[lab == 255] = 9
  np.testing.assert_allclose(losses.cross_entropy(logits, lab, ignore_label=9),
                             losses.cross_entropy(logits, labels), rtol=1e-7)


def test_all_ignored_is_zero_not_nan():
  logits = jnp.ones((1, 3, 3, 21))
  labels = jnp.full((1, 3, 3), 255)
  for normalize in (True, False):
    loss, grad = jax.value_and_grad(
        lambda z: losses.cross_entropy(z, labels, normalize=normalize))(logits)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)


def test_bf16_logits_computed_in_f32(batch):
  logits, labels = batch
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  loss = losses.cross_entropy(bf16, labels)
  assert loss.dtype == jnp.float32
  # Same as the f32 loss of the (rounded) bf16 values: no bf16 arithmetic inside.
  expected = losses.cross_entropy(bf16.astype(jnp.float32), labels)
  np.testing.assert_allclose(loss, expected, rtol=1e-7)
  total, n = _reference(np.asarray(bf16.astype(jnp.float32)), labels)
  np.testing.assert_allclose(loss, total / n, rtol=1e-6)


def test_jit_and_large_logits_stable():
  logits = jnp.array([[[[1000.0, 0.0, -1000.0]]]])
  labels = jnp.array([[[2]]])
  loss = jax.jit(losses.cross_entropy)(logits, labels)
  np.testing.assert_allclose(loss, 2000.0, rtol=1e-6)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError):
    losses.cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5), jnp.int32))
