"""Caffe-exact building blocks: ceil-mode pooling, bilinear kernels, the sub-pixel deconvolution."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax.models import layers
from fcn_jax.models import forms as forms_lib

# (kernel, stride) pairs of every deconvolution in the model family, plus odd/awkward ones.
DECONV_CASES = [(4, 2), (16, 8), (32, 16), (64, 32), (63, 32), (3, 2), (5, 3), (2, 2), (1, 1), (7, 2)]


# ---------------------------------------------------------------------------------------------
# References.


def caffe_pool_size(size, window, stride, pad=0):
  """Caffe pooling_layer.cpp / PyTorch ceil_mode output length."""
  out = int(math.ceil((size + 2 * pad - window) / stride)) + 1
  if pad and (out - 1) * stride >= size + pad:  # the last window must start inside the image
    out -= 1
  return out


def numpy_max_pool(x, window, stride, pad=0):
  """Ceil-mode max pooling of (N, H, W, C); windows are clipped to the image (padding never wins)."""
  n, h, w, c = x.shape
  oh, ow = caffe_pool_size(h, window, stride, pad), caffe_pool_size(w, window, stride, pad)
  out = np.empty((n, oh, ow, c), x.dtype)
  for i in range(oh):
    r0 = max(i * stride - pad, 0)
    r1 = min(i * stride - pad + window, h)
    for j in range(ow):
      c0 = max(j * stride - pad, 0)
      c1 = min(j * stride - pad + window, w)
      out[:, i, j] = x[:, r0:r1, c0:c1].max(axis=(1, 2))
  return out


def numpy_deconv(x, kernel, stride):
  """Caffe Deconvolution (no pad, no bias) as a scatter-add: out[i*s+a, j*s+b, o] += x[i,j,c] W[a,b,c,o]."""
  n, h, w, _ = x.shape
  k = kernel.shape[0]
  out = np.zeros((n, stride * (h - 1) + k, stride * (w - 1) + k, kernel.shape[3]), np.float64)
  for i in range(h):
    for j in range(w):
      out[:, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
          'nc,abco->nabo', x[:, i, j].astype(np.float64), kernel.astype(np.float64))
  return out


def upsample_filt(size):
  """Verbatim logic of Caffe's surgery.upsample_filt (fcn.berkeleyvision.org)."""
  factor = (size + 1) // 2
  if size % 2 == 1:
    center = factor - 1
  else:
    center = factor - 0.5
  og = np.ogrid[:size, :size]
  return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


# ---------------------------------------------------------------------------------------------
# Ceil-mode pooling.


