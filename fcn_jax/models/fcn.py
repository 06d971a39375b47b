"""One FCN builder for every network of the paper: a backbone, a list of skips, bilinear upsampling.

FCN-32s/16s/8s differ only in the skip list; FCN-8s at-once also scales the pooled features it taps
(0.01 for pool4, 0.0001 for pool3). Crop offsets and the final upsampling kernel are derived from the
backbone geometry (Caffe's coord_map), and tests check them against the reference values
19 / 5, 27 / 5, 9, 31 / AlexNet 18.
"""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.models import backbones
from fcn_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Skip:
  """A skip from a pooling layer: its scores are added after upsampling the coarser scores x2."""
  tap: str
  scale: float = 1.0  # FCN-8s at-once: fixed scaling of the tapped features before scoring


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  backbone: str
  skips: tuple[Skip, ...] = ()


ARCHS: dict[str, ArchSpec] = {
    'fcn32s': ArchSpec('vgg16'),
    'fcn16s': ArchSpec('vgg16', (Skip('pool4'),)),
    'fcn8s': ArchSpec('vgg16', (Skip('pool4'), Skip('pool3'))),
    'fcn8s_atonce': ArchSpec('vgg16', (Skip('pool4', 0.01), Skip('pool3', 0.0001))),
    'fcn_alexnet': ArchSpec('alexnet'),
    'fcn_googlenet': ArchSpec('googlenet'),
}

SKIP_UPSAMPLE_KERNEL = 4  # upscore2 / upscore_pool4: k4 s2


