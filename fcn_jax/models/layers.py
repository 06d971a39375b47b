"""Caffe-exact building blocks: ceil-mode max pooling, unpadded transposed convolution, crops.

All arrays are NHWC. These are pure functions of their inputs (the deconvolution is a flax module
only to own its kernel).
"""

from __future__ import annotations

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
  pads = []
  for size in x.shape[1:3]:
    out = ceil_pool_size(size, window, stride, padding)
    right = (out - 1) * stride + window - size - padding
    pads.append((padding, max(right, 0)))
  # reduce_window pads with the init value (-inf), so padding never wins the max.
  y = nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)
  return y


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
  y = jax.lax.conv_general_dilated(
      x, sub.astype(x.dtype), window_strides=(1, 1),
      padding=((taps - 1, taps - 1), (taps - 1, taps - 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  m_h, m_w = h + taps - 1, w + taps - 1
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


def crop_like(x: jax.Array, offset: int, shape: Sequence[int]) -> jax.Array:
  """Caffe Crop (axis 2): x[:, offset:offset+H, offset:offset+W] with (H, W) = shape[1:3]."""
  h, w = shape[1], shape[2]
  if x.shape[1] < offset + h or x.shape[2] < offset + w:
    raise ValueError(f'cannot crop {x.shape} at offset {offset} to {h}x{w}')
  return x[:, offset:offset + h, offset:offset + w]
