"""Reference PyTorch networks for the import/parity tests (torch only; no torchvision needed).

- `TorchFCN`: the PyTorch port of the Caffe FCNs (wkentaro/pytorch-fcn layout and keys): ceil-mode
  pooling, conv1_1 padding 100, fc6/fc7 as convolutions, ConvTranspose2d(bias=False) upsampling and
  the Caffe crops (19 / 5, 27 / 5, 9, 31), FCN-8s at-once scaling pool4 by 0.01 and pool3 by 1e-4.
- `TorchVGG16`, `TorchAlexNet`, `TorchGoogLeNet`: torchvision's ImageNet classifiers (module layout
  and state-dict keys of torchvision.models), at a reduced width.
- `backbone_fcn(net, ...)`: the FCN built on one of those classifiers the way the paper does it
  (pad 100 on the first convolution, ceil pooling, fc layers transplanted into convolutions), with the
  score layer and the bilinear upsampling given explicitly.

Every channel count is `backbones.scaled(c, width)`, so the nets match `models.build(..., width)`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fcn_jax.models.backbones import scaled

VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def bilinear_weight(channels: int, k: int) -> torch.Tensor:
  """ConvTranspose2d weight (C, C, k, k): Caffe's upsample_filt on the class diagonal."""
  factor = (k + 1) // 2
  center = factor - 1 if k % 2 == 1 else factor - 0.5
  og = np.ogrid[:k, :k]
  filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
  w = np.zeros((channels, channels, k, k), np.float32)
  w[range(channels), range(channels)] = filt
  return torch.from_numpy(w)


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
  """Random non-zero weights with He scaling (activations stay O(1) through 16 layers)."""
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        w = m.weight
        fan_in = w[0].numel() if not isinstance(m, nn.ConvTranspose2d) else w.shape[0] * w.shape[2] * w.shape[3] / 4
        w.copy_(torch.randn(w.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=generator))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
  for m in module.modules():
    if isinstance(m, TorchFCN):
      m.per_class_final_upsampling_()
  return module.eval()


# --------------------------------------------------------------------------------------------------
# The Caffe FCNs (pytorch-fcn layout)


class TorchFCN(nn.Module):
  UPSAMPLING = {
      'fcn32s': (('upscore', 64, 32),),
      'fcn16s': (('upscore2', 4, 2), ('upscore16', 32, 16)),
      'fcn8s': (('upscore2', 4, 2), ('upscore_pool4', 4, 2), ('upscore8', 16, 8)),
      'fcn8s_atonce': (('upscore2', 4, 2), ('upscore_pool4', 4, 2), ('upscore8', 16, 8)),
  }

  def __init__(self, arch: str, n_class: int = 21, width: float = 1.0):
    super().__init__()
    self.arch = arch
    c = lambda f: scaled(f, width)
    in_ch = 3
    for block, (features, convs) in enumerate(VGG_BLOCKS, 1):
      for i in range(1, convs + 1):
        pad = 100 if (block, i) == (1, 1) else 1
        setattr(self, f'conv{block}_{i}', nn.Conv2d(in_ch, c(features), 3, padding=pad))
        in_ch = c(features)
      setattr(self, f'pool{block}', nn.MaxPool2d(2, stride=2, ceil_mode=True))
    self.fc6 = nn.Conv2d(c(512), c(4096), 7)
    self.fc7 = nn.Conv2d(c(4096), c(4096), 1)
    self.score_fr = nn.Conv2d(c(4096), n_class, 1)
    if arch != 'fcn32s':
      self.score_pool4 = nn.Conv2d(c(512), n_class, 1)
    if arch in ('fcn8s', 'fcn8s_atonce'):
      self.score_pool3 = nn.Conv2d(c(256), n_class, 1)
    for name, k, s in self.UPSAMPLING[arch]:
      setattr(self, name, nn.ConvTranspose2d(n_class, n_class, k, stride=s, bias=False))
    self.per_class_final_upsampling_()

  def per_class_final_upsampling_(self) -> None:
    """Zero the final upsampling's off-diagonal weights: in every reference net it upsamples each
    class by itself (fcn_jax computes it that way and refuses other files); any filter on the
    diagonal."""
    up = getattr(self, self.UPSAMPLING[self.arch][-1][0])
    with torch.no_grad():
      up.weight.mul_(torch.eye(up.weight.shape[0], up.weight.shape[1])[:, :, None, None])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = x
    pools = {}
    for block, (_, convs) in enumerate(VGG_BLOCKS, 1):
      for i in range(1, convs + 1):
        h = F.relu(getattr(self, f'conv{block}_{i}')(h))
      h = getattr(self, f'pool{block}')(h)
      pools[block] = h
    h = F.relu(self.fc6(h))  # dropout: identity at test time
    h = F.relu(self.fc7(h))
    h = self.score_fr(h)
    if self.arch == 'fcn32s':
      h = self.upscore(h)
      return h[:, :, 19:19 + x.size(2), 19:19 + x.size(3)].contiguous()
    atonce = self.arch == 'fcn8s_atonce'
    upscore2 = self.upscore2(h)
    h = self.score_pool4(pools[4] * 0.01 if atonce else pools[4])
    h = h[:, :, 5:5 + upscore2.size(2), 5:5 + upscore2.size(3)]
    h = upscore2 + h
    if self.arch == 'fcn16s':
      h = self.upscore16(h)
      return h[:, :, 27:27 + x.size(2), 27:27 + x.size(3)].contiguous()
    upscore_pool4 = self.upscore_pool4(h)
    h = self.score_pool3(pools[3] * 0.0001 if atonce else pools[3])
    h = h[:, :, 9:9 + upscore_pool4.size(2), 9:9 + upscore_pool4.size(3)]
    h = upscore_pool4 + h
    h = self.upscore8(h)
    return h[:, :, 31:31 + x.size(2), 31:31 + x.size(3)].contiguous()


