"""Acceptance tests of the FCN model family (paper Table 1, Caffe geometry, initialisation, API).

Full-size networks are only traced (jax.eval_shape); real forwards, jit and grad run at reduced width.
"""

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax import models
from fcn_jax.models import backbones, layers

ALL_ARCHS = ['fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce', 'fcn_alexnet', 'fcn_googlenet']
ZOO_ARCHS = ['fcn_alexnet_caffe', 'fcn32s_two_heads', 'fcn16s_two_heads', 'fcn8s_two_heads',
             'fcn32s_early_fusion', 'fcn32s_late_fusion', 'fcn16s_late_fusion', 'fcn_resnet50', 'fcn_resnet101']
VGG_ARCHS = ['fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce']
SMALL = 1 / 16  # width for real forwards on CPU
DECONV_NAMES = {'upscore', 'upscore2', 'upscore16', 'upscore_pool4', 'upscore8'}


def test_archs_listed():
  assert sorted(models.ARCHS) == sorted(ALL_ARCHS + ZOO_ARCHS)


# ---------------------------------------------------------------------------------------------
# Helpers.


@functools.lru_cache(maxsize=None)
def full_shapes(arch, learnable_upsampling=True, width=1.0):
  model = models.build(arch, width=width, learnable_upsampling=learnable_upsampling)
  return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))


def out_shape(arch, h, w, n=1):
  model = models.build(arch)
  return jax.eval_shape(lambda v, x: model.apply(v, x), full_shapes(arch),
                        jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32)).shape


def he_fill(shape, rng):
  return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)


@functools.lru_cache(maxsize=None)
def small_model(arch, width=SMALL, seed=0):
  """A reduced-width model and variables filled on the host (He-normal backbone, zero scores,
  bilinear deconvolutions, identity BatchNorm), the layout of `init_variables`. Random
  initialisation compiles one threefry program per parameter (about a second each on a CPU), so the
  forward tests use these; `test_init_variables` checks the real initialiser."""
  model = models.build(arch, width=width)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    names = path_names(path)
    if names[0] == 'batch_stats':
      return jnp.zeros(x.shape) if names[-1] == 'mean' else jnp.ones(x.shape)
    if names[1] in DECONV_NAMES:
      return jnp.asarray(layers.bilinear_init(x.shape[0])(None, x.shape))
    if names[1].startswith('score_') or names[-1] == 'bias':
      return jnp.zeros(x.shape)
    if names[-1] == 'scale':
      return jnp.ones(x.shape)
    return jnp.asarray(he_fill(x.shape, rng))

  return model, jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def jitted(model, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))


def with_random_scores(variables, seed=1, scale=0.05):
  """Copy of `variables` with random (non-zero) score layers, so outputs depend on the backbone."""
  params = dict(variables['params'])
  key = jax.random.key(seed)
  for name in sorted(params):
    if name.startswith('score_'):
      key, k1, k2 = jax.random.split(key, 3)
      p = params[name]
      params[name] = {'kernel': scale * jax.random.normal(k1, p['kernel'].shape),
                      'bias': scale * jax.random.normal(k2, p['bias'].shape)}
  return {**variables, 'params': params}


def path_names(path):
  return [getattr(k, 'key', getattr(k, 'name', str(k))) for k in path]


# ---------------------------------------------------------------------------------------------
# Paper Table 1 (static columns) and full-size shapes.


def test_describe_vgg16_matches_table1():
  for arch in VGG_ARCHS:
    d = models.describe(arch)
    assert d['backbone'] == 'vgg16'
    assert d['conv_layers'] == 16
    assert d['receptive_field'] == 404
    assert d['max_stride'] == 32
  d = models.describe('fcn32s')
  # VGG16 convs 14.71M + fc6 102.76M + fc7 16.78M + score 0.09M = 134.3M (paper: 134M).
  assert abs(d['params'] - 134.3e6) / 134.3e6 < 0.005, d['params']
  assert d['params'] == 134_346_581
  assert d['upsampling_params'] == 64 * 64 * 21 * 21
  # The skips add only their 1x1 score layers.
  assert models.describe('fcn16s')['params'] - d['params'] == 512 * 21 + 21
  assert models.describe('fcn8s')['params'] - d['params'] == 512 * 21 + 21 + 256 * 21 + 21
  assert models.describe('fcn8s_atonce')['params'] == models.describe('fcn8s')['params']


