"""Caffe-exact building blocks: ceil-mode max pooling, unpadded transposed convolution, crops.

All arrays are NHWC. These are pure functions of their inputs (the deconvolution is a flax module
only to own its kernel).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.models import forms as forms_lib
from fcn_jax.models import cpu_kernels


def ceil_pool_size(size: int, window: int, stride: int, padding: int = 0) -> int:
  """Output length of Caffe/PyTorch ceil-mode pooling (the last window must start inside the
  input)."""
  out = math.ceil((size + 2 * padding - window) / stride) + 1
  if padding and (out - 1) * stride >= size + padding:
    out -= 1
  return max(out, 1)


_valid_pooling: list[bool] = []


@contextlib.contextmanager
def valid_pooling() -> Iterator[None]:
  """Trace max pooling inside this block as an explicit -inf pad and flax's max_pool with 'VALID'
  padding and a keyword window, without custom gradients: the form ONNX export converts (jax2onnx
  replaces flax's max_pool by an NCHW MaxPool that takes only 'SAME'/'VALID' and a keyword window;
  its lax.reduce_window_max lowering pools over all four axes, which onnxruntime refuses). The same
  numbers as every other form: a max is exact and -inf padding never wins it. For inference
  export: the gradient is XLA's generic one (training keeps `forms`)."""
  _valid_pooling.append(True)
  try:
    yield
  finally:
    _valid_pooling.pop()


def _max_pool(x: jax.Array, window: int, stride: int, pads: tuple, blocks: bool,
              forms: forms_lib.Forms | None) -> jax.Array:
  if _valid_pooling:
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=(window, window), strides=(stride, stride),
                       padding='VALID')
  return cpu_kernels.max_pool(x, window, stride, pads, blocks=blocks, forms=forms)


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0,
                  forms: forms_lib.Forms | None = None) -> jax.Array:
  """Max pooling with Caffe's ceil rounding: an odd size keeps its last row/column (its gradient
  in the form `forms` picks, see fcn_jax.models.cpu_kernels).

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
  return _max_pool(x, window, stride, tuple(pads), blocks=window == stride and not padding,
                   forms=forms)


def max_pool_floor(x: jax.Array, window: int, stride: int, padding: int = 0,
                   forms: forms_lib.Forms | None = None) -> jax.Array:
  """Max pooling with PyTorch's default floor rounding (nn.MaxPool2d, ceil_mode=False: ResNet's
  stem): (size + 2 * padding - window) // stride + 1 outputs; -inf padding.

  Args:
    x: (N, H, W, C).
  """
  pads = []
  for size in x.shape[1:3]:
    out = (size + 2 * padding - window) // stride + 1
    if out < 1:
      raise ValueError(f'max pooling {window}/{stride} (padding {padding}) of a {size}-pixel '
                       f'input has no output')
    # The right padding that ends the last window exactly (less than `padding` when the floor
    # rounding leaves trailing rows unvisited, as PyTorch does).
    pads.append((padding, max((out - 1) * stride + window - size - padding, 0)))
  return _max_pool(x, window, stride, tuple(pads), blocks=False, forms=forms)


def bilinear_kernel(size: int) -> np.ndarray:
  """The (size, size) bilinear interpolation filter of Caffe's surgery.upsample_filt."""
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  og = np.arange(size, dtype=np.float64)
  filt_1d = 1 - np.abs(og - center) / factor
  return np.outer(filt_1d, filt_1d).astype(np.float32)


def bilinear_init(kernel_size: int) -> Callable:
  """Deconvolution kernel initialiser: bilinear on the class diagonal (each class upsamples
  itself)."""

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


