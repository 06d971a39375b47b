"""Caffe-exact building blocks: ceil-mode max pooling, unpadded transposed convolution, crops.

All arrays are NHWC. These are pure functions of their inputs (the deconvolution is a flax module
only to own its kernel).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def ceil_pool_size(size: int, window: int, stride: int, padding: int = 0) -> int:
  """Output length of Caffe/PyTorch ceil-mode pooling (the last window must start inside the input)."""
  out = math.ceil((size + 2 * padding - window) / stride) + 1
  if padding and (out - 1) * stride >= size + padding:
    out -= 1
  return max(out, 1)


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """Max pooling with Caffe's ceil rounding: an odd size keeps its last row/column.

  Args:
    x: (N, H, W, C).
  Returns:
    (N, ceil_pool_size(H), ceil_pool_size(W), C).
  """
  if window == stride and padding == 0 and BLOCK_POOL:
    return _block_max_pool(x, stride)
  pads = []
  for size in x.shape[1:3]:
    out = ceil_pool_size(size, window, stride, padding)
    right = (out - 1) * stride + window - size - padding
    pads.append((padding, max(right, 0)))
  if BLOCK_POOL and jax.default_backend() == 'cpu':  # measured on CPU; GPU/TPU keep XLA's gradient
    return _window_max_pool(x, window, stride, tuple(pads))
  # reduce_window pads with the init value (-inf), so padding never wins the max.
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


# Non-overlapping pooling (window == stride: VGG16's 2x2 pools, GoogLeNet's maxpool4) as a reshape
# and a max, with a custom gradient: XLA's generic reduce_window gradient (select_and_scatter) takes
# 0.57 s for pool1 of FCN-VGG16 at 256x256 on the 2-core CPU, against 13 ms for the forward; the
# gradient below is one elementwise pass. Same values, and the same tie rule as select_and_scatter
# (the first maximum of the window in row-major order receives the gradient).
BLOCK_POOL = True  # False: always nn.max_pool (for A/B benchmarks)


def _block_windows(x: jax.Array, s: int) -> jax.Array:
  n, h, w, c = x.shape
  oh, ow = -(-h // s), -(-w // s)
  if (oh * s, ow * s) != (h, w):
    x = jnp.pad(x, ((0, 0), (0, oh * s - h), (0, ow * s - w), (0, 0)), constant_values=-jnp.inf)
  return x.reshape(n, oh, s, ow, s, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max_pool(x: jax.Array, s: int) -> jax.Array:
  return _block_windows(x, s).max(axis=(2, 4))


def _block_max_pool_fwd(x, s):
  y = _block_max_pool(x, s)
  return y, (x, y)


def _block_max_pool_bwd(s, res, g):
  x, y = res
  xw = _block_windows(x, s)
  taken = jnp.zeros(y.shape, bool)
  rows = []
  for i in range(s):
    cols = []
    for j in range(s):
      hit = (xw[:, :, i, :, j, :] == y) & ~taken
      taken = taken | hit
      cols.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
    rows.append(jnp.stack(cols, axis=3))       # (N, oh, ow, s, C)
  dx = jnp.stack(rows, axis=2)                  # (N, oh, s, ow, s, C)
  n, oh, _, ow, _, c = dx.shape
  return (dx.reshape(n, oh * s, ow * s, c)[:, :x.shape[1], :x.shape[2]],)


_block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


# Overlapping windows (GoogLeNet's 3x3 pools, stride 2 and the inception branches' stride 1): XLA's
# forward is fine, and the gradient is window * window strided passes instead of select_and_scatter:
# for each offset (i, j) of the window in row-major order, the output positions whose first maximum
# sits there send their gradient to input (s * oh + i, s * ow + j) (a strided pad, then a sum).
# The same tie rule as select_and_scatter, so the same values up to the order in which overlapping
# windows add into one input (float rounding).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _window_max_pool(x: jax.Array, window: int, stride: int, pads: tuple) -> jax.Array:
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def _window_max_pool_fwd(x, window, stride, pads):
  y = _window_max_pool(x, window, stride, pads)
  return y, (x, y)


def _window_max_pool_bwd(window, stride, pads, res, g):
  x, y = res
  (top, bottom), (left, right) = pads
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
  n, h_p, w_p, c = xp.shape
  oh, ow = y.shape[1], y.shape[2]
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)
  dxp = None
  for i in range(window):
    for j in range(window):
      xs = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
      hit = (xs == y) & ~taken
      taken = taken | hit
      placed = jax.lax.pad(jnp.where(hit, g, zero), zero, (
          (0, 0, 0), (i, h_p - i - stride * (oh - 1) - 1, stride - 1),
          (j, w_p - j - stride * (ow - 1) - 1, stride - 1), (0, 0, 0)))
      dxp = placed if dxp is None else dxp + placed
  return (dxp[:, top:top + x.shape[1], left:left + x.shape[2], :],)


_window_max_pool.defvjp(_window_max_pool_fwd, _window_max_pool_bwd)


def bilinear_kernel(size: int) -> np.ndarray:
  """The (size, size) bilinear interpolation filter of Caffe's surgery.upsample_filt."""
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  og = np.arange(size, dtype=np.float64)
  filt_1d = 1 - np.abs(og - center) / factor
  return np.outer(filt_1d, filt_1d).astype(np.float32)