def test_describe_counts_forward_flops_and_takes_a_backbone_variant():
  # FCN-32s at 500x500, by hand: pad 100 -> conv1 maps of 698, ceil pooling 349, 175, 88, 44, 22;
  # fc6 (7x7 valid) and fc7 on 16x16; score_fr. XLA counts 2 per multiply-add, leaves out the
  # taps that fall on padding (~1% of these) and adds the elementwise work (bias, ReLU, upsampling).
  macs = 0
  for side, ci, co, n in [(698, 3, 64, 2), (349, 64, 128, 2), (175, 128, 256, 3),
                          (88, 256, 512, 3), (44, 512, 512, 3)]:
    macs += side * side * 9 * (ci * co + co * co * (n - 1))
  macs += 16 * 16 * (49 * 512 * 4096 + 4096 * 4096 + 4096 * 21)
  flops = models.describe('fcn32s', flops_size=500)['gflops'] * 1e9
  assert 0.97 * 2 * macs <= flops <= 1.03 * 2 * macs, (flops, 2 * macs)
  bn = models.describe('fcn8s', backbone='vgg16_bn')
  assert bn['backbone'] == 'vgg16_bn' and bn['params'] > models.describe('fcn8s')['params']


def test_describe_alexnet_matches_table1():
  d = models.describe('fcn_alexnet')
  assert (d['conv_layers'], d['receptive_field'], d['max_stride']) == (8, 355, 32)
  assert abs(d['params'] - 57e6) / 57e6 < 0.01, d['params']


def test_describe_googlenet_matches_table1():
  d = models.describe('fcn_googlenet')
  assert d['conv_layers'] == 22
  assert 5.5e6 <= d['params'] <= 6.7e6, d['params']
  assert d['max_stride'] == 32
  # The paper's 907 is Caffe's bvlc_googlenet: true 5x5 branches, a 3x3/2 pool4 and the final 7x7
  # average pooling. We use torchvision's layout (its "5x5" branches are 3x3 and its maxpool4 is
  # 2x2/2, as in the released weights) and no average pooling (it would only blur the stride-32
  # score map). Recompute both figures from the layer list.
  assert d['receptive_field'] == 379

  def rf_of(branch_kernel, pool4_window, avg_pool):
    rf, jump = 1, 1
    for layer in backbones.get_backbone('googlenet'):
      if isinstance(layer, backbones.Inception):
        k, s = branch_kernel, 1
      elif isinstance(layer, backbones.Conv):
        k, s = layer.kernel, layer.stride
      elif isinstance(layer, backbones.MaxPool):
        k, s = (pool4_window if layer.name == 'maxpool4' else layer.window), layer.stride
      else:
        continue
      rf += (k - 1) * jump
      jump *= s
    return rf + (avg_pool - 1) * jump

  assert rf_of(3, 2, 1) == 379
  assert rf_of(5, 3, 7) == 907


