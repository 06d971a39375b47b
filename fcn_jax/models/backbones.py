"""Convolutionalised classifiers (VGG16, AlexNet, GoogLeNet, ResNet-50/101) described as data.

A backbone is a tuple of layer specs. The same tuple drives the flax module (`Backbone`) and the
geometry (`coord_map`, `receptive_field`, `conv_depth`), so the figures of the paper's Table 1 and
the Caffe crop offsets are computed from the network definition, never typed in.

Layer names follow Caffe for VGG16/AlexNet (conv1_1..conv5_3, fc6, fc7) and torchvision for
GoogLeNet (conv1, conv2, conv3, inception3a..5b with branch1..branch4) and ResNet (conv1, layer1..4
with their blocks as layer1_0, layer1_1, ...), so that weights from either can be imported by name.
"""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction
from typing import Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_jax.models import layers
from fcn_jax.models import forms as forms_lib
from fcn_jax.models import cpu_kernels

# The FCN input padding: with 100 pixels on the first convolution the score map covers the input,
# and the output is aligned to it, for ANY input size (Caffe voc-fcn*/net.py).
FIRST_CONV_PAD = 100


@dataclasses.dataclass(frozen=True)
class Conv:
  name: str
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  batch_norm: bool = False  # torchvision BasicConv2d: conv without bias, BatchNorm(eps=1e-3), ReLU
  groups: int = 1  # Caffe `group`: input and output channels split into this many halves
  # vgg16_bn: conv without bias -> BatchNorm that trains (batch statistics in training, running
  # averages in the `batch_stats` collection otherwise) -> ReLU.
  trained_bn: bool = False


@dataclasses.dataclass(frozen=True)
class MaxPool:
  name: str
  window: int
  stride: int
  padding: int = 0
  ceil: bool = True  # Caffe's rounding (the paper's nets); False: PyTorch's default (ResNet)


@dataclasses.dataclass(frozen=True)
class Dropout:
  rate: float


@dataclasses.dataclass(frozen=True)
class LRN:
  """Caffe LRN across channels: x / (k + alpha / size * sum of x^2 over `size` channels)^beta."""
  name: str
  size: int = 5
  alpha: float = 1e-4
  beta: float = 0.75
  k: float = 1.0


@dataclasses.dataclass(frozen=True)
class Inception:
  """torchvision's Inception block (its "5x5" branch uses a 3x3 kernel, as in the released
  weights)."""
  name: str
  c1: int
  c3_reduce: int
  c3: int
  c5_reduce: int
  c5: int
  pool_proj: int

  @property
  def features(self) -> int:
    return self.c1 + self.c3 + self.c5 + self.pool_proj


@dataclasses.dataclass(frozen=True)
class ResLayer:
  """torchvision ResNet's layerN: `blocks` Bottlenecks (1x1 -> 3x3 -> 1x1, expansion 4, each conv
  followed by BatchNorm). The first block has the stride (on its 3x3: ResNet v1.5) and a projection
  shortcut (1x1 conv + BatchNorm). `dilation` is that of the 3x3s; torchvision's _make_layer gives
  the first block the previous layer's (`first_dilation`) when a stride is replaced by dilation."""
  name: str
  planes: int
  blocks: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1

  @property
  def features(self) -> int:
    return self.planes * BOTTLENECK_EXPANSION


BOTTLENECK_EXPANSION = 4

Layer = Union[Conv, MaxPool, Dropout, Inception, LRN, ResLayer]


