"""One FCN builder for every network of the paper: a backbone, a list of skips, bilinear upsampling.

FCN-32s/16s/8s differ only in the skip list; FCN-8s at-once also scales the pooled features it taps
(0.01 for pool4, 0.0001 for pool3). Crop offsets and the final upsampling kernel are derived from
the backbone geometry (Caffe's coord_map), and tests check them against the reference values
19 / 5, 27 / 5, 9, 31 / AlexNet 18.

torchvision's FCN-ResNet50/101 are the same builder with the other head type: its FCNHead (3x3 conv,
BatchNorm, ReLU, dropout, 1x1 scores) on a dilated ResNet (output stride 8), an optional auxiliary
FCNHead on layer3, and bilinear resizing of the scores to the input instead of deconvolutions.
"""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction
import inspect
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.models import backbones
from fcn_jax.models import layers
from fcn_jax.models import forms as forms_lib


@dataclasses.dataclass(frozen=True)
class Skip:
  """A skip from a pooling layer: its scores are added after upsampling the coarser scores x2."""
  tap: str
  scale: float = 1.0  # FCN-8s at-once: fixed scaling of the tapped features before scoring


@dataclasses.dataclass(frozen=True)
class Head:
  """One output of the net: its own score layers, skips and upsampling on the shared trunk."""
  name: str = 'labels'  # what the head predicts (file names, metadata, metrics)
  suffix: str = ''      # appended to its Caffe layer names (SIFT Flow: score_fr_sem, upscore2_geo)


@dataclasses.dataclass(frozen=True)
class Stream:
  """One input stream: a complete backbone over `channels` input channels.

  Several streams (NYUD late fusion) average their score maps at each level before upsampling.
  """
  channels: int = 3
  suffix: str = ''  # appended to its layer names (late fusion: conv1_1color ... score_frhha)
  renames: tuple[tuple[str, str], ...] = ()  # early fusion: (('conv1_1', 'conv1_1_bgrd'),)

  def name_of(self, name: str) -> str:
    return dict(self.renames).get(name, name) + self.suffix


# How the scores are made and brought to the input size (ArchSpec.head_type).
CAFFE_HEADS = 'caffe'  # 1x1 score layers, skips, deconvolutions and Caffe crops (the paper's nets)
# torchvision's FCNHead on the last features (3x3 conv to a quarter of the channels, BatchNorm,
# ReLU, dropout, 1x1 scores), then bilinear resizing to the input (align_corners=False).
TORCHVISION_HEADS = 'torchvision'
TORCHVISION_HEAD_DROPOUT = 0.1
AUX_OUTPUT = 'aux'  # the output name of the auxiliary head (build(aux=True))


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  backbone: str
  skips: tuple[Skip, ...] = ()
  heads: tuple[Head, ...] = (Head(),)
  streams: tuple[Stream, ...] = (Stream(),)
  default_classes: tuple[int, ...] = (21,)  # per head, when build() is not told
  head_type: str = CAFFE_HEADS
  aux_tap: str = ''  # torchvision heads: the features of the auxiliary head (build(aux=True))

  @property
  def input_channels(self) -> int:
    return sum(s.channels for s in self.streams)


_SIFT_FLOW_HEADS = (Head('semantic', '_sem'), Head('geometric', '_geo'))
_FCN16S_SKIPS = (Skip('pool4'),)
_FCN8S_SKIPS = (Skip('pool4'), Skip('pool3'))
_LATE_FUSION = (Stream(3, 'color'), Stream(3, 'hha'))

