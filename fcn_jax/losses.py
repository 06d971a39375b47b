"""Segmentation losses, and their weighted sums chosen by a spec string (config.loss).

`cross_entropy` is the reference's loss (Caffe SoftmaxWithLoss with ignore_label), exact to Caffe.
The others are what later segmentation work trains with; each one ignores `ignore_label` and any
label outside 0..C-1 (no loss, no gradient), computes in float32, and is 0 with zero gradients on
a batch without a valid pixel.

  ce      softmax cross-entropy; option `smoothing` (label smoothing epsilon, default 0 = exactly
          `cross_entropy`).
  ohem    cross-entropy over the hard pixels only, as mmsegmentation's OHEMPixelSampler picks them:
          pixels whose probability of their true class is below `thresh` (default 0.7), but at
          least the `min_kept` (default 100000) per image hardest ones.
  dice    soft Dice over the batch's valid pixels, 1 - (2 I_c + s) / (P_c + T_c + s) per class,
          averaged over the classes; option `smooth` (s, default 1).
  lovasz  Lovasz-softmax (Berman et al. 2018), a convex surrogate of the per-class IoU, averaged
          over the classes present in the labels; option `classes` ('present' or 'all').
  focal   softmax focal loss (Lin et al. 2017), -(1 - p_t)^gamma log p_t; option `gamma`
          (default 2; 0 is cross-entropy). The class weights play the part of alpha.

Spec grammar (config.loss): comma-separated terms, each NAME[:WEIGHT][:OPTION=VALUE]...; the
weight defaults to 1 and the loss is the weighted sum of the terms. Examples: 'ce' (the default,
the reference loss), 'ce:1.0,dice:0.5', 'focal:1.0:gamma=2', 'ohem:1.0:thresh=0.7:min_kept=100000',
'ce:1.0:smoothing=0.1', 'ce,lovasz:0.5'.

Normalisation and class weights: the pixel losses (ce, ohem, focal) follow `normalize` like
`cross_entropy` (the weighted mean over the valid, for ohem the kept, pixels; or False: the sum
per image averaged over the batch). Dice and Lovasz are ratios in [0, 1] over the whole batch
whatever `normalize` says (with normalize=False a pixel sum is far larger: weigh them
accordingly); their class weights weigh the per-class terms of the mean over classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fcn_jax.errors import UserError

__all__ = [
    'LOSS_NAMES', 'LossTerm', 'check_loss_spec', 'cross_entropy', 'dice_loss', 'focal_loss',
    'format_loss_spec', 'lovasz_softmax', 'loss_spec_problem', 'ohem_cross_entropy',
    'parse_loss_spec', 'segmentation_loss', 'smoothed_cross_entropy',
]


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


# ------------------------------------------------------------------------------------------------
# Shared pieces: the valid pixels, their weights, the Caffe-style reduction.

def _prepare(logits, labels, ignore_label: int):
  """float32 logits, int32 labels, the valid-pixel mask and the labels with invalid ones at 0
  (so that gathers stay in range; their values are masked out everywhere)."""
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(f'logits {logits.shape} must be labels {labels.shape} plus a class axis')
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < logits.shape[-1]) & (labels != ignore_label)
  return logits, valid, jnp.where(valid, labels, 0)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den is 0, with finite gradients there too (the double where)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _reduce_pixels(per_pixel: jax.Array, weight: jax.Array, normalize: bool) -> jax.Array:
  """`cross_entropy`'s reduction of per-pixel losses (already 0 outside `weight`'s pixels)."""
  total = jnp.sum(per_pixel * weight)
  if normalize:
    return _safe_divide(total, jnp.sum(weight)).astype(jnp.float32)
  batch = per_pixel.shape[0] if per_pixel.ndim >= 1 else 1
  return (total / jnp.float32(max(batch, 1))).astype(jnp.float32)


def _pixel_weight(mask: jax.Array, safe: jax.Array, class_weights) -> jax.Array:
  weight = mask.astype(jnp.float32)
  if class_weights is not None:
    weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
  return weight


def _class_mean(per_class: jax.Array, include: jax.Array, class_weights) -> jax.Array:
  """The (weighted) mean of per-class losses over the classes in `include`; 0 if none."""
  w = include.astype(jnp.float32)
  if class_weights is not None:
    w = w * jnp.asarray(class_weights, jnp.float32)
  return _safe_divide(jnp.sum(per_class * w), jnp.sum(w)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The losses.

def smoothed_cross_entropy(logits, labels, *, smoothing: float, ignore_label: int = 255,
                           normalize: bool = True, class_weights=None) -> jax.Array:
  """Cross-entropy against label-smoothed targets, (1 - smoothing) one-hot + smoothing / C
  (optax.smooth_labels, optax.softmax_cross_entropy): discourages over-confident scores.
  Reduced like `cross_entropy` (same arguments); smoothing=0 is cross-entropy."""
  logits, valid, safe = _prepare(logits, labels, ignore_label)
  targets = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32),
                                smoothing)
  per_pixel = jnp.where(valid, optax.softmax_cross_entropy(logits, targets), 0.0)
  return _reduce_pixels(per_pixel, _pixel_weight(valid, safe, class_weights), normalize)


def ohem_cross_entropy(logits, labels, *, thresh: float = 0.7, min_kept: int = 100000,
                       ignore_label: int = 255, normalize: bool = True,
                       class_weights=None) -> jax.Array:
  """Cross-entropy over the hard pixels only (online hard example mining), picked as
  mmsegmentation's OHEMPixelSampler does: with p the probability of each valid pixel's true class
  and k = min(min_kept * N, valid pixels - 1), the threshold is max(k-th smallest p (0-based),
  thresh) and the pixels with p strictly below it are kept: all those under `thresh`, and else
  the k hardest (ties aside), i.e. min_kept per image. The selection carries no gradient.

  Unlike mmsegmentation's default (avg_non_ignore=False: the kept losses summed over ALL pixels
  of the batch), normalize=True here averages over the kept pixels (weighted by class), so the
  loss stays on the cross-entropy's scale; normalize=False sums per image like `cross_entropy`.
  """
  logits, valid, safe = _prepare(logits, labels, ignore_label)
  label_log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None],
                                    axis=-1)[..., 0]
  prob = jax.lax.stop_gradient(jnp.exp(label_log_p))
  ordered = jnp.sort(jnp.where(valid, prob, jnp.inf).ravel())  # valid pixels first, ascending
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  batch = labels.shape[0] if jnp.ndim(labels) >= 1 else 1
  kept_static = min(int(min_kept) * batch, ordered.size - 1)  # an int32-safe bound, same result
  k = jnp.clip(jnp.minimum(kept_static, n_valid - 1), 0, None)
  min_threshold = jnp.where(n_valid > 0, ordered[k], 0.0)
  kept = valid & (prob < jnp.maximum(min_threshold, jnp.float32(thresh)))
  per_pixel = jnp.where(kept, -label_log_p, 0.0)
  return _reduce_pixels(per_pixel, _pixel_weight(kept, safe, class_weights), normalize)


def dice_loss(logits, labels, *, smooth: float = 1.0, ignore_label: int = 255,
              class_weights=None) -> jax.Array:
  """Soft (multi-class) Dice loss on the softmax probabilities of the batch's valid pixels: per
  class c, 1 - (2 I_c + smooth) / (P_c + T_c + smooth), with I_c = sum p_c * [label = c],
  P_c = sum p_c, T_c = #[label = c]; then the mean over the classes, weighted by `class_weights`.
  Every class counts: an empty one is 0 with no predicted mass (smooth > 0), so predicting it is
  penalised. Written here rather than with optax.losses.dice_loss, which has no pixel mask (and
  whose apply_softmax=False path checks its input with Python control flow, not traceable)."""
  logits, valid, safe = _prepare(logits, labels, ignore_label)
  num_classes = logits.shape[-1]
  mask = valid[..., None].astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1) * mask
  onehot = jax.nn.one_hot(safe, num_classes, dtype=jnp.float32) * mask
  axes = tuple(range(logits.ndim - 1))
  intersection = jnp.sum(probs * onehot, axis=axes)
  denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes) + smooth
  # smooth=0 on an all-ignored batch: 0 / 0, the class counted as a perfect match.
  score = jnp.where(denominator > 0, _safe_divide(2.0 * intersection + smooth, denominator), 1.0)
  return _class_mean(1.0 - score, jnp.ones((num_classes,), bool), class_weights)


def lovasz_softmax(logits, labels, *, classes: str = 'present', ignore_label: int = 255,
                   class_weights=None) -> jax.Array:
  """Lovasz-softmax loss (Berman, Rannen Triki, Blaschko, CVPR 2018) over the batch's valid
  pixels, as the reference lovasz_softmax(per_image=False): per class, the Lovasz extension of
  the Jaccard loss applied to the errors |[label = c] - p_c|, then the mean over the classes
  present in the labels ('present', the reference default; 0 if none) or over all classes
  ('all'), weighted by `class_weights`. A direct surrogate of the mean IoU."""
  if classes not in ('present', 'all'):
    raise ValueError(f"classes={classes!r}: 'present' or 'all'")
  logits, valid, safe = _prepare(logits, labels, ignore_label)
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1).reshape(-1, num_classes)
  valid = valid.reshape(-1, 1)
  fg = (jax.nn.one_hot(safe.reshape(-1), num_classes, dtype=jnp.int32) * valid)
  errors = jnp.where(valid, jnp.abs(fg.astype(jnp.float32) - probs), 0.0)
  # Invalid pixels sort last (key -1): there every foreground pixel has been counted, so the
  # Jaccard increments are 0 and they change nothing, as if they were absent.
  order = jnp.argsort(jnp.where(valid, jax.lax.stop_gradient(errors), -1.0), axis=0,
                      descending=True)
  errors_sorted = jnp.take_along_axis(errors, order, axis=0)
  fg_sorted = jnp.take_along_axis(fg, order, axis=0)
  gts = jnp.sum(fg, axis=0)
  # Integer counts: exact for any pixel count; the union is >= 1 at every position.
  intersection = gts - jnp.cumsum(fg_sorted, axis=0)
  union = gts + jnp.cumsum(1 - fg_sorted, axis=0)
  jaccard = 1.0 - intersection.astype(jnp.float32) / union.astype(jnp.float32)
  grad = jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]], axis=0)
  per_class = jnp.sum(errors_sorted * jax.lax.stop_gradient(grad), axis=0)
  include = gts > 0 if classes == 'present' else jnp.ones((num_classes,), bool)
  return _class_mean(per_class, include, class_weights)


def focal_loss(logits, labels, *, gamma: float = 2.0, ignore_label: int = 255,
               normalize: bool = True, class_weights=None) -> jax.Array:
  """Softmax focal loss (Lin et al. 2017): each valid pixel's -(1 - p_t)^gamma log p_t, which
  down-weights the pixels already classified well. `class_weights` are the alpha_t, and the
  reduction is `cross_entropy`'s (gamma=0: cross-entropy). optax.sigmoid_focal_loss is the binary
  (sigmoid) form, hence written here."""
  logits, valid, safe = _prepare(logits, labels, ignore_label)
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None],
                              axis=-1)[..., 0]
  if gamma == 0:
    modulation = jnp.ones_like(log_p)
  else:
    miss = jnp.maximum(-jnp.expm1(log_p), 0.0)  # 1 - p_t, accurate near p_t = 1
    # (1 - p_t)^gamma has an infinite slope at 0 for gamma < 1: keep that branch out.
    modulation = jnp.where(miss > 0, jnp.where(miss > 0, miss, 1.0) ** gamma, 0.0)
  per_pixel = jnp.where(valid, -modulation * log_p, 0.0)
  return _reduce_pixels(per_pixel, _pixel_weight(valid, safe, class_weights), normalize)


# ------------------------------------------------------------------------------------------------
# The spec: parsing, checking, the weighted sum.

@dataclasses.dataclass(frozen=True)
class _Option:
  default: Any
  accepts: str                  # for error messages
  check: Callable[[Any], bool]


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
  return lambda v: ((v > lo) if lo_open else (v >= lo)) and ((v < hi) if hi_open else (v <= hi))


_OPTIONS: dict[str, dict[str, _Option]] = {
    'ce': {'smoothing': _Option(0.0, 'a number in [0, 1)', _float_in(0, 1, hi_open=True))},
    'ohem': {'thresh': _Option(0.7, 'a number in (0, 1]', _float_in(0, 1, lo_open=True)),
             'min_kept': _Option(100000, 'an integer >= 0 (pixels per image)', lambda v: v >= 0)},
    'dice': {'smooth': _Option(1.0, 'a number >= 0', _float_in(0, math.inf))},
    'lovasz': {'classes': _Option('present', "'present' or 'all'",
                                  lambda v: v in ('present', 'all'))},
    'focal': {'gamma': _Option(2.0, 'a number >= 0', _float_in(0, math.inf))},
}
LOSS_NAMES: tuple[str, ...] = tuple(_OPTIONS)
_GRAMMAR = ("terms NAME[:WEIGHT][:OPTION=VALUE]... joined by commas, e.g. 'ce', 'ce:1.0,dice:0.5', "
            "'focal:1.0:gamma=2', 'ohem:1.0:thresh=0.7:min_kept=100000', 'ce:1.0:smoothing=0.1'")


class LossTerm(NamedTuple):
  """One term of a loss spec: the loss's name, its weight, and all its options (defaults filled)."""
  name: str
  weight: float
  options: dict