def _vgg16() -> tuple[Layer, ...]:
  spec: list[Layer] = []
  for block, (features, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
    for i in range(1, convs + 1):
      pad = FIRST_CONV_PAD if (block, i) == (1, 1) else 1
      spec.append(Conv(f'conv{block}_{i}', features, 3, padding=pad))
    spec.append(MaxPool(f'pool{block}', 2, 2))
  spec += [Conv('fc6', 4096, 7), Dropout(0.5), Conv('fc7', 4096, 1), Dropout(0.5)]
  return tuple(spec)


def _alexnet() -> tuple[Layer, ...]:
  # torchvision layout (64/192/384/256/256 channels, no groups, no LRN); Caffe's pad 100 on conv1.
  return (
      Conv('conv1', 64, 11, stride=4, padding=FIRST_CONV_PAD), MaxPool('pool1', 3, 2),
      Conv('conv2', 192, 5, padding=2), MaxPool('pool2', 3, 2),
      Conv('conv3', 384, 3, padding=1), Conv('conv4', 256, 3, padding=1),
      Conv('conv5', 256, 3, padding=1), MaxPool('pool5', 3, 2),
      Conv('fc6', 4096, 6), Dropout(0.5), Conv('fc7', 4096, 1), Dropout(0.5),
  )


def _caffenet() -> tuple[Layer, ...]:
  # CaffeNet / the released voc-fcn-alexnet: 96-channel conv1, LRN after pool1 and pool2, conv2/4/5
  # in two groups (the two GPUs of Krizhevsky et al.).
  return (
      Conv('conv1', 96, 11, stride=4, padding=FIRST_CONV_PAD), MaxPool('pool1', 3, 2), LRN('norm1'),
      Conv('conv2', 256, 5, padding=2, groups=2), MaxPool('pool2', 3, 2), LRN('norm2'),
      Conv('conv3', 384, 3, padding=1), Conv('conv4', 384, 3, padding=1, groups=2),
      Conv('conv5', 256, 3, padding=1, groups=2), MaxPool('pool5', 3, 2),
      Conv('fc6', 4096, 6), Dropout(0.5), Conv('fc7', 4096, 1), Dropout(0.5),
  )


def _googlenet() -> tuple[Layer, ...]:
  # torchvision GoogLeNet without aux classifiers, final average pooling and fc.
  return (
      Conv('conv1', 64, 7, stride=2, padding=FIRST_CONV_PAD, batch_norm=True),
      MaxPool('maxpool1', 3, 2),
      Conv('conv2', 64, 1, batch_norm=True),
      Conv('conv3', 192, 3, padding=1, batch_norm=True),
      MaxPool('maxpool2', 3, 2),
      Inception('inception3a', 64, 96, 128, 16, 32, 32),
      Inception('inception3b', 128, 128, 192, 32, 96, 64),
      MaxPool('maxpool3', 3, 2),
      Inception('inception4a', 192, 96, 208, 16, 48, 64),
      Inception('inception4b', 160, 112, 224, 24, 64, 64),
      Inception('inception4c', 128, 128, 256, 24, 64, 64),
      Inception('inception4d', 112, 144, 288, 32, 64, 64),
      Inception('inception4e', 256, 160, 320, 32, 128, 128),
      MaxPool('maxpool4', 2, 2),
      Inception('inception5a', 256, 160, 320, 32, 128, 128),
      Inception('inception5b', 384, 192, 384, 48, 128, 128),
      Dropout(0.2),  # torchvision's dropout before its classifier
  )


def _vgg16_bn() -> tuple[Layer, ...]:
  """VGG16 with BatchNorm after every convolution (torchvision vgg16_bn's conv -> BN -> ReLU, here
  also on fc6 / fc7, and without the conv bias BN makes redundant), for training from scratch.

  'Same' padding throughout (1 on conv1_1, 3 on the 7x7 fc6) instead of the pad of 100: the score
  maps are as large as the input / stride, not (input + 200) / stride, which halves the work on a
  256 crop. The skips' crop offsets come out as -1 (the upsampled scores start one cell before the
  tapped map): `geometry` then crops the upsampled scores to the tap instead (see FCN.__call__).
  """
  spec: list[Layer] = []
  for block, (features, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
    for i in range(1, convs + 1):
      spec.append(Conv(f'conv{block}_{i}', features, 3, padding=1, trained_bn=True))
    spec.append(MaxPool(f'pool{block}', 2, 2))
  spec += [Conv('fc6', 4096, 7, padding=3, trained_bn=True), Dropout(0.5),
           Conv('fc7', 4096, 1, trained_bn=True), Dropout(0.5)]
  return tuple(spec)


def _resnet(blocks_per_layer: tuple[int, int, int, int],
            replace_stride_with_dilation: tuple[bool, bool, bool] = (False, True, True)
            ) -> tuple[Layer, ...]:
  """torchvision's ResNet (Bottleneck) up to layer4, as its segmentation models build it:
  replace_stride_with_dilation=[False, True, True] keeps layer3 and layer4 at stride 8, dilating
  their 3x3s by 2 and 4 instead (torchvision _make_layer's rule, first_dilation included).
  BatchNorm eps 1e-5; the stem pools with PyTorch's floor rounding. No average pooling, no fc."""
  spec: list[Layer] = [Conv('conv1', 64, 7, stride=2, padding=3, trained_bn=True),
                       MaxPool('maxpool', 3, 2, padding=1, ceil=False)]
  dilation = 1
  for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_layer)):
    stride, previous = (1 if i == 0 else 2), dilation
    if i > 0 and replace_stride_with_dilation[i - 1]:
      dilation, stride = dilation * stride, 1
    spec.append(ResLayer(f'layer{i + 1}', planes, blocks, stride, dilation, previous))
  return tuple(spec)