ARCHS: dict[str, ArchSpec] = {
    'fcn32s': ArchSpec('vgg16'),
    'fcn16s': ArchSpec('vgg16', _FCN16S_SKIPS),
    'fcn8s': ArchSpec('vgg16', _FCN8S_SKIPS),
    'fcn8s_atonce': ArchSpec('vgg16', (Skip('pool4', 0.01), Skip('pool3', 0.0001))),
    'fcn_alexnet': ArchSpec('alexnet'),           # torchvision AlexNet layout
    'fcn_alexnet_caffe': ArchSpec('caffenet'),    # the released voc-fcn-alexnet (CaffeNet layout)
    'fcn_googlenet': ArchSpec('googlenet'),
    # SIFT Flow: semantic and geometric heads on one VGG16 trunk.
    'fcn32s_two_heads': ArchSpec('vgg16', heads=_SIFT_FLOW_HEADS, default_classes=(33, 3)),
    'fcn16s_two_heads': ArchSpec('vgg16', _FCN16S_SKIPS, heads=_SIFT_FLOW_HEADS,
                                 default_classes=(33, 3)),
    'fcn8s_two_heads': ArchSpec('vgg16', _FCN8S_SKIPS, heads=_SIFT_FLOW_HEADS,
                                default_classes=(33, 3)),
    # NYUDv2 colour + log depth, early fusion: a 4-channel first convolution.
    'fcn32s_early_fusion': ArchSpec(
        'vgg16', streams=(Stream(4, renames=(('conv1_1', 'conv1_1_bgrd'),)),),
        default_classes=(40,)),
    # NYUDv2 colour and HHA, late fusion: two complete streams, score maps averaged.
    'fcn32s_late_fusion': ArchSpec('vgg16', streams=_LATE_FUSION, default_classes=(40,)),
    'fcn16s_late_fusion': ArchSpec('vgg16', _FCN16S_SKIPS, streams=_LATE_FUSION,
                                   default_classes=(40,)),
    # torchvision.models.segmentation.fcn_resnet50 / fcn_resnet101 (ResNet dilated to stride 8).
    'fcn_resnet50': ArchSpec('resnet50', head_type=TORCHVISION_HEADS, aux_tap='layer3'),
    'fcn_resnet101': ArchSpec('resnet101', head_type=TORCHVISION_HEADS, aux_tap='layer3'),
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
  skip_crops: tuple[int, ...]  # < 0: the upsampled scores are cropped to the tap (vgg16_bn)
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
  if arch.head_type == TORCHVISION_HEADS:
    return Geometry((), (), 0)  # no deconvolutions or crops: the scores are resized to the input
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
    crop = (b - tap_b) / a
    if crop.denominator != 1:
      raise ValueError(f'crop offset of score_{skip.tap} is {crop}: the architecture is not '
                       f'aligned')
    # Caffe's nets (pad 100): the tapped scores are cropped to the upsampled ones. 'Same'-padded
    # backbones (vgg16_bn): the upsampled scores start before the tap (a negative offset) and are
    # cropped to it instead; the sum then lies on the tap's grid.
    crops.append(int(crop))
    if crop < 0:
      b = tap_b
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
  """Fully convolutional network. Input (N, H, W, C) preprocessed inputs (C = arch.input_channels:
  the modalities concatenated, e.g. 3 for colour, 4 for colour + depth, 6 for colour and HHA);
  output (N, H, W, classes) float32 scores, for any H, W >= 1, or with several heads a dict
  {head name: scores}. With `aux` (torchvision heads) a dict {head name: scores, 'aux': the
  auxiliary head's scores}, in training and at test time alike (as torchvision's FCN).
  """

  arch: ArchSpec
  num_classes: tuple[int, ...] = (21,)  # one per head
  width: float = 1.0
  dtype: Any = jnp.float32
  learnable_upsampling: bool = True  # intermediate deconvolutions; the final one is always fixed
  dropout_rate: float | None = None  # None: the classifier's own (0.5 after fc6/fc7); 0 disables
  # False drops the skips' fixed scales (FCN-8s at-once's 0.01 / 0.0001): they fit ImageNet-trained
  # features under SGD, but from scratch they mute the skips (see experiments/configs: demo).
  skip_scaling: bool = True
  # The CPU forms of the layers (fcn_jax.models.forms, fcn_jax.tune): chosen per machine when the
  # model is built, not part of the model config (a checkpoint runs anywhere). None: chosen at
  # trace time.
  forms: forms_lib.Forms | None = None
  aux: bool = False  # torchvision heads: also the auxiliary head's scores (AUX_OUTPUT)
  # BatchNorm that would train (vgg16_bn, ResNet, the torchvision heads) keeps its running
  # statistics in training too (fine-tuning with small batches); its scale and bias still learn.
  bn_frozen: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array | dict[str, jax.Array]:
    channels = self.arch.input_channels
    if images.ndim != 4 or images.shape[-1] != channels:
      raise ValueError(f'expected inputs of shape (N, H, W, {channels}), got {images.shape}')
    if self.aux and not self.arch.aux_tap:
      raise ValueError('aux=True needs an arch with an auxiliary head (torchvision heads)')
    spec = backbones.get_backbone(self.arch.backbone)
    geo = geometry(self.arch)
    x = images.astype(self.dtype)
    features, start = [], 0
    for stream in self.arch.streams:
      features.append(backbones.apply_backbone(
          spec, x[..., start:start + stream.channels], width=self.width, dtype=self.dtype,
          train=train, dropout_rate=self.dropout_rate, name_of=stream.name_of, forms=self.forms,
          bn_frozen=self.bn_frozen))
      start += stream.channels
    if self.arch.head_type == TORCHVISION_HEADS:
      return self._torchvision_heads(images, features, train)
    outputs = {}
    for head, num_classes in zip(self.arch.heads, self.num_classes):
      score = self._fused_score(head, num_classes, 'fr', features, 'out', 1.0)
      for skip, up, crop in zip(self.arch.skips, geo.upsamples, geo.skip_crops):
        score = self._upsample(head, num_classes, up, score)
        scale = skip.scale if self.skip_scaling else 1.0
        tapped = self._fused_score(head, num_classes, skip.tap, features, skip.tap, scale)
        if crop >= 0:
          score = score + layers.crop_like(tapped, crop, score.shape)
        else:  # a 'same'-padded backbone: the upsampled scores cover the tap (see geometry)
          score = layers.crop_like(score, -crop, tapped.shape) + tapped
      score = self._upsample(head, num_classes, geo.upsamples[-1], score)
      outputs[head.name] = layers.crop_like(score, geo.final_crop, images.shape).astype(jnp.float32)
    return outputs if len(outputs) > 1 else outputs[self.arch.heads[0].name]

  def _fused_score(self, head: Head, num_classes: int, level: str, features: list[dict], tap: str,
                   scale: float) -> jax.Array:
    """score_<level><head suffix><stream suffix> per stream, averaged over the streams (Caffe
    Eltwise SUM with coefficients 1/n: late fusion's score_fused = 0.5 colour + 0.5 HHA)."""
    scores = []
    for stream, feats in zip(self.arch.streams, features):
      tapped = feats[tap]
      if scale != 1.0:
        tapped = tapped * jnp.asarray(scale, self.dtype)
      scores.append(self._score(f'score_{level}{head.suffix}{stream.suffix}', num_classes, tapped))
    if len(scores) == 1:
      return scores[0]
    return sum(scores[1:], scores[0]) * jnp.asarray(1 / len(scores), scores[0].dtype)

  def _torchvision_heads(self, images: jax.Array, features: list[dict], train: bool
                         ) -> jax.Array | dict[str, jax.Array]:
    """torchvision's FCN: an FCNHead per head on the last features (and with `aux` one on
    arch.aux_tap's), each resized bilinearly to the input (align_corners=False)."""
    if len(features) != 1 or self.arch.skips:
      raise ValueError('torchvision heads take one stream and no skips')
    feats = features[0]
    outputs = {head.name: self._fcn_head(f'score_fr{head.suffix}', n, feats['out'], train)
               for head, n in zip(self.arch.heads, self.num_classes)}
    if self.aux:
      outputs[AUX_OUTPUT] = self._fcn_head('score_aux', self.num_classes[0],
                                           feats[self.arch.aux_tap], train)
    # Scores are resized in float32 (a few channels: cheap, and bfloat16 would round them).
    outputs = {name: layers.resize_bilinear(score.astype(jnp.float32), images.shape[1:3])
               for name, score in outputs.items()}
    return outputs if len(outputs) > 1 else outputs[self.arch.heads[0].name]

  def _fcn_head(self, name: str, num_classes: int, x: jax.Array, train: bool) -> jax.Array:
    """torchvision's FCNHead: 3x3 conv (no bias) to a quarter of the channels, BatchNorm (eps
    1e-5), ReLU, dropout (0.1 unless dropout_rate says otherwise), 1x1 conv to the classes.
    Parameters <name>_conv/{conv, bn} and <name> (the zero-initialised score layer)."""
    x = backbones.ConvBN(max(1, x.shape[-1] // 4), 3, padding=1, dtype=self.dtype,
                         forms=self.forms, trained=not self.bn_frozen, epsilon=1e-5,
                         name=f'{name}_conv')(x, train)
    rate = TORCHVISION_HEAD_DROPOUT if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(rate, deterministic=not train or rate == 0)(x)
    return self._score(name, num_classes, x)

  def _score(self, name: str, num_classes: int, x: jax.Array) -> jax.Array:
    # Zero-initialised 1x1 classifiers: training starts from the backbone's features, not noise.
    return nn.Conv(num_classes, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name=name)(x)

  def _upsample(self, head: Head, num_classes: int, up: Upsample, x: jax.Array) -> jax.Array:
    # The final upsampling is frozen and diagonal: computed per class (layers.Deconv).
    return layers.Deconv(num_classes, up.kernel, up.stride, dtype=self.dtype, per_class=up.final,
                         forms=self.forms, name=f'{up.name}{head.suffix}')(x)

  @property
  def head_names(self) -> tuple[str, ...]:
    return tuple(h.name for h in self.arch.heads)

  def final_upsampling_modules(self) -> tuple[str, ...]:
    """Top-level parameter names of the final (per-class, frozen) upsamplings, one per head (none
    for torchvision heads, which resize)."""
    ups = geometry(self.arch).upsamples
    return tuple(f'{ups[-1].name}{h.suffix}' for h in self.arch.heads) if ups else ()

  def frozen_modules(self) -> tuple[str, ...]:
    """Top-level parameter names the optimiser must keep fixed."""
    ups = geometry(self.arch).upsamples
    return tuple(f'{u.name}{h.suffix}' for h in self.arch.heads for u in ups
                 if u.final or not self.learnable_upsampling)


def head_classes(arch: str, num_classes: int | Sequence[int] | None) -> tuple[int, ...]:
  """num_classes as one count per head of `arch` (an int is the count of a single-headed net;
  None the arch's default)."""
  heads = ARCHS[arch].heads
  if num_classes is None:
    return ARCHS[arch].default_classes
  counts = (num_classes,) if isinstance(num_classes, (int, np.integer)) else tuple(num_classes)
  if len(counts) != len(heads):
    names = ', '.join(h.name for h in heads)
    raise ValueError(f'{arch} has {len(heads)} heads ({names}): num_classes needs {len(heads)} '
                     f'counts, got {num_classes!r}')
  if any(int(c) < 1 for c in counts):
    raise ValueError(f'num_classes must be >= 1, got {num_classes!r}')
  return tuple(int(c) for c in counts)


def build(arch: str, num_classes: int | Sequence[int] | None = None, width: float = 1.0,
          dtype: Any = jnp.float32, learnable_upsampling: bool = True,
          dropout_rate: float | None = None, skip_scaling: bool = True, backbone: str = '',
          aux: bool = False, bn_frozen: bool = False, in_channels: int = 0) -> FCN:
  """The FCN named `arch` (one of ARCHS). Its keyword arguments are the model config: what
  `train` reads from config.model and what every checkpoint stores as metadata['model'].

  Args:
    arch: one of ARCHS (fcn32s, fcn16s, fcn8s, fcn8s_atonce, fcn_alexnet, fcn_alexnet_caffe,
      fcn_googlenet, fcn{32,16,8}s_two_heads, fcn32s_early_fusion, fcn{32,16}s_late_fusion,
      fcn_resnet50, fcn_resnet101).
    num_classes: output classes (21 for PASCAL VOC); one count per head for several heads
      (SIFT Flow: (33, 3)). None: the arch's default (21; two heads (33, 3); NYUD fusion 40).
    width: multiplies every channel count of the backbone (e.g. 1/8 for CPU tests and demos).
    dtype: compute dtype (bfloat16 on GPU/TPU); parameters stay float32 and scores are float32.
    learnable_upsampling: train the intermediate deconvolutions (the seed report) or freeze them
      (the Caffe reference). The final deconvolution is always frozen.
    dropout_rate: None keeps the classifier's dropout (0.5 after fc6 and fc7, as the paper; 0.1 in
      torchvision's FCNHead); a number replaces it (0 disables it, e.g. for short from-scratch runs
      at reduced width).
    skip_scaling: False drops FCN-8s at-once's fixed skip scales (for training from scratch).
    backbone: '' keeps the arch's own; 'vgg16_bn' replaces a VGG16 one by VGG16 with BatchNorm
      that trains and 'same' padding (no pad of 100), for training from scratch (the `scratch`
      preset). Its BatchNorm statistics live in the `batch_stats` collection: training applies
      the net with train=True and mutable=['batch_stats'].
    aux: fcn_resnet50/101: also torchvision's auxiliary FCNHead on layer3; the net then returns
      {head name: scores, 'aux': scores} (the auxiliary loss is the training's business).
    bn_frozen: BatchNorm that trains (vgg16_bn, ResNet and its heads; statistics in the
      `batch_stats` collection) keeps its running statistics instead, for fine-tuning with small
      batches; False trains them (from scratch).
    in_channels: 0 keeps the arch's input channels (3: colour); another count is the input of a
      single-input arch's first convolution (multispectral bands, 16-bit greyscale: the
      `dataset` preprocessing). Fine-tuning from RGB weights adapts that convolution
      (fcn_jax.train.transfer).

  The model takes the default CPU forms (`forms.active()`); `fcn_jax.tune.tuned(model)` gives it
  this machine's (the entry points do: training, checkpoint.load_inference, the benchmarks).
  """
  if arch not in ARCHS:
    raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(ARCHS)}')
  if width <= 0:
    raise ValueError(f'width must be > 0, got {width}')
  spec = ARCHS[arch]
  if backbone and backbone != spec.backbone:
    if (spec.backbone, backbone) not in BACKBONE_VARIANTS:
      variants = sorted(v for b, v in BACKBONE_VARIANTS if b == spec.backbone)
      raise ValueError(f'{arch} has a {spec.backbone} backbone: backbone={backbone!r} cannot '
                       f'replace it (choose one of {variants or "none"}, or leave it empty)')
    spec = dataclasses.replace(spec, backbone=backbone)
  if in_channels and in_channels != spec.input_channels:
    if len(spec.streams) != 1 or in_channels < 1:
      raise ValueError(f'in_channels={in_channels}: {arch} takes {spec.input_channels} channels '
                       f'in {len(spec.streams)} streams; a count >= 1 fits single-input archs')
    spec = dataclasses.replace(spec, streams=(dataclasses.replace(spec.streams[0],
                                                                  channels=int(in_channels)),))
  if aux and not spec.aux_tap:
    with_aux = sorted(name for name, s in ARCHS.items() if s.aux_tap)
    raise ValueError(f'{arch} has no auxiliary head; aux=True is for {", ".join(with_aux)}')
  return FCN(spec, num_classes=head_classes(arch, num_classes), width=width,
             dtype=jnp.dtype(dtype), learnable_upsampling=learnable_upsampling,
             dropout_rate=dropout_rate, skip_scaling=skip_scaling,
             forms=forms_lib.active(), aux=bool(aux), bn_frozen=bool(bn_frozen))


# (the arch's backbone, a backbone that may replace it) for build(backbone=...): the same taps.
BACKBONE_VARIANTS = {('vgg16', 'vgg16_bn')}


MODEL_CONFIG_FIELDS = tuple(inspect.signature(build).parameters)


def build_from_config(model_config: Mapping[str, Any]) -> FCN:
  """`build(**model_config)`, with a clear error for a field `build` does not know."""
  unknown = sorted(set(model_config) - set(MODEL_CONFIG_FIELDS))
  if unknown:
    raise ValueError(f'unknown model config fields {unknown}; known: {list(MODEL_CONFIG_FIELDS)}')
  return build(**model_config)


def frozen_mask(model: FCN, params: Any) -> Any:
  """A pytree like `params` with True on the leaves the optimiser must not change."""
  frozen = set(model.frozen_modules())
  return {name: jax.tree.map(lambda _: name in frozen, sub) for name, sub in params.items()}


def init_variables(model: FCN, rng: jax.Array, image_size: int = 1) -> dict:
  """Initial variables ({'params'} plus BatchNorm statistics: frozen for GoogLeNet, trained for
  vgg16_bn and ResNet unless bn_frozen)."""
  images = jnp.zeros((1, image_size, image_size, model.arch.input_channels), jnp.float32)
  # Jitted: one compiled program instead of one per op and parameter shape. With the sequential
  # (not partitionable) threefry: XLA:CPU compiles jax's partitionable form slowly, per parameter
  # (FCN-8s at 1/16 width on a loaded 2-core CPU: 78 s against 13 s). The values are drawn once,
  # on the host, then replicated: nothing here is sharded, so nothing needs the partitionable form.
  with jax.threefry_partitionable(False):
    return _jit_init(model)({'params': rng, 'dropout': rng}, images)


@functools.lru_cache(maxsize=64)
def _jit_init(model: FCN):
  return jax.jit(functools.partial(model.init, train=False))


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def describe(arch: str, backbone: str = '', flops_size: int | None = None) -> dict[str, Any]:
  """Static figures of the paper's Table 1, computed from the definition at full width.

  `params` counts learned parameters of the backbone and score layers, as the paper does (it leaves
  out the upsampling filters, which are reported in `upsampling_params`). torchvision heads: the
  auxiliary head is left out of `params` too (build's default is aux=False) and reported in
  `aux_params`; `receptive_field` and `conv_layers` then include the head's 3x3 conv.
  `backbone`: as build's (vgg16_bn for a VGG16 arch). `flops_size`: also `gflops`, XLA's count of
  one forward pass on a flops_size x flops_size image (2 per multiply-add; lowered, not run).
  """
  model = build(arch, backbone=backbone)
  spec = ARCHS[arch]
  if backbone:
    spec = dataclasses.replace(spec, backbone=backbone)
  backbone = backbones.get_backbone(spec.backbone)
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))['params']
  geo = geometry(spec)
  up_names = {f'{u.name}{h.suffix}' for u in geo.upsamples for h in spec.heads}
  upsampling = count_params({k: v for k, v in shapes.items() if k in up_names})
  stride = backbones.max_stride(backbone)
  # After the backbone: score_fr (1x1), or the FCNHead's 3x3 conv and its 1x1 scores.
  torchvision = spec.head_type == TORCHVISION_HEADS
  head_convs, head_growth = (2, 2 * stride) if torchvision else (1, 0)
  figures = {
      'arch': arch,
      'backbone': spec.backbone,
      'heads': {h.name: n for h, n in zip(spec.heads, model.num_classes)},
      'head_type': spec.head_type,
      'input_channels': spec.input_channels,
      'streams': len(spec.streams),
      'conv_layers': backbones.conv_depth(backbone) + head_convs,  # along one stream
      'params': count_params(shapes) - upsampling,
      'upsampling_params': upsampling,
      'receptive_field': backbones.receptive_field(backbone) + head_growth,
      'max_stride': stride,
      'skip_crops': geo.skip_crops,
      'final_crop': geo.final_crop,
      'upsampling': [dataclasses.asdict(u) for u in geo.upsamples],  # deconvolutions
      'resize': 'bilinear, align_corners=False' if torchvision else None,  # scores to the input
  }
  if spec.aux_tap:
    with_aux = build(arch, aux=True)
    aux_shapes = jax.eval_shape(lambda: init_variables(with_aux, jax.random.key(0)))['params']
    figures['aux_params'] = count_params(aux_shapes) - count_params(shapes)
  if flops_size:
    figures['gflops'] = forward_flops(model, flops_size) / 1e9
  return figures


def forward_flops(model: FCN, size: int) -> float:
  """XLA's flop count (2 per multiply-add) of one forward pass on a size x size image, with plain
  XLA convolutions (the CPU forms rewrite some, not their arithmetic); lowered only."""
  plain = model.clone(forms=forms_lib.PLAIN_XLA)
  variables = jax.eval_shape(lambda: init_variables(plain, jax.random.key(0)))
  image = jax.ShapeDtypeStruct((1, size, size, plain.arch.input_channels), jnp.float32)
  cost = jax.jit(lambda v, x: plain.apply(v, x, train=False)).lower(variables, image)
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])
