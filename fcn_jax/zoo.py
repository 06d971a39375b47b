"""The fifteen nets of the Caffe reference (fcn.berkeleyvision.org), as data: which of our archs
each is, its classes, heads and input modalities, and the released file.

`fcn_jax.convert` recognises a file as one of these from its layer names and blob shapes
(`recognise`) and writes the net's metadata (`ZooNet.metadata`) into the checkpoint, so predict and
evaluate know its classes, heads and preprocessing with nothing else. `python -m fcn_jax.zoo`
prints the README's table.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

import numpy as np

from fcn_jax import checkpoint
from fcn_jax.data import classes as classes_lib
from fcn_jax.errors import UserError

DOWNLOAD_ROOT = 'http://dl.caffe.berkeleyvision.org'


@dataclasses.dataclass(frozen=True)
class ZooNet:
  name: str                    # the reference directory (voc-fcn32s, nyud-fcn32s-color-hha, ...)
  file: str | None             # the released weights (None: the reference released none)
  arch: str                    # ours (fcn_jax.models.ARCHS)
  dataset: str                 # the dataset it was trained on (fcn_jax.data name once it exists)
  heads: tuple[tuple[str, tuple[str, ...]], ...]  # (head name, class names in output order)
  modalities: tuple[tuple[str, str], ...]          # (modality, preprocessing preset), channel order
  reference: str               # the reference's score (README / paper table), as text

  @property
  def num_classes(self) -> int | list[int]:
    counts = [len(names) for _, names in self.heads]
    return counts[0] if len(counts) == 1 else counts

  @property
  def url(self) -> str | None:
    return f'{DOWNLOAD_ROOT}/{self.file}' if self.file else None

  def metadata(self, width: float = 1.0, learnable_upsampling: bool = False) -> dict[str, Any]:
    """The checkpoint metadata of this net: the model config and everything inference needs."""
    model = {'arch': self.arch, 'num_classes': self.num_classes, 'width': width,
             'learnable_upsampling': learnable_upsampling}
    heads = [{'name': name, 'num_classes': len(names), 'class_names': list(names),
              'palette': classes_lib.voc_palette(len(names)).tolist()}
             for name, names in self.heads]
    return {
        **checkpoint.model_metadata(model),
        'zoo_name': self.name,
        'dataset': self.dataset,
        'preprocessing': self.modalities[0][1],
        'modalities': [{'name': m, 'preprocessing': p} for m, p in self.modalities],
        'class_names': heads[0]['class_names'],
        'palette': heads[0]['palette'],
        'heads': heads,
        'ignore_label': classes_lib.IGNORE_LABEL,
    }


_VOC = (('labels', classes_lib.VOC_CLASS_NAMES),)
_CONTEXT = (('labels', classes_lib.PASCAL_CONTEXT_CLASS_NAMES),)
_SIFT_FLOW = (('semantic', classes_lib.SIFT_FLOW_SEMANTIC_CLASS_NAMES),
              ('geometric', classes_lib.SIFT_FLOW_GEOMETRIC_CLASS_NAMES))
_NYUD = (('labels', classes_lib.NYUD_CLASS_NAMES),)
_BGR = (('color', 'caffe_bgr'),)


def _nets() -> dict[str, ZooNet]:
  nets = [
      ZooNet('voc-fcn32s', 'fcn32s-heavy-pascal.caffemodel', 'fcn32s', 'PASCAL VOC', _VOC, _BGR,
             '63.6 mean IU, seg11valid'),
      ZooNet('voc-fcn16s', 'fcn16s-heavy-pascal.caffemodel', 'fcn16s', 'PASCAL VOC', _VOC, _BGR,
             '65.0 mean IU, seg11valid'),
      ZooNet('voc-fcn8s', 'fcn8s-heavy-pascal.caffemodel', 'fcn8s', 'PASCAL VOC', _VOC, _BGR,
             '65.5 mean IU, seg11valid'),
      ZooNet('voc-fcn8s-atonce', 'fcn8s-atonce-pascal.caffemodel', 'fcn8s_atonce', 'PASCAL VOC',
             _VOC, _BGR, '65.4 mean IU, seg11valid'),
      ZooNet('voc-fcn-alexnet', 'fcn-alexnet-pascal.caffemodel', 'fcn_alexnet_caffe', 'PASCAL VOC',
             _VOC, _BGR, '48.0 mean IU, seg11valid'),
  ]
  context_scores = {'32s': '-', '16s': '-', '8s': '35.1 mean IU, val (PAMI FCN-8s)'}
  for stride in ('32s', '16s', '8s'):
    nets.append(ZooNet(f'pascalcontext-fcn{stride}', f'pascalcontext-fcn{stride}-heavy.caffemodel',
                       f'fcn{stride}', 'PASCAL-Context', _CONTEXT,
                       (('color', 'pascal_context_bgr'),), context_scores[stride]))
  sift_scores = {'32s': '-', '16s': '39.5 mean IU, 94.3 geometric pixel acc. (Table 5)', '8s': '-'}
  for stride in ('32s', '16s', '8s'):
    nets.append(ZooNet(f'siftflow-fcn{stride}', f'siftflow-fcn{stride}-heavy.caffemodel',
                       f'fcn{stride}_two_heads', 'SIFT Flow', _SIFT_FLOW,
                       (('color', 'sift_flow_bgr'),), sift_scores[stride]))
  nets += [
      ZooNet('nyud-fcn32s-color', 'nyud-fcn32s-color-heavy.caffemodel', 'fcn32s', 'NYUDv2', _NYUD,
             (('color', 'nyud_bgr'),), '29.2 mean IU, test (Table 4, RGB)'),
      ZooNet('nyud-fcn32s-hha', 'nyud-fcn32s-hha-heavy.caffemodel', 'fcn32s', 'NYUDv2', _NYUD,
             (('hha', 'nyud_hha'),), '24.2 mean IU, test (Table 4, HHA)'),
      ZooNet('nyud-fcn32s-color-d', None, 'fcn32s_early_fusion', 'NYUDv2', _NYUD,
             (('color', 'nyud_bgr'), ('depth', 'nyud_log_depth')),
             '30.5 mean IU, test (Table 4, RGB-D)'),
      ZooNet('nyud-fcn32s-color-hha', 'nyud-fcn32s-color-hha-heavy.caffemodel',
             'fcn32s_late_fusion', 'NYUDv2', _NYUD, (('color', 'nyud_bgr'), ('hha', 'nyud_hha')),
             '32.8 mean IU, test (Table 4, RGB-HHA)'),
  ]
  return {n.name: n for n in nets}


ZOO: dict[str, ZooNet] = _nets()


class RecognitionError(UserError, ValueError):
  """The file fits none of the reference nets; the message says what was recognised."""


def _out_channels(state: dict, key: str) -> int | None:
  value = state.get(key)
  return int(np.shape(value)[0]) if value is not None and np.ndim(value) >= 1 else None


def _stride_of(has, head: str = '') -> str:
  if has(f'score_pool3{head}'):
    return '8s'
  if has(f'score_pool4{head}'):
    return '16s'
  return '32s'


def _recognise_alexnet(state: dict, conv1) -> tuple[ZooNet, str]:
  """An FCN-AlexNet file: the reference's (CaffeNet layout), or RecognitionError."""
  # The CaffeNet layout's conv2 is grouped: each filter sees half of conv1's channels (48 of 96
  # at full width); torchvision's AlexNet has no groups.
  conv1_out = np.shape(conv1)[0]
  conv2_inputs = np.shape(state.get('conv2.weight', np.zeros((0, 0))))[1]
  if conv1_out % 2 == 0 and conv2_inputs == conv1_out // 2:
    return ZOO['voc-fcn-alexnet'], ('conv1..conv5 + score_fr, conv2 in two groups '
                                    f'({conv2_inputs} of {conv1_out} channels each): '
                                    'FCN-AlexNet, CaffeNet layout')
  raise RecognitionError(f'an FCN-AlexNet whose conv2 is not grouped ({conv2_inputs} inputs per '
                         f'filter, {conv1_out} channels from conv1): not the reference CaffeNet '
                         'layout; convert it with --arch fcn_alexnet (torchvision layout)')