BACKBONES = {'vgg16': _vgg16, 'vgg16_bn': _vgg16_bn, 'alexnet': _alexnet, 'caffenet': _caffenet,
             'googlenet': _googlenet,
             'resnet50': lambda: _resnet((3, 4, 6, 3)), 'resnet101': lambda: _resnet((3, 4, 23, 3))}


def get_backbone(name: str) -> tuple[Layer, ...]:
  try:
    return BACKBONES[name]()
  except KeyError:
    raise ValueError(f'unknown backbone {name!r}; choose one of {sorted(BACKBONES)}') from None


# ---------------------------------------------------------------------------------------------
# Geometry, from the spec alone.


def _windows(layer: Layer) -> list[tuple[int, int, int]]:
  """(kernel, stride, padding) of each spatial window along the layer's longest path; a dilated
  kernel counts with its extent, dilation * (kernel - 1) + 1."""
  if isinstance(layer, Conv):
    return [(layer.kernel, layer.stride, layer.padding)]
  if isinstance(layer, MaxPool):
    return [(layer.window, layer.stride, layer.padding)]
  if isinstance(layer, Inception):
    # Every branch is centred; the widest kernel is 3 (1x1 then 3x3, or pool then 1x1).
    return [(3, 1, 1)]
  if isinstance(layer, ResLayer):
    # The 3x3 of each block (padding = dilation, so centred); the 1x1s and shortcuts add nothing.
    d0, d = layer.first_dilation, layer.dilation
    return [(2 * d0 + 1, layer.stride, d0)] + [(2 * d + 1, 1, d)] * (layer.blocks - 1)
  return []


def coord_map(spec: tuple[Layer, ...], upto: str | None = None) -> tuple[Fraction, Fraction]:
  """Caffe coord_map: input coordinate = a * (coordinate in the output of `upto`) + b.

  `upto=None` maps through the whole spec.
  """
  a, b = Fraction(1), Fraction(0)
  for layer in spec:
    for k, s, p in _windows(layer):
      b += a * (Fraction(k - 1, 2) - p)
      a *= s
    if upto is not None and getattr(layer, 'name', None) == upto:
      return a, b
  if upto is not None:
    raise ValueError(f'no layer named {upto!r} in the backbone')
  return a, b


def receptive_field(spec: tuple[Layer, ...]) -> int:
  rf, jump = 1, 1
  for layer in spec:
    for k, s, _ in _windows(layer):
      rf += (k - 1) * jump
      jump *= s
  return rf


def max_stride(spec: tuple[Layer, ...]) -> int:
  return int(coord_map(spec)[0])


def conv_depth(spec: tuple[Layer, ...]) -> int:
  """Convolutions on the longest path from the input (an Inception block is two deep, a
  Bottleneck three)."""
  depth = 0
  for layer in spec:
    if isinstance(layer, Conv):
      depth += 1
    elif isinstance(layer, Inception):
      depth += 2
    elif isinstance(layer, ResLayer):
      depth += 3 * layer.blocks
  return depth


