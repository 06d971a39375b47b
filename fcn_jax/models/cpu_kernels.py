"""The CPU forms' kernels: max pooling with cheap gradients, convolutions as matrix products
(im2col, row-shifted kernel gradients), the sub-pixel convolution of the learned upsamplings. Each
takes its `Forms` (fcn_jax.models.forms) as an argument and computes the same numbers as XLA's own
form up to float summation order (tests/test_cpu_convs.py, tests/test_layers.py)."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcn_jax.models.forms import (FEW_INPUT_CHANNELS, IM2COL_MAX_BYTES, IM2COL_MIN_KERNEL, Forms,
                                  active, on_cpu)


# ---------------------------------------------------------------------------------------------
# Max pooling with cheap gradients.
#
# Non-overlapping pooling (window == stride: VGG16's 2x2 pools, GoogLeNet's maxpool4) as a reshape
# and a max, with a custom gradient: XLA's generic reduce_window gradient (select_and_scatter) took
# 0.57 s for pool1 of FCN-VGG16 at 256x256 on a 2-core AMD EPYC, against 13 ms for the forward; the
# gradient below is one elementwise pass. Same values, and the same tie rule as select_and_scatter
# (the first maximum of the window in row-major order receives the gradient).


def _block_windows(x: jax.Array, s: int) -> jax.Array:
  n, h, w, c = x.shape
  oh, ow = -(-h // s), -(-w // s)
  if (oh * s, ow * s) != (h, w):
    x = jnp.pad(x, ((0, 0), (0, oh * s - h), (0, ow * s - w), (0, 0)), constant_values=-jnp.inf)
  return x.reshape(n, oh, s, ow, s, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def block_max_pool(x: jax.Array, s: int) -> jax.Array:
  """Max pooling over s x s blocks (window == stride, ceil mode, no padding)."""
  return _block_windows(x, s).max(axis=(2, 4))


def _block_max_pool_fwd(x, s):
  y = block_max_pool(x, s)
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


block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


# Overlapping windows (GoogLeNet's 3x3 pools, stride 2 and the inception branches' stride 1): XLA's
# forward is fine, and the gradient is window * window strided passes instead of select_and_scatter:
# for each offset (i, j) of the window in row-major order, the output positions whose first maximum
# sits there send their gradient to input (s * oh + i, s * ow + j) (a strided pad, then a sum).
# The same tie rule as select_and_scatter, so the same values up to the order in which overlapping
# windows add into one input (float rounding).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def window_max_pool(x: jax.Array, window: int, stride: int, pads: tuple) -> jax.Array:
  """nn.max_pool with explicit (-inf) padding and the strided-pass gradient above."""
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def _window_max_pool_fwd(x, window, stride, pads):
  y = window_max_pool(x, window, stride, pads)
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


window_max_pool.defvjp(_window_max_pool_fwd, _window_max_pool_bwd)


def max_pool(x: jax.Array, window: int, stride: int, pads: tuple, blocks: bool,
             forms: Forms | None = None) -> jax.Array:
  """Max pooling with explicit (-inf) padding, in the form `forms` (None: `active()`) picks;
  `blocks`: the windows tile the input (window == stride, only the ceil-mode padding on the
  right)."""
  forms = forms or active()
  if forms.pool_grad and blocks:
    return block_max_pool(x, stride)  # pads the ceil-mode remainder with -inf itself
  if forms.pool_grad and on_cpu():
    return window_max_pool(x, window, stride, pads)
  # reduce_window pads with the init value (-inf), so padding never wins the max.
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


# ---------------------------------------------------------------------------------------------
# Convolution as matrix products (a drop-in for lax.conv_general_dilated in nn.Conv).
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
#   It is used where the output map has at least DW_SHIFT_MIN_PIXELS pixels, below which XLA's
#   own kernel gradient was as fast or faster (AMD EPYC, YNNPACK).


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


def _lax_conv_nhwc(x, kernel, strides, padding, precision=None):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_shifted_dw(x, kernel, strides, padding, precision):
  return _lax_conv_nhwc(x, kernel, strides, padding, precision)


def _conv_shifted_dw_fwd(x, kernel, strides, padding, precision):
  return _lax_conv_nhwc(x, kernel, strides, padding, precision), (x, kernel)


def _conv_shifted_dw_bwd(strides, padding, precision, res, g):
  x, kernel = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv_nhwc(x_, kernel, strides, padding, precision), x)
  (dx,) = vjp_x(g)
  dw = _shifted_rows_dw(x, g, kernel.shape, padding, precision)
  return dx, dw.astype(kernel.dtype)


_conv_shifted_dw.defvjp(_conv_shifted_dw_fwd, _conv_shifted_dw_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, forms: Forms | None = None):
  """lax.conv_general_dilated, in the matrix-product forms `forms` (None: `active()`) picks.

  Pass as `nn.Conv(..., conv_general_dilated=cpu_kernels.conv_with(forms))`.
  """
  forms = forms or active()
  plain = ((forms.im2col or forms.shifted_dw or forms.shifted_dw_input) and on_cpu()
           and _is_nhwc_hwio(dimension_numbers, lhs.ndim)
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
    if (forms.im2col and out_h > 0 and out_w > 0 and whole_layer_dot
        and patch_bytes <= IM2COL_MAX_BYTES):
      return _im2col_conv(lhs, rhs, strides, pads, precision)
    if out_h > 0 and out_w > 0 and not whole_layer_dot and strides == (1, 1):
      first = c_in <= FEW_INPUT_CHANNELS
      if (forms.shifted_dw_input and first) or (
          forms.shifted_dw and not first and out_h * out_w >= forms.shifted_dw_min_pixels):
        return _conv_shifted_dw(lhs, rhs, strides, pads, precision)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def conv_with(forms: Forms | None) -> Callable:
  """`conv_general_dilated` bound to `forms` (for nn.Conv's conv_general_dilated field)."""
  return functools.partial(conv_general_dilated, forms=forms)


def subpixel_conv(x: jax.Array, kernel: jax.Array, pads: tuple,
                  forms: Forms | None = None) -> jax.Array:
  """The stride-1 convolution inside `layers.transposed_conv` (few input channels, s*s*C_out
  outputs: XLA's CPU convolution computed its input gradient at ~12 GFLOP/s; im2col + dot is a
  matmul both ways)."""
  taps = kernel.shape[0]
  m_h, m_w = x.shape[1] + sum(pads[0]) - taps + 1, x.shape[2] + sum(pads[1]) - taps + 1
  patch_bytes = x.shape[0] * m_h * m_w * taps * taps * x.shape[-1] * jnp.dtype(x.dtype).itemsize
  if (forms or active()).im2col and on_cpu() and patch_bytes <= IM2COL_MAX_BYTES:
    return _im2col_conv(x, kernel, (1, 1), pads, None)
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=pads,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
