"""torchvision's state dicts recognised from their keys, and rewritten where our layout differs:
ResNet depth from the blocks per layer; vgg16_bn's conv biases and classifier Linears expressed in
our vgg16_bn's conv -> BatchNorm names (fcn_jax.convert_layouts maps the result)."""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

_VGG_CONVS = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
              'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3')
# torchvision vgg16_bn: each conv (with a bias) at features.i is followed by its BatchNorm at
# features.i+1; the classifier's Linears have no BatchNorm.
_TV_VGG16_BN_FEATURES = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
_BN_EPSILON = 1e-5  # torchvision's BatchNorm2d and our vgg16_bn's


def is_torchvision_vgg16_bn(keys: Iterable[str]) -> bool:
  """Whether the keys are torchvision vgg16_bn's (a BatchNorm after the last conv, features.40)."""
  keys = set(keys)
  return {'features.40.weight', 'features.41.running_var', 'classifier.0.weight'} <= keys


def vgg16_bn_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision vgg16_bn's state dict under our vgg16_bn's names, the same function at inference:

  - each conv's bias moves into its BatchNorm's running mean (our convs before a BatchNorm have no
    bias): BN(conv(x) + b) with mean m is BN(conv(x)) with mean m - b;
  - fc6 / fc7 (Linear without BatchNorm in torchvision, conv -> BatchNorm here) get the BatchNorm
    that is the identity plus the Linear's bias: mean 0, var 1 - eps, scale 1, shift = the bias.
  Keys it does not use pass through (the classifier's last layer, num_batches_tracked)."""
  out = dict(state)
  pairs = [(name, f'features.{i}', f'features.{i + 1}')
           for name, i in zip(_VGG_CONVS, _TV_VGG16_BN_FEATURES)]
  for name, conv, bn in pairs:
    if f'{conv}.weight' not in state or f'{bn}.running_mean' not in state:
      continue  # reported as missing by the mapping
    bias = out.pop(f'{conv}.bias', np.zeros_like(state[f'{bn}.running_mean']))
    out[f'{name}.conv.weight'] = out.pop(f'{conv}.weight')
    out[f'{name}.bn.running_mean'] = out.pop(f'{bn}.running_mean') - bias
    for leaf in ('weight', 'bias', 'running_var'):
      out[f'{name}.bn.{leaf}'] = out.pop(f'{bn}.{leaf}')
  for name, linear in (('fc6', 'classifier.0'), ('fc7', 'classifier.3')):
    if f'{linear}.weight' not in state:
      continue
    weight, bias = out.pop(f'{linear}.weight'), out.pop(f'{linear}.bias')
    out[f'{name}.conv.weight'] = weight
    out[f'{name}.bn.weight'] = np.ones_like(bias)
    out[f'{name}.bn.bias'] = bias
    out[f'{name}.bn.running_mean'] = np.zeros_like(bias)
    out[f'{name}.bn.running_var'] = np.full_like(bias, 1 - _BN_EPSILON)
  return out


def resnet_depth(keys: Iterable[str]) -> tuple[str | None, str]:
  """('resnet50' | 'resnet101' | None, why) for torchvision ResNet keys (an ImageNet classifier,
  or under `backbone.` an FCN-ResNet): told apart by their blocks per layer. (None, '') when there
  are no ResNet layers; (None, why) for a ResNet no arch has (ResNet-18/34/152, ...)."""
  blocks: dict[str, set[int]] = {}
  bottleneck = False
  for key in keys:
    m = re.match(r'^(?:backbone\.)?(layer[1-4])\.(\d+)\.conv(\d)\.weight$', key)
    if m:
      blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
      bottleneck |= m.group(3) == '3'
  if not blocks:
    return None, ''
  counts = tuple(len(blocks.get(f'layer{i}', ())) for i in range(1, 5))
  for depth, expected in (('resnet50', (3, 4, 6, 3)), ('resnet101', (3, 4, 23, 3))):
    if bottleneck and counts == expected:
      return depth, f'ResNet layers of {"/".join(map(str, counts))} Bottleneck blocks: {depth}'
  kind = 'Bottleneck' if bottleneck else 'BasicBlock (no conv3)'
  return None, (f'a ResNet with {"/".join(map(str, counts))} {kind} blocks per layer: only '
                'ResNet-50 (3/4/6/3) and ResNet-101 (3/4/23/3) Bottleneck nets have an arch')
