"""An independent reference for the fifteen Caffe nets: their layer lists, written from the reference
net definitions (fcn.berkeleyvision.org <net>/net.py and the crop offsets of its generated
prototxts), random Caffe-layout blobs, and a small PyTorch (float64) executor of Caffe layers.

Nothing here uses fcn_jax's models: the layer lists are Caffe's, the executor implements Caffe's
layer semantics (Convolution with groups, ceil-mode max Pooling, LRN across channels,
Deconvolution, Crop, Eltwise SUM with coefficients, Scale, Concat), and the preprocessing is the
reference data layers'. Channel counts follow the width rule max(1, round(c * width)) so that small
nets run on a CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Layer:
  name: str
  type: str
  bottom: tuple[str, ...] = ()
  top: str = ''
  params: dict = dataclasses.field(default_factory=dict)
  blobs: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.top = self.top or self.name


class NetSpec:
  def __init__(self, width: float):
    self.width, self.layers = width, []

  def ch(self, c: int) -> int:
    return max(1, int(round(c * self.width)))

  def add(self, name, type, bottom=(), top='', **params) -> str:
    self.layers.append(Layer(name, type, tuple(bottom), top, params))
    return top or name

  def conv_relu(self, name, bottom, nout, ks=3, stride=1, pad=1, group=1, relu_name=None):
    self.add(name, 'Convolution', [bottom], num_output=self.ch(nout), kernel_size=ks, stride=stride,
             pad=pad, group=group)
    return self.add(relu_name or f'relu{name[4:] if name.startswith("conv") else name[2:]}', 'ReLU',
                    [name], top=name)  # in place

  def score(self, name, bottom, classes):
    return self.add(name, 'Convolution', [bottom], num_output=classes, kernel_size=1, stride=1,
                    pad=0, group=1)

  def deconv(self, name, bottom, classes, ks, stride):
    return self.add(name, 'Deconvolution', [bottom], num_output=classes, kernel_size=ks,
                    stride=stride)


# ---------------------------------------------------------------------------------------------
# The reference nets (net.py of each reference directory)


def vgg16_trunk(n: NetSpec, data: str, m: str = '', first: str = 'conv1_1') -> tuple[str, dict]:
  """conv1_1 .. drop7 with layer names suffixed by the modality `m` (late fusion)."""
  pools = {}
  x = data
  for block, (nout, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
    for i in range(1, convs + 1):
      name = (first if (block, i) == (1, 1) else f'conv{block}_{i}') + m
      x = n.conv_relu(name, x, nout, pad=100 if (block, i) == (1, 1) else 1,
                      relu_name=f'relu{block}_{i}{m}')
    x = pools[block] = n.add(f'pool{block}{m}', 'Pooling', [x], kernel_size=2, stride=2)
  x = n.conv_relu(f'fc6{m}', x, 4096, ks=7, pad=0, relu_name=f'relu6{m}')
  x = n.add(f'drop6{m}', 'Dropout', [x], top=x)
  x = n.conv_relu(f'fc7{m}', x, 4096, ks=1, pad=0, relu_name=f'relu7{m}')
  x = n.add(f'drop7{m}', 'Dropout', [x], top=x)
  return x, pools


def fcn_head(n: NetSpec, fc7: str, pools: dict, stride: str, classes: int, data: str, h: str = '',
             atonce: bool = False, score_name: str = 'score') -> str:
  """voc-fcn32s/16s/8s (and -atonce) from score_fr on; h: the head suffix (SIFT Flow _sem, _geo)."""
  x = n.score(f'score_fr{h}', fc7, classes)
  if stride == '32s':
    x = n.deconv(f'upscore{h}', x, classes, 64, 32)
    return n.add(score_name + h, 'Crop', [x, data], offset=19)
  x = n.deconv(f'upscore2{h}', x, classes, 4, 2)
  p4 = pools[4]
  if atonce:
    p4 = n.add('scale_pool4', 'Scale', [p4], value=0.01)
  s4 = n.score(f'score_pool4{h}', p4, classes)
  s4 = n.add(f'score_pool4{h}c', 'Crop', [s4, x], offset=5)
  x = n.add(f'fuse_pool4{h}', 'Eltwise', [x, s4])
  if stride == '16s':
    x = n.deconv(f'upscore16{h}', x, classes, 32, 16)
    return n.add(score_name + h, 'Crop', [x, data], offset=27)
  x = n.deconv(f'upscore_pool4{h}', x, classes, 4, 2)
  p3 = pools[3]
  if atonce:
    p3 = n.add('scale_pool3', 'Scale', [p3], value=0.0001)
  s3 = n.score(f'score_pool3{h}', p3, classes)
  s3 = n.add(f'score_pool3{h}c', 'Crop', [s3, x], offset=9)
  x = n.add(f'fuse_pool3{h}', 'Eltwise', [x, s3])
  x = n.deconv(f'upscore8{h}', x, classes, 16, 8)
  return n.add(score_name + h, 'Crop', [x, data], offset=31)


def alexnet(n: NetSpec, classes: int = 21) -> dict[str, str]:
  n.add('data', 'Python')
  x = n.conv_relu('conv1', 'data', 96, ks=11, stride=4, pad=100)
  x = n.add('pool1', 'Pooling', [x], kernel_size=3, stride=2)
  x = n.add('norm1', 'LRN', [x], local_size=5, alpha=1e-4, beta=0.75)
  x = n.conv_relu('conv2', x, 256, ks=5, pad=2, group=2)
  x = n.add('pool2', 'Pooling', [x], kernel_size=3, stride=2)
  x = n.add('norm2', 'LRN', [x], local_size=5, alpha=1e-4, beta=0.75)
  x = n.conv_relu('conv3', x, 384, ks=3, pad=1)
  x = n.conv_relu('conv4', x, 384, ks=3, pad=1, group=2)
  x = n.conv_relu('conv5', x, 256, ks=3, pad=1, group=2)
  x = n.add('pool5', 'Pooling', [x], kernel_size=3, stride=2)
  x = n.conv_relu('fc6', x, 4096, ks=6, pad=0)
  x = n.add('drop6', 'Dropout', [x], top=x)
  x = n.conv_relu('fc7', x, 4096, ks=1, pad=0)
  x = n.add('drop7', 'Dropout', [x], top=x)
  x = n.score('score_fr', x, classes)
  x = n.deconv('upscore', x, classes, 63, 32)
  return {'labels': n.add('score', 'Crop', [x, 'data'], offset=18)}


def vgg_net(n: NetSpec, stride: str, classes: int, atonce: bool = False) -> dict[str, str]:
  n.add('data', 'Python')
  fc7, pools = vgg16_trunk(n, 'data')
  return {'labels': fcn_head(n, fc7, pools, stride, classes, 'data', atonce=atonce)}


def siftflow(n: NetSpec, stride: str) -> dict[str, str]:
  n.add('data', 'Python')
  fc7, pools = vgg16_trunk(n, 'data')
  return {'semantic': fcn_head(n, fc7, pools, stride, 33, 'data', '_sem'),
          'geometric': fcn_head(n, fc7, pools, stride, 3, 'data', '_geo')}


def nyud_color_d(n: NetSpec) -> dict[str, str]:
  n.add('color', 'Python')
  n.add('depth', 'Python')
  n.add('data', 'Concat', ['color', 'depth'])
  fc7, pools = vgg16_trunk(n, 'data', first='conv1_1_bgrd')
  return {'labels': fcn_head(n, fc7, pools, '32s', 40, 'data')}


def nyud_color_hha(n: NetSpec) -> dict[str, str]:
  n.add('color', 'Python')
  n.add('hha', 'Python')
  fc7c, _ = vgg16_trunk(n, 'color', 'color')
  score_c = n.score('score_frcolor', fc7c, 40)
  fc7h, _ = vgg16_trunk(n, 'hha', 'hha')
  score_h = n.score('score_frhha', fc7h, 40)
  x = n.add('score_fused', 'Eltwise', [score_c, score_h], coeff=(0.5, 0.5))
  x = n.deconv('upscore', x, 40, 64, 32)
  return {'labels': n.add('score', 'Crop', [x, 'color'], offset=19)}


# name -> (builder, inputs {top: modality}, released file name)
NETS = {
    'voc-fcn32s': (lambda n: vgg_net(n, '32s', 21), 'fcn32s-heavy-pascal.caffemodel'),
    'voc-fcn16s': (lambda n: vgg_net(n, '16s', 21), 'fcn16s-heavy-pascal.caffemodel'),
    'voc-fcn8s': (lambda n: vgg_net(n, '8s', 21), 'fcn8s-heavy-pascal.caffemodel'),
    'voc-fcn8s-atonce': (lambda n: vgg_net(n, '8s', 21, atonce=True), 'fcn8s-atonce-pascal.caffemodel'),
    'voc-fcn-alexnet': (alexnet, 'fcn-alexnet-pascal.caffemodel'),
    'pascalcontext-fcn32s': (lambda n: vgg_net(n, '32s', 60), 'pascalcontext-fcn32s-heavy.caffemodel'),
    'pascalcontext-fcn16s': (lambda n: vgg_net(n, '16s', 60), 'pascalcontext-fcn16s-heavy.caffemodel'),
    'pascalcontext-fcn8s': (lambda n: vgg_net(n, '8s', 60), 'pascalcontext-fcn8s-heavy.caffemodel'),
    'siftflow-fcn32s': (lambda n: siftflow(n, '32s'), 'siftflow-fcn32s-heavy.caffemodel'),
    'siftflow-fcn16s': (lambda n: siftflow(n, '16s'), 'siftflow-fcn16s-heavy.caffemodel'),
    'siftflow-fcn8s': (lambda n: siftflow(n, '8s'), 'siftflow-fcn8s-heavy.caffemodel'),
    'nyud-fcn32s-color': (lambda n: vgg_net(n, '32s', 40), 'nyud-fcn32s-color-heavy.caffemodel'),
    'nyud-fcn32s-hha': (lambda n: vgg_net(n, '32s', 40), 'nyud-fcn32s-hha-heavy.caffemodel'),
    'nyud-fcn32s-color-d': (nyud_color_d, 'nyud-fcn32s-color-d.caffemodel'),
    'nyud-fcn32s-color-hha': (nyud_color_hha, 'nyud-fcn32s-color-hha-heavy.caffemodel'),
}

# The reference data layers' preprocessing (voc_layers, pascalcontext_layers, siftflow_layers,
# nyud_layers): BGR minus the mean; HHA as stored minus its mean; log depth minus 7.844.
MEANS = {'voc': (104.00699, 116.66877, 122.67892), 'pascalcontext': (104.007, 116.669, 122.679),
         'siftflow': (114.578, 115.294, 108.353), 'nyud': (116.190, 97.203, 92.318)}
HHA_MEAN = (132.431, 94.076, 118.477)
LOG_DEPTH_MEAN = 7.844


def data_tops(name: str, rgb: np.ndarray, hha: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
  """The data layers' tops (C, H, W float64) for one example."""
  bgr = lambda mean: (rgb[..., ::-1].astype(np.float64) - np.asarray(mean)).transpose(2, 0, 1)
  dataset = name.split('-')[0]
  hha_top = (hha.astype(np.float64) - np.asarray(HHA_MEAN)).transpose(2, 0, 1)
  if dataset != 'nyud':
    return {'data': bgr(MEANS[dataset])}
  color = bgr(MEANS['nyud'])
  if name == 'nyud-fcn32s-hha':
    return {'data': hha_top}
  if name == 'nyud-fcn32s-color':
    return {'data': color}
  if name == 'nyud-fcn32s-color-d':
    return {'color': color, 'depth': (np.log(depth.astype(np.float64)) - LOG_DEPTH_MEAN)[None]}
  return {'color': color, 'hha': hha_top}