@pytest.mark.parametrize('window,stride,pad', [(2, 2, 0), (3, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_ceil_pool_size_matches_caffe_rule(window, stride, pad):
  for size in range(max(window - 2 * pad, 1), 80):
    assert layers.ceil_pool_size(size, window, stride, pad) == caffe_pool_size(size, window, stride, pad), size


def test_ceil_pool_keeps_last_row_and_column():
  # 2x2/2 on odd sizes: ceil keeps the last row/column (floor would drop them).
  assert layers.ceil_pool_size(5, 2, 2) == 3
  assert layers.ceil_pool_size(7, 3, 2) == 3
  assert layers.ceil_pool_size(8, 3, 2) == 4  # floor mode would give 3
  x = np.zeros((1, 5, 7, 1), np.float32)
  x[0, 4, :, 0] = np.arange(7) + 10  # the value in the last row only
  x[0, :, 6, 0] = 100.0  # the last column only
  y = np.asarray(layers.max_pool_ceil(jnp.asarray(x), 2, 2))
  assert y.shape == (1, 3, 4, 1)
  np.testing.assert_array_equal(y[0, 2, :3, 0], [11, 13, 15])
  np.testing.assert_array_equal(y[0, :, 3, 0], [100, 100, 100])


@pytest.mark.parametrize('window,stride,pad', [(2, 2, 0), (3, 2, 0), (3, 1, 1)])
def test_max_pool_ceil_matches_numpy(window, stride, pad):
  rng = np.random.default_rng(window * 10 + stride)
  # Negative values everywhere: zero padding would win the max, -inf padding must not.
  for h, w in [(5, 7), (6, 9), (11, 4), (3, 3), (1 + 2 * (window - 1 - pad), 13), (17, 16)]:
    if min(h, w) + 2 * pad < window:
      continue
    x = -1 - rng.random((2, h, w, 3)).astype(np.float32)
    y = np.asarray(layers.max_pool_ceil(jnp.asarray(x), window, stride, pad))
    ref = numpy_max_pool(x, window, stride, pad)
    assert y.shape == ref.shape, (h, w)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize('window,stride,pad', [(2, 2, 0), (3, 2, 0), (3, 1, 1), (3, 2, 1), (3, 3, 0)])
def test_max_pool_ceil_gradient_equals_select_and_scatter(window, stride, pad):
  # The custom gradients (block and overlapping windows) against XLA's reduce_window gradient on
  # inputs full of ties (ReLU zeros, repeated values): the first maximum of each window in row-major
  # order gets the gradient, and overlapping windows add up (in another order: float rounding).
  rng = np.random.default_rng(window * 100 + stride * 10 + pad)
  for h, w in [(5, 7), (6, 9), (11, 4), (17, 16)]:
    if min(h, w) + 2 * pad < window:
      continue
    x = jnp.asarray(np.maximum(rng.integers(-3, 3, (2, h, w, 3)), 0).astype(np.float32))
    g_out = jnp.asarray(rng.standard_normal(layers.max_pool_ceil(x, window, stride, pad).shape,
                                            dtype=np.float32))
    # No jit: the switch is read at trace time, and jit would reuse the first trace.
    grad = lambda x_: jax.grad(lambda v: jnp.sum(layers.max_pool_ceil(v, window, stride, pad) * g_out))(x_)
    with forms_lib.use(forms_lib.Forms(pool_grad=True)):
      ours = np.asarray(grad(x))
    with forms_lib.use(forms_lib.Forms(pool_grad=False)):
      ref = np.asarray(grad(x))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6, err_msg=f'{h}x{w}')
    assert np.count_nonzero(ref) > 0


def test_max_pool_ceil_matches_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 13, 10, 2)).astype(np.float32)
  for window, stride, pad in [(2, 2, 0), (3, 2, 0), (3, 1, 1), (3, 2, 1)]:
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), window, stride, pad,
                                         ceil_mode=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(layers.max_pool_ceil(jnp.asarray(x), window, stride, pad)), ref)


# ---------------------------------------------------------------------------------------------
# Bilinear kernel and its initialiser.


@pytest.mark.parametrize('k', [1, 2, 3, 4, 16, 32, 63, 64])
def test_bilinear_kernel_matches_caffe_upsample_filt(k):
  np.testing.assert_allclose(layers.bilinear_kernel(k), upsample_filt(k), rtol=0, atol=1e-7)
  assert layers.bilinear_kernel(k).dtype == np.float32


def test_bilinear_kernel_known_values():
  np.testing.assert_allclose(layers.bilinear_kernel(4)[0], [0.0625, 0.1875, 0.1875, 0.0625])
  np.testing.assert_allclose(layers.bilinear_kernel(3)[1], [0.5, 1.0, 0.5])


@pytest.mark.parametrize('k', [4, 16, 63, 64])
def test_bilinear_init_is_diagonal(k):
  w = np.asarray(layers.bilinear_init(k)(jax.random.key(0), (k, k, 5, 5)))
  filt = upsample_filt(k)
  for i in range(5):
    for o in range(5):
      np.testing.assert_allclose(w[:, :, i, o], filt if i == o else 0.0, atol=1e-7)
  with pytest.raises(ValueError):
    layers.bilinear_init(k)(jax.random.key(0), (k + 1, k + 1, 5, 5))