def test_full_size_vgg_parameter_shapes():
  p = full_shapes('fcn8s')['params']
  expect = {
      'conv1_1': (3, 3, 3, 64), 'conv1_2': (3, 3, 64, 64), 'conv2_1': (3, 3, 64, 128),
      'conv2_2': (3, 3, 128, 128), 'conv3_1': (3, 3, 128, 256), 'conv3_2': (3, 3, 256, 256),
      'conv3_3': (3, 3, 256, 256), 'conv4_1': (3, 3, 256, 512), 'conv4_2': (3, 3, 512, 512),
      'conv4_3': (3, 3, 512, 512), 'conv5_1': (3, 3, 512, 512), 'conv5_2': (3, 3, 512, 512),
      'conv5_3': (3, 3, 512, 512), 'fc6': (7, 7, 512, 4096), 'fc7': (1, 1, 4096, 4096),
      'score_fr': (1, 1, 4096, 21), 'score_pool4': (1, 1, 512, 21), 'score_pool3': (1, 1, 256, 21),
      'upscore2': (4, 4, 21, 21), 'upscore_pool4': (4, 4, 21, 21), 'upscore8': (16, 16, 21, 21),
  }
  assert set(p) == set(expect)
  for name, shape in expect.items():
    assert p[name]['kernel'].shape == shape, name
    assert p[name]['kernel'].dtype == jnp.float32
    if name.startswith('up'):
      assert set(p[name]) == {'kernel'}, name  # Deconvolution has no bias
    else:
      assert p[name]['bias'].shape == (shape[-1],), name
  p32 = full_shapes('fcn32s')['params']
  assert p32['upscore']['kernel'].shape == (64, 64, 21, 21)
  assert 'score_pool4' not in p32
  p16 = full_shapes('fcn16s')['params']
  assert p16['upscore2']['kernel'].shape == (4, 4, 21, 21)
  assert p16['upscore16']['kernel'].shape == (32, 32, 21, 21)
  assert p16['score_pool4']['kernel'].shape == (1, 1, 512, 21)
  assert 'score_pool3' not in p16


def test_full_size_alexnet_and_googlenet_shapes():
  p = full_shapes('fcn_alexnet')['params']
  assert p['conv1']['kernel'].shape == (11, 11, 3, 64)
  assert p['fc6']['kernel'].shape == (6, 6, 256, 4096)
  assert p['score_fr']['kernel'].shape == (1, 1, 4096, 21)
  assert p['upscore']['kernel'].shape == (63, 63, 21, 21)
  g = full_shapes('fcn_googlenet')
  p = g['params']
  assert p['conv1']['conv']['kernel'].shape == (7, 7, 3, 64)
  assert p['inception5b']['branch1']['conv']['kernel'].shape == (1, 1, 832, 384)
  assert p['score_fr']['kernel'].shape == (1, 1, 1024, 21)  # inception5b: 384+384+128+128
  assert p['upscore']['kernel'].shape == (63, 63, 21, 21)
  assert g['batch_stats']['conv1']['bn']['mean'].shape == (64,)
  # The backbone's last feature map really has 1024 channels.
  model = models.build('fcn_googlenet')
  _, inter = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=lambda m, _: m.name == 'inception5b',
                               mutable=['intermediates']),
      g, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert inter['intermediates']['inception5b']['__call__'][0].shape[-1] == 1024


# ---------------------------------------------------------------------------------------------
# Geometry: crops, kernels, alignment.


def test_crop_offsets_match_caffe():
  expect = {
      'fcn32s': ((), 19, [('upscore', 64, 32)]),
      'fcn16s': ((5,), 27, [('upscore2', 4, 2), ('upscore16', 32, 16)]),
      'fcn8s': ((5, 9), 31, [('upscore2', 4, 2), ('upscore_pool4', 4, 2), ('upscore8', 16, 8)]),
      'fcn8s_atonce': ((5, 9), 31, [('upscore2', 4, 2), ('upscore_pool4', 4, 2), ('upscore8', 16, 8)]),
      'fcn_alexnet': ((), 18, [('upscore', 63, 32)]),
      'fcn_googlenet': ((), 106, [('upscore', 63, 32)]),
  }
  for arch, (skips, final, ups) in expect.items():
    geo = models.geometry(models.ARCHS[arch])
    assert geo.skip_crops == skips, arch
    assert geo.final_crop == final, arch
    assert [(u.name, u.kernel, u.stride) for u in geo.upsamples] == ups, arch
    assert [u.final for u in geo.upsamples] == [False] * (len(ups) - 1) + [True]
    assert geo == models.geometry(arch)  # also accepts the name
    d = models.describe(arch)
    assert (d['skip_crops'], d['final_crop']) == (skips, final)