@dataclasses.dataclass(frozen=True)
class Upsample:
  name: str
  kernel: int
  stride: int
  final: bool


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Derived layout: the upsampling layers in order, the crop of each skip and the final crop."""
  upsamples: tuple[Upsample, ...]
  skip_crops: tuple[int, ...]
  final_crop: int


def _as_int(value: Fraction, what: str) -> int:
  if value.denominator != 1 or value < 0:
    raise ValueError(f'{what} is {value}: the architecture is not aligned')
  return int(value)


def geometry(arch: ArchSpec | str) -> Geometry:
  """Upsampling layers and crop offsets of `arch` (an ArchSpec or a name in ARCHS)."""
  if isinstance(arch, str):
    if arch not in ARCHS:
      raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
    arch = ARCHS[arch]
  spec = backbones.get_backbone(arch.backbone)
  a, b = backbones.coord_map(spec)  # score_fr: x_input = a * x + b
  upsamples, crops = [], []
  prev_name = None
  for skip in arch.skips:
    name = 'upscore2' if prev_name is None else f'upscore_{prev_name}'
    k, s = SKIP_UPSAMPLE_KERNEL, 2
    upsamples.append(Upsample(name, k, s, final=False))
    # Deconvolution: x_in = (x_out - (k-1)/2) / s, so x_input = (a/s) x_out + b - a (k-1) / (2s).
    a, b = a / s, b - a * Fraction(k - 1, 2 * s)
    tap_a, tap_b = backbones.coord_map(spec, skip.tap)
    if tap_a != a:
      raise ValueError(f'skip {skip.tap} has stride {tap_a}, the upsampled scores {a}')
    crops.append(_as_int((b - tap_b) / a, f'crop offset of score_{skip.tap}'))
    prev_name = skip.tap
  stride = _as_int(a, 'final stride')
  # Caffe uses 2s for VGG16 (half-pixel alignment) and 2s - 1 for AlexNet (integer alignment): the
  # kernel whose centre makes the final crop an integer.
  kernel = 2 * stride if (2 * b).denominator == 1 and (2 * b) % 2 == 1 else 2 * stride - 1
  final_name = 'upscore' if not arch.skips else f'upscore{stride}'
  upsamples.append(Upsample(final_name, kernel, stride, final=True))
  final_crop = _as_int(Fraction(kernel - 1, 2) - b, 'final crop offset')
  return Geometry(tuple(upsamples), tuple(crops), final_crop)


class FCN(nn.Module):
  """Fully convolutional network. Input (N, H, W, 3) preprocessed images; output (N, H, W, classes)
  float32 scores, for any H, W >= 1.
  """

  arch: ArchSpec
  num_classes: int = 21
  width: float = 1.0
  dtype: Any = jnp.float32
  learnable_upsampling: bool = True  # intermediate deconvolutions; the final one is always fixed
  dropout_rate: float | None = None  # None: the classifier's own (0.5 after fc6/fc7); 0 disables
  # False drops the skips' fixed scales (FCN-8s at-once's 0.01 / 0.0001): they fit ImageNet-trained
  # features under SGD, but from scratch they mute the skips (see experiments/configs: demo).
  skip_scaling: bool = True

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected images of shape (N, H, W, 3), got {images.shape}')
    spec = backbones.get_backbone(self.arch.backbone)
    geo = geometry(self.arch)
    x = images.astype(self.dtype)
    feats = backbones.apply_backbone(spec, x, width=self.width, dtype=self.dtype, train=train,
                                     dropout_rate=self.dropout_rate)
    score = self._score('score_fr', feats['out'])
    for skip, up, crop in zip(self.arch.skips, geo.upsamples, geo.skip_crops):
      score = self._upsample(up, score)
      tapped = feats[skip.tap]
      if skip.scale != 1.0 and self.skip_scaling:
        tapped = tapped * jnp.asarray(skip.scale, self.dtype)
      score = score + layers.crop_like(self._score(f'score_{skip.tap}', tapped), crop, score.shape)
    score = self._upsample(geo.upsamples[-1], score)
    return layers.crop_like(score, geo.final_crop, images.shape).astype(jnp.float32)

  def _score(self, name: str, x: jax.Array) -> jax.Array:
    # Zero-initialised 1x1 classifiers: training starts from the backbone's features, not noise.
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name=name)(x)

  def _upsample(self, up: Upsample, x: jax.Array) -> jax.Array:
    return layers.Deconv(self.num_classes, up.kernel, up.stride, dtype=self.dtype, name=up.name)(x)

  def frozen_modules(self) -> tuple[str, ...]:
    """Top-level parameter names the optimiser must keep fixed."""
    ups = geometry(self.arch).upsamples
    return tuple(u.name for u in ups if u.final or not self.learnable_upsampling)


def build(arch: str, num_classes: int = 21, width: float = 1.0, dtype: Any = jnp.float32,
          learnable_upsampling: bool = True, dropout_rate: float | None = None,
          skip_scaling: bool = True) -> FCN:
  """The FCN named `arch` (one of ARCHS).

  Args:
    arch: fcn32s, fcn16s, fcn8s, fcn8s_atonce, fcn_alexnet or fcn_googlenet.
    num_classes: output classes (21 for PASCAL VOC).
    width: multiplies every channel count of the backbone (e.g. 1/8 for CPU tests and demos).
    dtype: compute dtype (bfloat16 on GPU/TPU); parameters stay float32 and scores are float32.
    learnable_upsampling: train the intermediate deconvolutions (the seed report) or freeze them
      (the Caffe reference). The final deconvolution is always frozen.
    dropout_rate: None keeps the classifier's dropout (0.5 after fc6 and fc7, as the paper); a
      number replaces it (0 disables it, e.g. for short from-scratch runs at reduced width).
    skip_scaling: False drops FCN-8s at-once's fixed skip scales (for training from scratch).
  """
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  if width <= 0:
    raise ValueError(f'width must be > 0, got {width}')
  return FCN(ARCHS[arch], num_classes=num_classes, width=width, dtype=dtype,
             learnable_upsampling=learnable_upsampling, dropout_rate=dropout_rate,
             skip_scaling=skip_scaling)


def frozen_mask(model: FCN, params: Any) -> Any:
  """A pytree like `params` with True on the leaves the optimiser must not change."""
  frozen = set(model.frozen_modules())
  return {name: jax.tree.map(lambda _: name in frozen, sub) for name, sub in params.items()}


def init_variables(model: FCN, rng: jax.Array, image_size: int = 1) -> dict:
  """Initial variables ({'params'} plus frozen BatchNorm statistics for GoogLeNet)."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  # Jitted: bit-identical values, but one compiled program instead of one per op and parameter
  # shape (GoogLeNet at width 1/16 on a loaded 2-core CPU: 20 s instead of 50 s). What remains is
  # XLA compiling one threefry generator per parameter (~1 s each on CPU).
  return _jit_init(model)({'params': rng, 'dropout': rng}, images)


@functools.lru_cache(maxsize=64)
def _jit_init(model: FCN):
  return jax.jit(functools.partial(model.init, train=False))


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def describe(arch: str) -> dict[str, Any]:
  """Static figures of the paper's Table 1, computed from the definition at full width.

  `params` counts learned parameters of the backbone and score layers, as the paper does (it leaves
  out the upsampling filters, which are reported in `upsampling_params`).
  """
  model = build(arch)
  spec = backbones.get_backbone(ARCHS[arch].backbone)
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))['params']
  geo = geometry(ARCHS[arch])
  up_names = {u.name for u in geo.upsamples}
  upsampling = count_params({k: v for k, v in shapes.items() if k in up_names})
  return {
      'arch': arch,
      'backbone': ARCHS[arch].backbone,
      'conv_layers': backbones.conv_depth(spec) + 1,  # + score_fr
      'params': count_params(shapes) - upsampling,
      'upsampling_params': upsampling,
      'receptive_field': backbones.receptive_field(spec),
      'max_stride': backbones.max_stride(spec),
      'skip_crops': geo.skip_crops,
      'final_crop': geo.final_crop,
      'upsampling': [dataclasses.asdict(u) for u in geo.upsamples],
  }