def _recognise_nyud(stride: str, base: str, modality: str | None) -> tuple[ZooNet, str]:
  """A 40-class VGG16 FCN: the NYUD colour or HHA net, told apart by `modality` or the file name
  `base`; or RecognitionError."""
  if stride != '32s':
    raise RecognitionError(f'a 40-class (NYUDv2) FCN-{stride}: the reference has only FCN-32s '
                           'NYUD nets; convert it with --arch')
  if modality is None:
    found = [m for m in ('hha', 'color') if re.search(rf'(^|[-_.]){m}([-_.]|$)', base)]
    if len(found) == 1:
      return ZOO[f'nyud-fcn32s-{found[0]}'], (f'VGG16 FCN-32s, 40 classes: NYUDv2; {found[0]} '
                                              f'input from the file name {base!r}')
    raise RecognitionError(
        'a 40-class VGG16 FCN-32s: NYUDv2, but its colour and HHA nets share one layout and the '
        'same layer names, and the file name does not say which (the released ones are '
        'nyud-fcn32s-color-heavy.caffemodel and nyud-fcn32s-hha-heavy.caffemodel); pass '
        '--modality color or --modality hha')
  if modality not in ('color', 'hha'):
    raise RecognitionError(f'--modality {modality!r}: color or hha')
  return (ZOO[f'nyud-fcn32s-{modality}'],
          f'VGG16 FCN-32s, 40 classes: NYUDv2; {modality} from --modality')