# Independent layer tables (kernel, stride, pad) of the spatial path, Caffe/torchvision definitions.
VGG_TABLE = ([('conv', 3, 1, 100), ('conv', 3, 1, 1), ('pool1', 2, 2, 0)]
             + [('conv', 3, 1, 1)] * 2 + [('pool2', 2, 2, 0)]
             + [('conv', 3, 1, 1)] * 3 + [('pool3', 2, 2, 0)]
             + [('conv', 3, 1, 1)] * 3 + [('pool4', 2, 2, 0)]
             + [('conv', 3, 1, 1)] * 3 + [('pool5', 2, 2, 0)]
             + [('fc6', 7, 1, 0), ('fc7', 1, 1, 0)])
ALEXNET_TABLE = [('conv1', 11, 4, 100), ('pool1', 3, 2, 0), ('conv2', 5, 1, 2), ('pool2', 3, 2, 0),
                 ('conv3', 3, 1, 1), ('conv4', 3, 1, 1), ('conv5', 3, 1, 1), ('pool5', 3, 2, 0),
                 ('fc6', 6, 1, 0), ('fc7', 1, 1, 0)]
GOOGLENET_TABLE = ([('conv1', 7, 2, 100), ('maxpool1', 3, 2, 0), ('conv2', 1, 1, 0), ('conv3', 3, 1, 1),
                    ('maxpool2', 3, 2, 0)] + [('inception', 3, 1, 1)] * 2 + [('maxpool3', 3, 2, 0)]
                   + [('inception', 3, 1, 1)] * 5 + [('maxpool4', 2, 2, 0)] + [('inception', 3, 1, 1)] * 2)
TABLES = {'vgg16': VGG_TABLE, 'alexnet': ALEXNET_TABLE, 'googlenet': GOOGLENET_TABLE}


def table_coord_map(table, upto=None):
  """x_input = a * x + b through the table (Caffe coord_map)."""
  a, b = Fraction(1), Fraction(0)
  for name, k, s, p in table:
    b += a * (Fraction(k - 1, 2) - p)
    a *= s
    if name == upto:
      break
  return a, b


def test_googlenet_final_crop_is_the_integer_alignment():
  a, b = table_coord_map(GOOGLENET_TABLE)
  assert (a, b) == (32, -75)
  assert (a, b) == backbones.coord_map(backbones.get_backbone('googlenet'))
  # Output pixel x of a k x k, stride-32 deconvolution followed by a crop c sits at input coordinate
  # x + c + b - (k - 1) / 2: the crop must be an integer making that exactly x.
  geo = models.geometry('fcn_googlenet')
  k, c = geo.upsamples[-1].kernel, geo.final_crop
  assert Fraction(k - 1, 2) - b == c == 106
  # The VGG-style k = 2s kernel would need a crop of 106.5: no integer crop aligns it.
  assert Fraction(64 - 1, 2) - b == Fraction(213, 2)


def test_crops_from_independent_coord_maps():
  # The Caffe offsets follow from the layer tables: skip crop = (b_up - b_tap) / a, final
  # crop = (k - 1) / 2 - b.
  a, b = table_coord_map(VGG_TABLE)
  assert (a, b) == (32, Fraction(25, 2))
  assert Fraction(63, 2) - b == 19
  b_up = b - a * Fraction(3, 2 * 2)  # upscore2 (k4 s2): stride 16
  a4, b4 = table_coord_map(VGG_TABLE, 'pool4')
  assert a4 == 16 and (b_up - b4) / a4 == 5
  b_up2 = b_up - a4 * Fraction(3, 4)  # upscore_pool4: stride 8
  a3, b3 = table_coord_map(VGG_TABLE, 'pool3')
  assert a3 == 8 and (b_up2 - b3) / a3 == 9
  assert Fraction(31, 2) - b_up == 27 and Fraction(15, 2) - b_up2 == 31
  a, b = table_coord_map(ALEXNET_TABLE)
  assert (a, b) == (32, 13) and Fraction(62, 2) - b == 18
  for name, table in TABLES.items():
    assert backbones.coord_map(backbones.get_backbone(name)) == table_coord_map(table), name


def table_sizes(table, size):
  sizes = {}
  for name, k, s, p in table:
    if name.startswith(('pool', 'maxpool', 'inception')):
      out = math.ceil((size + 2 * p - k) / s) + 1
      if p and (out - 1) * s >= size + p:
        out -= 1
    else:
      out = (size + 2 * p - k) // s + 1
    assert out >= 1, (name, size)
    sizes[name] = size = out
  return sizes, size