class _SpecError(ValueError):
  pass


def _option_value(name: str, key: str, text: str, term: str) -> Any:
  option = _OPTIONS[name][key]
  try:
    if isinstance(option.default, str):
      value = text
    elif isinstance(option.default, int):
      number = float(text)
      if not number.is_integer():
        raise ValueError(text)
      value = int(number)
    else:
      value = float(text)
      if not math.isfinite(value):
        raise ValueError(text)
  except ValueError:
    raise _SpecError(f'{key}={text!r} in {term!r}: {key} is {option.accepts}') from None
  if not option.check(value):
    raise _SpecError(f'{key}={text!r} in {term!r}: {key} is {option.accepts}')
  return value


def _parse_term(term: str) -> LossTerm:
  parts = [p.strip() for p in term.split(':')]
  name, rest = parts[0], parts[1:]
  if name not in _OPTIONS:
    raise _SpecError(f'unknown loss {name!r} in {term!r}; the losses are '
                     f'{", ".join(LOSS_NAMES)}')
  weight = 1.0
  if rest and '=' not in rest[0]:
    text, rest = rest[0], rest[1:]
    try:
      weight = float(text)
    except ValueError:
      raise _SpecError(f'weight {text!r} in {term!r} is not a number') from None
    if not (math.isfinite(weight) and weight >= 0):
      raise _SpecError(f'weight {text!r} in {term!r}: a weight is a number >= 0')
  known = _OPTIONS[name]
  valid_keys = (f'{name} takes {", ".join(f"{k}= ({o.accepts})" for k, o in known.items())}'
                if known else f'{name} takes no options')
  options = {k: o.default for k, o in known.items()}
  seen = set()
  for part in rest:
    key, eq, text = (s.strip() for s in part.partition('='))
    if not eq or not key:
      raise _SpecError(f'{part!r} in {term!r} is neither a weight nor OPTION=VALUE; {valid_keys}')
    if key not in known:
      raise _SpecError(f'unknown option {key!r} in {term!r}; {valid_keys}')
    if key in seen:
      raise _SpecError(f'option {key!r} given twice in {term!r}')
    seen.add(key)
    options[key] = _option_value(name, key, text, term)
  return LossTerm(name, weight, options)


