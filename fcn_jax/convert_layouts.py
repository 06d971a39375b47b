"""Where each parameter of our models lives in a weights file (torchvision or Caffe names), and
`import_weights`, which maps a state dict from fcn_jax.convert_formats onto an arch's variables."""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Iterable

import jax
import numpy as np

from fcn_jax import models
from fcn_jax.convert_formats import ConversionError
from fcn_jax.convert_torchvision import (  # noqa: F401 - re-exported
    _VGG_CONVS, is_torchvision_vgg16_bn, resnet_depth, vgg16_bn_state)
from fcn_jax.models import fcn as fcn_lib, layers


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  backbone: str
  module_keys: dict[str, str]  # our top-level module name -> source prefix ('' = the same name)
  ignored: tuple[str, ...]     # regexes of source keys that are dropped on purpose
  preprocessing: str
  rename_branches: bool = False  # torchvision GoogLeNet: branch2_1 -> branch2.1
  # (regex, replacement) applied in order to our dotted names (torchvision ResNet:
  # layer1_0.conv1.bn.weight -> layer1.0.bn1.weight), then `backbone_prefix` before the backbone's.
  renames: tuple[tuple[str, str], ...] = ()
  backbone_prefix: str = ''
  # The FCN layers in the source: a key starting with `fcn_marker` makes the file an FCN (not a
  # backbone; None: never one); keys starting with `head_keys` are its FCN layers.
  fcn_marker: str | None = 'score_fr'
  head_keys: tuple[str, ...] = ('score_', 'upscore')

  def prefix(self, module: str) -> str:
    return self.module_keys.get(module) or module

  def is_fcn(self, keys: Iterable[str]) -> bool:
    """Whether the source holds FCN layers, not just a backbone."""
    return self.fcn_marker is not None and any(k.startswith(self.fcn_marker) for k in keys)


_TV_VGG16_FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_NUM_BATCHES = r'.*\.num_batches_tracked$'

# torchvision ResNet / FCN-ResNet names from ours (fcn_jax.models.backbones.Bottleneck, FCN's
# torchvision heads): ConvBN's conv / bn are torchvision's convN / bnN, an FCNHead's conv / bn / 1x1
# scores its Sequential's 0 / 1 / 4.
_RESNET_RENAMES = (
    (r'^conv1\.conv\.', 'conv1.'), (r'^conv1\.bn\.', 'bn1.'),
    (r'^(layer\d)_(\d+)\.', r'\1.\2.'),
    (r'\.conv(\d)\.conv\.', r'.conv\1.'), (r'\.conv(\d)\.bn\.', r'.bn\1.'),
    (r'\.downsample\.conv\.', '.downsample.0.'), (r'\.downsample\.bn\.', '.downsample.1.'),
    (r'^score_fr_conv\.conv\.', 'classifier.0.'), (r'^score_fr_conv\.bn\.', 'classifier.1.'),
    (r'^score_fr\.', 'classifier.4.'),
    (r'^score_aux_conv\.conv\.', 'aux_classifier.0.'),
    (r'^score_aux_conv\.bn\.', 'aux_classifier.1.'), (r'^score_aux\.', 'aux_classifier.4.'),
)


def _resnet_layouts(depth: str) -> dict[str, Layout]:
  """torchvision's segmentation FCN-ResNet (the backbone under `backbone.`, the FCNHeads under
  `classifier.` / `aux_classifier.`) and its ImageNet ResNet (no prefix; fc dropped)."""
  fcn = Layout(f'torchvision_fcn_{depth}', depth, {}, (_NUM_BATCHES,), 'torchvision_rgb',
               renames=_RESNET_RENAMES, backbone_prefix='backbone.', fcn_marker='classifier.',
               head_keys=('classifier.', 'aux_classifier.'))
  imagenet = Layout(f'torchvision_{depth}', depth, {}, (r'^fc\.', _NUM_BATCHES), 'torchvision_rgb',
                    renames=_RESNET_RENAMES, fcn_marker=None)
  return {fcn.name: fcn, imagenet.name: imagenet}

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
    **_resnet_layouts('resnet50'),
    **_resnet_layouts('resnet101'),
    # torchvision vgg16_bn, rewritten by `vgg16_bn_state` to our names first.
    'torchvision_vgg16_bn': Layout('torchvision_vgg16_bn', 'vgg16_bn', {},
                                   (r'^classifier\.6\.', _NUM_BATCHES), 'torchvision_rgb',
                                   fcn_marker=None),
}


