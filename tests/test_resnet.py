"""FCN-ResNet50/101 as torchvision defines them: layout, geometry, weights import and parity.

The reference is an independent PyTorch implementation written from torchvision's definitions
(tests/torch_resnet.py; torchvision itself is not installed). Its random weights (random BatchNorm
running statistics included) are saved with torchvision's real key names, converted by
`fcn_jax.convert` without --arch, and run through our model in eval mode: relative error below
1e-5 on 'out' and 'aux', at reduced width (1/16) and, for FCN-ResNet50 at 65x97, at full width.
Every file layout (FCN-ResNet50 with and without aux, FCN-ResNet101, ImageNet ResNet-50/101) is
also imported at full width with the keys and shapes of the real files (zero-stride arrays, no
weights to generate). Training compiles slowly on a CPU, so the train step runs on a shallower
ResNet of the same blocks (1/1/2/1 per layer).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

sys.path.insert(0, os.path.dirname(__file__))
import torch_fcn  # noqa: E402
import torch_resnet  # noqa: E402

from fcn_jax import convert  # noqa: E402
from fcn_jax import models  # noqa: E402
from fcn_jax.models import backbones, layers  # noqa: E402
from fcn_jax.models import forms as forms_lib  # noqa: E402

WIDTH = 1 / 16
RTOL = 1e-5
# torchvision's published parameter counts (its weights' meta['num_params']).
TORCHVISION_PARAMS = {'fcn_resnet50': 35_322_218, 'fcn_resnet101': 54_314_346,
                      'resnet50': 25_557_032, 'resnet101': 44_549_160}
FC_PARAMS = 2048 * 1000 + 1000


# --------------------------------------------------------------------------------------------------
# Helpers


def state_of(net) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def save_pth(state: dict[str, np.ndarray], path) -> str:
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
  return str(path)


def random_fcn(depth: str, aux: bool = True, width: float = WIDTH, seed: int = 0):
  net = torch_resnet.TorchFCNResNet(depth, 21, aux=aux, width=width)
  return torch_fcn.randomize_(net, torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def jitted_apply(model_config: tuple):
  model = models.build_from_config(dict(model_config))
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def run_ours(metadata: dict, variables: dict, x: torch.Tensor) -> dict[str, np.ndarray]:
  """NCHW torch input -> {'out', maybe 'aux'}: NCHW scores from our model."""
  out = jitted_apply(tuple(sorted(metadata['model'].items())))(
      variables, x.numpy().transpose(0, 2, 3, 1))
  out = out if isinstance(out, dict) else {'labels': out}
  names = {'labels': 'out', 'aux': 'aux'}
  return {names[k]: np.asarray(v).transpose(0, 3, 1, 2) for k, v in out.items()}


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert np.linalg.norm(ref) > 0
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_same_argmax(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
  """The same predicted class, except at near ties of the reference (random weights make some:
  its top two scores within float32 noise of each other)."""
  picked = np.take_along_axis(ref, ours.argmax(1)[:, None], axis=1)[:, 0]
  gap = ref.max(1) - picked  # 0 where the argmaxes agree
  assert gap.max() <= 1e-5 * np.abs(ref).max(), f'{what}: argmax differs by {gap.max():.3g}'
  assert (gap > 0).mean() < 1e-3, what


def check_parity(net, metadata, variables, sizes, batch=1, seed=1) -> dict[str, float]:
  """Max relative error per output over `sizes`; asserts < RTOL and the same argmax."""
  g = torch.Generator().manual_seed(seed)
  worst = {}
  for h, w in sizes:
    x = torch.randn((batch, 3, h, w), generator=g)  # torchvision_rgb inputs are O(1)
    with torch.no_grad():
      ref = {k: v.numpy() for k, v in net(x).items()}
    ours = run_ours(metadata, variables, x)
    assert sorted(ours) == sorted(ref)
    for name in ref:
      assert ref[name].shape[2:] == (h, w)
      err = relative_error(ours[name], ref[name])
      assert err < RTOL, f'{name} {h}x{w}: relative error {err:.3g}'
      assert_same_argmax(ours[name], ref[name], f'{name} {h}x{w}')
      worst[name] = max(worst.get(name, 0.0), err)
  print(f'parity {metadata["arch"]} width {metadata["width"]:g} {sizes}: '
        + ', '.join(f'{k} {v:.2e}' for k, v in worst.items()))
  return worst


def flat(tree: dict) -> dict[str, np.ndarray]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_head(path: str) -> bool:
  return path.split('/')[1].startswith('score_')


@pytest.fixture(scope='module')
def fcn50():
  return random_fcn('resnet50')


@pytest.fixture(scope='module')
def fcn50_converted(fcn50, tmp_path_factory):
  path = save_pth(state_of(fcn50), tmp_path_factory.mktemp('w') / 'fcn_resnet50_coco.pth')
  messages = []
  variables, metadata = convert.convert(path, log=messages.append)
  return variables, metadata, messages


# --------------------------------------------------------------------------------------------------
# Definition: layout, geometry, Table-1 figures


def test_describe_matches_torchvision():
  """Parameter counts equal torchvision's published ones; output stride 8; the receptive field
  from an independent table of the dilated 3x3s."""
  for arch, blocks in (('fcn_resnet50', (3, 4, 6, 3)), ('fcn_resnet101', (3, 4, 23, 3))):
    d = models.describe(arch)
    assert d['params'] + d['aux_params'] == TORCHVISION_PARAMS[arch], d
    assert d['aux_params'] == 1024 * 256 * 9 + 2 * 256 + 256 * 21 + 21
    assert d['max_stride'] == 8 and d['head_type'] == 'torchvision'
    assert d['conv_layers'] == 1 + 3 * sum(blocks) + 2
    assert d['upsampling_params'] == 0 and d['skip_crops'] == () and d['final_crop'] == 0
    assert d['upsampling'] == [] and d['resize'] == 'bilinear, align_corners=False'
    # (kernel extent, stride) along the longest path: stem, pool, then each block's 3x3.
    table = [(7, 2), (3, 2)] + [(3, 1)] * blocks[0] + [(3, 2)] + [(3, 1)] * (blocks[1] - 1)
    table += [(3, 1)] + [(5, 1)] * (blocks[2] - 1)  # layer3: dilation 1 first, then 2
    table += [(5, 1)] + [(9, 1)] * (blocks[3] - 1)  # layer4: dilation 2 first, then 4
    table += [(3, 1)]  # the FCNHead's 3x3
    rf, jump = 1, 1
    for k, s in table:
      rf, jump = rf + (k - 1) * jump, jump * s
    assert d['receptive_field'] == rf == {'fcn_resnet50': 443, 'fcn_resnet101': 987}[arch]
  spec = backbones.get_backbone('resnet50')
  res = [l for l in spec if isinstance(l, backbones.ResLayer)]
  assert [(l.stride, l.first_dilation, l.dilation) for l in res] == [
      (1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
  assert backbones.coord_map(spec) == (8, 0)
  model = models.build('fcn_resnet50')
  assert model.frozen_modules() == () and model.final_upsampling_modules() == ()


def test_full_size_shapes_and_outputs():
  model = models.build('fcn_resnet101', aux=True)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  p = shapes['params']
  assert p['conv1']['conv']['kernel'].shape == (7, 7, 3, 64)
  assert p['layer3_22']['conv2']['conv']['kernel'].shape == (3, 3, 256, 256)
  assert p['layer4_0']['downsample']['conv']['kernel'].shape == (1, 1, 1024, 2048)
  assert 'downsample' not in p['layer4_1']
  assert p['score_fr_conv']['conv']['kernel'].shape == (3, 3, 2048, 512)
  assert p['score_fr']['kernel'].shape == (1, 1, 512, 21)
  assert p['score_aux_conv']['conv']['kernel'].shape == (3, 3, 1024, 256)
  assert shapes['batch_stats']['layer2_0']['conv3']['bn']['var'].shape == (512,)
  for h, w in ((1, 1), (65, 97)):
    out = jax.eval_shape(lambda v, x: model.apply(v, x), shapes,
                         jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32))
    assert {k: v.shape for k, v in out.items()} == {'labels': (2, h, w, 21), 'aux': (2, h, w, 21)}
  with pytest.raises(ValueError, match='no auxiliary head'):
    models.build('fcn8s', aux=True)
  assert 'aux' in models.MODEL_CONFIG_FIELDS and 'bn_frozen' in models.MODEL_CONFIG_FIELDS


# --------------------------------------------------------------------------------------------------
# The resampling operators against PyTorch's


@pytest.mark.parametrize('src,dst', [((9, 13), (65, 97)), ((8, 8), (64, 64)), ((5, 7), (37, 53)),
                                     ((41, 61), (321, 481)), ((3, 3), (3, 3)), ((1, 1), (7, 5)),
                                     ((20, 30), (7, 11))])
def test_resize_bilinear_is_interpolate_align_corners_false(src, dst):
  x = torch.randn((2, 3, *src), generator=torch.Generator().manual_seed(0))
  ref = F.interpolate(x, size=dst, mode='bilinear', align_corners=False).numpy()
  ours = np.asarray(layers.resize_bilinear(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), dst))
  np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-5)


def test_max_pool_floor_is_torch_max_pool():
  pool = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
  for h, w in ((1, 1), (2, 3), (4, 5), (33, 64), (65, 97)):
    x = torch.randn((1, 2, h, w), generator=torch.Generator().manual_seed(h * w))
    ours = layers.max_pool_floor(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), 3, 2, 1)
    np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), pool(x).numpy())


# --------------------------------------------------------------------------------------------------
# Weights import and parity


def test_fcn_resnet50_parity(fcn50, fcn50_converted):
  variables, metadata, messages = fcn50_converted
  assert any('fcn_resnet50' in m and 'torchvision' in m for m in messages), messages
  assert metadata['arch'] == 'fcn_resnet50' and metadata['model']['aux'] is True
  assert metadata['width'] == WIDTH and metadata['num_classes'] == 21
  assert metadata['preprocessing'] == 'torchvision_rgb'
  assert metadata['source_layout'] == 'torchvision_fcn_resnet50'
  assert metadata['source_kind'] == 'fcn'
  assert len(metadata['class_names']) == 21 and metadata['class_names'][15] == 'person'
  # every variable came from the file, running statistics included
  model = models.build_from_config(metadata['model'])
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  sd = fcn50.state_dict()
  np.testing.assert_array_equal(variables['batch_stats']['layer3_1']['conv2']['bn']['var'],
                                sd['backbone.layer3.1.bn2.running_var'].numpy())
  np.testing.assert_array_equal(variables['params']['layer4_0']['downsample']['conv']['kernel'],
                                sd['backbone.layer4.0.downsample.0.weight'].numpy()
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['score_aux']['bias'],
                                sd['aux_classifier.4.bias'].numpy())
  check_parity(fcn50, metadata, variables, sizes=((65, 97),), batch=2)


def test_fcn_resnet50_full_width_parity(tmp_path):
  net = random_fcn('resnet50', width=1.0, seed=3)
  path = save_pth(state_of(net), tmp_path / 'fcn_resnet50.pth')
  variables, metadata = convert.convert(path)
  assert metadata['arch'] == 'fcn_resnet50' and metadata['width'] == 1.0
  check_parity(net, metadata, variables, sizes=((65, 97),))


def test_fcn_resnet101_conversion(tmp_path):
  """Converted without --arch, every variable from the file. (Its forward parity, 7.8e-7 'out' and
  6.5e-7 'aux' at 33x47, width 1/16, compiles for ~25 s on a loaded 2-core CPU: left out; it only
  repeats FCN-ResNet50's blocks, and test_real_file_layouts_at_full_width checks its layout.)"""
  net = random_fcn('resnet101', seed=4)
  state = state_of(net)
  variables, metadata = convert.convert(save_pth(state, tmp_path / 'fcn_resnet101.pth'))
  assert metadata['arch'] == 'fcn_resnet101' and metadata['model']['aux'] is True
  assert metadata['source_layout'] == 'torchvision_fcn_resnet101'
  model = models.build_from_config(metadata['model'])
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  leaves = flat(variables)
  np.testing.assert_array_equal(leaves['params/layer3_22/conv2/conv/kernel'],
                                state['backbone.layer3.22.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(leaves['batch_stats/layer4_2/conv3/bn/mean'],
                                state['backbone.layer4.2.bn3.running_mean'])
  np.testing.assert_array_equal(leaves['params/score_fr_conv/bn/scale'],
                                state['classifier.1.weight'])


def test_fcn_resnet50_without_aux(fcn50, fcn50_converted, tmp_path):
  """torchvision's aux_loss=False file: no aux head in the checkpoint's model, one output."""
  net = random_fcn('resnet50', aux=False)
  net.load_state_dict({k: v for k, v in fcn50.state_dict().items()
                       if not k.startswith('aux_classifier.')})
  state = state_of(net)
  assert not any(k.startswith('aux_classifier.') for k in state)
  variables, metadata = convert.convert(save_pth(state, tmp_path / 'no_aux.pth'))
  assert metadata['arch'] == 'fcn_resnet50' and metadata['model']['aux'] is False
  assert 'score_aux' not in variables['params'] and 'score_aux_conv' not in variables['params']
  with_aux = flat(fcn50_converted[0])
  for path, leaf in flat(variables).items():
    np.testing.assert_array_equal(leaf, with_aux[path], err_msg=path)
  model = models.build_from_config(metadata['model'])
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                       jax.ShapeDtypeStruct((1, 65, 97, 3), jnp.float32))
  assert out.shape == (1, 65, 97, 21)  # one array, not a dict
  # the converted parameters give torchvision's 'out' (the aux head does not feed it)
  x = torch.randn((2, 3, 65, 97), generator=torch.Generator().manual_seed(9))  # compiled above
  with torch.no_grad():
    ref = net(x)['out'].numpy()
  ours = run_ours(fcn50_converted[1], fcn50_converted[0], x)['out']
  assert relative_error(ours, ref) < RTOL


@pytest.mark.parametrize('depth', ['resnet50', 'resnet101'])
def test_imagenet_resnet_backbone(depth, fcn50, fcn50_converted, tmp_path):
  """torchvision's ImageNet classifier: the backbone imported (fc dropped), the heads initialised
  as models.init_variables does; the same backbone variables as from the FCN file."""
  fcn = fcn50 if depth == 'resnet50' else random_fcn('resnet101', seed=5)
  backbone = {k[len('backbone.'):]: v for k, v in state_of(fcn).items()
              if k.startswith('backbone.')}
  rng = np.random.default_rng(0)
  backbone['fc.weight'] = rng.normal(size=(1000, 128)).astype(np.float32)
  backbone['fc.bias'] = rng.normal(size=(1000,)).astype(np.float32)
  variables, metadata = convert.convert(save_pth(backbone, tmp_path / f'{depth}.pth'))
  arch = f'fcn_{depth}'
  assert metadata['arch'] == arch and metadata['source_kind'] == 'backbone'
  assert metadata['source_layout'] == f'torchvision_{depth}'
  assert metadata['preprocessing'] == 'torchvision_rgb' and metadata['num_classes'] == 21
  assert metadata['model']['aux'] is False and metadata['width'] == WIDTH
  model = models.build_from_config(metadata['model'])
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  leaves = flat(variables)
  if depth == 'resnet50':
    from_fcn = flat(fcn50_converted[0])
    for path, leaf in leaves.items():
      if not is_head(path):
        np.testing.assert_array_equal(leaf, from_fcn[path], err_msg=path)
  else:
    np.testing.assert_array_equal(leaves['params/layer3_22/conv3/conv/kernel'],
                                  backbone['layer3.22.conv3.weight'].transpose(2, 3, 1, 0))
  for path, leaf in leaves.items():
    if is_head(path):
      name = path.split('/')[-1]
      if path.startswith('params/score_fr_conv/conv/'):
        fan_in = np.prod(leaf.shape[:-1])
        assert 0.8 < leaf.std() * np.sqrt(fan_in / 2) < 1.2, path  # He normal
      else:
        np.testing.assert_array_equal(leaf, 1.0 if name in ('scale', 'var') else 0.0, path)


def test_real_file_layouts_at_full_width():
  """The keys and shapes of torchvision's real files (modules on the meta device: shapes only, as
  zero-stride arrays) import at full width with nothing missing, unexpected or mismatched."""
  cases = [('resnet50', 'fcn', True), ('resnet50', 'fcn', False), ('resnet101', 'fcn', True),
           ('resnet50', 'imagenet', False), ('resnet101', 'imagenet', False)]
  for depth, kind, aux in cases:
    with torch.device('meta'):
      net = (torch_resnet.TorchFCNResNet(depth, 21, aux=aux) if kind == 'fcn' else
             torch_resnet.TorchResNet(depth, replace_stride_with_dilation=(False, False, False),
                                      classifier=True))
    state = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
             for k, v in net.state_dict().items()}
    torch_params = sum(int(np.prod(v.shape)) for _, v in net.named_parameters())
    assert convert.resnet_depth(state)[0] == depth
    variables, info = convert.import_weights(state, f'fcn_{depth}')
    assert info['kind'] == ('fcn' if kind == 'fcn' else 'backbone')
    assert info['aux'] is aux and info['width'] == 1.0 and info['num_classes'] == 21
    ignored = {k for k in state if k.endswith('num_batches_tracked') or k.startswith('fc.')}
    assert set(info['ignored']) == ignored
    params = variables['params']
    if kind == 'fcn':
      assert models.count_params(params) == torch_params
      if aux:
        assert torch_params == TORCHVISION_PARAMS[f'fcn_{depth}']
    else:
      assert torch_params == TORCHVISION_PARAMS[depth]
      backbone = {k: v for k, v in params.items() if not k.startswith('score_')}
      assert models.count_params(backbone) == torch_params - FC_PARAMS


