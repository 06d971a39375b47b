"""The CPU matrix-product forms of cpu_kernels.conv_general_dilated equal lax.conv_general_dilated:
forward, input gradient and kernel gradient, for every branch (im2col, shifted-row kernel gradient
on either operand), batches, odd and asymmetric padding, non-square maps and kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax.models import forms as forms_lib
from fcn_jax.models import cpu_kernels

DN = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(autouse=True)
def every_form_on():
  # Whatever this machine chose (fcn_jax.tune.for_this_machine), these tests take every form, the
  # shifted kernel gradient at every map size.
  with forms_lib.use(forms_lib.Forms(shifted_dw_min_pixels=1)):
    yield


def _reference(x, w, padding, strides=(1, 1)):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                      precision=jax.lax.Precision.HIGHEST)


def _ours(x, w, padding, strides=(1, 1)):
  return cpu_kernels.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                     precision=jax.lax.Precision.HIGHEST)


def _value_and_grads(conv, x, w, g, padding, strides):
  y, vjp = jax.vjp(lambda x_, w_: conv(x_, w_, padding, strides), x, w)
  return (y, *vjp(g))


CASES = [  # (x shape, kernel shape, padding, strides): which branch the case takes, see `_branch`
    ((1, 9, 11, 8), (3, 3, 8, 8), ((1, 1), (1, 1)), (1, 1)),        # shifted g (C' <= C)
    ((2, 9, 7, 4), (3, 3, 4, 6), ((1, 1), (1, 1)), (1, 1)),         # shifted x (C' > C), batch 2
    ((1, 6, 5, 3), (3, 3, 3, 5), ((4, 4), (4, 4)), (1, 1)),         # conv1_1-like: pad > kernel
    ((2, 8, 10, 5), (3, 2, 5, 4), ((2, 0), (0, 1)), (1, 1)),        # asymmetric kernel and padding
    ((1, 12, 12, 6), (7, 7, 6, 9), ((0, 0), (0, 0)), (1, 1)),       # fc6-like: im2col
    ((1, 13, 11, 6), (5, 5, 6, 4), ((2, 2), (1, 1)), (2, 2)),       # strided im2col
    ((2, 5, 6, 7), (1, 1, 7, 3), ((0, 0), (0, 0)), (1, 1)),         # 1x1: im2col
    ((1, 9, 9, 4), (3, 3, 4, 4), ((1, 1), (1, 1)), (2, 2)),         # stride 2 3x3: lax
]


def _branch(x_shape, k_shape, strides):
  k_h, k_w = k_shape[:2]
  if min(k_h, k_w) >= forms_lib.IM2COL_MIN_KERNEL or (k_h == k_w == 1 and strides == (1, 1)):
    return 'im2col'
  if strides != (1, 1):
    return 'lax'
  return 'shift-g' if k_shape[3] <= k_shape[2] else 'shift-x'


@pytest.mark.parametrize('x_shape,k_shape,padding,strides', CASES)
def test_cpu_conv_forms_match_lax(x_shape, k_shape, padding, strides):
  rng = np.random.default_rng(sum(x_shape) + sum(k_shape))
  x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
  w = jnp.asarray(rng.standard_normal(k_shape, np.float32))
  y_ref = _reference(x, w, padding, strides)
  g = jnp.asarray(rng.standard_normal(y_ref.shape, np.float32))
  ref = _value_and_grads(_reference, x, w, g, padding, strides)
  got = _value_and_grads(_ours, x, w, g, padding, strides)
  for name, a, b in zip(('output', 'input gradient', 'kernel gradient'), got, ref):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(b))), err_msg=name)
  # The case really goes through the form it is listed for (on CPU; other backends use lax).
  jaxpr = str(jax.make_jaxpr(lambda x_, w_: _ours(x_, w_, padding, strides))(x, w))
  branch = _branch(x_shape, k_shape, strides)
  if jax.default_backend() == 'cpu':
    assert ('custom_vjp_call' in jaxpr) == branch.startswith('shift'), (branch, jaxpr[:400])
    assert ('conv_general_dilated' not in jaxpr) == (branch == 'im2col'), branch


def test_shifted_kernel_gradient_in_bfloat16():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 10, 10, 8), np.float32)).astype(jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 8), np.float32)).astype(jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  dw = jax.grad(lambda w_: _ours(x, w_, pad).astype(jnp.float32).sum())(w)
  dw_ref = jax.grad(lambda w_: _reference(x.astype(jnp.float32), w_, pad).sum())(
      w.astype(jnp.float32))
  assert dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(dw_ref), rtol=2e-2,
                             atol=2e-2 * float(jnp.max(jnp.abs(dw_ref))))


def test_shifted_form_is_used_only_above_the_pixel_threshold():
  x = jnp.zeros((1, 20, 20, 16))
  w = jnp.zeros((3, 3, 16, 16))
  pad = ((1, 1), (1, 1))
  jaxpr = lambda: str(jax.make_jaxpr(lambda w_: _ours(x, w_, pad))(w))
  if jax.default_backend() != 'cpu':
    pytest.skip('the CPU forms apply on the CPU backend only')
  with forms_lib.use(forms_lib.Forms()):
    assert 'custom_vjp_call' not in jaxpr()  # 400 output pixels < the default 2^15
  with forms_lib.use(forms_lib.Forms(shifted_dw_min_pixels=400)):
    assert 'custom_vjp_call' in jaxpr()
  with forms_lib.use(forms_lib.Forms(shifted_dw=False, shifted_dw_min_pixels=400)):
    assert 'custom_vjp_call' not in jaxpr()  # the switch turns the form off


def test_first_layer_takes_the_shifted_form_at_any_size():
  # A first convolution (<= FEW_INPUT_CHANNELS inputs) has its own switch, below the threshold too.
  if jax.default_backend() != 'cpu':
    pytest.skip('the CPU forms apply on the CPU backend only')
  x, w, pad = jnp.zeros((1, 20, 20, 3)), jnp.zeros((3, 3, 3, 16)), ((1, 1), (1, 1))
  jaxpr = lambda: str(jax.make_jaxpr(lambda w_: _ours(x, w_, pad))(w))
  assert 'custom_vjp_call' in jaxpr()
  with forms_lib.use(forms_lib.Forms(shifted_dw_input=False)):
    assert 'custom_vjp_call' not in jaxpr()
  with forms_lib.use(forms_lib.Forms(shifted_dw=False)):
    assert 'custom_vjp_call' in jaxpr()