def transposed_conv(x: jax.Array, kernel: jax.Array, stride: int,
                    forms: forms_lib.Forms | None = None) -> jax.Array:
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
  sub = sub.transpose(0, 2, 4, 1, 3, 5).reshape(taps, taps, kernel.shape[2],
                                                stride * stride * c_out)
  pads = ((taps - 1, taps - 1), (taps - 1, taps - 1))
  m_h, m_w = h + taps - 1, w + taps - 1
  y = cpu_kernels.subpixel_conv(x, sub.astype(x.dtype), pads, forms=forms)
  y = y.reshape(n, m_h, m_w, stride, stride, c_out).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(n, m_h * stride, m_w * stride, c_out)
  return y[:, : stride * (h - 1) + k, : stride * (w - 1) + k]


def _per_class_sub_pixel(filters: jax.Array, stride: int) -> jax.Array:
  """(k, k, C) filters -> (J, s, J, s, C) sub-pixel taps, J = ceil(k / s): phase t of an output
  gets tap j from input row m - j (as in `transposed_conv`)."""
  k, _, c = filters.shape
  taps = -(-k // stride)
  padded = jnp.pad(filters, ((0, taps * stride - k), (0, taps * stride - k), (0, 0)))
  return padded.reshape(taps, stride, taps, stride, c)[::-1, :, ::-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _per_class_phases(x: jax.Array, filters: jax.Array, stride: int) -> jax.Array:
  """(N, H, W, C) -> (N, M_h, s, M_w, s, C) phases, M = H + J - 1 (see
  transposed_conv_per_class)."""
  sub = _per_class_sub_pixel(filters, stride)
  taps = sub.shape[0]
  xp = jnp.pad(x, ((0, 0), (taps - 1, taps - 1), (taps - 1, taps - 1), (0, 0)))
  m_h, m_w = x.shape[1] + taps - 1, x.shape[2] + taps - 1
  y = None
  for j_u in range(taps):
    for j_v in range(taps):
      shifted = xp[:, j_u:j_u + m_h, j_v:j_v + m_w, :][:, :, None, :, None, :]
      term = shifted * sub[j_u, :, j_v][None, None, :, None, :, :]
      y = term if y is None else y + term
  return y


def _per_class_phases_fwd(x, filters, stride):
  return _per_class_phases(x, filters, stride), (x, filters)


def _per_class_phases_bwd(stride, res, g):
  # Autodiff of the broadcast sum above took 40 ms on CPU for a 512x512x21 output (XLA
  # materialised every tap's broadcast); written out, the adjoint is two small contractions
  # (6-9 ms): g's s x s phases against the J^2 taps, and the input patches against g.
  x, filters = res
  sub = _per_class_sub_pixel(filters, stride)
  taps = sub.shape[0]
  n, h, w, c = x.shape
  m_h, m_w = h + taps - 1, w + taps - 1
  xp = jnp.pad(x, ((0, 0), (taps - 1, taps - 1), (taps - 1, taps - 1), (0, 0)))
  # All J^2 taps in one contraction over each output's s x s phases (one pass over g; a per-tap
  # broadcast-multiply-reduce had XLA materialise each tap broadcast to g's size).
  taps_first = sub.transpose(0, 2, 1, 3, 4).reshape(taps * taps, stride, stride, c)
  parts = jnp.einsum('nmawbc,jabc->jnmwc', g, taps_first, preferred_element_type=jnp.float32)
  dxp = jnp.zeros(xp.shape, jnp.float32)
  for j_u in range(taps):
    for j_v in range(taps):
      dxp = dxp.at[:, j_u:j_u + m_h, j_v:j_v + m_w, :].add(parts[j_u * taps + j_v])
  patches = jnp.stack([xp[:, j_u:j_u + m_h, j_v:j_v + m_w, :]
                       for j_u in range(taps) for j_v in range(taps)])  # (J^2, N, M_h, M_w, C)
  d_taps = jnp.einsum('jnmwc,nmawbc->jabc', patches, g, preferred_element_type=jnp.float32)
  dx = dxp[:, taps - 1:taps - 1 + h, taps - 1:taps - 1 + w, :].astype(x.dtype)
  # d_taps[j_u * J + j_v, t1, t2] -> the filters' gradient (undo the flip, the reshape, the pad).
  d_sub = d_taps.reshape(taps, taps, stride, stride, c).transpose(0, 2, 1, 3, 4)
  d_padded = d_sub[::-1, :, ::-1].reshape(taps * stride, taps * stride, c)
  k = filters.shape[0]
  return dx, d_padded[:k, :k].astype(filters.dtype)


_per_class_phases.defvjp(_per_class_phases_fwd, _per_class_phases_bwd)


def transposed_conv_per_class(x: jax.Array, filters: jax.Array, stride: int) -> jax.Array:
  """`transposed_conv` with a diagonal kernel: class c upsamples itself with filters[:, :, c].

  The final upsampling of every FCN is such a filter (bilinear, frozen): computed class by class
  it costs C times fewer multiply-adds than the full (C, C) kernel (21x for PASCAL VOC). The same
  sub-pixel phases as `transposed_conv`, as ceil(k / s)^2 broadcast multiply-adds (elementwise
  work on every backend), with the adjoint written out.

  Args:
    x: (N, H, W, C).
    filters: (k, k, C), scatter orientation (the diagonal of a (k, k, C, C) kernel).
    stride: s.
  Returns:
    (N, s*(H-1)+k, s*(W-1)+k, C).
  """
  k = filters.shape[0]
  if filters.shape[1] != k or filters.shape[2] != x.shape[-1]:
    raise ValueError(f'expected ({k}, {k}, {x.shape[-1]}) filters, got {filters.shape}')
  n, h, w, c = x.shape
  y = _per_class_phases(x, filters.astype(x.dtype), stride)
  y = y.reshape(n, y.shape[1] * stride, y.shape[3] * stride, c)
  return y[:, : stride * (h - 1) + k, : stride * (w - 1) + k]


def off_diagonal_max(kernel: np.ndarray) -> float:
  """Largest |kernel[:, :, i, o]| with i != o (0 for a per-class upsampling filter)."""
  kernel = np.asarray(kernel)
  if kernel.ndim != 4 or kernel.shape[2] != kernel.shape[3]:
    return float('inf')
  eye = np.eye(kernel.shape[2], dtype=bool)
  return float(np.abs(np.where(eye, 0, kernel)).max(initial=0.0))


class Deconv(nn.Module):
  """Learnable or fixed upsampling: a bias-free, unpadded transposed convolution (Caffe
  Deconvolution).

  per_class: the kernel is a frozen diagonal filter (the final upsampling): computed class by class
  from its diagonal, with no gradient to the kernel. The parameter keeps the (k, k, C, C) layout of
  the Caffe and PyTorch weights; `convert` refuses a file whose final upsampling is not diagonal.
  """

  features: int
  kernel_size: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  per_class: bool = False
  forms: forms_lib.Forms | None = None  # None: forms.active() at trace time

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', bilinear_init(self.kernel_size),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    if self.per_class:
      if x.shape[-1] != self.features:
        raise ValueError(f'a per-class upsampling maps C to C channels, got {x.shape[-1]} -> '
                         f'{self.features}')
      filters = jax.lax.stop_gradient(jnp.diagonal(kernel, axis1=2, axis2=3))
      return transposed_conv_per_class(x.astype(self.dtype), filters.astype(self.dtype),
                                        self.stride)
    return transposed_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                           forms=self.forms)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resizing of (N, H, W, C) to (N, *size, C) with half-pixel centres: PyTorch's
  F.interpolate(mode='bilinear', align_corners=False) (torchvision's FCN scores to the input).

  Without antialiasing, as PyTorch: a smaller `size` samples, it does not average (an FCN always
  enlarges, so this only matters for other callers).
  """
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, int(size[0]), int(size[1]), c), 'bilinear', antialias=False)


def lrn_across_channels(x: jax.Array, size: int, alpha: float, beta: float,
                        k: float = 1.0) -> jax.Array:
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