# ---------------------------------------------------------------------------------------------
# Modules.


def scaled(features: int, width: float) -> int:
  """Channel count under the width multiplier (at least one channel)."""
  return max(1, int(round(features * width)))


def conv_relu(layer: Conv, width: float, dtype: jnp.dtype, name: str | None = None,
              forms: forms_lib.Forms | None = None, train: bool = False, bn_frozen: bool = False):
  """The flax module for one Conv spec: Conv + ReLU, torchvision's BasicConv2d, or conv -> BN ->
  ReLU with trained statistics (`train`: batch statistics, updating the running averages; not with
  `bn_frozen`, which keeps them fixed for fine-tuning); `forms`: the CPU forms of the convolution
  (None: forms.active() at trace time)."""
  features = scaled(layer.features, width)
  name = name or layer.name
  if layer.trained_bn or layer.batch_norm:
    block = ConvBN(features, layer.kernel, layer.stride, layer.padding, dtype=dtype, forms=forms,
                   trained=layer.trained_bn and not bn_frozen,
                   epsilon=1e-5 if layer.trained_bn else 1e-3, name=name)
    return lambda x: block(x, train)
  if features % layer.groups:
    raise ValueError(f'{layer.name}: {features} channels at width {width:g} do not split into '
                     f'{layer.groups} groups; choose a width that keeps them even')
  conv = nn.Conv(features, (layer.kernel, layer.kernel), strides=layer.stride,
                 padding=[(layer.padding, layer.padding)] * 2, dtype=dtype,
                 feature_group_count=layer.groups, kernel_init=nn.initializers.he_normal(),
                 conv_general_dilated=cpu_kernels.conv_with(forms), name=name)
  return lambda x: nn.relu(conv(x))


class ConvBN(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU. Frozen statistics (`trained=False`: torchvision's
  BasicConv2d, eps 1e-3; the paper fine-tunes with small batches of variably sized crops), or
  trained ones (vgg16_bn and ResNet, eps 1e-5): batch statistics when `train` (the running averages
  in `batch_stats` are updated, so the caller applies with mutable=['batch_stats']), the running
  averages otherwise. `relu=False`: a Bottleneck's last conv and its shortcut (the ReLU follows the
  sum)."""

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  dtype: jnp.dtype = jnp.float32
  forms: forms_lib.Forms | None = None
  trained: bool = False
  epsilon: float = 1e-3
  dilation: int = 1
  relu: bool = True
  # Running averages keep 10% of each step's batch statistics: a from-scratch run of a few
  # thousand steps needs averages that follow its weights (flax's default 0.99 lags ~100 steps).
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                padding=[(self.padding, self.padding)] * 2, kernel_dilation=self.dilation,
                use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.he_normal(),
                conv_general_dilated=cpu_kernels.conv_with(self.forms), name='conv')(x)
    x = nn.BatchNorm(use_running_average=not (self.trained and train), momentum=self.momentum,
                     epsilon=self.epsilon, dtype=self.dtype, name='bn')(x)
    return nn.relu(x) if self.relu else x


class InceptionBlock(nn.Module):
  spec: Inception
  width: float
  dtype: jnp.dtype = jnp.float32
  forms: forms_lib.Forms | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s, w = self.spec, self.width
    unit = lambda f, k, name: ConvBN(scaled(f, w), k, padding=k // 2, dtype=self.dtype,
                                     forms=self.forms, name=name)
    b1 = unit(s.c1, 1, 'branch1')(x)
    b2 = unit(s.c3, 3, 'branch2_1')(unit(s.c3_reduce, 1, 'branch2_0')(x))
    b3 = unit(s.c5, 3, 'branch3_1')(unit(s.c5_reduce, 1, 'branch3_0')(x))
    b4 = unit(s.pool_proj, 1, 'branch4_1')(layers.max_pool_ceil(x, 3, 1, 1, forms=self.forms))
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): conv1 1x1 -> conv2 3x3 (stride, dilation) -> conv3 1x1, each
  with BatchNorm, plus the shortcut (identity, or `downsample`: 1x1 conv with the stride and
  BatchNorm), then ReLU. Parameters conv1..conv3/{conv, bn} and downsample/{conv, bn}."""

  planes: int
  features: int
  stride: int = 1
  dilation: int = 1
  projection: bool = False
  dtype: jnp.dtype = jnp.float32
  forms: forms_lib.Forms | None = None
  trained: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvBN, dtype=self.dtype, forms=self.forms, trained=self.trained,
                             epsilon=1e-5)
    y = unit(self.planes, 1, name='conv1')(x, train)
    y = unit(self.planes, 3, self.stride, self.dilation, dilation=self.dilation,
             name='conv2')(y, train)
    y = unit(self.features, 1, relu=False, name='conv3')(y, train)
    if self.projection:
      x = unit(self.features, 1, self.stride, relu=False, name='downsample')(x, train)
    return nn.relu(y + x)


