"""Imports pretrained weights: ImageNet backbones and the released FCN models, into an orbax checkpoint.

    python -m fcn_jax.convert SRC --out DIR [--arch ARCH]
        [--format auto|pth|npz|safetensors|caffemodel] [--modality color|hha]
        [--preprocessing caffe_bgr|torchvision_rgb|inception_rgb|...] [--num_classes N] [--width W]

Without --arch, the file must be one of the fifteen reference nets (fcn_jax.zoo): it is recognised
from its layer names and blob shapes (the NYUD colour and HHA nets, which share one layout, from
the released file name or --modality), and the checkpoint records the net's classes, heads, input
modalities and each modality's preprocessing.

Sources (the format is detected from the file's contents, not its name):

- PyTorch state dicts: `.pth` (read with torch, when installed), `.npz` (NumPy, one array per key) and
  `.safetensors`. Layouts:
  - torchvision ImageNet classifiers: VGG16 (`features.N`, `classifier.0/3`), AlexNet (`features.N`,
    `classifier.1/4`) and GoogLeNet (`conv1.conv`, `inception3a.branch2.1.bn`, ...). fc6/fc7 are
    "transplanted" into convolutions (fc6 (4096, C*k*k) -> (4096, C, k, k)); the 1000-way classifier
    and GoogLeNet's auxiliary heads are dropped.
  - the PyTorch port of the Caffe FCNs (and any file using Caffe's layer names): `conv1_1`..`conv5_3`,
    `fc6`, `fc7`, `score_fr`, `score_pool4`, `score_pool3`, `upscore`, `upscore2`, `upscore16`,
    `upscore_pool4`, `upscore8` (`.weight`, `.bias`).
- Caffe `.caffemodel` (NetParameter, read with protobuf, no Caffe needed; current `layer` and legacy
  V1 `layers` fields): VGG_ILSVRC_16_layers (fc6/fc7 InnerProduct) and the released
  fcn32s/fcn16s/fcn8s-heavy-pascal and fcn8s-atonce-pascal models.

Layout conversions: convolutions OIHW -> HWIO; transposed convolutions (PyTorch ConvTranspose2d and
Caffe Deconvolution both store (C_in, C_out, k, k) in scatter orientation) -> (k, k, C_in, C_out);
fully connected layers reshaped into convolutions. A backbone (classification weights) fills the
backbone only: the FCN layers keep their initialisation (zero score layers, bilinear upsampling).

The input convention belongs to the weights and is recorded in the checkpoint metadata: Caffe
weights (caffemodels and the PyTorch port of the Caffe FCNs) expect `caffe_bgr`, torchvision VGG16 /
AlexNet `torchvision_rgb`, torchvision GoogLeNet (transform_input=True) `inception_rgb`. Override with
`--preprocessing` (e.g. pytorch-fcn's `vgg16_from_caffe.pth` uses torchvision keys but Caffe weights).

Anything that does not fit (unknown format, missing or unexpected keys, shapes, a file made for
another arch) raises `ConversionError` listing every mismatch, and nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Any, Iterable

import numpy as np

from fcn_jax import cli as cli_lib
from fcn_jax.data.classes import VOC_CLASS_NAMES
from fcn_jax.errors import UserError, cli

FORMATS = ('pth', 'npz', 'safetensors', 'caffemodel')

VOC_CLASSES = VOC_CLASS_NAMES

__all__ = ['ConversionError', 'FORMATS', 'VOC_CLASSES', 'convert', 'convert_to_checkpoint',
           'detect_format', 'import_weights', 'main', 'read_weights']


class ConversionError(UserError, ValueError):
  """The source file cannot be imported into the requested model; the message lists why."""


# --------------------------------------------------------------------------------------------------
# Reading files


def detect_format(path: str | os.PathLike) -> str:
  """'pth' | 'npz' | 'safetensors' | 'caffemodel', from the file's first bytes."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(16)
  # safetensors: u64 little-endian header length, then a JSON object.
  if len(head) >= 9 and head[8:9] == b'{' and 8 + int.from_bytes(head[:8], 'little') <= size:
    return 'safetensors'
  if head[:4] == b'PK\x03\x04':
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile as e:
      raise ConversionError(f'{path}: corrupt zip archive ({e})') from None
    if any(n.endswith('.npy') for n in names):
      return 'npz'
    if any(n.endswith('data.pkl') for n in names):
      return 'pth'  # torch.save's zip format
    raise ConversionError(f'{path}: a zip archive that is neither a NumPy .npz nor a torch.save file')
  if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
    return 'pth'  # legacy (pre-1.6) torch.save: a pickle
  # A serialized NetParameter starts with one of its fields: name (1), layers (2), input (3),
  # input_dim (4), force_backward (5), state (6), debug_info (7), input_shape (8), layer (100).
  if head[:1] in (b'\x0a', b'\x12', b'\x1a', b'\x20', b'\x22', b'\x28', b'\x32', b'\x38', b'\x42') or \
     head[:2] == b'\xa2\x06':
    return 'caffemodel'
  raise ConversionError(
      f'{path}: unknown format (first bytes {head[:8]!r}); supported: PyTorch state dict (.pth), '
      'NumPy .npz, .safetensors, Caffe .caffemodel; pass --format to force one')


