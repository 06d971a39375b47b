"""Batched inference from a checkpoint: `Segmenter.load(checkpoint_dir)(images)` -> label maps.

Images of mixed sizes are grouped by bucket (each side rounded up to a multiple of `bucket_step`),
padded at the bottom and right with the preprocessing mean (0 after preprocessing), run in batches
of `batch_size` over all local devices (one compile per bucket), and cropped back to their own
size. Padding changes the scores near the padded borders a little (the layers' zero padding and
ceil-mode pools see other neighbours), so `exact=True` runs every image at its native size (one
compile per distinct size), the reference protocol.

    segmenter = Segmenter.load('runs/fcn8s')
    labels = segmenter([image_a, image_b])  # uint8 RGB (H, W, 3) each -> (H, W) uint8
    out = segmenter(images, scores=True)    # {'labels': [...], 'scores': [(H, W, C)]}

Nets trained on TIFF bands or 16-bit PNG (`preprocessing='dataset'`) take the images as stored,
(H, W, C) of the training data's type (`fcn_jax.images.read_image` reads them), or their paths.
Nets with several input modalities (NYUD colour + HHA or depth) take one dict per image,
{'color': RGB, 'hha': HHA, 'depth': depth}, with the modalities the checkpoint lists; nets with
several heads (SIFT Flow) give one {head name: labels / scores} dict per image.

Large images run by tiles (`mode='slide'`, or `'auto'` past `WHOLE_MAX_PIXELS`): overlapping
`tile` x `tile` windows every `tile_stride` pixels, batched over the devices, their scores
averaged where they overlap (mmsegmentation's slide mode); memory follows the tiles and one band
of rows, not the image, when only labels are asked for. An image that fits one tile runs whole.
Test-time augmentation (`tta='flip,0.75,1,1.25'`) averages the softmax probabilities of every
scale and flip, resized back to the image; the scores returned are then the log of that average
(their softmax is the average, their argmax the labels).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fcn_jax import checkpoint, preprocessing, pretrained
from fcn_jax import images as images_lib
from fcn_jax.errors import UserError
from fcn_jax.models import forms as forms_lib

DEFAULT_BUCKET_STEP = 64
MODES = ('auto', 'whole', 'slide')
DEFAULT_TILE, DEFAULT_TILE_STRIDE = 512, 384
# mode 'auto' runs images above this many pixels by tiles: whole-image activations of a full-width
# FCN take ~10 KB per pixel (a 12000x9000 photo would need ~1 TB).
WHOLE_MAX_PIXELS = 2048 * 2048


@dataclasses.dataclass(frozen=True)
class TTA:
  """Test-time augmentation: the scales and whether to add horizontal flips."""
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False

  @classmethod
  def parse(cls, spec: 'str | TTA | None') -> 'TTA | None':
    """'flip,0.75,1,1.25' (any order; scales are numbers, 'flip' adds mirrored views); '' or None:
    no augmentation."""
    if spec is None or isinstance(spec, TTA):
      return spec
    parts = [p.strip() for p in str(spec).split(',') if p.strip()]
    if not parts:
      return None
    scales = []
    for part in parts:
      if part == 'flip':
        continue
      try:
        scales.append(float(part))
      except ValueError:
        raise UserError(f'tta {spec!r}: {part!r} is neither "flip" nor a scale; e.g. '
                        '"flip,0.75,1,1.25"') from None
      if not 0.05 <= scales[-1] <= 8:
        raise UserError(f'tta {spec!r}: scale {part} outside 0.05..8')
    return cls(tuple(scales) or (1.0,), 'flip' in parts)

  @property
  def views(self) -> list[tuple[float, bool]]:
    return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
  """Window offsets covering 0..size: every `stride`, the last one flush with the end."""
  if size <= tile:
    return [0]
  count = -(-(size - tile) // stride) + 1
  return [min(i * stride, size - tile) for i in range(count)]


def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
  if x.shape[:2] == (height, width):
    return x
  return np.asarray(jax.image.resize(jnp.asarray(x), (height, width, x.shape[-1]), 'bilinear'))


def bucket_shape(height: int, width: int, step: int) -> tuple[int, int]:
  return (math.ceil(height / step) * step, math.ceil(width / step) * step)


def is_single_image(images: Any) -> bool:
  """One image rather than a sequence of them: an (H, W) / (H, W, C) array, a path or a PIL
  image."""
  if isinstance(images, np.ndarray):
    return images.ndim in (2, 3) and images.dtype != object
  return isinstance(images, (str, os.PathLike)) or hasattr(images, 'getbands')


class Segmenter:
  """A model restored for inference, with its classes, palette and preprocessing."""

  def __init__(self, model, variables: dict, metadata: dict, *, batch_size: int = 8,
               bucket_step: int = DEFAULT_BUCKET_STEP, dtype: str | None = None,
               devices: Sequence[jax.Device] | None = None, mode: str = 'auto',
               tile: int = DEFAULT_TILE, tile_stride: int = DEFAULT_TILE_STRIDE,
               tta: 'str | TTA | None' = None):
    if batch_size < 1 or bucket_step < 1:
      raise UserError(f'batch_size ({batch_size}) and bucket_step ({bucket_step}) must be >= 1')
    if mode not in MODES:
      raise UserError(f'mode {mode!r}: one of {", ".join(MODES)}')
    if not 1 <= tile_stride <= tile:
      raise UserError(f'tile stride {tile_stride} and tile {tile}: need 1 <= stride <= tile (a '
                      'larger stride would leave pixels between the tiles)')
    self.mode, self.tile, self.tile_stride, self.tta = mode, tile, tile_stride, TTA.parse(tta)
    if dtype not in (None, 'float32', 'bfloat16'):
      raise UserError(f'dtype {dtype!r}: float32 or bfloat16')
    if dtype is not None:
      model = model.clone(dtype=jnp.dtype(dtype))
    self.model, self.metadata = model, dict(metadata)
    self.devices = list(devices or jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.asarray(self.devices), ('data',))
    self._replicated = NamedSharding(self.mesh, P())
    self._batched = NamedSharding(self.mesh, P('data'))
    self.variables = jax.device_put(variables, self._replicated)
    # Rounded up to the device count, so that every batch splits evenly over the devices.
    self.batch_size = -(-batch_size // len(self.devices)) * len(self.devices)
    self.bucket_step = bucket_step
    self.modalities = preprocessing.modalities_of(self.metadata)
    self.head_names = list(model.head_names)
    self.channels = model.arch.input_channels
    self._apply = forms_lib.jit(lambda v, x: model.apply(v, x, train=False), forms=model.forms,
                                in_shardings=(self._replicated, self._batched),
                                out_shardings=self._batched)
    self._apply_one = forms_lib.jit(lambda v, x: model.apply(v, x, train=False),
                                    forms=model.forms)
    self.compiled_shapes: set[tuple[int, ...]] = set()  # what was compiled, for tests / logs

  @classmethod
  def load(cls, checkpoint_dir, which: str = 'best', **kwargs) -> 'Segmenter':
    model, variables, metadata = checkpoint.load_inference(checkpoint_dir, which=which)
    return cls(model, variables, metadata, **kwargs)

  @classmethod
  def from_pretrained(cls, name: str, *, weights: str | os.PathLike | None = None,
                      progress: bool = True, **kwargs) -> 'Segmenter':
    """A reference net by name ('voc-fcn8s'; `python -m fcn_jax.pretrained list`): downloaded,
    verified and converted into the cache on first use, then loaded from there. `weights`: a
    local copy of the file instead of a download."""
    return cls.load(pretrained.get(name, weights=weights, progress=progress), **kwargs)

  def _head_entry(self, head: str | None) -> dict:
    for entry in self.metadata.get('heads') or ():
      if head is None or entry.get('name') == head:
        return entry
    return {}

  def class_names_of(self, head: str | None = None) -> list[str]:
    """The class names of `head` (default: the first head)."""
    entry = self._head_entry(head)
    names = entry.get('class_names') or (self.metadata.get('class_names') if not entry else None)
    if names:
      return list(names)
    n = self.model.num_classes[self.head_names.index(head) if head else 0]
    return [str(i) for i in range(n)]

  def palette_of(self, head: str | None = None):
    entry = self._head_entry(head)
    return entry.get('palette') if entry else self.metadata.get('palette')

  @property
  def class_names(self) -> list[str]:
    return self.class_names_of()

  @property
  def palette(self):
    return self.palette_of()

  def require_single_colour_net(self, what: str) -> None:
    """Raises UserError for a net with several heads or inputs besides colour, or images read as
    stored (TIFF bands; for the tools that do not handle them yet: export, serve)."""
    problem = preprocessing.not_single_colour(what, self.head_names, self.modalities)
    if problem:
      raise UserError(problem)

  @property
  def image_preprocessing(self) -> preprocessing.Preprocessing:
    """The preprocessing of the first input (the image)."""
    return preprocessing.get(self.modalities[0]['preprocessing'])

  @property
  def modality_names(self) -> list[str]:
    return [m['name'] for m in self.modalities]

  def _prepared(self, item) -> np.ndarray:
    """One image (or {modality: array}, or an image file's path) -> (H, W, C) float32 model
    input."""
    if isinstance(item, (str, os.PathLike)):  # as predict reads it: TIFF bands as stored
      item = images_lib.read_image(item, max_size=0)
    # A bare array is the first modality (an image; an HHA-only net's HHA image).
    parts = item if isinstance(item, dict) else {self.modalities[0]['name']: item}
    color = parts.get('color')
    p = self.image_preprocessing
    if color is not None and p.stored:  # TIFF bands / 16-bit data, as training read them
      color = np.asarray(color)
      color = color[..., None] if color.ndim == 2 else color
      if color.ndim != 3 or color.shape[-1] != p.channels or (p.dtype and
                                                              color.dtype.name != p.dtype):
        raise UserError(f'expected an image of {p.channels} channel(s) of {p.dtype or "numbers"}, '
                        f'(H, W, {p.channels}) as the training data stored them (TIFF or 16-bit '
                        f'PNG: fcn_jax.images.read_image), got {color.dtype} {color.shape}')
      parts = dict(parts, color=color)
    elif color is not None:
      color = np.asarray(color)
      if color.ndim != 3 or color.shape[-1] != 3 or color.dtype != np.uint8:
        raise UserError(f'expected a uint8 RGB image of shape (H, W, 3), got {color.dtype} '
                        f'{color.shape}')
    try:
      return preprocessing.prepare(parts, self.modalities)
    except ValueError as e:
      raise UserError(str(e)) from None

  def _per_head(self, result) -> dict[str, np.ndarray]:
    if isinstance(result, dict):
      return {k: np.asarray(v) for k, v in result.items()}
    return {self.head_names[0]: np.asarray(result)}

  def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
    """One padded batch (batch_size, H, W, C) through the model over all devices."""
    self.compiled_shapes.add(batch.shape)
    return self._per_head(self._apply(self.variables, batch))

  def _by_tiles(self, x: np.ndarray) -> bool:
    h, w = x.shape[:2]
    if self.mode == 'slide':
      return h > self.tile or w > self.tile
    return self.mode == 'auto' and h * w > WHOLE_MAX_PIXELS

  def _whole(self, inputs: dict[int, np.ndarray], exact: bool) -> dict[int, dict]:
    """{index: {head: (h, w, C) scores}} of whole-image inference."""
    out = {}
    if exact:
      for i, x in inputs.items():
        self.compiled_shapes.add(x.shape)
        per_head = self._per_head(self._apply_one(self.variables, x[None]))
        out[i] = {k: v[0] for k, v in per_head.items()}
      return out
    groups = collections.defaultdict(list)
    for i, x in inputs.items():
      groups[bucket_shape(*x.shape[:2], self.bucket_step)].append(i)
    for (bh, bw), indices in groups.items():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        batch = np.zeros((self.batch_size, bh, bw, self.channels), np.float32)
        for j, i in enumerate(chunk):
          h, w = inputs[i].shape[:2]
          batch[j, :h, :w] = inputs[i]
        result = self._run(batch)
        for j, i in enumerate(chunk):
          h, w = inputs[i].shape[:2]
          out[i] = {k: v[j, :h, :w] for k, v in result.items()}
    return out

  def _slide(self, x: np.ndarray, labels_only: bool) -> dict[str, np.ndarray]:
    """{head: (H, W, C) averaged scores, or (H, W) uint8 labels} of `x` by overlapping tiles.

    Tiles run a row of windows at a time; the rows no later window reaches are averaged (and
    reduced to labels) and dropped, so only one band of scores is held besides the output."""
    height, width = x.shape[:2]
    th, tw = min(self.tile, height), min(self.tile, width)
    ys, xs = tile_starts(height, th, self.tile_stride), tile_starts(width, tw, self.tile_stride)
    classes = dict(zip(self.head_names, self.model.num_classes))
    out = {h: (np.zeros((height, width), np.uint8) if labels_only else
               np.zeros((height, width, c), np.float32)) for h, c in classes.items()}
    band = {h: np.zeros((0, width, c), np.float32) for h, c in classes.items()}
    count = np.zeros((0, width, 1), np.float32)
    top = 0

    def settle(rows: int) -> None:  # rows [top, top + rows) are final
      for h in band:
        mean = band[h][:rows] / count[:rows]
        out[h][top:top + rows] = np.argmax(mean, -1).astype(np.uint8) if labels_only else mean
        band[h] = band[h][rows:]

    for y in ys:
      if y > top:
        settle(y - top)
        count, top = count[y - top:], y
      grow = y + th - top - count.shape[0]
      if grow > 0:
        count = np.concatenate([count, np.zeros((grow, width, 1), np.float32)])
        for h in band:
          band[h] = np.concatenate([band[h], np.zeros((grow, width, classes[h]), np.float32)])
      tiles = [x[y:y + th, x0:x0 + tw] for x0 in xs]
      for start in range(0, len(tiles), self.batch_size):
        chunk = tiles[start:start + self.batch_size]
        batch = np.zeros((self.batch_size, th, tw, self.channels), np.float32)
        batch[:len(chunk)] = chunk
        result = self._run(batch)
        for j, x0 in enumerate(xs[start:start + len(chunk)]):
          for h in band:
            band[h][y - top:y - top + th, x0:x0 + tw] += result[h][j]
          count[y - top:y - top + th, x0:x0 + tw] += 1
    settle(count.shape[0])
    return out

  def _raw(self, inputs: list[np.ndarray], exact: bool, labels_only: bool = False) -> list[dict]:
    """{head: scores (or labels)} per prepared input: whole, or by tiles for large ones."""
    tiled = {i for i, x in enumerate(inputs) if self._by_tiles(x)}
    out = self._whole({i: x for i, x in enumerate(inputs) if i not in tiled}, exact)
    if labels_only:
      out = {i: {h: np.argmax(v, -1).astype(np.uint8) for h, v in o.items()}
             for i, o in out.items()}
    for i in sorted(tiled):
      out[i] = self._slide(inputs[i], labels_only)
    return [out[i] for i in range(len(inputs))]

  def _augmented(self, inputs: list[np.ndarray], exact: bool) -> list[dict]:
    """Log of the probabilities averaged over the TTA views, per input and head."""
    views = self.tta.views
    batch = []
    for x in inputs:
      h, w = x.shape[:2]
      for scale, flip in views:
        v = _resize(x, max(1, round(h * scale)), max(1, round(w * scale)))
        batch.append(np.ascontiguousarray(v[:, ::-1]) if flip else v)
    raw = self._raw(batch, exact)
    out = []
    for i, x in enumerate(inputs):
      h, w = x.shape[:2]
      total = {}
      for k, (_, flip) in enumerate(views):
        for head, s in raw[i * len(views) + k].items():
          s = _resize(s[:, ::-1] if flip else s, h, w)
          p = np.asarray(jax.nn.softmax(jnp.asarray(s), -1))
          total[head] = total[head] + p if head in total else p
      out.append({head: np.log(np.maximum(p / len(views), 1e-30)).astype(np.float32)
                  for head, p in total.items()})
    return out

  def _unwrap(self, per_input: list[dict]) -> list[Any]:
    if len(self.head_names) == 1:
      return [o[self.head_names[0]] for o in per_input]
    return per_input

  def scores(self, images: Sequence[Any] | np.ndarray, exact: bool = False) -> list[Any]:
    """float32 (H, W, C) scores per image, in input order ({head: scores} for several heads). One
    image (an (H, W, C) array, a path or a PIL image) gives one result, not a list. With TTA, the
    log of the averaged probabilities."""
    if is_single_image(images):
      return self.scores([images], exact=exact)[0]
    inputs = [self._prepared(im) for im in images]
    if self.tta is not None:
      return self._unwrap(self._augmented(inputs, exact))
    return self._unwrap(self._raw(inputs, exact))

  def __call__(self, images: Sequence[Any] | np.ndarray, *, scores: bool = False,
               probabilities: bool = False, exact: bool = False) -> Any:
    """Label maps (uint8 (H, W) class ids) per image; with scores / probabilities a dict that also
    holds the float32 (H, W, C) scores or softmax probabilities. With several heads each entry is
    a {head name: array} dict. One image (an (H, W, C) array, a path or a PIL image) gives one
    result, not a list."""
    if is_single_image(images):
      result = self([images], scores=scores, probabilities=probabilities, exact=exact)
      return {k: v[0] for k, v in result.items()} if isinstance(result, dict) else result[0]
    if not (scores or probabilities) and self.tta is None:
      # Labels alone: a tiled image never holds its whole score map.
      return self._unwrap(self._raw([self._prepared(im) for im in images], exact, True))
    raw = self.scores(images, exact=exact)
    per_head = len(self.head_names) > 1
    each = lambda fn: [({k: fn(v) for k, v in s.items()} if per_head else fn(s)) for s in raw]
    labels = each(lambda s: np.argmax(s, -1).astype(np.uint8))
    if not (scores or probabilities):
      return labels
    out: dict[str, Any] = {'labels': labels}
    if scores:
      out['scores'] = raw
    if probabilities:
      out['probabilities'] = each(lambda s: np.asarray(jax.nn.softmax(jnp.asarray(s), -1)))
    return out
