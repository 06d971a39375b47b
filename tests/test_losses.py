"""Cross-entropy: normalised vs summed (Caffe), ignore label, empty batches, bf16 inputs."""

import flax.linen as nn
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


# ------------------------------------------------------------------------------------------------
# The other losses, each against a NumPy formula written with loops over the valid pixels.

C = 4


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  return z - z.max() - np.log(np.exp(z - z.max()).sum())


def _pixels(logits, labels, ignore=255):
  """[(index, label, log-probabilities)] of the valid pixels."""
  out = []
  for idx in np.ndindex(labels.shape):
    label = int(labels[idx])
    if label == ignore or not 0 <= label < logits.shape[-1]:
      continue
    out.append((idx, label, _log_softmax(logits[idx])))
  return out


def _weighted_mean(values, labels_, class_weights):
  w = [1.0 if class_weights is None else class_weights[c] for c in labels_]
  total, count = sum(v * wi for v, wi in zip(values, w)), sum(w)
  return total / count if count > 0 else 0.0


def _np_smoothed_ce(logits, labels, eps, class_weights=None, normalize=True):
  values, labs = [], []
  for _, label, lp in _pixels(logits, labels):
    value = 0.0
    for c in range(len(lp)):
      target = (1 - eps) * (c == label) + eps / len(lp)
      value -= target * lp[c]
    values.append(value)
    labs.append(label)
  if normalize:
    return _weighted_mean(values, labs, class_weights)
  w = [1.0 if class_weights is None else class_weights[c] for c in labs]
  return sum(v * wi for v, wi in zip(values, w)) / labels.shape[0]


def _np_focal(logits, labels, gamma, class_weights=None):
  values, labs = [], []
  for _, label, lp in _pixels(logits, labels):
    p = np.exp(lp[label])
    values.append(-((1 - p) ** gamma) * lp[label])
    labs.append(label)
  return _weighted_mean(values, labs, class_weights)


def _np_ohem(logits, labels, thresh, min_kept, class_weights=None):
  """mmsegmentation's OHEMPixelSampler rule, then the weighted mean over the kept pixels."""
  pixels = _pixels(logits, labels)
  probs = [np.exp(lp[label]) for _, label, lp in pixels]
  ordered = sorted(probs)
  batch_kept = min_kept * labels.shape[0]
  min_threshold = ordered[min(batch_kept, len(ordered) - 1)] if ordered else 0.0
  threshold = max(min_threshold, thresh)
  kept = np.zeros(labels.shape, bool)
  values, labs = [], []
  for (idx, label, lp), p in zip(pixels, probs):
    if p < threshold:
      kept[idx] = True
      values.append(-lp[label])
      labs.append(label)
  return _weighted_mean(values, labs, class_weights), kept


def _np_dice(logits, labels, smooth, class_weights=None):
  pixels = _pixels(logits, labels)
  per_class = []
  for c in range(logits.shape[-1]):
    inter = psum = tsum = 0.0
    for _, label, lp in pixels:
      p = np.exp(lp[c])
      inter += p * (label == c)
      psum += p
      tsum += label == c
    per_class.append(1 - (2 * inter + smooth) / (psum + tsum + smooth))
  w = np.ones(logits.shape[-1]) if class_weights is None else np.asarray(class_weights, float)
  return float(np.dot(per_class, w) / w.sum())


def _np_lovasz(logits, labels, classes='present', class_weights=None):
  """Algorithm 1 of Berman et al. with loops: per class, errors sorted in decreasing order, each
  weighted by the increment of the Jaccard loss as the pixels are added one by one."""
  pixels = _pixels(logits, labels)
  per_class, weights = [], []
  for c in range(logits.shape[-1]):
    fg = [float(label == c) for _, label, _ in pixels]
    if classes == 'present' and sum(fg) == 0:
      continue
    errors = [abs(f - np.exp(lp[c])) for f, (_, _, lp) in zip(fg, pixels)]
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    gts, seen_fg, seen_bg, previous, value = sum(fg), 0.0, 0.0, 0.0, 0.0
    for i in order:
      seen_fg += fg[i]
      seen_bg += 1 - fg[i]
      jaccard = 1 - (gts - seen_fg) / (gts + seen_bg)
      value += errors[i] * (jaccard - previous)
      previous = jaccard
    per_class.append(value)
    weights.append(1.0 if class_weights is None else class_weights[c])
  return float(np.dot(per_class, weights) / sum(weights)) if per_class else 0.0


