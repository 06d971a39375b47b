"""Reference PyTorch FCN-ResNet for the parity tests (torch only; torchvision is not installed).

Written from torchvision's definitions (torchvision/models/resnet.py and
models/segmentation/{fcn,_utils}.py), module layout and state-dict keys included:

- `TorchResNet`: ResNet with Bottleneck blocks (expansion 4, the stride on the 3x3: v1.5),
  `_make_layer` with replace_stride_with_dilation (the first block of a dilated layer keeps the
  previous dilation), optionally the ImageNet classifier (`avgpool`, `fc`).
- `TorchFCNResNet`: torchvision's FCN: `backbone` (the ResNet up to layer4, as
  IntermediateLayerGetter keeps it), `classifier` and `aux_classifier` (FCNHead: Sequential of
  conv 3x3 no bias, BatchNorm, ReLU, Dropout(0.1), conv 1x1), F.interpolate(bilinear,
  align_corners=False) to the input; returns {'out', 'aux'}.

Every channel count is `backbones.scaled(c, width)`, and FCNHead's inter channels in_channels // 4
as in torchvision, so the nets match `models.build(..., width)`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcn_jax.models.backbones import scaled

LAYERS = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                   bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, out_planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride, dilation)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, out_planes)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    out += identity
    return self.relu(out)


class TorchResNet(nn.Module):
  def __init__(self, depth: str = 'resnet50', width: float = 1.0,
               replace_stride_with_dilation=(False, True, True), classifier: bool = False,
               num_classes: int = 1000):
    super().__init__()
    self.width = width
    self.inplanes = scaled(64, width)
    self.dilation = 1
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    blocks = LAYERS[depth]
    self.layer1 = self._make_layer(64, blocks[0])
    self.layer2 = self._make_layer(128, blocks[1], stride=2,
                                   dilate=replace_stride_with_dilation[0])
    self.layer3 = self._make_layer(256, blocks[2], stride=2,
                                   dilate=replace_stride_with_dilation[1])
    self.layer4 = self._make_layer(512, blocks[3], stride=2,
                                   dilate=replace_stride_with_dilation[2])
    if classifier:
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(scaled(512 * Bottleneck.expansion, width), num_classes)

  def _make_layer(self, planes_full: int, blocks: int, stride: int = 1, dilate: bool = False):
    planes = scaled(planes_full, self.width)
    out_planes = scaled(planes_full * Bottleneck.expansion, self.width)
    downsample = None
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    if stride != 1 or self.inplanes != out_planes:
      downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride),
                                 nn.BatchNorm2d(out_planes))
    layers = [Bottleneck(self.inplanes, planes, out_planes, stride, downsample, previous_dilation)]
    self.inplanes = out_planes
    for _ in range(1, blocks):
      layers.append(Bottleneck(self.inplanes, planes, out_planes, dilation=self.dilation))
    return nn.Sequential(*layers)

  def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer2(self.layer1(x))
    aux = self.layer3(x)
    return {'aux': aux, 'out': self.layer4(aux)}


class FCNHead(nn.Sequential):
  def __init__(self, in_channels: int, channels: int) -> None:
    inter_channels = in_channels // 4
    super().__init__(
        nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(inter_channels),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Conv2d(inter_channels, channels, 1),
    )


class TorchFCNResNet(nn.Module):
  def __init__(self, depth: str = 'resnet50', num_classes: int = 21, aux: bool = True,
               width: float = 1.0):
    super().__init__()
    self.backbone = TorchResNet(depth, width)
    self.classifier = FCNHead(scaled(2048, width), num_classes)
    self.aux_classifier = FCNHead(scaled(1024, width), num_classes) if aux else None

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    input_shape = x.shape[-2:]
    features = self.backbone.features(x)
    result = OrderedDict()
    out = self.classifier(features['out'])
    result['out'] = F.interpolate(out, size=input_shape, mode='bilinear', align_corners=False)
    if self.aux_classifier is not None:
      aux = self.aux_classifier(features['aux'])
      result['aux'] = F.interpolate(aux, size=input_shape, mode='bilinear', align_corners=False)
    return result