def arch_fits(arch, size):
  """Independent check that every crop of `arch` fits for input length `size` (Caffe arithmetic)."""
  spec = models.ARCHS[arch]
  table = TABLES[spec.backbone]
  sizes, n = table_sizes(table, size)
  geo = models.geometry(arch)
  for skip, up, crop in zip(spec.skips, geo.upsamples, geo.skip_crops):
    n = up.stride * (n - 1) + up.kernel
    if sizes[skip.tap] < crop + n:
      return False
  up = geo.upsamples[-1]
  return up.stride * (n - 1) + up.kernel >= geo.final_crop + size


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_every_input_size_fits_exhaustive(arch):
  bad = [size for size in range(1, 601) if not arch_fits(arch, size)]
  assert not bad


def test_floor_pooling_would_break_the_fixed_crops():
  # The reason for ceil mode (FCN_REFERENCE §3): with floor pooling the crops fail for many sizes.
  def fits_floor(size):
    n = size
    for name, k, s, p in VGG_TABLE:
      n = (n + 2 * p - k) // s + 1
    return 32 * (n - 1) + 64 >= 19 + size
  assert sum(not fits_floor(size) for size in range(100, 501)) > 100


def sample_sizes(arch):
  """Every size up to 32 (all residues mod 32), then a spread up to 600; widest for the most
  constrained arch (fcn8s: three crops) and the cheapest trace (AlexNet). Every size 1..600 is
  covered by test_every_input_size_fits_exhaustive."""
  if arch in ('fcn8s', 'fcn_alexnet'):
    return list(range(1, 41)) + list(range(41, 601, 9)) + [599, 600]
  if arch == 'fcn_googlenet':  # ~6x slower to trace
    return list(range(1, 33)) + [63, 100, 161, 257, 333, 418, 500, 555, 600]
  return list(range(1, 33)) + list(range(45, 601, 37)) + [600]


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_output_size_equals_input_size(arch):
  sizes = sample_sizes(arch)
  assert {s % 32 for s in sizes} == set(range(32))
  # Two sizes per trace: H and W from opposite ends of the list (rectangular inputs).
  pairs = [(sizes[i], sizes[-1 - i]) for i in range((len(sizes) + 1) // 2)]
  bad = []
  for h, w in pairs:
    shape = out_shape(arch, h, w)
    if shape != (1, h, w, 21):
      bad.append(((h, w), shape))
  assert not bad


def constant_variables(variables):
  """Every convolution a positive box filter (1/fan_in), biases 0, BatchNorm the identity;
  deconvolutions keep their bilinear kernels. The network is then a composition of symmetric
  window operators (ReLU never clips a positive signal)."""
  def leaf(path, x):
    names = path_names(path)
    if names[0] == 'batch_stats':
      return jnp.zeros_like(x) if names[-1] == 'mean' else jnp.ones_like(x)
    if names[1] in DECONV_NAMES:
      return x
    if names[-1] == 'kernel':
      return jnp.full_like(x, 1.0 / np.prod(x.shape[:-1]))
    if names[-1] == 'scale':
      return jnp.ones_like(x)
    return jnp.zeros_like(x)
  return jax.tree_util.tree_map_with_path(leaf, variables)


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_output_is_aligned_to_the_input(arch):
  """Alignment checked on real numbers. Input: a tent f(x) = C - |x - x0|, constant over rows,
  centred on a point (or half-point) of the score lattice. With symmetric window operators the
  output must be mirror-symmetric about x0 too; a crop off by d pixels would make it symmetric
  about x0 - d instead. This checks the final crop and every skip crop of the arch."""
  model, variables = small_model(arch, 1 / 32)
  variables = constant_variables(variables)
  a, b = table_coord_map(TABLES[models.ARCHS[arch].backbone])
  x0 = a * 11 + b  # a score-lattice point far from both borders
  width = int(2 * x0) + 230
  xs = np.arange(width, dtype=np.float32)
  tent = 1000.0 - np.abs(xs - float(x0))
  images = jnp.asarray(np.broadcast_to(tent[None, None, :, None], (1, 1, width, 3)))
  y = np.asarray(jitted(model)(variables, images))[0, 0, :, 0].astype(np.float64)
  assert y.shape == (width,)
  lo, hi = math.floor(x0), math.ceil(x0)
  d = np.arange(0, 40)
  left, right = y[lo - d], y[hi + d]
  span = y[lo - d].max() - y[lo - d].min()
  assert span > 0
  np.testing.assert_allclose(left, right, rtol=0, atol=1e-4 * span)
  # The check has power: one pixel of misalignment is far outside the tolerance.
  assert np.abs(y[lo - d + 1] - y[hi + d + 1]).max() > 1e-2 * span


# ---------------------------------------------------------------------------------------------
# Initialisation and frozen parameters.


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_init_variables_jit_and_grad(arch):
  """The real initialiser: zero score layers (so the initial output is exactly zero), bilinear
  deconvolutions on the class diagonal, He-normal backbone, identity BatchNorm statistics; then a
  jitted gradient step from it."""
  model = models.build(arch, width=SMALL)
  # 'rbg' keys compile in a fraction of the time of threefry ones on CPU (same code path).
  key = jax.random.key(0, impl='rbg')
  variables = models.init_variables(model, key)
  params = variables['params']
  assert jax.tree.structure(params) == jax.tree.structure(small_model(arch)[1]['params'])
  geo = models.geometry(arch)
  for name in params:
    if name.startswith('score_'):
      assert not np.any(np.asarray(params[name]['kernel'])), name
      assert not np.any(np.asarray(params[name]['bias'])), name
  assert {u.name for u in geo.upsamples} == {n for n in params if n.startswith('upscore')}
  for up in geo.upsamples:
    kernel = np.asarray(params[up.name]['kernel'])
    assert kernel.shape == (up.kernel, up.kernel, 21, 21)
    filt = layers.bilinear_kernel(up.kernel)
    expect = np.einsum('ab,co->abco', filt, np.eye(21, dtype=np.float32))
    np.testing.assert_array_equal(kernel, expect)
  first = params['conv1_1']['kernel'] if 'conv1_1' in params else (
      params['conv1']['kernel'] if 'kernel' in params['conv1'] else params['conv1']['conv']['kernel'])
  fan_in = np.prod(first.shape[:-1])
  assert 0.5 < float(np.std(np.asarray(first))) * np.sqrt(fan_in / 2.0) < 1.5  # He normal
  for path, x in jax.tree_util.tree_leaves_with_path(variables.get('batch_stats', {})):
    np.testing.assert_array_equal(np.asarray(x), 0.0 if path_names(path)[-1] == 'mean' else 1.0)
  # jit + grad of a training step from this initialisation (reduced width, dropout on): the
  # output is exactly zero, so the loss is log(21) and only the score layers get gradients.
  x = jax.random.normal(jax.random.key(5), (2, 29, 35, 3))
  labels = jax.random.randint(jax.random.key(6), (2, 29, 35), 0, 21)

  def loss_fn(params, variables):
    logits = model.apply({**variables, 'params': params}, x, train=True,
                         rngs={'dropout': jax.random.key(7)})
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1)), logits

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, logits), grads = grad_fn(variables['params'], variables)
  assert logits.shape == (2, 29, 35, 21) and logits.dtype == jnp.float32
  assert not np.any(np.asarray(logits))
  np.testing.assert_allclose(float(loss), math.log(21), rtol=1e-4)  # float32 mean
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  assert np.abs(np.asarray(grads['score_fr']['kernel'])).sum() > 0
  assert not np.any(np.asarray(jax.tree.leaves(grads['fc6' if 'fc6' in grads else 'inception5b'])[0]))
  # With non-zero scores the gradient reaches the first layer.
  variables = with_random_scores(variables)
  (loss, logits), grads = grad_fn(variables['params'], variables)
  assert np.isfinite(float(loss)) and np.any(np.asarray(logits))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  first = grads['conv1_1'] if 'conv1_1' in grads else grads['conv1']
  assert np.abs(np.asarray(jax.tree.leaves(first)[0])).sum() > 0