def bilinear_init(kernel_size: int) -> Callable:
  """Deconvolution kernel initialiser: bilinear on the class diagonal (each class upsamples itself)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    k_h, k_w, c_in, c_out = shape
    if k_h != kernel_size or k_w != kernel_size:
      raise ValueError(f'bilinear_init({kernel_size}) got kernel shape {shape}')
    w = np.zeros(shape, np.float32)
    filt = bilinear_kernel(kernel_size)
    for c in range(min(c_in, c_out)):
      w[:, :, c, c] = filt
    return jnp.asarray(w, dtype)

  return init


def transposed_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Caffe Deconvolution without padding or bias: out[i*s + a] += x[i] * kernel[a].

  Computed as a sub-pixel convolution (a small stride-1 convolution producing s*s phases, then
  depth-to-space) rather than a convolution over an s-times dilated input: the same numbers with s^2
  fewer multiply-adds, which matters on CPU for the final x32 upsampling.

  Args:
    x: (N, H, W, C_in).
    kernel: (k, k, C_in, C_out), scatter orientation (the same as PyTorch's ConvTranspose2d weight
      transposed (2, 3, 0, 1)).
    stride: s.
  Returns:
    (N, s*(H-1)+k, s*(W-1)+k, C_out).
  """
  k = kernel.shape[0]
  if kernel.shape[1] != k:
    raise ValueError(f'square kernels only, got {kernel.shape}')
  n, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  taps = -(-k // stride)  # ceil(k / s)
  padded = jnp.pad(kernel, ((0, taps * stride - k), (0, taps * stride - k), (0, 0), (0, 0)))
  # padded[j*s + t] -> sub[J-1-j, ..., t]: phase t of the output gets tap j from input row m - j.
  sub = padded.reshape(taps, stride, taps, stride, *kernel.shape[2:])
  sub = sub[::-1, :, ::-1]  # (J_u, t1, J_v, t2, C_in, C_out)
  sub = sub.transpose(0, 2, 4, 1, 3, 5).reshape(taps, taps, kernel.shape[2], stride * stride * c_out)
  pads = ((taps - 1, taps - 1), (taps - 1, taps - 1))
  m_h, m_w = h + taps - 1, w + taps - 1
  patch_bytes = n * m_h * m_w * taps * taps * x.shape[-1] * jnp.dtype(x.dtype).itemsize
  if CPU_MATMUL_CONVS and jax.default_backend() == 'cpu' and patch_bytes <= IM2COL_MAX_BYTES:
    # A few input channels, s*s*C_out output channels (21 -> 21504 for x32): XLA's CPU convolution
    # computes its input gradient at ~12 GFLOP/s; as im2col + dot both directions are matmuls.
    y = _im2col_conv(x, sub.astype(x.dtype), (1, 1), pads, None)
  else:
    y = jax.lax.conv_general_dilated(x, sub.astype(x.dtype), window_strides=(1, 1), padding=pads,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = y.reshape(n, m_h, m_w, stride, stride, c_out).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(n, m_h * stride, m_w * stride, c_out)
  return y[:, : stride * (h - 1) + k, : stride * (w - 1) + k]


class Deconv(nn.Module):
  """Learnable or fixed upsampling: a bias-free, unpadded transposed convolution (Caffe Deconvolution)."""

  features: int
  kernel_size: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', bilinear_init(self.kernel_size),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    return transposed_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


def lrn_across_channels(x: jax.Array, size: int, alpha: float, beta: float, k: float = 1.0) -> jax.Array:
  """Caffe LRN (ACROSS_CHANNELS): x / (k + alpha / size * sum_{|c' - c| <= size // 2} x_c'^2)^beta.

  Channels beyond the edges count as zero (Caffe pads the squared input with zeros).
  """
  half = size // 2
  sq = jnp.square(x.astype(jnp.float32))
  window = jax.lax.reduce_window(sq, 0.0, jax.lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                                 ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
  return (x / jnp.power(k + (alpha / size) * window, beta)).astype(x.dtype)


def crop_like(x: jax.Array, offset: int, shape: Sequence[int]) -> jax.Array:
  """Caffe Crop (axis 2): x[:, offset:offset+H, offset:offset+W] with (H, W) = shape[1:3]."""
  h, w = shape[1], shape[2]
  if x.shape[1] < offset + h or x.shape[2] < offset + w:
    raise ValueError(f'cannot crop {x.shape} at offset {offset} to {h}x{w}')
  return x[:, offset:offset + h, offset:offset + w]


# ---------------------------------------------------------------------------------------------
# Convolution with CPU-friendly gradients (a drop-in for lax.conv_general_dilated in nn.Conv).
#
# XLA's CPU backend runs a convolution and its input gradient well, but two cases of FCN-VGG16 are
# several times slower than PyTorch's oneDNN (benchmarks/RESULTS.md): the kernel gradient of the
# layers with large maps (conv1_2: 0.39-0.54 s against 0.12 s at 256x256, about 40 GFLOP/s), and
# fc6, a 7x7 kernel over a map hardly larger than itself. Both are matrix products in disguise.
#
# - fc6 (and any kernel >= IM2COL_MIN_KERNEL wide, and 1x1 layers) is im2col patches
#   (H'W', 7*7*512) times the (25088, 4096) kernel; autodiff of that form gives dots for both
#   gradients.
# - The kernel gradient dW[i, j] = sum_{n,h,w} x_pad[n, h+i, w+j] g[n, h, w] of a stride-1 layer is,
#   with x_pad flattened to rows (N*Hp*Wp, C) and g zero-padded to the same (Hp, Wp) grid, the
#   product x_rows[o:o+L]^T g_rows[:L] at the row offset o = i*Wp + j: a shift, not a gather (the
#   padded columns of g are zero, so rows that wrap across an image row or image contribute
#   nothing). We stack the k_w column shifts of the narrower operand (3x its size, instead of the
#   9x of im2col patches) and take one dot per kernel row: k_h dots of (L, C) x (L, k_w*C').
#   That runs at 2/3 of the matmul peak; it is used where the output map has at least
#   DW_SHIFT_MIN_PIXELS pixels, below which XLA's own kernel gradient is as fast or faster.
#
# Same parameters, same results up to float summation order; other backends, and any case outside
# these, use lax.conv_general_dilated unchanged.

CPU_MATMUL_CONVS = True       # False: always lax.conv_general_dilated (for A/B benchmarks)
IM2COL_MAX_BYTES = 1 << 29    # patches larger than this (512 MiB) stay on the convolution path
IM2COL_MIN_KERNEL = 5         # kernels at least this wide: the whole layer as im2col + dot
DW_SHIFT_MIN_PIXELS = 1 << 15  # stride-1 layers with an output map this large: shifted-row dW


def _is_nhwc_hwio(dimension_numbers, ndim: int) -> bool:
  if ndim != 4 or dimension_numbers is None:
    return False
  dn = jax.lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers) \
      if isinstance(dimension_numbers, (tuple, list)) and isinstance(dimension_numbers[0], str) \
      else dimension_numbers
  return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == (
      (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _patches(x, k_h, k_w, strides, padding, out_h, out_w):
  """(N, out_h, out_w, k_h * k_w * C) im2col patches, in the (kh, kw, c) order of an HWIO kernel."""
  s_h, s_w = strides
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  cols = [xp[:, i:i + s_h * (out_h - 1) + 1:s_h, j:j + s_w * (out_w - 1) + 1:s_w, :]
          for i in range(k_h) for j in range(k_w)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _im2col_conv(x, kernel, strides, padding, precision):
  k_h, k_w, c_in, c_out = kernel.shape
  out_h = (x.shape[1] + sum(padding[0]) - k_h) // strides[0] + 1
  out_w = (x.shape[2] + sum(padding[1]) - k_w) // strides[1] + 1
  p = _patches(x, k_h, k_w, strides, padding, out_h, out_w)
  y = jax.lax.dot_general(p, kernel.reshape(k_h * k_w * c_in, c_out), (((3,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)
  return y.astype(jnp.result_type(x.dtype, kernel.dtype))


def _shifted_rows_dw(x, g, kernel_shape, padding, precision):
  """Kernel gradient of a stride-1 NHWC/HWIO convolution as k_h row-shifted dots (see above)."""
  k_h, k_w, c_in, c_out = kernel_shape
  n = x.shape[0]
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  h_p, w_p = xp.shape[1], xp.shape[2]
  rows = n * h_p * w_p
  x_rows = xp.reshape(rows, c_in)
  g_rows = jnp.pad(g.astype(x.dtype), ((0, 0), (0, h_p - g.shape[1]), (0, w_p - g.shape[2]),
                                       (0, 0))).reshape(rows, c_out)
  length = rows - ((k_h - 1) * w_p + k_w - 1)  # every non-zero row of g lies below this
  contract = (((0,), (0,)), ((), ()))
  if c_out <= c_in:  # shift g: G[m, j] = g[m - j], then dW[i] = x_rows[i*Wp:]^T G
    span = length + k_w - 1
    g_shift = jnp.concatenate([jnp.pad(g_rows[:span - j], ((j, 0), (0, 0))) for j in range(k_w)],
                              axis=1)
    per_row = [jax.lax.dot_general(x_rows[i * w_p:i * w_p + span], g_shift, contract,
                                   precision=precision, preferred_element_type=jnp.float32)
               for i in range(k_h)]  # each (C, k_w * C')
    dw = jnp.stack(per_row).reshape(k_h, c_in, k_w, c_out).transpose(0, 2, 1, 3)
  else:  # shift x: X[m, j] = x_rows[m + j], then dW[i] = X[i*Wp:]^T g
    span = length + (k_h - 1) * w_p
    x_shift = jnp.concatenate([x_rows[j:j + span] for j in range(k_w)], axis=1)
    per_row = [jax.lax.dot_general(x_shift[i * w_p:i * w_p + length], g_rows[:length], contract,
                                   precision=precision, preferred_element_type=jnp.float32)
               for i in range(k_h)]  # each (k_w * C, C')
    dw = jnp.stack(per_row).reshape(k_h, k_w, c_in, c_out)
  return dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_shifted_dw(x, kernel, strides, padding, precision):
  return _lax_conv(x, kernel, strides, padding, precision)


def _lax_conv(x, kernel, strides, padding, precision):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_shifted_dw_fwd(x, kernel, strides, padding, precision):
  return _lax_conv(x, kernel, strides, padding, precision), (x, kernel)


def _conv_shifted_dw_bwd(strides, padding, precision, res, g):
  x, kernel = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, kernel, strides, padding, precision), x)
  (dx,) = vjp_x(g)
  dw = _shifted_rows_dw(x, g, kernel.shape, padding, precision)
  return dx, dw.astype(kernel.dtype)


_conv_shifted_dw.defvjp(_conv_shifted_dw_fwd, _conv_shifted_dw_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """lax.conv_general_dilated, with the CPU matrix-product forms described above.

  Pass as `nn.Conv(..., conv_general_dilated=layers.conv_general_dilated)`.
  """
  plain = (CPU_MATMUL_CONVS and jax.default_backend() == 'cpu' and _is_nhwc_hwio(dimension_numbers, lhs.ndim)
           and not isinstance(padding, str) and feature_group_count == 1
           and batch_group_count == 1 and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1))))
  if plain:
    k_h, k_w, c_in, _ = rhs.shape
    strides = tuple(window_strides)
    pads = tuple(tuple(p) for p in padding)
    out_h = (lhs.shape[1] + sum(pads[0]) - k_h) // strides[0] + 1
    out_w = (lhs.shape[2] + sum(pads[1]) - k_w) // strides[1] + 1
    patch_bytes = lhs.shape[0] * out_h * out_w * k_h * k_w * c_in * jnp.dtype(lhs.dtype).itemsize
    whole_layer_dot = min(k_h, k_w) >= IM2COL_MIN_KERNEL or (k_h == k_w == 1 and strides == (1, 1))
    if out_h > 0 and out_w > 0 and whole_layer_dot and patch_bytes <= IM2COL_MAX_BYTES:
      return _im2col_conv(lhs, rhs, strides, pads, precision)
    if (out_h > 0 and out_w > 0 and not whole_layer_dot and strides == (1, 1)
        and out_h * out_w >= DW_SHIFT_MIN_PIXELS):
      return _conv_shifted_dw(lhs, rhs, strides, pads, precision)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