def recognise(state: dict[str, np.ndarray], filename: str = '',
              modality: str | None = None) -> tuple[ZooNet, str]:
  """The reference net a Caffe-named weights file holds, and why: (net, reason).

  From the layer names and blob shapes alone, except for the NYUD colour and HHA nets, which share
  one layout and the same layer names: those are told apart by the released file name
  (nyud-fcn32s-hha-heavy.caffemodel) or `modality` ('color' | 'hha').
  Raises RecognitionError when the file fits none of the fifteen.
  """
  has = lambda layer: f'{layer}.weight' in state
  base = os.path.basename(filename).lower()
  conv1 = state.get('conv1.weight')
  if any(k.startswith('inception3a.') for k in state):
    raise RecognitionError('a GoogLeNet file: the reference has no FCN-GoogLeNet; convert it with '
                           '--arch fcn_googlenet')
  if conv1 is not None and not has('score_fr'):
    raise RecognitionError('an AlexNet backbone without FCN layers (no score_fr): an ImageNet '
                           'classifier; convert it with --arch fcn_alexnet_caffe or fcn_alexnet')
  if conv1 is not None:
    return _recognise_alexnet(state, conv1)
  if has('conv1_1color') or has('conv1_1hha'):
    if not (has('conv1_1color') and has('conv1_1hha')):
      raise RecognitionError('a late-fusion file with only one of the colour / HHA streams')
    stride = _stride_of(lambda layer: has(f'{layer}color'))
    if stride != '32s':
      raise RecognitionError(f'a colour-HHA late-fusion FCN-{stride}: the reference released only '
                             'FCN-32s; convert it with --arch fcn16s_late_fusion')
    return ZOO['nyud-fcn32s-color-hha'], 'two VGG16 streams (conv1_1color, conv1_1hha): late fusion'
  if has('conv1_1_bgrd'):
    return (ZOO['nyud-fcn32s-color-d'],
            'conv1_1_bgrd with 4 input channels: colour + depth, early fusion')
  if has('score_fr_sem') or has('score_fr_geo'):
    stride = _stride_of(has, '_sem')
    return ZOO[f'siftflow-fcn{stride}'], ('semantic and geometric heads (score_fr_sem, '
                                          f'score_fr_geo) with FCN-{stride} skips: SIFT Flow')
  if not has('conv5_3'):
    raise RecognitionError('not a Caffe-named VGG16, CaffeNet or fusion net (no conv5_3 or conv1); '
                           f'layers like {sorted(state)[:8]}')
  if not has('score_fr'):
    raise RecognitionError('a VGG16 backbone without FCN layers (no score_fr): an ImageNet '
                           'classifier; pass --arch fcn32s (or another VGG16 FCN) to start one')
  classes = _out_channels(state, 'score_fr.weight')
  stride = _stride_of(has)
  atonce = 'scale_pool4.weight' in state or 'scale_pool3.weight' in state
  if classes == 21:
    name = 'voc-fcn8s-atonce' if atonce else f'voc-fcn{stride}'
    why = 'Scale layers before the skips (at-once)' if atonce else f'FCN-{stride} skips'
    return ZOO[name], f'VGG16, 21 classes, {why}: PASCAL VOC'
  if classes == 60:
    return (ZOO[f'pascalcontext-fcn{stride}'],
            f'VGG16, 60 classes, FCN-{stride} skips: PASCAL-Context')
  if classes == 40:
    return _recognise_nyud(stride, base, modality)
  raise RecognitionError(
      f'a VGG16 FCN-{stride} with {classes} classes: no reference net has that many (VOC 21, '
      'PASCAL-Context 60, NYUDv2 40, SIFT Flow 33 + 3); convert it with --arch and --class_names')


def markdown_table() -> str:
  """The README's table of the reference nets."""
  rows = ['| reference net | dataset | classes | inputs | heads | arch | reference score |',
          '|---|---|---|---|---|---|---|']
  for net in ZOO.values():
    counts = ' + '.join(str(len(names)) for _, names in net.heads)
    inputs = ' + '.join(f'{m} ({p})' for m, p in net.modalities)
    heads = ', '.join(name for name, _ in net.heads)
    released = f'[{net.name}]({net.url})' if net.url else f'{net.name} (no released weights)'
    rows.append(f'| {released} | {net.dataset} | {counts} | {inputs} | {heads} | `{net.arch}` | '
                f'{net.reference} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  print(markdown_table())
  sys.exit(0)