@pytest.mark.parametrize('arch', ['fcn8s', 'fcn_alexnet'])
def test_real_forward_tiny_inputs(arch):
  model, variables = small_model(arch)
  variables = with_random_scores(variables)
  for h, w in [(1, 1), (1, 5), (33, 2)]:
    y = jitted(model)(variables, jax.random.normal(jax.random.key(h + w), (1, h, w, 3)))
    assert y.shape == (1, h, w, 21)
    assert np.all(np.isfinite(np.asarray(y))) and np.any(np.asarray(y))


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_frozen_mask(arch):
  geo = models.geometry(arch)
  final = geo.upsamples[-1].name
  every = {u.name for u in geo.upsamples}
  for learnable, frozen in [(True, {final}), (False, every)]:
    model = models.build(arch, learnable_upsampling=learnable)
    params = full_shapes(arch, learnable)['params']
    mask = models.frozen_mask(model, params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for path, value in jax.tree_util.tree_leaves_with_path(mask):
      assert value is (path_names(path)[0] in frozen), path


# ---------------------------------------------------------------------------------------------
# Train / test behaviour.


@pytest.mark.parametrize('arch', ['fcn32s', 'fcn_alexnet'])
def test_dropout_only_in_training(arch):
  model, variables = small_model(arch)
  variables = with_random_scores(variables)
  x = jax.random.normal(jax.random.key(3), (1, 20, 24, 3))
  test, train = jitted(model, train=False), jitted(model, train=True)
  det1 = test(variables, x)
  det2 = test(variables, x, rngs={'dropout': jax.random.key(9)})
  np.testing.assert_array_equal(np.asarray(det1), np.asarray(det2))
  assert np.any(np.asarray(det1))
  tr1 = train(variables, x, rngs={'dropout': jax.random.key(1)})
  tr1b = train(variables, x, rngs={'dropout': jax.random.key(1)})
  tr2 = train(variables, x, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(tr1), np.asarray(tr1b))
  assert not np.allclose(np.asarray(tr1), np.asarray(tr2))
  assert not np.allclose(np.asarray(tr1), np.asarray(det1))


def test_fcn8s_atonce_scales_the_pooled_features():
  m8, variables = small_model('fcn8s')
  ma, _ = small_model('fcn8s_atonce')
  variables = with_random_scores(variables)
  x = jax.random.normal(jax.random.key(4), (1, 45, 38, 3))
  y8 = np.asarray(jitted(m8)(variables, x))
  ya = np.asarray(jitted(ma)(variables, x))
  assert np.abs(y8 - ya).max() > 1e-3 * np.abs(y8).max()
  # pool4 * 0.01 and pool3 * 1e-4 before a 1x1 conv = kernels scaled by the same factors (not the bias).
  params = dict(variables['params'])
  params['score_pool4'] = {**params['score_pool4'], 'kernel': params['score_pool4']['kernel'] * 0.01}
  params['score_pool3'] = {**params['score_pool3'], 'kernel': params['score_pool3']['kernel'] * 1e-4}
  y8s = np.asarray(jitted(m8)({**variables, 'params': params}, x))
  np.testing.assert_allclose(ya, y8s, rtol=1e-5, atol=1e-5 * np.abs(ya).max())


def test_width_scales_channels():
  p = full_shapes('fcn8s', True, 0.5)['params']
  assert p['conv1_1']['kernel'].shape == (3, 3, 3, 32)
  assert p['conv5_3']['kernel'].shape == (3, 3, 256, 256)
  assert p['fc6']['kernel'].shape == (7, 7, 256, 2048)
  assert p['score_fr']['kernel'].shape == (1, 1, 2048, 21)
  assert p['score_pool3']['kernel'].shape == (1, 1, 128, 21)
  assert p['upscore8']['kernel'].shape == (16, 16, 21, 21)  # class space is not scaled
  g = full_shapes('fcn_googlenet', True, 0.25)['params']
  assert g['score_fr']['kernel'].shape == (1, 1, 256, 21)
  a = full_shapes('fcn_alexnet', True, 0.125)['params']
  assert a['fc7']['kernel'].shape == (1, 1, 512, 512)
  # Tiny widths keep at least one channel.
  t = full_shapes('fcn32s', True, 1e-4)['params']
  assert t['conv1_1']['kernel'].shape == (3, 3, 3, 1)
  n_half = models.count_params(p)
  n_full = models.count_params(full_shapes('fcn8s')['params'])
  assert 0.2 < n_half / n_full < 0.3


def test_num_classes():
  model = models.build('fcn16s', num_classes=5)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))['params']
  assert shapes['score_fr']['kernel'].shape == (1, 1, 4096, 5)
  assert shapes['upscore16']['kernel'].shape == (32, 32, 5, 5)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), {'params': shapes},
                       jax.ShapeDtypeStruct((2, 17, 9, 3), jnp.float32))
  assert out.shape == (2, 17, 9, 5)