def _unwrap_state_dict(obj: Any, path: str) -> dict:
  if not isinstance(obj, dict):
    if hasattr(obj, 'state_dict'):
      obj = obj.state_dict()
    else:
      raise ConversionError(f'{path}: expected a state dict, got {type(obj).__name__}')
  for key in ('state_dict', 'model_state_dict', 'model'):  # training checkpoints (e.g. pytorch-fcn)
    inner = obj.get(key)
    if isinstance(inner, dict) and inner and not _looks_like_tensor(inner):
      obj = inner
      break
  return obj


def _looks_like_tensor(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    import torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.to(torch.float32)
    return value.numpy()
  return np.asarray(value)


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a 'module.' (DataParallel) prefix shared by every key."""
  for prefix in ('module.',):
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def read_weights(path: str | os.PathLike, format: str = 'auto') -> tuple[dict[str, np.ndarray], str]:
  """Reads a weights file into {key: float32 array} (PyTorch-style keys) and its format.

  Caffe layers become `<layer>.weight` (first blob), `<layer>.bias` (second blob) and
  `<layer>.blob<i>` (any further blob), with the blob shapes as stored.
  """
  path = os.fspath(path)
  if format == 'auto':
    format = detect_format(path)
  if format not in FORMATS:
    raise ConversionError(f'unknown format {format!r}; choose one of {", ".join(FORMATS)} or auto')
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  try:
    if format == 'pth':
      try:
        import torch
      except ImportError:
        raise ConversionError(f'{path}: reading .pth files needs PyTorch (pip install torch); or '
                              'save the state dict as .npz or .safetensors') from None
      obj = torch.load(path, map_location='cpu', weights_only=True)
      state = {k: _to_numpy(v) for k, v in _unwrap_state_dict(obj, path).items()
               if _looks_like_tensor(v)}
    elif format == 'npz':
      with np.load(path, allow_pickle=False) as z:
        state = {k: np.asarray(z[k]) for k in z.files}
    elif format == 'safetensors':
      try:
        from safetensors.numpy import load_file
        state = load_file(path)
      except (TypeError, ValueError) as numpy_error:  # e.g. bfloat16, which NumPy lacks
        try:
          from safetensors.torch import load_file as torch_load_file
        except ImportError:
          raise ConversionError(f'{path}: {numpy_error}') from None
        state = {k: _to_numpy(v) for k, v in torch_load_file(path).items()}
    else:
      from fcn_jax import caffe_pb
      with open(path, 'rb') as f:
        data = f.read()
      try:
        _, layers = caffe_pb.read_net(data)
      except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ConversionError(f'{path}: not a Caffe NetParameter ({type(e).__name__}: {e})') from None
      if not layers:
        raise ConversionError(f'{path}: a Caffe NetParameter without any weights')
      state = {}
      for name, _, blobs in layers:
        for i, blob in enumerate(blobs):
          suffix = ('weight', 'bias')[i] if i < 2 else f'blob{i}'
          state[f'{name}.{suffix}'] = blob
  except ConversionError:
    raise
  except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear error
    raise ConversionError(f'{path}: cannot read as {format}: {type(e).__name__}: {e}') from None
  state = {k: (v.astype(np.float32, copy=False) if np.issubdtype(v.dtype, np.floating) else v)
           for k, v in _strip_prefix(dict(state)).items()}
  return state, format


# --------------------------------------------------------------------------------------------------
# Layouts: where each of our parameters lives in a source file


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  backbone: str
  module_keys: dict[str, str]  # our top-level module name -> source prefix ('' = the same name)
  ignored: tuple[str, ...]     # regexes of source keys that are dropped on purpose
  preprocessing: str
  rename_branches: bool = False  # torchvision GoogLeNet: branch2_1 -> branch2.1

  def prefix(self, module: str) -> str:
    return self.module_keys.get(module) or module


_VGG_CONVS = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3', 'conv4_1',
              'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3')
_TV_VGG16_FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_NUM_BATCHES = r'.*\.num_batches_tracked$'

LAYOUTS = {
    # Caffe names: VGG_ILSVRC_16_layers, the released FCNs, pytorch-fcn's port of them.
    'caffe': Layout('caffe', 'vgg16', {}, (r'^fc8\.', _NUM_BATCHES), 'caffe_bgr'),
    'torchvision_vgg16': Layout(
        'torchvision_vgg16', 'vgg16',
        {**{c: f'features.{i}' for c, i in zip(_VGG_CONVS, _TV_VGG16_FEATURES)},
         'fc6': 'classifier.0', 'fc7': 'classifier.3'},
        (r'^classifier\.6\.', _NUM_BATCHES), 'torchvision_rgb'),
    'caffe_alexnet': Layout('caffe_alexnet', 'alexnet', {}, (r'^fc8\.', _NUM_BATCHES), 'caffe_bgr'),
    # CaffeNet / the released voc-fcn-alexnet (grouped conv2/4/5; the LRN layers have no blobs).
    'caffe_caffenet': Layout('caffe_caffenet', 'caffenet', {}, (r'^fc8\.', _NUM_BATCHES),
                             'caffe_bgr'),
    'torchvision_alexnet': Layout(
        'torchvision_alexnet', 'alexnet',
        {'conv1': 'features.0', 'conv2': 'features.3', 'conv3': 'features.6', 'conv4': 'features.8',
         'conv5': 'features.10', 'fc6': 'classifier.1', 'fc7': 'classifier.4'},
        (r'^classifier\.6\.', _NUM_BATCHES), 'torchvision_rgb'),
    'torchvision_googlenet': Layout(
        'torchvision_googlenet', 'googlenet', {}, (r'^fc\.', r'^aux[12]\.', _NUM_BATCHES),
        'inception_rgb', rename_branches=True),
}

HEAD_PREFIXES = ('score_', 'upscore')  # the FCN layers; all other parameters form the backbone
_LEAF_KEYS = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
              ('params', 'scale'): 'weight', ('batch_stats', 'mean'): 'running_mean',
              ('batch_stats', 'var'): 'running_var'}


@dataclasses.dataclass(frozen=True)
class Target:
  path: tuple[str, ...]  # ('params', 'conv1_1', 'kernel'), ('batch_stats', 'conv1', 'bn', 'mean'), ...
  shape: tuple[int, ...]

  @property
  def module(self) -> str:
    return self.path[1]

  @property
  def is_head(self) -> bool:
    return self.module.startswith(HEAD_PREFIXES)

  @property
  def is_deconv(self) -> bool:
    return self.module.startswith('upscore')

  def source_key(self, layout: Layout) -> str:
    parts = [layout.prefix(self.module) if not self.is_head else self.module, *self.path[2:-1]]
    if layout.rename_branches:
      parts = [re.sub(r'^branch(\d)_(\d)$', r'branch\1.\2', p) for p in parts]
    return '.'.join(parts + [_LEAF_KEYS[(self.path[0], self.path[-1])]])


def _targets(model) -> list[Target]:
  import jax
  from fcn_jax.models import init_variables
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return [Target(tuple(str(k.key) for k in path), tuple(leaf.shape)) for path, leaf in flat]


def _layouts_for(backbone: str) -> list[Layout]:
  return [l for l in LAYOUTS.values() if l.backbone == backbone]


def guess_archs(keys: Iterable[str]) -> list[str]:
  """The archs a set of source keys looks made for (for error messages)."""
  keys = set(keys)
  has = lambda k: k in keys
  if any(k.startswith('inception3a.') for k in keys):
    return ['fcn_googlenet']
  if has('conv1_1color.weight') or has('conv1_1hha.weight'):
    return ['fcn16s_late_fusion' if has('score_pool4color.weight') else 'fcn32s_late_fusion']
  if has('conv1_1_bgrd.weight'):
    return ['fcn32s_early_fusion']
  if has('score_fr_sem.weight') or has('score_fr_geo.weight'):
    stride = ('8s' if has('score_pool3_sem.weight') else
              '16s' if has('score_pool4_sem.weight') else '32s')
    return [f'fcn{stride}_two_heads']
  vgg = has('conv5_3.weight') or has('features.28.weight')
  alex = (has('conv5.weight') or has('features.10.weight')) and not vgg
  if alex:
    return ['fcn_alexnet_caffe', 'fcn_alexnet'] if has('conv5.weight') else ['fcn_alexnet']
  if not vgg:
    return []
  if has('scale_pool4.weight') or has('scale_pool3.weight'):
    return ['fcn8s_atonce']
  if has('score_pool3.weight') or has('upscore8.weight'):
    return ['fcn8s', 'fcn8s_atonce']
  if has('score_pool4.weight') or has('upscore16.weight'):
    return ['fcn16s']
  if has('score_fr.weight') or has('upscore.weight'):
    return ['fcn32s']
  return ['fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce']  # an ImageNet VGG16


def _fit(array: np.ndarray, target: Target) -> np.ndarray | None:
  """The source array in our layout, or None if its shape cannot be the target's."""
  shape = target.shape
  if target.path[-1] == 'kernel' and len(shape) == 4:
    kh, kw, ci, co = shape
    if target.is_deconv:
      return array.transpose(2, 3, 0, 1) if array.shape == (ci, co, kh, kw) else None
    if array.shape == (co, ci, kh, kw):
      return array.transpose(2, 3, 1, 0)
    squeezed = array
    while squeezed.ndim > 2 and squeezed.shape[0] == 1:  # Caffe V1 InnerProduct blob (1, 1, O, I)
      squeezed = squeezed[0]
    if squeezed.shape == (co, ci * kh * kw):  # fully connected -> convolution (C, H, W order)
      return squeezed.reshape(co, ci, kh, kw).transpose(2, 3, 1, 0)
    return None
  # biases, BatchNorm parameters and statistics: the same values, possibly padded with 1-dims.
  if array.size == int(np.prod(shape)) and all(d == 1 for d in array.shape[:-1]) and \
     (array.ndim == 0 or array.shape[-1] == (shape[-1] if shape else 1)):
    return array.reshape(shape)
  return None


def _expected_source_shape(target: Target) -> tuple[int, ...]:
  if target.path[-1] == 'kernel' and len(target.shape) == 4:
    kh, kw, ci, co = target.shape
    return (ci, co, kh, kw) if target.is_deconv else (co, ci, kh, kw)
  return target.shape


def _initial_head(target: Target) -> np.ndarray:
  """The FCN layers' initialisation: zero score layers, bilinear upsampling."""
  if target.is_deconv:
    from fcn_jax.models import layers
    return np.asarray(layers.bilinear_init(target.shape[0])(None, target.shape))
  return np.zeros(target.shape, np.float32)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _listing(title: str, items: list[str], limit: int = 40) -> str:
  shown = items[:limit] + ([f'... and {len(items) - limit} more'] if len(items) > limit else [])
  return f'{title} ({len(items)}):\n' + '\n'.join(f'    {s}' for s in shown)


def _classes_text(num_classes) -> str:
  if isinstance(num_classes, (tuple, list)):
    return ' + '.join(map(str, num_classes)) + ' classes'
  return f'{num_classes} classes'


def import_weights(state: dict[str, np.ndarray], arch: str, *, num_classes: int | None = None,
                   width: float | None = None, init_missing_heads: bool = False,
                   learnable_upsampling: bool = True) -> tuple[dict, dict]:
  """Maps a state dict (from `read_weights`) onto the variables of `models.build(arch, ...)`.

  Args:
    state: {key: array} in one of the LAYOUTS (torchvision or Caffe names).
    arch: the FCN to build.
    num_classes: default: the source's score_fr outputs (an FCN), else 21.
    width: default: inferred from the first convolution (64 channels at width 1).
    init_missing_heads: allow an FCN source without some of the arch's FCN layers (e.g. FCN-16s
      initialised from FCN-32s, as in the paper): those keep their initialisation, and source FCN
      layers the arch does not have are dropped.
  Returns:
    (variables {'params', maybe 'batch_stats'} of float32 NumPy arrays, info) where info holds
    'layout', 'kind' ('fcn' | 'backbone'), 'preprocessing' (the layout's default), 'num_classes',
    'width', 'initialised' (our parameters that kept their initialisation) and 'ignored' (source
    keys dropped on purpose).
  Raises:
    ConversionError listing missing, unexpected and mismatched keys.
  """
  from fcn_jax import models
  from fcn_jax.models import fcn as fcn_lib, layers
  if arch not in fcn_lib.ARCHS:
    raise ConversionError(f'unknown arch {arch!r}; choose one of {sorted(fcn_lib.ARCHS)}')
  spec = fcn_lib.ARCHS[arch]
  keys = set(state)
  is_fcn = any(k.startswith('score_fr') for k in keys)

  # The layout whose backbone keys the file covers best.
  probe = _targets(models.build(arch, num_classes=(1,) * len(spec.heads), width=1.0))
  scored = []
  for layout in _layouts_for(spec.backbone):
    backbone_keys = {t.source_key(layout) for t in probe if not t.is_head}
    scored.append((len(backbone_keys & keys), layout))
  hits, layout = max(scored, key=lambda s: s[0])

  def guess_hint() -> str:
    guesses = guess_archs(keys)
    if guesses and arch not in guesses:
      return f'\nThe file looks like weights for {" or ".join(guesses)}, not {arch}.'
    if not guesses:
      return '\nThe file does not look like VGG16, AlexNet or GoogLeNet weights.'
    return ''

  if hits == 0:
    sample = sorted(keys)[:12]
    raise ConversionError(
        f'no backbone weights for {arch} ({spec.backbone}) found in the file. Known layouts: '
        f'{", ".join(l.name for l in _layouts_for(spec.backbone))}; the file has keys like {sample}'
        + guess_hint())

  first = next(t for t in probe if t.path[-1] == 'kernel' and not t.is_head)
  if width is None:
    first_weight = state.get(first.source_key(layout))
    width = float(first_weight.shape[0]) / first.shape[-1] if first_weight is not None else 1.0
  if num_classes is None:
    counts = []
    for head in spec.heads:
      score = state.get(f'score_fr{head.suffix}{spec.streams[0].suffix}.weight')
      found = is_fcn and score is not None and score.ndim >= 1
      counts.append(int(score.shape[0]) if found else None)
    if None in counts:
      counts = list(spec.default_classes) if len(spec.heads) > 1 else [21]
    num_classes = counts[0] if len(counts) == 1 else tuple(counts)

  model = models.build(arch, num_classes=num_classes, width=width,
                       learnable_upsampling=learnable_upsampling)
  targets = _targets(model)
  variables: dict = {}
  missing, mismatched, initialised = [], [], []
  used = set()
  for t in targets:
    key = t.source_key(layout)
    if t.is_head and (not is_fcn or (init_missing_heads and key not in keys)):
      _set(variables, t.path, _initial_head(t))
      initialised.append('/'.join(t.path))
      continue
    if key not in keys:
      missing.append(f'{key}  (for {"/".join(t.path)}, expected {_expected_source_shape(t)})')
      continue
    used.add(key)
    value = _fit(np.asarray(state[key]), t)
    if value is None:
      mismatched.append(f'{key}: file has {tuple(state[key].shape)}, {arch} (width {width:g}, '
                        f'{_classes_text(num_classes)}) needs {_expected_source_shape(t)}')
      continue
    _set(variables, t.path, np.ascontiguousarray(value, dtype=np.float32))

  # The final upsampling is computed class by class from the kernel's diagonal (layers.Deconv):
  # a file whose final upsampling mixes classes would give other scores, so it is refused.
  mixing = []
  for name in model.final_upsampling_modules():
    kernel = variables.get('params', {}).get(name, {}).get('kernel')
    if kernel is not None and layers.off_diagonal_max(kernel) > 0:
      mixing.append(f'{name}: off-diagonal weights up to {layers.off_diagonal_max(kernel):.3g}')

  # FCN-8s at-once (Caffe): fixed Scale layers before score_pool4/3, checked and dropped.
  ignored = []
  for skip in spec.skips:
    key = f'scale_{skip.tap}.weight'
    if skip.scale != 1.0 and key in keys:
      used.add(key)
      values = np.asarray(state[key], np.float64)
      if values.size == 0 or not np.allclose(values, skip.scale, rtol=1e-5, atol=0):
        mismatched.append(f'{key}: {arch} scales {skip.tap} by the fixed {skip.scale:g}, the file by '
                          f'{np.unique(values)[:5].tolist()}')
  patterns = [re.compile(p) for p in layout.ignored]
  for key in sorted(keys - used):
    if any(p.search(key) for p in patterns) or \
       (init_missing_heads and is_fcn and key.startswith(HEAD_PREFIXES)):
      ignored.append(key)
  unexpected = sorted(keys - used - set(ignored))
  if missing or unexpected or mismatched or mixing:
    parts = [f'cannot load the file into {arch} (layout {layout.name}, width {width:g}, '
             f'{_classes_text(num_classes)}):' + guess_hint()]
    if missing:
      parts.append(_listing('missing keys', missing))
    if unexpected:
      parts.append(_listing('unexpected keys', [f'{k} {tuple(np.shape(state[k]))}' for k in unexpected]))
    if mismatched:
      parts.append(_listing('shape mismatches', mismatched))
    if mixing:
      parts.append(_listing('final upsamplings that mix classes (fcn_jax upsamples each class by '
                            'itself with the diagonal filter, as every reference net does with its '
                            'fixed bilinear one)', mixing))
    raise ConversionError('\n'.join(parts))

  info = {'layout': layout.name, 'kind': 'fcn' if is_fcn else 'backbone',
          'preprocessing': layout.preprocessing, 'num_classes': num_classes, 'width': width,
          'initialised': initialised, 'ignored': ignored}
  return variables, info


# --------------------------------------------------------------------------------------------------
# Whole conversions


def convert(src: str | os.PathLike, arch: str | None = None, *, format: str = 'auto',
            num_classes: int | None = None, width: float | None = None,
            preprocessing: str | None = None, learnable_upsampling: bool = True,
            class_names: list[str] | None = None, init_missing_heads: bool = False,
            modality: str | None = None, log=None) -> tuple[dict, dict]:
  """Reads `src` and maps it onto `arch`: (variables, checkpoint metadata). Writes nothing.

  Without `arch`, the file must be one of the fifteen reference nets (fcn_jax.zoo.recognise):
  their arch, classes, heads, modalities and preprocessing come from the recognised net.
  `log(message)` receives what was recognised and why.
  """
  from fcn_jax import checkpoint, zoo
  from fcn_jax import preprocessing as preprocessing_lib
  from fcn_jax.models import fcn as fcn_lib
  src = os.fspath(src)
  state, fmt = read_weights(src, format)
  net, why = None, ''
  try:
    net, why = zoo.recognise(state, src, modality)
  except zoo.RecognitionError as e:
    if arch is None:
      raise ConversionError(f'{src}: {e}. Nothing fits; pass --arch to convert it anyway.') \
          from None
    why = str(e)
  recognised = net
  if arch is None:
    arch = net.arch
  if net is not None and net.arch != arch:
    net = None  # --arch overrides: generic metadata for that arch
  elif net is not None and log:
    log(f'recognised {net.name} ({why}) -> arch {arch}')
  if modality is not None and (net is None or len(net.modalities) != 1):
    raise ConversionError(f'--modality is for the NYUD colour / HHA nets; {src} is not one of them')
  if net is not None and num_classes is None:
    num_classes = net.num_classes
  try:
    variables, info = import_weights(state, arch, num_classes=num_classes, width=width,
                                     init_missing_heads=init_missing_heads,
                                     learnable_upsampling=learnable_upsampling)
  except ConversionError as e:
    if recognised is not None and recognised.arch != arch:
      raise ConversionError(f'{src} is the reference net {recognised.name} ({why}), arch '
                            f'{recognised.arch}: convert it without --arch (or with --arch '
                            f'{recognised.arch}).\n{e}') from None
    raise
  prep = preprocessing or (net.modalities[0][1] if net is not None else
                           'caffe_bgr' if fmt == 'caffemodel' else info['preprocessing'])
  preprocessing_lib.get(prep)  # validates the name
  n = info['num_classes']
  heads = fcn_lib.ARCHS[arch].heads
  if net is not None and n == net.num_classes and class_names is None:
    metadata = net.metadata(width=info['width'], learnable_upsampling=learnable_upsampling)
    metadata['preprocessing'] = prep
    metadata['modalities'][0]['preprocessing'] = prep
  else:
    if class_names is None:
      counts = [n] if isinstance(n, int) else list(n)
      class_names = (list(VOC_CLASSES) if counts == [len(VOC_CLASSES)] else
                     [f'class_{i}' for i in range(counts[0])])
    if len(heads) == 1 and len(class_names) != n:
      raise ConversionError(f'{len(class_names)} class names for {n} classes')
    model = {'arch': arch, 'num_classes': n, 'width': info['width'],
             'learnable_upsampling': learnable_upsampling}
    metadata = {**checkpoint.model_metadata(model), 'preprocessing': prep,
                'class_names': list(class_names)}
    channels = fcn_lib.ARCHS[arch].input_channels
    if channels != 3:
      raise ConversionError(f'{arch} takes {channels} input channels; only the reference nets '
                            '(converted without --arch) say which modalities they are')
  what = 'FCN weights' if info['kind'] == 'fcn' else 'ImageNet backbone (FCN layers initialised)'
  metadata.update({
      'source': f'{os.path.basename(src)}: {what}, {fmt} file, {info["layout"]} layout',
      'source_format': fmt,
      'source_layout': info['layout'],
      'source_kind': info['kind'],
  })
  return variables, metadata


def convert_to_checkpoint(src: str | os.PathLike, out: str | os.PathLike, arch: str | None = None,
                          *, overwrite: bool = False, **kwargs) -> dict:
  """`convert` then `checkpoint.save_inference` to `out`, atomically: written to a temporary
  directory beside `out` and renamed, so a failure leaves nothing behind. Returns the metadata."""
  from fcn_jax import checkpoint
  out = os.path.abspath(os.path.expanduser(os.fspath(out)))
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConversionError(f'--out {out} is a file; give a directory to write the checkpoint into')
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise ConversionError(f'--out {out} exists; pass overwrite=True (--overwrite) to replace it')
    if not checkpoint.is_checkpoint_dir(out):
      raise ConversionError(f'--out {out} holds files that are not an fcn_jax checkpoint; '
                            f'--overwrite only replaces a checkpoint directory. Choose another --out.')
  if not os.path.isfile(os.path.expanduser(os.fspath(src))):
    raise ConversionError(f'{src}: no such file')
  variables, metadata = convert(src, arch, **kwargs)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    staged = os.path.join(tmp, 'checkpoint')
    checkpoint.save_inference(staged, variables, metadata)
    if os.path.exists(out):
      old = os.path.join(tmp, 'old')
      os.rename(out, old)
    os.rename(staged, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return metadata


@cli
def main(argv: list[str] | None = None) -> int:
  from fcn_jax import preprocessing as preprocessing_lib
  from fcn_jax.models import ARCHS
  parser = cli_lib.ArgumentParser(
      prog='python -m fcn_jax.convert',
      description='Import ImageNet backbones or released FCN models into an fcn_jax checkpoint.')
  parser.add_argument('src', help='.pth / .npz / .safetensors state dict or Caffe .caffemodel')
  parser.add_argument('--arch', choices=sorted(ARCHS),
                      help='default: recognised from the file (the fifteen reference nets)')
  parser.add_argument('--modality', choices=('color', 'hha'),
                      help='NYUD 40-class FCN-32s: colour or HHA input (their files share one '
                      'layout; default: from the file name)')
  parser.add_argument('--out', required=True, help='checkpoint directory to write')
  parser.add_argument('--format', default='auto', choices=('auto',) + FORMATS)
  parser.add_argument('--preprocessing', choices=sorted(preprocessing_lib.PRESETS),
                      help='input convention of the weights (default: from the file layout)')
  parser.add_argument('--num_classes', type=int, help='default: from score_fr, else 21')
  parser.add_argument('--width', type=float, help='default: inferred from the first convolution')
  parser.add_argument('--class_names', help='comma-separated (default: the 21 VOC classes)')
  parser.add_argument('--frozen_upsampling', action='store_true',
                      help='record learnable_upsampling=False (the Caffe reference training)')
  parser.add_argument('--init_missing_heads', action='store_true',
                      help='allow FCN layers missing from the file (e.g. FCN-16s from FCN-32s)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace --out if it is an existing fcn_jax checkpoint (never any other '
                      'directory)')
  args = parser.parse_args(argv)
  if args.num_classes is not None and args.num_classes < 2:
    parser.error(f'--num_classes {args.num_classes}: must be >= 2 (background and a class)')
  if args.width is not None and not args.width > 0:
    parser.error(f'--width {args.width}: must be > 0 (1.0 = the paper\'s nets)')
  try:
    metadata = convert_to_checkpoint(
        args.src, args.out, args.arch, overwrite=args.overwrite, format=args.format,
        num_classes=args.num_classes, width=args.width, preprocessing=args.preprocessing,
        learnable_upsampling=not args.frozen_upsampling,
        class_names=args.class_names.split(',') if args.class_names else None,
        init_missing_heads=args.init_missing_heads, modality=args.modality,
        log=lambda message: print(message))
  except ConversionError as e:
    print(f'error: {e}\nnothing was written.', file=sys.stderr)
    return 2
  inputs = ' + '.join(f'{m["name"]} ({m["preprocessing"]})' for m in
                      preprocessing_lib.modalities_of(metadata))
  print(f'wrote {os.path.abspath(args.out)}: {metadata["arch"]}, '
        f'{_classes_text(metadata["num_classes"])}, width {metadata["width"]:g}, inputs {inputs} '
        f'({metadata["source"]})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