# ---------------------------------------------------------------------------------------------
# Blobs and the executor


def is_final_upsampling(layer_name: str) -> bool:
  """upscore, upscore16, upscore8 (with a head suffix): not the intermediate upscore2 /
  upscore_pool4, which may mix classes."""
  return layer_name.startswith('upscore') and not layer_name.startswith(('upscore2', 'upscore_pool4'))


def build(name: str, width: float, seed: int = 0) -> tuple[list[Layer], dict[str, str]]:
  """The layer list of the reference net `name` with random blobs, and its score tops by head."""
  n = NetSpec(width)
  outputs = NETS[name][0](n)
  rng = np.random.default_rng(seed)
  channels = {}
  for layer in n.layers:
    p = layer.params
    if layer.type == 'Python':
      channels[layer.top] = {'depth': 1}.get(layer.top, 3)
    elif layer.type == 'Concat':
      channels[layer.top] = sum(channels[b] for b in layer.bottom)
    elif layer.type == 'Convolution':
      c_in, g = channels[layer.bottom[0]], p['group']
      shape = (p['num_output'], c_in // g, p['kernel_size'], p['kernel_size'])
      fan_in = shape[1] * shape[2] * shape[3]
      layer.blobs = [rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32),
                     rng.normal(0, 0.1, (p['num_output'],)).astype(np.float32)]
      channels[layer.top] = p['num_output']
    elif layer.type == 'Deconvolution':
      c_in, k, s = channels[layer.bottom[0]], p['kernel_size'], p['stride']
      shape = (c_in, p['num_output'], k, k)
      blob = rng.normal(0, 1 / np.sqrt(c_in * (k / s) ** 2), shape).astype(np.float32)
      if is_final_upsampling(layer.name):  # per class, as in every reference net (any filter)
        blob = blob * np.eye(c_in, p['num_output'], dtype=np.float32)[:, :, None, None]
      layer.blobs = [blob]
      channels[layer.top] = p['num_output']
    elif layer.type == 'Scale':
      layer.blobs = [np.full((channels[layer.bottom[0]],), p['value'], np.float32)]
      channels[layer.top] = channels[layer.bottom[0]]
    elif layer.type == 'Crop':
      channels[layer.top] = channels[layer.bottom[0]]
    else:
      channels[layer.top] = channels[layer.bottom[0]]
  n.layers.append(Layer('loss', 'SoftmaxWithLoss', tuple(outputs.values())))
  return n.layers, outputs