@pytest.mark.parametrize('arch', ['fcn8s', 'fcn_alexnet'])
def test_bfloat16_compute(arch):
  model32, variables = small_model(arch)
  variables = with_random_scores(variables)
  model16 = models.build(arch, width=SMALL, dtype=jnp.bfloat16)
  vars16 = jax.eval_shape(lambda: models.init_variables(model16, jax.random.key(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(vars16))  # params stay float32
  x = jax.random.normal(jax.random.key(8), (1, 26, 31, 3))
  y16, inter = jitted(model16, capture_intermediates=True, mutable='intermediates')(variables, x)
  assert y16.dtype == jnp.float32 and y16.shape == (1, 26, 31, 21)
  inter = inter['intermediates']
  for name in ('score_fr', 'upscore2' if 'upscore2' in inter else 'upscore'):
    assert inter[name]['__call__'][0].dtype == jnp.bfloat16, name
  y32 = np.asarray(jitted(model32)(variables, x))
  scale = np.abs(y32).max()
  assert scale > 0
  np.testing.assert_allclose(np.asarray(y16), y32, rtol=0, atol=0.1 * scale)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_arguments_raise_value_error():
  with pytest.raises(ValueError, match='unknown arch'):
    models.build('fcn4s')
  with pytest.raises(ValueError, match='unknown arch'):
    models.describe('vgg16')
  with pytest.raises(ValueError):
    models.geometry('fcn4s')
  for width in (0, -0.5):
    with pytest.raises(ValueError, match='width'):
      models.build('fcn32s', width=width)
  with pytest.raises(ValueError, match='num_classes'):
    models.build('fcn32s', num_classes=0)


def test_bad_images_raise_value_error():
  model, variables = small_model('fcn32s')
  for shape in [(8, 8, 3), (1, 8, 8, 1), (1, 8, 8, 4), (1, 3, 8, 8), (1, 1, 8, 8, 3)]:
    with pytest.raises(ValueError, match=r'\(N, H, W, 3\)'):
      model.apply(variables, jnp.zeros(shape))
  with pytest.raises(ValueError, match=r'\(N, H, W, 3\)'):
    model.init(jax.random.key(0), jnp.zeros((4, 4, 3)))


def test_atonce_without_skip_scaling_is_fcn8s():
  """skip_scaling=False (the demo preset's from-scratch at-once) drops only the fixed skip scales."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 37, 41, 3)), jnp.float32)
  fcn8s = models.build('fcn8s', width=1 / 16, num_classes=3)
  params = models.init_variables(fcn8s, jax.random.key(0))['params']
  params = jax.tree.map(lambda p: p + 0.01, params)  # non-zero score layers
  unscaled = models.build('fcn8s_atonce', width=1 / 16, num_classes=3, skip_scaling=False)
  scaled = models.build('fcn8s_atonce', width=1 / 16, num_classes=3)
  want = fcn8s.apply({'params': params}, x)
  np.testing.assert_array_equal(unscaled.apply({'params': params}, x), want)
  assert float(jnp.max(jnp.abs(scaled.apply({'params': params}, x) - want))) > 1e-4