def _parse(spec) -> tuple[LossTerm, ...]:
  if not isinstance(spec, str):
    raise _SpecError(f'a loss spec is a string, not {type(spec).__name__}')
  if not spec.strip():
    raise _SpecError('empty: give at least one term')
  terms = []
  for term in spec.split(','):
    if not term.strip():
      raise _SpecError('an empty term (two commas in a row, or one at an end)')
    terms.append(_parse_term(term.strip()))
  return tuple(terms)


def parse_loss_spec(spec: str) -> tuple[LossTerm, ...]:
  """'ce:1.0,dice:0.5' -> (LossTerm('ce', 1.0, {'smoothing': 0.0}), LossTerm('dice', 0.5,
  {'smooth': 1.0})). Raises UserError naming the bad part, the valid names and the grammar."""
  try:
    return _parse(spec)
  except _SpecError as e:
    raise UserError(f'loss spec {spec!r}: {e}. A loss spec is {_GRAMMAR}.') from None


def loss_spec_problem(spec) -> str | None:
  """What is wrong with a loss spec, for a config check listing every problem; None if fine."""
  try:
    _parse(spec)
  except _SpecError as e:
    return f'{e}; a loss spec is {_GRAMMAR}'
  return None


def check_loss_spec(spec, field: str = 'config.loss') -> tuple[LossTerm, ...]:
  """The parsed spec, or UserError naming the config field: for the checks before training."""
  problem = loss_spec_problem(spec)
  if problem is not None:
    raise UserError(f'{field}={spec!r}: {problem}')
  return _parse(spec)