@pytest.mark.parametrize('s,odd', [(2, False), (8, False), (16, False), (32, False), (32, True)])
def test_bilinear_upsampling_of_a_ramp_is_exact_in_the_interior(s, odd):
  # k = 2s (VGG nets, half-pixel centre) and k = 2s - 1 (AlexNet/GoogLeNet, integer centre).
  k = 2 * s - 1 if odd else 2 * s
  n_h, n_w = 4, 6
  ii, jj = np.meshgrid(np.arange(n_h), np.arange(n_w), indexing='ij')
  x = (3.0 * ii - 2.0 * jj + 1.0).astype(np.float32)[None, :, :, None]
  kernel = layers.bilinear_init(k)(None, (k, k, 1, 1))
  y = np.asarray(layers.transposed_conv(jnp.asarray(x), kernel, s))[0, :, :, 0]
  centre = (k - 1) / 2  # output pixel o sits at input coordinate (o - centre) / s
  lo = math.ceil(centre)
  oi = np.arange(lo, int(centre + s * (n_h - 1)) + 1)
  oj = np.arange(lo, int(centre + s * (n_w - 1)) + 1)
  u, v = (oi - centre) / s, (oj - centre) / s
  expect = 3.0 * u[:, None] - 2.0 * v[None, :] + 1.0
  np.testing.assert_allclose(y[np.ix_(oi, oj)], expect, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Transposed convolution.


@pytest.mark.parametrize('k,s', DECONV_CASES)
def test_transposed_conv_matches_numpy_scatter(k, s):
  rng = np.random.default_rng(k * 100 + s)
  x = rng.standard_normal((2, 3, 5, 3)).astype(np.float32)  # non-square input
  kernel = rng.standard_normal((k, k, 3, 4)).astype(np.float32)
  y = np.asarray(layers.transposed_conv(jnp.asarray(x), jnp.asarray(kernel), s))
  ref = numpy_deconv(x, kernel, s)
  assert y.shape == (2, s * 2 + k, s * 4 + k, 4)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('h,w', [(1, 1), (1, 4), (7, 2)])
def test_transposed_conv_matches_numpy_small_maps(h, w):
  rng = np.random.default_rng(h * 10 + w)
  for k, s in [(64, 32), (63, 32), (4, 2)]:
    x = rng.standard_normal((1, h, w, 2)).astype(np.float32)
    kernel = rng.standard_normal((k, k, 2, 2)).astype(np.float32)
    y = np.asarray(layers.transposed_conv(jnp.asarray(x), jnp.asarray(kernel), s))
    np.testing.assert_allclose(y, numpy_deconv(x, kernel, s), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('k,s', DECONV_CASES)
def test_transposed_conv_matches_lax_conv_transpose(k, s):
  rng = np.random.default_rng(k + s)
  x = jnp.asarray(rng.standard_normal((1, 4, 3, 2)).astype(np.float32))
  kernel = jnp.asarray(rng.standard_normal((k, k, 2, 3)).astype(np.float32))
  y = layers.transposed_conv(x, kernel, s)
  dn = ('NHWC', 'HWIO', 'NHWC')
  # transpose_kernel=True wants the kernel of the forward convolution whose gradient this is: HWIO
  # with I = our outputs and O = our inputs (PyTorch's ConvTranspose2d weight layout, moved to HW
  # first); lax then flips it spatially itself.
  ref = jax.lax.conv_transpose(x, kernel.transpose(0, 1, 3, 2), (s, s), 'VALID', dimension_numbers=dn,
                               transpose_kernel=True)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)
  # Without transpose_kernel the kernel must be flipped by hand (a correlation over the dilated input).
  ref2 = jax.lax.conv_transpose(x, kernel[::-1, ::-1], (s, s), 'VALID', dimension_numbers=dn)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref2), rtol=1e-5, atol=1e-4)


def test_transposed_conv_matches_torch_conv_transpose2d():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 3, 4, 2)).astype(np.float32)
  kernel = rng.standard_normal((16, 16, 2, 3)).astype(np.float32)
  ref = torch.nn.functional.conv_transpose2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                             torch.from_numpy(kernel).permute(2, 3, 0, 1).contiguous(),
                                             stride=8).permute(0, 2, 3, 1).numpy()
  y = np.asarray(layers.transposed_conv(jnp.asarray(x), jnp.asarray(kernel), 8))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_transposed_conv_gradient_matches_numpy_adjoint():
  # The gradient w.r.t. the input of a scatter-add is the correlation with the same kernel.
  rng = np.random.default_rng(2)
  k, s = 5, 3
  x = jnp.asarray(rng.standard_normal((1, 3, 4, 2)).astype(np.float32))
  kernel = jnp.asarray(rng.standard_normal((k, k, 2, 3)).astype(np.float32))
  g_out = rng.standard_normal((1, s * 2 + k, s * 3 + k, 3)).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(layers.transposed_conv(x, kernel, s) * g_out))(x)
  ref = np.zeros((1, 3, 4, 2))
  for i in range(3):
    for j in range(4):
      ref[0, i, j] = np.einsum('abo,abco->c', g_out[0, i * s:i * s + k, j * s:j * s + k], np.asarray(kernel))
  np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k,s', [(64, 32), (63, 32), (32, 16), (16, 8), (4, 2), (5, 3), (3, 3)])