def caffemodel_layers(layers: list[Layer]) -> list:
  """(name, type, blobs) for caffe_pb.write_net: every layer, blobs on the parameter layers."""
  return [(l.name, l.type, l.blobs) for l in layers]


def _lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float = 1.0) -> torch.Tensor:
  sq = F.pad(x * x, (0, 0, 0, 0, size // 2, (size - 1) // 2))  # pad the channel axis with zeros
  window = sum(sq[:, i:i + x.shape[1]] for i in range(size))
  return x / (k + alpha / size * window) ** beta


def run(layers: list[Layer], tops: dict[str, np.ndarray], outputs: dict[str, str]) -> dict[str, np.ndarray]:
  """Executes the layer list in float64 on (C, H, W) inputs: {head: (H, W, classes) scores}."""
  t = lambda a: torch.as_tensor(np.asarray(a, np.float64))
  blobs = {k: t(v)[None] for k, v in tops.items()}
  for l in layers:
    p, b = l.params, [blobs.get(name) for name in l.bottom]
    if l.type in ('Python', 'SoftmaxWithLoss'):
      continue
    if l.type == 'Convolution':
      y = F.conv2d(b[0], t(l.blobs[0]), t(l.blobs[1]), stride=p['stride'], padding=p['pad'],
                   groups=p['group'])
    elif l.type == 'ReLU':
      y = F.relu(b[0])
    elif l.type == 'Pooling':
      y = F.max_pool2d(b[0], p['kernel_size'], p['stride'], ceil_mode=True)
    elif l.type == 'LRN':
      y = _lrn(b[0], p['local_size'], p['alpha'], p['beta'])
    elif l.type == 'Dropout':
      y = b[0]
    elif l.type == 'Deconvolution':
      y = F.conv_transpose2d(b[0], t(l.blobs[0]), stride=p['stride'])
    elif l.type == 'Crop':
      o, (h, w) = p['offset'], b[1].shape[2:]
      y = b[0][:, :, o:o + h, o:o + w]
    elif l.type == 'Eltwise':
      coeff = p.get('coeff', (1.0,) * len(b))
      y = sum(c * x for c, x in zip(coeff, b))
    elif l.type == 'Scale':
      y = b[0] * t(l.blobs[0])[None, :, None, None]
    elif l.type == 'Concat':
      y = torch.cat(b, dim=1)
    else:
      raise ValueError(f'no executor for {l.type}')
    blobs[l.top] = y
  return {head: blobs[top][0].permute(1, 2, 0).numpy() for head, top in outputs.items()}