def format_loss_spec(terms) -> str:
  """The canonical spec of parsed terms (options that differ from the defaults only), for logs:
  format_loss_spec(parse_loss_spec(s)) parses back to the same terms."""
  if isinstance(terms, str):
    terms = parse_loss_spec(terms)
  out = []
  for t in terms:
    changed = [f'{k}={v}' for k, v in t.options.items() if v != _OPTIONS[t.name][k].default]
    out.append(':'.join([t.name, f'{t.weight:g}', *changed]))
  return ','.join(out)


def _term_loss(term: LossTerm, logits, labels, *, ignore_label: int, normalize: bool,
               class_weights) -> jax.Array:
  o = term.options
  common = dict(ignore_label=ignore_label, class_weights=class_weights)
  if term.name == 'ce':
    if o['smoothing'] == 0:
      return cross_entropy(logits, labels, normalize=normalize, **common)
    return smoothed_cross_entropy(logits, labels, smoothing=o['smoothing'], normalize=normalize,
                                  **common)
  if term.name == 'ohem':
    return ohem_cross_entropy(logits, labels, thresh=o['thresh'], min_kept=o['min_kept'],
                              normalize=normalize, **common)
  if term.name == 'dice':
    return dice_loss(logits, labels, smooth=o['smooth'], **common)
  if term.name == 'lovasz':
    return lovasz_softmax(logits, labels, classes=o['classes'], **common)
  if term.name == 'focal':
    return focal_loss(logits, labels, gamma=o['gamma'], normalize=normalize, **common)
  raise ValueError(f'unknown loss {term.name!r}')


def segmentation_loss(logits, labels, spec: str | tuple[LossTerm, ...] = 'ce', *,
                      ignore_label: int = 255, normalize: bool = True,
                      class_weights=None) -> jax.Array:
  """The weighted sum of the spec's losses (a spec string or parse_loss_spec's terms); the
  arguments are `cross_entropy`'s. 'ce' is exactly `cross_entropy`, the reference loss."""
  terms = parse_loss_spec(spec) if isinstance(spec, str) else tuple(spec)
  if not terms:
    raise ValueError('a loss spec needs at least one term')
  total = None
  for term in terms:
    value = _term_loss(term, logits, labels, ignore_label=ignore_label, normalize=normalize,
                       class_weights=class_weights)
    if term.weight != 1.0:
      value = value * jnp.float32(term.weight)
    total = value if total is None else total + value
  return total