HEAD_PREFIXES = ('score_', 'upscore')  # the FCN layers; all other parameters form the backbone
_LEAF_KEYS = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
              ('params', 'scale'): 'weight', ('batch_stats', 'mean'): 'running_mean',
              ('batch_stats', 'var'): 'running_var'}


@dataclasses.dataclass(frozen=True)
class Target:
  # ('params', 'conv1_1', 'kernel'), ('batch_stats', 'conv1', 'bn', 'mean'), ...
  path: tuple[str, ...]
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
    key = '.'.join(parts + [_LEAF_KEYS[(self.path[0], self.path[-1])]])
    for pattern, replacement in layout.renames:
      key = re.sub(pattern, replacement, key)
    return key if self.is_head else layout.backbone_prefix + key


def _targets(model) -> list[Target]:
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return [Target(tuple(str(k.key) for k in path), tuple(leaf.shape)) for path, leaf in flat]


def _layouts_for(backbone: str) -> list[Layout]:
  return [l for l in LAYOUTS.values() if l.backbone == backbone]


def guess_archs(keys: Iterable[str]) -> list[str]:
  """The archs a set of source keys looks made for (for error messages)."""
  keys = set(keys)
  has = lambda k: k in keys
  depth, _ = resnet_depth(keys)
  if depth is not None:
    return [f'fcn_{depth}']
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
  """The FCN layers' initialisation (as models.init_variables): zero score layers, bilinear
  upsampling; the 3x3 conv of a torchvision head (score_fr_conv) He-normal, its BatchNorm the
  identity."""
  if target.is_deconv:
    return np.asarray(layers.bilinear_init(target.shape[0])(None, target.shape))
  if target.path[-1] in ('scale', 'var'):
    return np.ones(target.shape, np.float32)
  if target.path[-1] == 'kernel' and target.module.endswith('_conv'):
    return _he_normal(target.shape, seed=zlib.crc32('/'.join(target.path).encode()))
  return np.zeros(target.shape, np.float32)