def _reference_inputs():
  """The inputs of the hard-coded Lovasz-softmax numbers below (closed form, no RNG)."""
  n, h, w, c = 2, 3, 4, 4
  i = np.arange(n * h * w * c, dtype=np.float64).reshape(n, h, w, c)
  logits = (2.5 * np.sin(1.3 * i + 0.7) + 0.5 * np.cos(0.37 * i * i)).astype(np.float32)
  j = np.arange(n * h * w).reshape(n, h, w)
  labels = ((j * j + 2 * j + 1) % 3).astype(np.int64)  # classes 0 and 1 only: 2 and 3 absent
  labels[0, 0, :2] = 255
  labels[1, 2, 3] = 255
  return logits, labels


WEIGHTS = (0.5, 2.0, 1.0, 0.25)


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.3])
def test_label_smoothing(batch, eps):
  logits, labels = batch
  np.testing.assert_allclose(losses.smoothed_cross_entropy(logits, labels, smoothing=eps),
                             _np_smoothed_ce(logits, labels, eps), rtol=1e-5)
  np.testing.assert_allclose(
      losses.smoothed_cross_entropy(logits, labels, smoothing=eps, class_weights=WEIGHTS),
      _np_smoothed_ce(logits, labels, eps, WEIGHTS), rtol=1e-5)
  np.testing.assert_allclose(
      losses.smoothed_cross_entropy(logits, labels, smoothing=eps, normalize=False,
                                    class_weights=WEIGHTS),
      _np_smoothed_ce(logits, labels, eps, WEIGHTS, normalize=False), rtol=1e-5)
  spec = losses.segmentation_loss(logits, labels, f'ce:1:smoothing={eps}')
  np.testing.assert_allclose(spec, _np_smoothed_ce(logits, labels, eps), rtol=1e-5)


@pytest.mark.parametrize('gamma', [0.0, 0.5, 2.0])
def test_focal(batch, gamma):
  logits, labels = batch
  np.testing.assert_allclose(losses.focal_loss(logits, labels, gamma=gamma),
                             _np_focal(logits, labels, gamma), rtol=1e-5)
  np.testing.assert_allclose(losses.focal_loss(logits, labels, gamma=gamma, class_weights=WEIGHTS),
                             _np_focal(logits, labels, gamma, WEIGHTS), rtol=1e-5)
  if gamma == 0:
    np.testing.assert_allclose(losses.focal_loss(logits, labels, gamma=0.0),
                               losses.cross_entropy(logits, labels), rtol=1e-6)


@pytest.mark.parametrize('thresh,min_kept', [(0.7, 1), (0.7, 20), (0.05, 3), (0.9, 1000)])
def test_ohem_is_mmsegmentation_rule(batch, thresh, min_kept):
  logits, labels = batch
  expected, kept = _np_ohem(logits, labels, thresh, min_kept)
  assert 0 < kept.sum() < (labels != 255).sum()
  loss, grad = jax.value_and_grad(lambda z: losses.ohem_cross_entropy(
      z, labels, thresh=thresh, min_kept=min_kept))(jnp.asarray(logits))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # Only the kept pixels have a gradient.
  pixel_grad = np.abs(np.asarray(grad)).sum(-1)
  np.testing.assert_array_equal(pixel_grad > 0, kept)
  weighted, _ = _np_ohem(logits, labels, thresh, min_kept, WEIGHTS)
  np.testing.assert_allclose(losses.ohem_cross_entropy(logits, labels, thresh=thresh,
                                                       min_kept=min_kept, class_weights=WEIGHTS),
                             weighted, rtol=1e-5)


def test_ohem_min_kept_keeps_the_hardest(batch):
  logits, labels = batch
  # thresh tiny: only min_kept (per image, x2) pixels, the lowest-probability ones.
  _, kept = _np_ohem(logits, labels, 1e-9, 5)
  assert kept.sum() == 10
  prob = np.exp(jax.nn.log_softmax(logits))
  p_true = np.take_along_axis(prob, np.where(labels == 255, 0, labels)[..., None], -1)[..., 0]
  assert p_true[kept].max() < p_true[(labels != 255) & ~kept].min()


@pytest.mark.parametrize('smooth', [1.0, 0.01])
def test_dice(batch, smooth):
  logits, labels = batch
  np.testing.assert_allclose(losses.dice_loss(logits, labels, smooth=smooth),
                             _np_dice(logits, labels, smooth), rtol=1e-5)
  np.testing.assert_allclose(losses.dice_loss(logits, labels, smooth=smooth, class_weights=WEIGHTS),
                             _np_dice(logits, labels, smooth, WEIGHTS), rtol=1e-5)