# --------------------------------------------------------------------------------------------------
# torchvision's ImageNet classifiers (layout and keys), at a reduced width


class TorchVGG16(nn.Module):
  """torchvision's vgg16 (`batch_norm`: vgg16_bn, conv -> BatchNorm2d -> ReLU in `features`)."""

  def __init__(self, width: float = 1.0, num_classes: int = 1000, batch_norm: bool = False):
    super().__init__()
    self.batch_norm = batch_norm
    c = lambda f: scaled(f, width)
    layers, in_ch = [], 3
    for features, convs in VGG_BLOCKS:
      for _ in range(convs):
        layers += [nn.Conv2d(in_ch, c(features), 3, padding=1),
                   *([nn.BatchNorm2d(c(features))] if batch_norm else []), nn.ReLU(inplace=True)]
        in_ch = c(features)
      layers.append(nn.MaxPool2d(2, 2))
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(c(512) * 49, c(4096)), nn.ReLU(True), nn.Dropout(),
        nn.Linear(c(4096), c(4096)), nn.ReLU(True), nn.Dropout(),
        nn.Linear(c(4096), num_classes))


class TorchAlexNet(nn.Module):
  def __init__(self, width: float = 1.0, num_classes: int = 1000):
    super().__init__()
    c = lambda f: scaled(f, width)
    self.features = nn.Sequential(
        nn.Conv2d(3, c(64), 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c(64), c(192), 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c(192), c(384), 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c(384), c(256), 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c(256), c(256), 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    self.classifier = nn.Sequential(
        nn.Dropout(), nn.Linear(c(256) * 36, c(4096)), nn.ReLU(inplace=True),
        nn.Dropout(), nn.Linear(c(4096), c(4096)), nn.ReLU(inplace=True),
        nn.Linear(c(4096), num_classes))


class BasicConv2d(nn.Module):
  def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

  def forward(self, x, padding=None):
    if padding is None:
      x = self.conv(x)
    else:
      x = F.conv2d(x, self.conv.weight, None, self.conv.stride, padding)
    return F.relu(self.bn(x))


class Inception(nn.Module):
  def __init__(self, in_ch, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
    super().__init__()
    self.branch1 = BasicConv2d(in_ch, ch1x1, 1)
    self.branch2 = nn.Sequential(BasicConv2d(in_ch, ch3x3red, 1), BasicConv2d(ch3x3red, ch3x3, 3, padding=1))
    # torchvision's "5x5" branch uses a 3x3 kernel (as in the released weights).
    self.branch3 = nn.Sequential(BasicConv2d(in_ch, ch5x5red, 1), BasicConv2d(ch5x5red, ch5x5, 3, padding=1))
    self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                 BasicConv2d(in_ch, pool_proj, 1))

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
  def __init__(self, in_ch, num_classes, width):
    super().__init__()
    self.conv = BasicConv2d(in_ch, scaled(128, width), 1)
    self.fc1 = nn.Linear(scaled(128, width) * 16, scaled(1024, width))
    self.fc2 = nn.Linear(scaled(1024, width), num_classes)


GOOGLENET_INCEPTIONS = (
    ('inception3a', (64, 96, 128, 16, 32, 32)), ('inception3b', (128, 128, 192, 32, 96, 64)),
    ('maxpool3', None),
    ('inception4a', (192, 96, 208, 16, 48, 64)), ('inception4b', (160, 112, 224, 24, 64, 64)),
    ('inception4c', (128, 128, 256, 24, 64, 64)), ('inception4d', (112, 144, 288, 32, 64, 64)),
    ('inception4e', (256, 160, 320, 32, 128, 128)),
    ('maxpool4', None),
    ('inception5a', (256, 160, 320, 32, 128, 128)), ('inception5b', (384, 192, 384, 48, 128, 128)),
)


class TorchGoogLeNet(nn.Module):
  """torchvision.models.GoogLeNet (aux_logits=True layout), transform_input left to the caller."""

  def __init__(self, width: float = 1.0, num_classes: int = 1000):
    super().__init__()
    c = lambda f: scaled(f, width)
    self.conv1 = BasicConv2d(3, c(64), 7, stride=2, padding=3)
    self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.conv2 = BasicConv2d(c(64), c(64), 1)
    self.conv3 = BasicConv2d(c(64), c(192), 3, padding=1)
    self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    in_ch = c(192)
    channels_at = {}
    for name, cfg in GOOGLENET_INCEPTIONS:
      if cfg is None:
        setattr(self, name, nn.MaxPool2d(3, 2, ceil_mode=True) if name == 'maxpool3'
                else nn.MaxPool2d(2, 2, ceil_mode=True))
        continue
      cs = [c(v) for v in cfg]
      setattr(self, name, Inception(in_ch, *cs))
      in_ch = cs[0] + cs[2] + cs[4] + cs[5]
      channels_at[name] = in_ch
    self.aux1 = InceptionAux(channels_at['inception4a'], num_classes, width)
    self.aux2 = InceptionAux(channels_at['inception4d'], num_classes, width)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(0.2)
    self.fc = nn.Linear(in_ch, num_classes)


# --------------------------------------------------------------------------------------------------
# FCNs on the torchvision classifiers (the paper's "convolutionalization")


def _features_fcn(features: nn.Sequential, x: torch.Tensor, first_pad: int = 100) -> torch.Tensor:
  h, first = x, True
  for m in features:
    if isinstance(m, nn.Conv2d):
      h = F.conv2d(h, m.weight, m.bias, m.stride, first_pad if first else m.padding)
      first = False
    elif isinstance(m, nn.BatchNorm2d):
      h = m(h)  # eval mode: the running statistics
    elif isinstance(m, nn.ReLU):
      h = F.relu(h)
    elif isinstance(m, nn.MaxPool2d):
      h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, ceil_mode=True)
  return h


def _fc_as_conv(h: torch.Tensor, linear: nn.Linear, k: int, padding: int = 0) -> torch.Tensor:
  w = linear.weight.reshape(linear.weight.shape[0], -1, k, k)
  return F.relu(F.conv2d(h, w, linear.bias, padding=padding))


def backbone_fcn(net: nn.Module, x: torch.Tensor, score: nn.Conv2d, up_kernel: int, up_stride: int,
                 crop: int) -> torch.Tensor:
  """FCN-32s-style net on a torchvision classifier: scores, bilinear x`up_stride`, crop."""
  if isinstance(net, TorchVGG16) and net.batch_norm:
    # fcn_jax's vgg16_bn backbone is 'same'-padded: 1 on conv1_1, 3 on the 7x7 fc6.
    h = _features_fcn(net.features, x, first_pad=1)
    h = _fc_as_conv(h, net.classifier[0], 7, padding=3)
    h = _fc_as_conv(h, net.classifier[3], 1)
  elif isinstance(net, TorchVGG16):
    h = _features_fcn(net.features, x)
    h = _fc_as_conv(h, net.classifier[0], 7)
    h = _fc_as_conv(h, net.classifier[3], 1)
  elif isinstance(net, TorchAlexNet):
    h = _features_fcn(net.features, x)
    h = _fc_as_conv(h, net.classifier[1], 6)
    h = _fc_as_conv(h, net.classifier[4], 1)
  elif isinstance(net, TorchGoogLeNet):
    h = net.conv1(x, padding=100)
    h = net.maxpool1(h)
    h = net.conv3(net.conv2(h))
    h = net.maxpool2(h)
    for name, _ in GOOGLENET_INCEPTIONS:
      h = getattr(net, name)(h)
  else:
    raise TypeError(type(net))
  h = score(h)
  n = score.out_channels
  h = F.conv_transpose2d(h, bilinear_weight(n, up_kernel), stride=up_stride)
  return h[:, :, crop:crop + x.size(2), crop:crop + x.size(3)].contiguous()
