"""The benchmarked FCNs in PyTorch (optional extra: torch only, never imported by fcn_jax).

Built from the reference nets of tests/torch_fcn.py (Caffe geometry, torchvision-layout backbones),
with what a training step needs on top: dropout in training mode (elementwise, after fc6/fc7 and
before GoogLeNet's score layer, as fcn_jax does), frozen BatchNorm statistics (GoogLeNet), and the
bilinear upsampling weight held as a buffer so the whole net moves to the GPU.
"""

from __future__ import annotations

import pathlib
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

_TESTS = pathlib.Path(__file__).resolve().parents[1] / 'tests'
if str(_TESTS) not in sys.path:
  sys.path.insert(0, str(_TESTS))

import torch_fcn  # noqa: E402  (tests/torch_fcn.py)
import torch_resnet  # noqa: E402  (tests/torch_resnet.py)

from fcn_jax.models import fcn as fcn_lib  # noqa: E402
from fcn_jax.models.backbones import scaled  # noqa: E402


class VGGFCN(torch_fcn.TorchFCN):
  """pytorch-fcn's FCN-32s/16s/8s with dropout 0.5 after fc6 and fc7 (relu(d*x) == d*relu(x))."""

  def __init__(self, arch: str, n_class: int = 21, width: float = 1.0):
    super().__init__(arch, n_class, width)
    self.fc6 = nn.Sequential(self.fc6, nn.Dropout(0.5))
    self.fc7 = nn.Sequential(self.fc7, nn.Dropout(0.5))


class BackboneFCN(nn.Module):
  """FCN-AlexNet / FCN-GoogLeNet on the torchvision-layout classifiers (pad 100, ceil pooling,
  fc layers as convolutions), score layer, fixed bilinear upsampling and the Caffe crop."""

  def __init__(self, arch: str, n_class: int = 21, width: float = 1.0):
    super().__init__()
    self.arch = arch
    geo = fcn_lib.geometry(fcn_lib.ARCHS[arch])
    up = geo.upsamples[-1]
    self.stride, self.crop = up.stride, geo.final_crop
    self.register_buffer('up_weight', torch_fcn.bilinear_weight(n_class, up.kernel))
    if arch == 'fcn_alexnet':
      self.net = torch_fcn.TorchAlexNet(width)
      channels = scaled(4096, width)
    elif arch == 'fcn_googlenet':
      self.net = torch_fcn.TorchGoogLeNet(width)
      del self.net.aux1, self.net.aux2, self.net.fc
      channels = sum(scaled(c, width) for c in (384, 384, 128, 128))
    else:
      raise ValueError(arch)
    self.score = nn.Conv2d(channels, n_class, 1)

  def train(self, mode: bool = True):
    super().train(mode)
    for m in self.modules():  # fcn_jax keeps BatchNorm statistics frozen
      if isinstance(m, nn.BatchNorm2d):
        m.eval()
    return self

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    net = self.net
    if self.arch == 'fcn_alexnet':
      h = torch_fcn._features_fcn(net.features, x)
      h = F.dropout(torch_fcn._fc_as_conv(h, net.classifier[1], 6), 0.5, self.training)
      h = F.dropout(torch_fcn._fc_as_conv(h, net.classifier[4], 1), 0.5, self.training)
    else:
      h = net.conv1(x, padding=100)
      h = net.maxpool1(h)
      h = net.conv3(net.conv2(h))
      h = net.maxpool2(h)
      for name, _ in torch_fcn.GOOGLENET_INCEPTIONS:
        h = getattr(net, name)(h)
      h = F.dropout(h, 0.2, self.training)
    h = F.conv_transpose2d(self.score(h), self.up_weight.to(h.dtype), stride=self.stride)
    c = self.crop
    return h[:, :, c:c + x.size(2), c:c + x.size(3)]