def test_other_resnets_are_refused(tmp_path):
  """A ResNet-18 (BasicBlock) has no arch: a clear error, not a wrong guess."""
  state = {'conv1.weight': np.zeros((64, 3, 7, 7), np.float32)}
  for layer in range(1, 5):
    for block in range(2):
      for conv in (1, 2):
        state[f'layer{layer}.{block}.conv{conv}.weight'] = np.zeros((1, 1, 3, 3), np.float32)
  path = save_pth(state, tmp_path / 'resnet18.pth')
  with pytest.raises(convert.ConversionError, match='2/2/2/2 BasicBlock'):
    convert.convert(path)


# --------------------------------------------------------------------------------------------------
# Training: initialisation, trained and frozen BatchNorm statistics


@pytest.fixture
def shallow_resnet(monkeypatch):
  """fcn_resnet50's definition on a ResNet of one block per layer, with XLA's own CPU forms (its
  train step compiles in ~30 s on a loaded 2-core CPU, FCN-ResNet50's in minutes; the same blocks,
  dilations and heads)."""
  monkeypatch.setitem(backbones.BACKBONES, 'resnet_test', lambda: backbones._resnet((1, 1, 1, 1)))
  spec = dataclasses.replace(models.ARCHS['fcn_resnet50'], backbone='resnet_test')
  return lambda **kw: models.FCN(spec, num_classes=(3,), width=1 / 32, aux=True,
                                 forms=forms_lib.PLAIN_XLA, **kw)