def _he_normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
  """flax's he_normal (variance 2 / fan_in, normal truncated at 2 standard deviations), from NumPy:
  deterministic, and no XLA program to compile per shape."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  while (outside := np.abs(x) > 2).any():
    x[outside] = rng.standard_normal(int(outside.sum()))
  # 0.8796...: the standard deviation of a unit normal truncated to [-2, 2].
  std = np.sqrt(2.0 / np.prod(shape[:-1])) / 0.87962566103423978
  return (x * std).astype(np.float32)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _listing(title: str, items: list[str], limit: int = 40) -> str:
  shown = items[:limit] + ([f'... and {len(items) - limit} more'] if len(items) > limit else [])
  return f'{title} ({len(items)}):\n' + '\n'.join(f'    {s}' for s in shown)


def classes_text(num_classes) -> str:
  if isinstance(num_classes, (tuple, list)):
    return ' + '.join(map(str, num_classes)) + ' classes'
  return f'{num_classes} classes'



def _best_layout(backbone: str, probe: list[Target], keys: set[str]) -> tuple[int, Layout]:
  """(hits, layout): the layout whose backbone keys the file covers best."""
  scored = []
  for layout in _layouts_for(backbone):
    backbone_keys = {t.source_key(layout) for t in probe if not t.is_head}
    scored.append((len(backbone_keys & keys), layout))
  return max(scored, key=lambda s: s[0])


def _guess_hint(arch: str, keys: set[str]) -> str:
  if 'conv5_3.conv.weight' in keys:  # torchvision vgg16_bn, as vgg16_bn_state renamed it
    return ('\nThe file is a VGG16-BN: it fills the vgg16_bn backbone of fcn32s, fcn16s or fcn8s '
            f'(not {arch}).')
  guesses = guess_archs(keys)
  if guesses and arch not in guesses:
    return f'\nThe file looks like weights for {" or ".join(guesses)}, not {arch}.'
  if not guesses:
    return '\nThe file does not look like VGG16, AlexNet, GoogLeNet or ResNet-50/101 weights.'
  return ''


def _default_width(state: dict[str, np.ndarray], probe: list[Target], layout: Layout) -> float:
  """The width the first convolution says (64 channels at width 1); 1.0 without one."""
  first = next(t for t in probe if t.path[-1] == 'kernel' and not t.is_head)
  first_weight = state.get(first.source_key(layout))
  return float(first_weight.shape[0]) / first.shape[-1] if first_weight is not None else 1.0


def _default_num_classes(state: dict[str, np.ndarray], spec, is_fcn: bool, layout: Layout):
  """The source's score_fr outputs per head (an FCN), else the arch's default classes (21)."""
  counts = []
  for head in spec.heads:
    score_fr = Target(('params', f'score_fr{head.suffix}{spec.streams[0].suffix}', 'kernel'), ())
    score = state.get(score_fr.source_key(layout))
    found = is_fcn and score is not None and score.ndim >= 1
    counts.append(int(score.shape[0]) if found else None)
  if None in counts:
    counts = list(spec.default_classes) if len(spec.heads) > 1 else [21]
  return counts[0] if len(counts) == 1 else tuple(counts)


def _mixing_upsamplings(model, variables: dict) -> list[str]:
  """The final upsampling is computed class by class from the kernel's diagonal (layers.Deconv):
  a file whose final upsampling mixes classes would give other scores, so it is refused."""
  mixing = []
  for name in model.final_upsampling_modules():
    kernel = variables.get('params', {}).get(name, {}).get('kernel')
    if kernel is not None and layers.off_diagonal_max(kernel) > 0:
      mixing.append(f'{name}: off-diagonal weights up to {layers.off_diagonal_max(kernel):.3g}')
  return mixing


@dataclasses.dataclass
class _Mapping:
  """One import in progress: the variables filled so far and every source key that did not fit."""
  state: dict[str, np.ndarray]
  arch: str
  layout: Layout
  width: float
  num_classes: Any
  init_missing_heads: bool
  variables: dict = dataclasses.field(default_factory=dict)
  missing: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)
  initialised: list[str] = dataclasses.field(default_factory=list)
  used: set[str] = dataclasses.field(default_factory=set)

  def __post_init__(self):
    self.keys = set(self.state)
    self.is_fcn = self.layout.is_fcn(self.keys)

  def add(self, t: Target) -> None:
    """Fills target `t` from its source key (or its initialisation), or records why not."""
    key = t.source_key(self.layout)
    if t.is_head and (not self.is_fcn or (self.init_missing_heads and key not in self.state)):
      _set(self.variables, t.path, _initial_head(t))
      self.initialised.append('/'.join(t.path))
      return
    if key not in self.state:
      self.missing.append(f'{key}  (for {"/".join(t.path)}, expected {_expected_source_shape(t)})')
      return
    self.used.add(key)
    value = _fit(np.asarray(self.state[key]), t)
    if value is None:
      self.mismatched.append(
          f'{key}: file has {tuple(self.state[key].shape)}, {self.arch} (width {self.width:g}, '
          f'{classes_text(self.num_classes)}) needs {_expected_source_shape(t)}')
      return
    _set(self.variables, t.path, np.ascontiguousarray(value, dtype=np.float32))

  def check_scales(self, spec) -> None:
    """FCN-8s at-once (Caffe): fixed Scale layers before score_pool4/3, checked and dropped."""
    for skip in spec.skips:
      key = f'scale_{skip.tap}.weight'
      if skip.scale != 1.0 and key in self.state:
        self.used.add(key)
        values = np.asarray(self.state[key], np.float64)
        if values.size == 0 or not np.allclose(values, skip.scale, rtol=1e-5, atol=0):
          self.mismatched.append(f'{key}: {self.arch} scales {skip.tap} by the fixed '
                                 f'{skip.scale:g}, the file by {np.unique(values)[:5].tolist()}')

  def ignored(self) -> list[str]:
    """The unused source keys dropped on purpose (the layout's, and FCN layers if allowed)."""
    patterns = [re.compile(p) for p in self.layout.ignored]
    drop_heads = self.init_missing_heads and self.is_fcn
    return [key for key in sorted(self.keys - self.used)
            if any(p.search(key) for p in patterns) or
            (drop_heads and key.startswith(self.layout.head_keys))]

  def error(self, unexpected: list[str], mixing: list[str]) -> ConversionError:
    parts = [f'cannot load the file into {self.arch} (layout {self.layout.name}, width '
             f'{self.width:g}, {classes_text(self.num_classes)}):' +
             _guess_hint(self.arch, self.keys)]
    if self.missing:
      parts.append(_listing('missing keys', self.missing))
    if unexpected:
      parts.append(_listing('unexpected keys',
                            [f'{k} {tuple(np.shape(self.state[k]))}' for k in unexpected]))
    if self.mismatched:
      parts.append(_listing('shape mismatches', self.mismatched))
    if mixing:
      parts.append(_listing('final upsamplings that mix classes (fcn_jax upsamples each class by '
                            'itself with the diagonal filter, as every reference net does with its '
                            'fixed bilinear one)', mixing))
    return ConversionError('\n'.join(parts))


def _no_backbone_error(arch: str, backbone: str, keys: set[str]) -> ConversionError:
  return ConversionError(
      f'no backbone weights for {arch} ({backbone}) found in the file. Known layouts: '
      f'{", ".join(l.name for l in _layouts_for(backbone))}; the file has keys like '
      f'{sorted(keys)[:12]}' + _guess_hint(arch, keys))


def import_weights(state: dict[str, np.ndarray], arch: str, *, num_classes: int | None = None,
                   width: float | None = None, init_missing_heads: bool = False,
                   learnable_upsampling: bool = True,
                   aux: bool | None = None, backbone: str = '') -> tuple[dict, dict]:
  """Maps a state dict (from `read_weights`) onto the variables of `models.build(arch, ...)`.

  Args:
    state: {key: array} in one of the LAYOUTS (torchvision or Caffe names).
    arch: the FCN to build.
    num_classes: default: the source's score_fr outputs (an FCN), else 21.
    width: default: inferred from the first convolution (64 channels at width 1).
    init_missing_heads: allow an FCN source without some of the arch's FCN layers (e.g. FCN-16s
      initialised from FCN-32s, as in the paper): those keep their initialisation, and source FCN
      layers the arch does not have are dropped.
    aux: archs with an auxiliary head (fcn_resnet50/101): build(aux=...); default: whether the
      source has one (torchvision's aux_classifier).
    backbone: build(backbone=...); default: the arch's own, or vgg16_bn for a VGG16 arch given
      torchvision vgg16_bn weights.
  Returns:
    (variables {'params', maybe 'batch_stats'} of float32 NumPy arrays, info) where info holds
    'layout', 'kind' ('fcn' | 'backbone'), 'preprocessing' (the layout's default), 'num_classes',
    'width', 'aux', 'initialised' (our parameters that kept their initialisation) and 'ignored'
    (source keys dropped on purpose).
  Raises:
    ConversionError listing missing, unexpected and mismatched keys.
  """
  if arch not in fcn_lib.ARCHS:
    raise ConversionError(f'unknown arch {arch!r}; choose one of {sorted(fcn_lib.ARCHS)}')
  spec = fcn_lib.ARCHS[arch]
  if is_torchvision_vgg16_bn(state):
    backbone = backbone or ('vgg16_bn' if spec.backbone == 'vgg16' else '')
    state = vgg16_bn_state(state)
  keys = set(state)
  try:
    probe = _targets(models.build(arch, num_classes=(1,) * len(spec.heads), width=1.0,
                                  aux=bool(spec.aux_tap), backbone=backbone))
  except ValueError as e:
    raise ConversionError(str(e)) from None
  backbone_name = backbone or spec.backbone
  hits, layout = _best_layout(backbone_name, probe, keys)
  if hits == 0:
    raise _no_backbone_error(arch, backbone_name, keys)
  is_fcn = layout.is_fcn(keys)
  if width is None:
    width = _default_width(state, probe, layout)
  if num_classes is None:
    num_classes = _default_num_classes(state, spec, is_fcn, layout)
  if aux is None:
    aux_keys = {t.source_key(layout) for t in probe if t.module.startswith('score_aux')}
    aux = is_fcn and bool(aux_keys & keys)

  model = models.build(arch, num_classes=num_classes, width=width,
                       learnable_upsampling=learnable_upsampling, aux=aux, backbone=backbone)
  mapping = _Mapping(state, arch, layout, width, num_classes, init_missing_heads)
  for t in _targets(model):
    mapping.add(t)
  mixing = _mixing_upsamplings(model, mapping.variables)
  mapping.check_scales(spec)
  ignored = mapping.ignored()
  unexpected = sorted(keys - mapping.used - set(ignored))
  if mapping.missing or unexpected or mapping.mismatched or mixing:
    raise mapping.error(unexpected, mixing)
  info = {'layout': layout.name, 'kind': 'fcn' if is_fcn else 'backbone',
          'preprocessing': layout.preprocessing, 'num_classes': num_classes, 'width': width,
          'aux': aux, 'backbone': backbone, 'initialised': mapping.initialised,
          'ignored': ignored}
  return mapping.variables, info