def apply_res_layer(layer: ResLayer, x: jax.Array, *, width: float, dtype: jnp.dtype, train: bool,
                    name_of=lambda name: name, forms: forms_lib.Forms | None = None,
                    bn_frozen: bool = False) -> jax.Array:
  """A ResLayer's blocks, named <layer>_<i> (layer1_0, ...) in the calling module's scope. The
  first block always projects its shortcut (at full width that is torchvision's rule: its stride
  or its channel count changes in every layer; here independent of `width`)."""
  planes, features = scaled(layer.planes, width), scaled(layer.features, width)
  for i in range(layer.blocks):
    first = i == 0
    x = Bottleneck(planes, features, stride=layer.stride if first else 1,
                   dilation=layer.first_dilation if first else layer.dilation, projection=first,
                   dtype=dtype, forms=forms, trained=not bn_frozen,
                   name=name_of(f'{layer.name}_{i}'))(x, train)
  return x


def apply_backbone(spec: tuple[Layer, ...], x: jax.Array, *, width: float, dtype: jnp.dtype,
                   train: bool, dropout_rate: float | None = None,
                   name_of=lambda name: name,
                   forms: forms_lib.Forms | None = None,
                   bn_frozen: bool = False) -> dict[str, jax.Array]:
  """Runs a layer spec inside the calling module's compact scope (so parameters are named
  conv1_1, fc6, ... at the top level, as in Caffe; `name_of` renames them, e.g. conv1_1color).
  `bn_frozen`: BatchNorm that would train keeps its running statistics (fine-tuning).

  Input (N, H, W, C). Returns {'out': (N, h, w, C')} plus the output of every pooling layer and
  ResNet layer by name.
  """
  taps = {}
  for layer in spec:
    if isinstance(layer, Conv):
      x = conv_relu(layer, width, dtype, name=name_of(layer.name), forms=forms, train=train,
                    bn_frozen=bn_frozen)(x)
    elif isinstance(layer, MaxPool):
      pool = layers.max_pool_ceil if layer.ceil else layers.max_pool_floor
      x = pool(x, layer.window, layer.stride, layer.padding, forms=forms)
      taps[layer.name] = x
    elif isinstance(layer, ResLayer):
      x = apply_res_layer(layer, x, width=width, dtype=dtype, train=train, name_of=name_of,
                          forms=forms, bn_frozen=bn_frozen)
      taps[layer.name] = x
    elif isinstance(layer, LRN):
      x = layers.lrn_across_channels(x, layer.size, layer.alpha, layer.beta, layer.k)
    elif isinstance(layer, Inception):
      x = InceptionBlock(layer, width, dtype=dtype, forms=forms, name=name_of(layer.name))(x)
    elif isinstance(layer, Dropout):
      # Elementwise, training only (Caffe Dropout).
      rate = layer.rate if dropout_rate is None else dropout_rate
      x = nn.Dropout(rate, deterministic=not train or rate == 0)(x)
    else:
      raise TypeError(f'unknown layer {layer!r}')
  taps['out'] = x
  return taps