def host_variables(model, seed: int = 0) -> dict:
  """Random variables filled on the host (the jitted initialiser compiles for ~15 s): He-normal
  kernels, small random biases and score layers, BatchNorm statistics of an identity."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))

  def leaf(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'kernel':
      return (rng.standard_normal(x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))).astype(np.float32)
    if name in ('scale', 'var'):
      return np.ones(x.shape, np.float32)
    return np.zeros(x.shape, np.float32) if name == 'mean' else \
        (0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_train_step_updates_batch_stats(shallow_resnet):
  from fcn_jax import optim, train
  model = shallow_resnet()
  variables = host_variables(model)
  tx = optim.make_optimizer(learning_rate=1e-3, momentum=0.9, weight_decay=1e-4,
                            params=variables['params'],
                            frozen=models.frozen_mask(model, variables['params']), algorithm='adam')
  state = train.create_train_state(model, tx, variables, jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(0, 3, size=(2, 16, 16)).astype(np.int32)}
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, normalize_loss=True))
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss']))
  before, after = flat(variables['batch_stats']), flat(new_state.batch_stats)
  assert all(not np.allclose(before[k], after[k]) for k in before if k.endswith('mean'))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(variables['params']),
                                                   jax.tree.leaves(new_state.params)))
  # bn_frozen: training keeps the running statistics (and normalises with them)
  frozen = shallow_resnet(bn_frozen=True)
  out, updated = jax.jit(lambda v, x: frozen.apply(v, x, train=True, mutable=['batch_stats'],
                                                   rngs={'dropout': jax.random.key(2)}))(
      variables, batch['image'])
  assert set(out) == {'labels', 'aux'}
  for path, leaf in flat(updated['batch_stats']).items():
    np.testing.assert_array_equal(leaf, flat(variables['batch_stats'])[path], path)


def test_the_auxiliary_head_adds_its_weighted_loss(shallow_resnet):
  """The train step's loss is the main head's cross-entropy plus aux_weight times the auxiliary
  head's, on the same labels (torchvision's recipe: 0.5), computed here from the model's own
  outputs with the textbook formula."""
  from fcn_jax import optim, train
  model = shallow_resnet()
  variables = host_variables(model)
  tx = optim.make_optimizer(learning_rate=0.0, momentum=0.9, weight_decay=0.0,
                            params=variables['params'],
                            frozen=models.frozen_mask(model, variables['params']), algorithm='adam')
  rng = np.random.default_rng(1)
  batch = {'image': rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(0, 3, size=(2, 16, 16)).astype(np.int32)}
  batch['label'][0, :4] = 255  # ignored pixels count in neither loss
  state = train.create_train_state(model, tx, variables, jax.random.key(1))
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  out, _ = model.apply(variables, batch['image'], train=True, rngs={'dropout': dropout_rng},
                       mutable=['batch_stats'])

  def ce(logits):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = batch['label'] != 255
    picked = np.take_along_axis(logp, np.where(valid, batch['label'], 0)[..., None], -1)[..., 0]
    return -picked[valid].mean()

  for weight in (0.5, 0.0):
    _, metrics = jax.jit(lambda s, b, w=weight: train.train_step(
        s, b, model=model, tx=tx, normalize_loss=True, aux_weight=w))(state, batch)
    np.testing.assert_allclose(float(metrics['loss']), ce(out['labels']) + weight * ce(out['aux']),
                               rtol=1e-5)