def test_dice_empty_class_counts(batch):
  logits, labels = batch
  labels = np.where(labels == 3, 255, labels)  # class 3 absent
  np.testing.assert_allclose(losses.dice_loss(logits, labels), _np_dice(logits, labels, 1.0),
                             rtol=1e-5)


# The Lovasz-softmax loss and d loss / d logits[0, 1] of the authors' reference implementation
# (github.com/bermanmaxim/LovaszSoftmax, pytorch/lovasz_losses.py at commit 7d48792,
# lovasz_softmax(softmax(z), labels, classes=..., ignore=255) on _reference_inputs(), float32,
# torch 2.13 CPU, backward through torch.softmax), run once and written down here.
REFERENCE_LOVASZ = {
    'present': (0.7845264077186584, [
        [3.83188436e-03, -1.58970687e-03, -1.96660258e-04, -2.04551779e-03],
        [-1.02248285e-02, 9.43401922e-03, 1.96453038e-04, 5.94357203e-04],
        [6.66823750e-03, -8.43499508e-03, 1.59631087e-03, 1.70447311e-04],
        [8.70624426e-05, -4.66338592e-03, 4.45339270e-03, 1.22930971e-04]]),
    'all': (0.8240848183631897, [
        [1.9159422e-03, -7.9485343e-04, -9.8330129e-05, -1.0227589e-03],
        [-5.1124142e-03, 4.7170096e-03, 9.8226519e-05, 2.9717860e-04],
        [3.3341188e-03, -4.2174975e-03, 7.9815544e-04, 8.5223655e-05],
        [-3.1433664e-03, -3.3505432e-02, 4.1087173e-02, -4.4383905e-03]]),
}


@pytest.mark.parametrize('classes', ['present', 'all'])
def test_lovasz_matches_reference_implementation(classes):
  logits, labels = _reference_inputs()
  value, grad = jax.value_and_grad(
      lambda z: losses.lovasz_softmax(z, labels, classes=classes))(jnp.asarray(logits))
  expected, expected_grad = REFERENCE_LOVASZ[classes]
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad)[0, 1], expected_grad, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(value, _np_lovasz(logits, labels, classes), rtol=1e-6)


@pytest.mark.parametrize('classes', ['present', 'all'])
def test_lovasz_loops_and_class_weights(batch, classes):
  logits, labels = batch
  np.testing.assert_allclose(losses.lovasz_softmax(logits, labels, classes=classes),
                             _np_lovasz(logits, labels, classes), rtol=1e-5)
  np.testing.assert_allclose(
      losses.lovasz_softmax(logits, labels, classes=classes, class_weights=WEIGHTS),
      _np_lovasz(logits, labels, classes, WEIGHTS), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# What every loss owes: the ignore label, empty classes, all-ignored batches, float32.

SPECS = ['ce', 'ce:1:smoothing=0.1', 'ohem:1:min_kept=3', 'dice', 'lovasz', 'lovasz:1:classes=all',
         'focal', 'focal:1:gamma=0.5']


@pytest.mark.parametrize('spec', SPECS)
def test_ignored_and_out_of_range_labels(batch, spec):
  logits, labels = batch
  loss_fn = lambda z, lab, **kw: losses.segmentation_loss(z, lab, spec, class_weights=WEIGHTS, **kw)
  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits), labels)
  assert loss.dtype == jnp.float32 and loss.shape == () and np.isfinite(loss)
  assert np.all(np.asarray(grad)[labels == 255] == 0)
  changed = np.where((labels == 255)[..., None], 1e4, logits)
  np.testing.assert_allclose(loss_fn(changed, labels), loss, rtol=1e-6)
  # A custom ignore label; labels outside 0..C-1 (negative or >= C) are ignored too.
  for other in (9, -1, C):
    lab = np.where(labels == 255, other, labels)
    np.testing.assert_allclose(loss_fn(logits, lab, ignore_label=7), loss, rtol=1e-6)
  np.testing.assert_allclose(loss_fn(logits, np.where(labels == 255, 7, labels), ignore_label=7),
                             loss, rtol=1e-6)
  # bf16 scores: computed in float32.
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  out = loss_fn(bf16, labels)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, loss_fn(bf16.astype(jnp.float32), labels), rtol=1e-6)


