"""Importing pretrained weights (fcn_jax.convert): every format, every layout, parity with PyTorch.

Files are written by the tests in the real formats (torch.save, np.savez, safetensors, Caffe
NetParameter protobufs with the caffe.proto field numbers, current and legacy V1), from reference
PyTorch nets with random non-zero weights at width 1/16 (tests/torch_fcn.py), then converted and run
through our models: relative error < 1e-4 and identical argmax on several input sizes, odd ones
included. Float32 throughout (XLA:CPU convolutions are full float32; no precision flag needed).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
nn = torch.nn

sys.path.insert(0, os.path.dirname(__file__))
import torch_fcn  # noqa: E402

import ml_collections  # noqa: E402

from fcn_jax import caffe_pb  # noqa: E402
from fcn_jax import checkpoint  # noqa: E402
from fcn_jax import convert  # noqa: E402
from fcn_jax import models  # noqa: E402
from fcn_jax.errors import UserError  # noqa: E402
from fcn_jax.models import fcn as fcn_lib  # noqa: E402
from fcn_jax.train import transfer  # noqa: E402

WIDTH = 1 / 16
SIZES = ((37, 53), (64, 64), (97, 81))
RTOL = 1e-4
VGG_CONVS = convert._VGG_CONVS


# --------------------------------------------------------------------------------------------------
# Helpers


@functools.lru_cache(maxsize=None)
def _apply_fn(arch: str, num_classes: int, width: float, backbone: str = ''):
  model = models.build(arch, num_classes=num_classes, width=width, backbone=backbone)
  return jax.jit(lambda variables, x: model.apply(variables, x))


def run_ours(arch: str, variables: dict, x: torch.Tensor, num_classes: int = 21,
             width: float = WIDTH, backbone: str = '') -> np.ndarray:
  """NCHW torch input -> NCHW scores from our model."""
  out = _apply_fn(arch, num_classes, width, backbone)(variables, x.numpy().transpose(0, 2, 3, 1))
  return np.asarray(out).transpose(0, 3, 1, 2)


def assert_parity(ours: np.ndarray, ref: np.ndarray, what: str = '') -> None:
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert np.linalg.norm(ref) > 0
  assert rel < RTOL, f'{what}: relative error {rel:.3g}'
  np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1), err_msg=what)


def check_parity(arch, variables, net_fn, sizes=SIZES, seed=0, batch=1, backbone=''):
  g = torch.Generator().manual_seed(seed)
  for h, w in sizes:
    x = torch.randn((batch, 3, h, w), generator=g) * 50  # image-like magnitudes (Caffe BGR - mean)
    with torch.no_grad():
      ref = net_fn(x).numpy()
    assert ref.shape[2:] == (h, w)
    ours = run_ours(arch, variables, x, num_classes=ref.shape[1], backbone=backbone)
    assert_parity(ours, ref, f'{arch} {h}x{w}')


def state_of(net: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def write(state: dict[str, np.ndarray], path: str, fmt: str, **caffe_kwargs) -> str:
  if fmt == 'pth':
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
  elif fmt == 'npz':
    with open(path, 'wb') as f:  # np.savez(path) would append '.npz'
      np.savez(f, **state)
  elif fmt == 'safetensors':
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  elif fmt == 'caffemodel':
    caffe_pb.write_net(path, 'net', caffe_layers(state, **caffe_kwargs),
                       legacy=caffe_kwargs.get('legacy', False))
  else:
    raise ValueError(fmt)
  return path


def caffe_layers(state: dict[str, np.ndarray], legacy: bool = False, fc_inner_product: bool = False,
                 scales: dict[str, float] | None = None) -> list:
  """Caffe layers (name, type, blobs) from pytorch-fcn keys, with blob-less layers interleaved as in
  a real net (ReLU / Pooling / Dropout / Crop). `fc_inner_product`: fc6/fc7/fc8 as InnerProduct
  (VGG_ILSVRC_16_layers) with (out, in) weights."""
  names = list(dict.fromkeys(k.rsplit('.', 1)[0] for k in state))
  layers = [('data', 'Data', [])]
  for name in names:
    blobs = [state[f'{name}.weight']] + ([state[f'{name}.bias']] if f'{name}.bias' in state else [])
    if name.startswith('upscore'):
      kind = 'Deconvolution'
    elif name.startswith('fc') and fc_inner_product:
      kind = 'InnerProduct'
      blobs[0] = blobs[0].reshape(blobs[0].shape[0], -1)
    else:
      kind = 'Convolution'
    if scales and name.startswith('score_pool'):
      tap = name[len('score_'):]
      c_in = state[f'{name}.weight'].shape[1]
      layers.append((f'scale_{tap}', 'Scale', [np.full((c_in,), scales[tap], np.float32)]))
    layers.append((name, kind, blobs))
    if name.startswith(('conv', 'fc')):
      layers.append((f'relu{name[len("conv"):] if name.startswith("conv") else name[2:]}', 'ReLU', []))
    if name in ('conv1_2', 'conv2_2', 'conv3_3', 'conv4_3', 'conv5_3'):
      layers.append((f'pool{name[4]}', 'Pooling', []))
    if name in ('fc6', 'fc7'):
      layers.append((f'drop{name[2]}', 'Dropout', []))
  if not legacy:
    layers.append(('score', 'Crop', []))
  layers.append(('loss', 'SoftmaxWithLoss', []))
  return layers


@pytest.fixture(scope='module')
def fcn_nets():
  g = torch.Generator().manual_seed(1)
  return {arch: torch_fcn.randomize_(torch_fcn.TorchFCN(arch, width=WIDTH), g)
          for arch in ('fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce')}


# --------------------------------------------------------------------------------------------------
# The Caffe FCNs (pytorch-fcn port and caffemodels): parity


FCN_CASES = [
    ('fcn32s', 'caffemodel', {}),
    ('fcn32s', 'pth', {}),
    ('fcn16s', 'npz', {}),
    ('fcn8s', 'safetensors', {}),
    ('fcn8s', 'caffemodel', {'legacy': True}),
    ('fcn8s_atonce', 'pth', {}),
    ('fcn8s_atonce', 'caffemodel', {'scales': {'pool4': 0.01, 'pool3': 0.0001}}),
]


@pytest.mark.parametrize('arch,fmt,caffe_kwargs', FCN_CASES,
                         ids=[f'{a}-{f}{"-v1" if k.get("legacy") else ""}' for a, f, k in FCN_CASES])
def test_fcn_parity(fcn_nets, tmp_path, arch, fmt, caffe_kwargs):
  net = fcn_nets[arch]
  # a misleading extension: the format is detected from the contents
  path = write(state_of(net), str(tmp_path / 'weights.bin'), fmt, **caffe_kwargs)
  assert convert.detect_format(path) == fmt
  variables, metadata = convert.convert(path, arch)
  assert metadata['arch'] == arch and metadata['num_classes'] == 21
  assert metadata['width'] == WIDTH
  assert metadata['preprocessing'] == 'caffe_bgr'
  assert metadata['source_kind'] == 'fcn' and metadata['source_format'] == fmt
  assert len(metadata['class_names']) == 21 and metadata['class_names'][15] == 'person'
  # every parameter of the model came from the file
  shapes = jax.eval_shape(lambda: models.init_variables(models.build(arch, width=WIDTH),
                                                        jax.random.key(0)))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  # orientations, checked directly: conv OIHW -> HWIO, deconv (in, out, k, k) -> (k, k, in, out)
  np.testing.assert_array_equal(variables['params']['conv1_1']['kernel'],
                                net.conv1_1.weight.detach().numpy().transpose(2, 3, 1, 0))
  up = fcn_lib.geometry(fcn_lib.ARCHS[arch]).upsamples[-1].name
  np.testing.assert_array_equal(variables['params'][up]['kernel'],
                                getattr(net, up).weight.detach().numpy().transpose(2, 3, 0, 1))
  sizes = SIZES if caffe_kwargs or fmt in ('npz', 'safetensors') else SIZES[:1]
  check_parity(arch, variables, net, sizes=sizes, batch=2 if fmt == 'pth' else 1)


def test_fcn_parity_tiny_input(fcn_nets, tmp_path):
  """Any input size, down to 1x1 (pad 100 makes the output the input's size)."""
  path = write(state_of(fcn_nets['fcn8s']), str(tmp_path / 'f.npz'), 'npz')
  variables, _ = convert.convert(path, 'fcn8s')
  check_parity('fcn8s', variables, fcn_nets['fcn8s'], sizes=((1, 1), (2, 5)))


# --------------------------------------------------------------------------------------------------
# ImageNet backbones


def _random_score(net_channels: int, seed: int) -> nn.Conv2d:
  g = torch.Generator().manual_seed(seed)
  return torch_fcn.randomize_(nn.Conv2d(net_channels, 21, 1), g)


def _with_score(variables: dict, score: nn.Conv2d) -> dict:
  params = dict(variables['params'])
  params['score_fr'] = {'kernel': score.weight.detach().numpy().transpose(2, 3, 1, 0),
                        'bias': score.bias.detach().numpy()}
  return {**variables, 'params': params}


def _assert_heads_initialised(arch: str, variables: dict) -> None:
  geo = fcn_lib.geometry(fcn_lib.ARCHS[arch])
  params = variables['params']
  for name, leaves in params.items():
    if name.startswith('score_'):
      for leaf in leaves.values():
        assert not np.any(leaf), name
  for up in geo.upsamples:
    kernel = params[up.name]['kernel']
    expected = torch_fcn.bilinear_weight(21, up.kernel).numpy().transpose(2, 3, 0, 1)
    np.testing.assert_array_equal(kernel, expected, err_msg=up.name)


BACKBONE_CASES = [
    ('fcn32s', 'vgg16', 'safetensors', 'torchvision_rgb'),
    ('fcn8s', 'vgg16', 'pth', 'torchvision_rgb'),
    ('fcn_alexnet', 'alexnet', 'pth', 'torchvision_rgb'),
    ('fcn_alexnet', 'alexnet', 'npz', 'torchvision_rgb'),
    ('fcn_googlenet', 'googlenet', 'safetensors', 'inception_rgb'),
    ('fcn32s', 'vgg16_bn', 'pth', 'torchvision_rgb'),
]
TORCH_BACKBONES = {'vgg16': torch_fcn.TorchVGG16, 'alexnet': torch_fcn.TorchAlexNet,
                   'googlenet': torch_fcn.TorchGoogLeNet,
                   'vgg16_bn': functools.partial(torch_fcn.TorchVGG16, batch_norm=True)}


@pytest.mark.parametrize('arch,backbone,fmt,prep', BACKBONE_CASES,
                         ids=[f'{b}-{a}-{f}' for a, b, f, _ in BACKBONE_CASES])
def test_torchvision_backbone_parity(tmp_path, arch, backbone, fmt, prep):
  net = torch_fcn.randomize_(TORCH_BACKBONES[backbone](WIDTH), torch.Generator().manual_seed(2))
  state = state_of(net)
  path = write(state, str(tmp_path / f'{backbone}.{fmt}'), fmt)
  variables, metadata = convert.convert(path, arch)
  assert metadata['preprocessing'] == prep
  assert metadata['source_kind'] == 'backbone'
  assert metadata['source_layout'] == f'torchvision_{backbone}'
  assert metadata['width'] == WIDTH
  _assert_heads_initialised(arch, variables)
  if backbone == 'vgg16_bn':
    # The conv bias inside the running mean; fc6 without BatchNorm in torchvision: the identity.
    assert metadata['model']['backbone'] == 'vgg16_bn'
    np.testing.assert_allclose(variables['batch_stats']['conv5_3']['bn']['mean'],
                               state['features.41.running_mean'] - state['features.40.bias'])
    np.testing.assert_array_equal(variables['params']['fc6']['bn']['bias'],
                                  state['classifier.0.bias'])
  if backbone == 'googlenet':
    bn = variables['batch_stats']['inception4e']['branch2_1']['bn']
    np.testing.assert_array_equal(bn['var'], state['inception4e.branch2.1.bn.running_var'])
    assert 'aux1' not in variables['params'] and 'fc' not in variables['params']
  if arch != 'fcn32s' and arch != 'fcn_alexnet' and arch != 'fcn_googlenet':
    return  # skips: the backbone import is the same as fcn32s; the heads were checked above
  # The FCN on the backbone: the same random score layer on both sides, bilinear upsampling.
  score_in = variables['params']['score_fr']['kernel'].shape[2]
  score = _random_score(score_in, seed=3)
  model_backbone = metadata['model'].get('backbone', '')
  spec = fcn_lib.ARCHS[arch]
  geo = fcn_lib.geometry(dataclasses.replace(spec, backbone=model_backbone or spec.backbone))
  up = geo.upsamples[-1]
  if arch == 'fcn_alexnet':
    assert (up.kernel, up.stride, geo.final_crop) == (63, 32, 18)  # FCN_REFERENCE §3
  if arch == 'fcn32s' and backbone == 'vgg16':
    assert (up.kernel, up.stride, geo.final_crop) == (64, 32, 19)
  fn = lambda x: torch_fcn.backbone_fcn(net, x, score, up.kernel, up.stride, geo.final_crop)
  sizes = SIZES if backbone != 'googlenet' else SIZES[::2]
  check_parity(arch, _with_score(variables, score), fn, sizes=sizes, backbone=model_backbone)


def test_torchvision_vgg16_bn_recognised_without_arch(tmp_path):
  """torchvision's ImageNet vgg16_bn (its real key names, random weights) converts with no --arch:
  FCN-8s on the vgg16_bn backbone, torchvision's preprocessing; the checkpoint builds that model."""
  net = torch_fcn.randomize_(torch_fcn.TorchVGG16(WIDTH, batch_norm=True),
                             torch.Generator().manual_seed(6))
  state = state_of(net)
  assert 'features.41.running_var' in state and 'classifier.6.weight' in state
  src = write(state, str(tmp_path / 'vgg16_bn-6c64b313.pth'), 'pth')
  out = tmp_path / 'ckpt'
  metadata = convert.convert_to_checkpoint(src, out)
  assert metadata['arch'] == 'fcn8s' and metadata['model']['backbone'] == 'vgg16_bn'
  assert metadata['source_layout'] == 'torchvision_vgg16_bn'
  assert metadata['preprocessing'] == 'torchvision_rgb'
  model, variables, _ = checkpoint.load_inference(out)
  assert model.arch.backbone == 'vgg16_bn'
  np.testing.assert_array_equal(variables['params']['conv3_2']['conv']['kernel'],
                                state['features.17.weight'].transpose(2, 3, 1, 0))
  # A plain VGG16 arch cannot take BatchNorm weights by mistake: --arch with another backbone.
  with pytest.raises(convert.ConversionError, match='vgg16_bn'):
    convert.convert(src, 'fcn_alexnet')
  # init_from: into a vgg16_bn run the backbone is copied (BatchNorm statistics too); a run on the
  # plain VGG16 is refused with the setting that fits, not left with only its score layers copied.
  config = ml_collections.ConfigDict({
      'init_from': str(out), 'preprocessing': 'torchvision_rgb', 'arch': 'fcn8s',
      'model': {'backbone': 'vgg16_bn', 'width': WIDTH, 'num_classes': 21}})
  logs = []
  bn_model = models.build('fcn8s', width=WIDTH, backbone='vgg16_bn')
  initial = transfer.initial_variables(bn_model, config, jax.random.key(0), log=logs.append)
  np.testing.assert_array_equal(initial['batch_stats']['conv5_3']['bn']['var'],
                                variables['batch_stats']['conv5_3']['bn']['var'])
  config.model.backbone = ''
  with pytest.raises(UserError, match=r'--config\.model\.backbone=vgg16_bn'):
    transfer.initial_variables(models.build('fcn8s', width=WIDTH), config, jax.random.key(0))


def test_caffe_vgg16_legacy_caffemodel(tmp_path):
  """VGG_ILSVRC_16_layers: legacy V1 `layers`, 4-D (num, channels, height, width) blobs, fc6/fc7/fc8
  InnerProduct; imported into FCN-32s with Caffe's BGR convention; parity through the FCN."""
  g = torch.Generator().manual_seed(4)
  net = torch_fcn.randomize_(torch_fcn.TorchVGG16(WIDTH), g)
  state = {}
  for name, idx in zip(VGG_CONVS, convert._TV_VGG16_FEATURES):
    state[f'{name}.weight'] = net.features[idx].weight.detach().numpy()
    state[f'{name}.bias'] = net.features[idx].bias.detach().numpy()
  for name, idx in (('fc6', 0), ('fc7', 3), ('fc8', 6)):
    state[f'{name}.weight'] = net.classifier[idx].weight.detach().numpy()
    state[f'{name}.bias'] = net.classifier[idx].bias.detach().numpy()
  path = write(state, str(tmp_path / 'VGG_ILSVRC_16_layers.caffemodel'), 'caffemodel', legacy=True,
               fc_inner_product=True)
  stored = caffe_pb.read_net(open(path, 'rb').read())[1]
  fc6_blob = next(blobs for name, _, blobs in stored if name == 'fc6')[0]
  assert fc6_blob.shape == (1, 1, 256, 32 * 49)  # as in the real file: (1, 1, 4096, 25088)
  variables, metadata = convert.convert(path, 'fcn32s')
  assert metadata['preprocessing'] == 'caffe_bgr' and metadata['source_layout'] == 'caffe'
  assert metadata['source_kind'] == 'backbone'
  fc6 = variables['params']['fc6']['kernel']
  assert fc6.shape == (7, 7, 32, 256)
  np.testing.assert_array_equal(fc6[2, 5, 7, 11], state['fc6.weight'][11, 7 * 49 + 2 * 7 + 5])
  _assert_heads_initialised('fcn32s', variables)
  score = _random_score(256, seed=5)
  fn = lambda x: torch_fcn.backbone_fcn(net, x, score, 64, 32, 19)
  check_parity('fcn32s', _with_score(variables, score), fn, sizes=SIZES[2:])


# --------------------------------------------------------------------------------------------------
# The command line and the checkpoint it writes


def test_cli_writes_checkpoint_that_loads(fcn_nets, tmp_path, capsys):
  net = fcn_nets['fcn16s']
  src = write(state_of(net), str(tmp_path / 'fcn16s.caffemodel'), 'caffemodel')
  out = tmp_path / 'ckpt' / 'fcn16s'
  assert convert.main([src, '--arch', 'fcn16s', '--out', str(out), '--frozen-upsampling']) == 0
  assert 'wrote' in capsys.readouterr().out
  model, variables, metadata = checkpoint.load_inference(str(out))
  assert metadata['arch'] == 'fcn16s' and metadata['preprocessing'] == 'caffe_bgr'
  assert metadata['learnable_upsampling'] is False and metadata['width'] == WIDTH
  assert metadata['class_names'][0] == 'background'
  assert model.learnable_upsampling is False and model.width == WIDTH
  x = torch.randn((1, 3, 45, 38), generator=torch.Generator().manual_seed(6)) * 50
  with torch.no_grad():
    ref = net(x).numpy()
  ours = np.asarray(model.apply(variables, x.numpy().transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
  assert_parity(ours, ref, 'cli fcn16s')
  # no temporary directories left beside the checkpoint
  assert os.listdir(out.parent) == ['fcn16s']
  # an existing checkpoint is not replaced without --overwrite
  assert convert.main([src, '--arch', 'fcn16s', '--out', str(out)]) == 2
  assert 'exists' in capsys.readouterr().err
  assert convert.main([src, '--arch', 'fcn16s', '--out', str(out), '--overwrite',
                       '--preprocessing', 'torchvision_rgb']) == 0
  assert checkpoint.read_metadata(str(out))['preprocessing'] == 'torchvision_rgb'
  assert os.listdir(out.parent) == ['fcn16s']


# --------------------------------------------------------------------------------------------------
# Bad input: an error that lists what did not match, and nothing written


def _cli_fails(tmp_path, capsys, argv_src, arch, *extra):
  out = tmp_path / 'out' / 'ckpt'
  assert convert.main([argv_src, '--arch', arch, '--out', str(out), *extra]) == 2
  err = capsys.readouterr().err
  assert 'nothing was written' in err
  assert not out.exists()
  assert not out.parent.exists() or not os.listdir(out.parent)
  return err


def test_pth_variants(fcn_nets, tmp_path):
  """Legacy (pre-zip) torch.save files and training checkpoints wrapping a DataParallel state dict."""
  sd = fcn_nets['fcn32s'].state_dict()
  legacy = tmp_path / 'legacy.pth'
  torch.save(sd, legacy, _use_new_zipfile_serialization=False)
  wrapped = tmp_path / 'checkpoint.pth.tar'
  torch.save({'epoch': 3, 'model_state_dict': {f'module.{k}': v for k, v in sd.items()}}, wrapped)
  for path in (legacy, wrapped):
    assert convert.detect_format(path) == 'pth'
    state, fmt = convert.read_weights(path)
    assert fmt == 'pth' and sorted(state) == sorted(sd)
    np.testing.assert_array_equal(state['fc6.weight'], sd['fc6.weight'].numpy())


def test_unknown_format(tmp_path, capsys):
  path = tmp_path / 'weights.pth'
  path.write_bytes(b'hello, these are not weights' * 10)
  with pytest.raises(convert.ConversionError, match='unknown format.*safetensors.*caffemodel'):
    convert.detect_format(path)
  err = _cli_fails(tmp_path, capsys, str(path), 'fcn8s')
  assert 'unknown format' in err
  # a zip that is neither npz nor torch.save; a protobuf-looking file that is not a NetParameter
  import zipfile
  with zipfile.ZipFile(tmp_path / 'x.zip', 'w') as z:
    z.writestr('readme.txt', 'hi')
  with pytest.raises(convert.ConversionError, match='neither'):
    convert.read_weights(tmp_path / 'x.zip')
  (tmp_path / 'bad.caffemodel').write_bytes(b'\x0a\xff\xff\xff\xff\x0f garbage')
  with pytest.raises(convert.ConversionError, match='caffemodel|NetParameter'):
    convert.read_weights(tmp_path / 'bad.caffemodel')
  with pytest.raises(convert.ConversionError, match='unknown format'):
    convert.read_weights(tmp_path / 'bad.caffemodel', format='onnx')


def test_missing_unexpected_and_mismatched_keys_are_listed(fcn_nets, tmp_path, capsys):
  state = state_of(fcn_nets['fcn8s'])
  del state['conv3_2.bias']
  del state['upscore8.weight']
  state['extra_layer.weight'] = np.ones((3, 3), np.float32)
  state['fc7.weight'] = state['fc7.weight'][:, :-1]  # (256, 255, 1, 1)
  path = write(state, str(tmp_path / 'bad.npz'), 'npz')
  with pytest.raises(convert.ConversionError) as info:
    convert.convert(path, 'fcn8s')
  msg = str(info.value)
  assert 'missing keys (2)' in msg and 'conv3_2.bias' in msg and 'upscore8.weight' in msg
  assert 'unexpected keys (1)' in msg and 'extra_layer.weight' in msg
  assert 'shape mismatches (1)' in msg and 'fc7.weight: file has (256, 255, 1, 1)' in msg
  err = _cli_fails(tmp_path, capsys, path, 'fcn8s')
  assert 'conv3_2.bias' in err and 'extra_layer.weight' in err


def test_final_upsampling_that_mixes_classes_is_refused(fcn_nets, tmp_path, capsys):
  # fcn_jax upsamples each class by itself from the final kernel's diagonal; a file whose final
  # upsampling has off-diagonal weights would give other scores, so nothing is converted.
  state = state_of(fcn_nets['fcn16s'])
  state['upscore16.weight'] = state['upscore16.weight'] + 0.5
  state['upscore2.weight'] = state['upscore2.weight'] + 0.5  # intermediate: may mix classes
  path = write(state, str(tmp_path / 'mixed.npz'), 'npz')
  with pytest.raises(convert.ConversionError) as info:
    convert.convert(path, 'fcn16s')
  msg = str(info.value)
  assert 'final upsamplings that mix classes' in msg and 'upscore16: off-diagonal' in msg
  assert 'upscore2' not in msg
  err = _cli_fails(tmp_path, capsys, path, 'fcn16s')
  assert 'upscore16' in err and 'Traceback' not in err


def test_num_classes_and_width_mismatch(fcn_nets, tmp_path):
  path = write(state_of(fcn_nets['fcn32s']), str(tmp_path / 'f.safetensors'), 'safetensors')
  with pytest.raises(convert.ConversionError, match=r'score_fr.weight: file has \(21, 256, 1, 1\)'):
    convert.convert(path, 'fcn32s', num_classes=5)
  with pytest.raises(convert.ConversionError, match=r'conv1_1.weight: file has \(4, 3, 3, 3\)'):
    convert.convert(path, 'fcn32s', width=0.125)
  with pytest.raises(convert.ConversionError, match='3 class names for 21 classes'):
    convert.convert(path, 'fcn32s', class_names=['a', 'b', 'c'])


def test_wrong_arch_for_the_file(fcn_nets, tmp_path, capsys):
  path = write(state_of(fcn_nets['fcn8s']), str(tmp_path / 'fcn8s.pth'), 'pth')
  with pytest.raises(convert.ConversionError) as info:
    convert.convert(path, 'fcn32s')
  msg = str(info.value)
  assert 'upscore.weight' in msg and 'score_pool4.weight' in msg
  assert 'looks like weights for fcn8s or fcn8s_atonce, not fcn32s' in msg
  err = _cli_fails(tmp_path, capsys, path, 'fcn_alexnet')
  assert 'looks like weights for fcn8s or fcn8s_atonce, not fcn_alexnet' in err
  googlenet = write(state_of(torch_fcn.TorchGoogLeNet(WIDTH)), str(tmp_path / 'g.npz'), 'npz')
  with pytest.raises(convert.ConversionError, match='no backbone weights for fcn8s(.|\n)*fcn_googlenet'):
    convert.convert(googlenet, 'fcn8s')
  # the at-once caffemodel carries its fixed Scale layers: not an fcn8s, and the scales are checked
  atonce = write(state_of(fcn_nets['fcn8s_atonce']), str(tmp_path / 'a.caffemodel'), 'caffemodel',
                 scales={'pool4': 0.01, 'pool3': 0.0001})
  with pytest.raises(convert.ConversionError, match='fcn8s_atonce, not fcn8s(.|\n)*scale_pool4.weight'):
    convert.convert(atonce, 'fcn8s')
  wrong = write(state_of(fcn_nets['fcn8s_atonce']), str(tmp_path / 'w.caffemodel'), 'caffemodel',
                scales={'pool4': 0.01, 'pool3': 0.001})
  with pytest.raises(convert.ConversionError, match='scale_pool3.weight: fcn8s_atonce scales pool3'):
    convert.convert(wrong, 'fcn8s_atonce')


def test_staged_initialisation_from_a_coarser_fcn(fcn_nets, tmp_path):
  """FCN-16s from FCN-32s (the paper's staged training): only with init_missing_heads."""
  path = write(state_of(fcn_nets['fcn32s']), str(tmp_path / 'f32.npz'), 'npz')
  with pytest.raises(convert.ConversionError, match='score_pool4.weight'):
    convert.convert(path, 'fcn16s')
  variables, _ = convert.convert(path, 'fcn16s', init_missing_heads=True)
  params = variables['params']
  np.testing.assert_array_equal(params['score_fr']['kernel'][0, 0],
                                fcn_nets['fcn32s'].score_fr.weight.detach().numpy()[:, :, 0, 0].T)
  assert not np.any(params['score_pool4']['kernel'])
  np.testing.assert_array_equal(params['upscore16']['kernel'][:, :, 3, 3],
                                torch_fcn.bilinear_weight(1, 32).numpy()[0, 0])