def test_per_class_transposed_conv_equals_the_diagonal_kernel(k, s):
  # The final upsampling computed class by class equals the full transposed convolution with the
  # diagonal (k, k, C, C) kernel: values and the input gradient; any filters, not only bilinear.
  rng = np.random.default_rng(k * 7 + s)
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 4)).astype(np.float32))
  filters = rng.standard_normal((k, k, 4)).astype(np.float32)
  kernel = np.einsum('abc,cd->abcd', filters, np.eye(4, dtype=np.float32))
  y, vjp = jax.vjp(lambda v: layers.transposed_conv_per_class(v, jnp.asarray(filters), s), x)
  ref_y, ref_vjp = jax.vjp(lambda v: layers.transposed_conv(v, jnp.asarray(kernel), s), x)
  np.testing.assert_allclose(np.asarray(y), numpy_deconv(np.asarray(x), kernel, s), rtol=1e-5,
                             atol=1e-4)
  g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(ref_vjp(g)[0]), rtol=1e-4, atol=1e-4)
  # The filters' gradient (the written-out adjoint) against the full kernel's diagonal.
  d_filters = jax.grad(lambda f: jnp.sum(layers.transposed_conv_per_class(x, f, s) * g))(
      jnp.asarray(filters))
  d_kernel = jax.grad(lambda kk: jnp.sum(layers.transposed_conv(x, kk, s) * g))(jnp.asarray(kernel))
  np.testing.assert_allclose(np.asarray(d_filters),
                             np.asarray(jnp.diagonal(d_kernel, axis1=2, axis2=3)), rtol=1e-4,
                             atol=1e-3)


def test_final_upsampling_is_per_class_and_frozen():
  # The model's final Deconv uses only the kernel's diagonal and passes no gradient to it; the
  # intermediate ones are full learnable kernels.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 3, 2)).astype(np.float32))
  full = layers.Deconv(features=2, kernel_size=4, stride=2)
  per_class = layers.Deconv(features=2, kernel_size=4, stride=2, per_class=True)
  params = full.init(jax.random.key(0), x)
  kernel = np.asarray(params['params']['kernel'])
  assert layers.off_diagonal_max(kernel) == 0  # bilinear_init: diagonal
  np.testing.assert_allclose(np.asarray(per_class.apply(params, x)), np.asarray(full.apply(params, x)),
                             rtol=1e-6, atol=1e-6)
  mixed = {'params': {'kernel': params['params']['kernel'] + 1.0}}
  assert layers.off_diagonal_max(mixed['params']['kernel']) == 1.0
  assert not np.allclose(per_class.apply(mixed, x), full.apply(mixed, x))  # the diagonal only
  grad = jax.grad(lambda p: jnp.sum(per_class.apply(p, x) ** 2))(params)
  assert not np.any(np.asarray(grad['params']['kernel']))
  assert np.any(np.asarray(jax.grad(lambda p: jnp.sum(full.apply(p, x) ** 2))(params)['params']['kernel']))


def test_deconv_module_shapes_and_dtype():
  module = layers.Deconv(features=3, kernel_size=4, stride=2, dtype=jnp.bfloat16)
  x = jnp.ones((1, 5, 6, 3), jnp.float32)
  params = module.init(jax.random.key(0), x)
  assert params['params']['kernel'].shape == (4, 4, 3, 3)
  assert params['params']['kernel'].dtype == jnp.float32
  y = module.apply(params, x)
  assert y.shape == (1, 12, 14, 3) and y.dtype == jnp.bfloat16


def test_crop_like():
  x = jnp.arange(2 * 10 * 12 * 1).reshape(2, 10, 12, 1)
  y = layers.crop_like(x, 3, (2, 4, 5, 7))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x[:, 3:7, 3:8]))
  with pytest.raises(ValueError):
    layers.crop_like(x, 7, (2, 4, 5, 7))
