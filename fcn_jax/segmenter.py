"""Batched inference from a checkpoint: `Segmenter.load(checkpoint_dir)(images)` -> label maps.

Images of mixed sizes are grouped by bucket (each side rounded up to a multiple of `bucket_step`),
padded at the bottom and right with the preprocessing mean (0 after preprocessing), run in batches
of `batch_size` over all local devices (one compile per bucket), and cropped back to their own
size. Padding changes the scores near the padded borders a little (the layers' zero padding and
ceil-mode pools see other neighbours), so `exact=True` runs every image at its native size (one
compile per distinct size), the reference protocol.

    segmenter = Segmenter.load('runs/fcn8s')
    labels = segmenter([image_a, image_b])                 # uint8 RGB (H, W, 3) each -> (H, W) uint8
    out = segmenter(images, scores=True)                   # {'labels': [...], 'scores': [(H, W, C)]}
"""

from __future__ import annotations

import collections
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fcn_jax import checkpoint, preprocessing
from fcn_jax.errors import UserError

DEFAULT_BUCKET_STEP = 64


def bucket_shape(height: int, width: int, step: int) -> tuple[int, int]:
  return (math.ceil(height / step) * step, math.ceil(width / step) * step)


class Segmenter:
  """A model restored for inference, with its classes, palette and preprocessing."""

  def __init__(self, model, variables: dict, metadata: dict, *, batch_size: int = 8,
               bucket_step: int = DEFAULT_BUCKET_STEP, dtype: str | None = None,
               devices: Sequence[jax.Device] | None = None):
    if batch_size < 1 or bucket_step < 1:
      raise UserError(f'batch_size ({batch_size}) and bucket_step ({bucket_step}) must be >= 1')
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
    self.preprocess = preprocessing.get(metadata['preprocessing'])
    self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False),
                          in_shardings=(self._replicated, self._batched),
                          out_shardings=self._batched)
    self._apply_one = jax.jit(lambda v, x: model.apply(v, x, train=False))
    self.compiled_shapes: set[tuple[int, ...]] = set()  # what was compiled, for tests / logs

  @classmethod
  def load(cls, checkpoint_dir, which: str = 'best', **kwargs) -> 'Segmenter':
    model, variables, metadata = checkpoint.load_inference(checkpoint_dir, which=which)
    return cls(model, variables, metadata, **kwargs)

  @property
  def class_names(self) -> list[str]:
    n = self.metadata.get('num_classes', 21)
    return list(self.metadata.get('class_names') or [str(i) for i in range(n)])

  @property
  def palette(self):
    return self.metadata.get('palette')

  def _check(self, image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise UserError(f'expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}')
    return image

  def scores(self, images: Sequence[np.ndarray] | np.ndarray, exact: bool = False) -> list[np.ndarray]:
    """float32 (H, W, C) scores per image, in input order."""
    images = [self._check(im) for im in images]
    out: list[np.ndarray | None] = [None] * len(images)
    if exact:
      for i, image in enumerate(images):
        self.compiled_shapes.add(image.shape)
        out[i] = np.asarray(self._apply_one(self.variables, self.preprocess(image)[None]))[0]
      return out
    groups = collections.defaultdict(list)
    for i, image in enumerate(images):
      groups[bucket_shape(*image.shape[:2], self.bucket_step)].append(i)
    for (bh, bw), indices in groups.items():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        batch = np.zeros((self.batch_size, bh, bw, 3), np.float32)
        for j, i in enumerate(chunk):
          h, w = images[i].shape[:2]
          batch[j, :h, :w] = self.preprocess(images[i])
        self.compiled_shapes.add(batch.shape)
        result = np.asarray(self._apply(self.variables, batch))
        for j, i in enumerate(chunk):
          h, w = images[i].shape[:2]
          out[i] = result[j, :h, :w]
    return out

  def __call__(self, images: Sequence[np.ndarray] | np.ndarray, *, scores: bool = False,
               probabilities: bool = False, exact: bool = False) -> Any:
    """Label maps (uint8 (H, W) class ids) per image; with scores / probabilities a dict that also
    holds the float32 (H, W, C) scores or softmax probabilities."""
    raw = self.scores(images, exact=exact)
    labels = [np.argmax(s, -1).astype(np.uint8) for s in raw]
    if not (scores or probabilities):
      return labels
    out: dict[str, Any] = {'labels': labels}
    if scores:
      out['scores'] = raw
    if probabilities:
      out['probabilities'] = [np.asarray(jax.nn.softmax(jnp.asarray(s), -1)) for s in raw]
    return out