@pytest.mark.parametrize('spec', SPECS)
@pytest.mark.parametrize('normalize', [True, False])
def test_all_ignored_batch_is_zero_with_zero_gradient(spec, normalize):
  logits = jnp.asarray(np.linspace(-3, 3, 2 * 3 * 3 * C).reshape(2, 3, 3, C), jnp.float32)
  labels = jnp.full((2, 3, 3), 255)
  loss, grad = jax.jit(jax.value_and_grad(lambda z: losses.segmentation_loss(
      z, labels, spec, normalize=normalize, class_weights=WEIGHTS)))(logits)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize('spec', SPECS + ['dice:1:smooth=0'])
def test_empty_class_and_saturated_scores_have_finite_gradients(spec):
  # Class 3 absent; scores so large that the probabilities are exactly 0 and 1 in float32; a
  # class weight of 0 (median-frequency weights give absent classes 0).
  labels = np.array([[[0, 1, 2, 255], [1, 1, 0, 2]]])
  logits = np.zeros((1, 2, 4, C), np.float32)
  for idx in np.ndindex(labels.shape):
    logits[idx + (int(labels[idx]) % C,)] = 200.0
  logits[0, 1, 3] = [0.0, 300.0, 0.0, 0.0]  # confidently wrong
  for weights in (None, (1.0, 2.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0)):
    loss, grad = jax.value_and_grad(lambda z: losses.segmentation_loss(
        z, labels, spec, class_weights=weights))(jnp.asarray(logits))
    assert np.isfinite(loss) and np.all(np.isfinite(np.asarray(grad))), (spec, weights)


# ------------------------------------------------------------------------------------------------
# The spec and the weighted sum.

def test_ce_spec_is_exactly_cross_entropy(batch):
  logits, labels = batch
  for normalize in (True, False):
    for weights in (None, WEIGHTS):
      expected = losses.cross_entropy(logits, labels, normalize=normalize, class_weights=weights)
      for spec in ('ce', 'ce:1.0', ' ce : 1 ', 'ce:1:smoothing=0'):
        got = losses.segmentation_loss(logits, labels, spec, normalize=normalize,
                                       class_weights=weights)
        assert np.asarray(got).tobytes() == np.asarray(expected).tobytes()
  jitted = jax.jit(lambda z, lab: losses.segmentation_loss(z, lab, 'ce'))(logits, labels)
  np.testing.assert_array_equal(jitted, jax.jit(losses.cross_entropy)(logits, labels))
  assert losses.segmentation_loss(logits, labels) == losses.cross_entropy(logits, labels)


def test_weights_add_up(batch):
  logits, labels = batch
  kw = dict(class_weights=WEIGHTS)
  parts = {
      'ce': losses.cross_entropy(logits, labels, **kw),
      'dice': losses.dice_loss(logits, labels, **kw),
      'lovasz': losses.lovasz_softmax(logits, labels, **kw),
      'focal': losses.focal_loss(logits, labels, gamma=3.0, **kw),
      'ohem': losses.ohem_cross_entropy(logits, labels, thresh=0.6, min_kept=2, **kw),
  }
  spec = 'ce:0.25,dice:2,lovasz:0,focal:1.5:gamma=3,ohem:0.5:thresh=0.6:min_kept=2'
  expected = (0.25 * parts['ce'] + 2 * parts['dice'] + 1.5 * parts['focal'] +
              0.5 * parts['ohem'])
  np.testing.assert_allclose(losses.segmentation_loss(logits, labels, spec, **kw), expected,
                             rtol=1e-6)
  # Parsed terms work as well as the string.
  np.testing.assert_allclose(
      losses.segmentation_loss(logits, labels, losses.parse_loss_spec(spec), **kw), expected,
      rtol=1e-6)


def test_parse_loss_spec():
  terms = losses.parse_loss_spec('ce:1.0,dice:0.5')
  assert terms == (('ce', 1.0, {'smoothing': 0.0}), ('dice', 0.5, {'smooth': 1.0}))
  assert losses.parse_loss_spec('focal:gamma=2') == (('focal', 1.0, {'gamma': 2.0}),)
  (ohem,) = losses.parse_loss_spec('ohem:1.0:thresh=0.7:min_kept=1e5')
  assert ohem.options == {'thresh': 0.7, 'min_kept': 100000}
  assert isinstance(ohem.options['min_kept'], int)
  assert losses.parse_loss_spec('lovasz:0.5:classes=all')[0].options == {'classes': 'all'}
  spec = 'ce:1:smoothing=0.1,ohem:0.5:min_kept=10,lovasz,dice:2:smooth=0.5,focal:1:gamma=1'
  canonical = losses.format_loss_spec(spec)
  assert canonical == ('ce:1:smoothing=0.1,ohem:0.5:min_kept=10,lovasz:1,dice:2:smooth=0.5,'
                       'focal:1:gamma=1.0')
  assert losses.parse_loss_spec(canonical) == losses.parse_loss_spec(spec)
  assert losses.LOSS_NAMES == ('ce', 'ohem', 'dice', 'lovasz', 'focal')
  assert losses.loss_spec_problem('ce,dice:0.5') is None