class ResNetFCN(torch_resnet.TorchFCNResNet):
  """torchvision's fcn_resnet50 / fcn_resnet101 without the auxiliary head (fcn_jax's default),
  returning the scores tensor; BatchNorm trains (batch statistics), as fcn_jax's does."""

  def __init__(self, arch: str, n_class: int = 21, width: float = 1.0):
    super().__init__(fcn_lib.ARCHS[arch].backbone, n_class, aux=False, width=width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return super().forward(x)['out']


def _conv_bn(in_ch: int, out_ch: int, k: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ScratchFCN8s(nn.Module):
  """The `scratch` preset's net (experiments/configs/common.py): FCN-8s at-once on VGG16 with
  BatchNorm that trains (conv without bias -> BN -> ReLU, fc6 / fc7 too), 'same' padding, no
  dropout, no skip scales, the two inner deconvolutions learnt and the x8 one a fixed per-class
  bilinear; each upsampled map cropped to its tap, as fcn_jax's vgg16_bn geometry does."""

  def __init__(self, n_class: int = 21, width: float = 1.0):
    super().__init__()
    c = lambda f: scaled(f, width)
    blocks, in_ch = [], 3
    for features, convs in torch_fcn.VGG_BLOCKS:
      layers = []
      for _ in range(convs):
        layers.append(_conv_bn(in_ch, c(features), 3))
        in_ch = c(features)
      blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2, 2, ceil_mode=True)))
    self.blocks = nn.ModuleList(blocks)
    self.fc6, self.fc7 = _conv_bn(c(512), c(4096), 7), _conv_bn(c(4096), c(4096), 1)
    self.score_fr = nn.Conv2d(c(4096), n_class, 1)
    self.score_pool4 = nn.Conv2d(c(512), n_class, 1)
    self.score_pool3 = nn.Conv2d(c(256), n_class, 1)
    self.upscore2 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
    self.upscore_pool4 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
    self.register_buffer('up_weight', torch_fcn.bilinear_weight(n_class, 16))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    taps, h = [], x
    for block in self.blocks:
      h = block(h)
      taps.append(h)
    h = self.score_fr(self.fc7(self.fc6(h)))
    for up, score, tap in ((self.upscore2, self.score_pool4, taps[3]),
                           (self.upscore_pool4, self.score_pool3, taps[2])):
      h = up(h)
      h = h[:, :, 1:1 + tap.size(2), 1:1 + tap.size(3)] + score(tap)
    h = F.conv_transpose2d(h, self.up_weight.to(h.dtype), stride=8)
    return h[:, :, 4:4 + x.size(2), 4:4 + x.size(3)]


def build(arch: str, width: float = 1.0, n_class: int = 21, preset: str = '') -> nn.Module:
  """The benchmarked net: the arch's paper layout, or (preset='scratch') the scratch preset's."""
  if preset == 'scratch':
    if arch != 'fcn8s_atonce':
      raise ValueError(f'the scratch layout is benchmarked as fcn8s_atonce, not {arch}')
    return ScratchFCN8s(n_class, width)
  if arch in ('fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce'):
    return VGGFCN(arch, n_class, width)
  if arch in ('fcn_resnet50', 'fcn_resnet101'):
    return ResNetFCN(arch, n_class, width)
  return BackboneFCN(arch, n_class, width)


def make_optimizer(model: nn.Module, lr: float = 1e-4, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
  """SGD as fcn_jax trains: weight decay on kernels, biases at 2x lr and no decay, the final
  (and with it every) deconvolution frozen; the scratch net's inner deconvolutions learn (its
  final one is a buffer)."""
  kernels, biases = [], []
  learnt_upsampling = isinstance(model, ScratchFCN8s)
  for name, p in model.named_parameters():
    if name.startswith('upscore') and not learnt_upsampling:
      p.requires_grad_(False)
      continue
    (biases if name.endswith('bias') else kernels).append(p)
  return torch.optim.SGD([{'params': kernels, 'weight_decay': weight_decay},
                          {'params': biases, 'lr': 2 * lr, 'weight_decay': 0.0}],
                         lr=lr, momentum=momentum)