@pytest.mark.parametrize('spec,match', [
    ('dise:0.5', r"unknown loss 'dise' in 'dise:0.5'; the losses are ce, ohem, dice, lovasz, focal"),
    ('ce:abc', r"weight 'abc' in 'ce:abc' is not a number"),
    ('ce:-1', r'a weight is a number >= 0'),
    ('ce:inf', r'a weight is a number >= 0'),
    ('ce,,dice', r'empty term'),
    ('ce,', r'empty term'),
    ('', r'empty'),
    ('focal:1:alpha=0.25', r"unknown option 'alpha' in 'focal:1:alpha=0.25'; focal takes gamma="),
    ('focal:1:gamma=-1', r"gamma='-1' in 'focal:1:gamma=-1': gamma is a number >= 0"),
    ('focal:1:gamma', r"'gamma' in 'focal:1:gamma' is neither a weight nor OPTION=VALUE"),
    ('ohem:1:min_kept=2.5', r'min_kept is an integer >= 0'),
    ('ohem:1:thresh=0', r'thresh is a number in \(0, 1\]'),
    ('ce:1:smoothing=1', r'smoothing is a number in \[0, 1\)'),
    ('lovasz:1:classes=some', r"classes is 'present' or 'all'"),
    ('dice:1:smooth=1:smooth=2', r"option 'smooth' given twice"),
    ('dice:1:1', r'neither a weight nor OPTION=VALUE; dice takes smooth='),
])
def test_bad_specs_are_user_errors(spec, match):
  from fcn_jax.errors import UserError
  with pytest.raises(UserError, match=match) as info:
    losses.parse_loss_spec(spec)
  assert 'NAME[:WEIGHT][:OPTION=VALUE]' in str(info.value)  # the grammar, with examples
  with pytest.raises(UserError, match=r'^config\.loss=') as info:
    losses.check_loss_spec(spec)
  assert losses.loss_spec_problem(spec) is not None
  with pytest.raises(UserError):
    losses.segmentation_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2), jnp.int32), spec)


def test_non_string_spec_is_a_user_error():
  from fcn_jax.errors import UserError
  with pytest.raises(UserError, match='config.loss=3: a loss spec is a string, not int'):
    losses.check_loss_spec(3)


# ------------------------------------------------------------------------------------------------
# The train step with a combined loss.

class _TinyNet(nn.Module):
  """The interface train_step uses (apply, head_names, num_classes) on two convolutions: a real
  FCN takes a minute to initialise and compile on a CPU (tests/test_train.py runs those)."""
  head_names = ('score',)
  num_classes = (3,)

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Conv(3, (1, 1))(nn.relu(nn.Conv(8, (3, 3))(x)))


def test_train_step_with_combined_loss_lowers_it():
  from fcn_jax import optim, train
  model = _TinyNet()
  rng = np.random.default_rng(0)
  labels = np.zeros((2, 16, 16), np.int32)
  labels[:, :, 8:] = 1
  labels[:, 4:8, 2:6] = 2
  labels[:, 0] = 255
  image = (labels[..., None] * 0.8 + 0.3 * rng.normal(size=(2, 16, 16, 3))).astype(np.float32)
  batch = {'image': image, 'label': labels}
  variables = jax.jit(model.init)(jax.random.key(0), image)
  tx = optim.make_optimizer(learning_rate=1e-2, momentum=0.9, weight_decay=0.0,
                            params=variables['params'],
                            frozen=jax.tree.map(lambda _: False, variables['params']),
                            algorithm='adam')
  state = train.create_train_state(model, tx, variables, jax.random.key(1))
  spec = 'ce:1.0,dice:0.5'
  # The step's loss is the spec's sum on the model's scores.
  expected = jax.jit(lambda v: losses.cross_entropy(model.apply(v, image), labels) +
                     0.5 * losses.dice_loss(model.apply(v, image), labels))(variables)
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, normalize_loss=True,
                                               loss=spec))
  seen = []
  for _ in range(10):
    state, m = step(state, batch)
    seen.append(float(m['loss']))
  np.testing.assert_allclose(seen[0], expected, rtol=1e-5)
  assert all(np.isfinite(seen)), seen
  assert seen[-1] < 0.8 * seen[0], seen
