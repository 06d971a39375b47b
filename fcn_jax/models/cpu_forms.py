"""CPU forms of the convolution and pooling layers, and which of them this machine runs.

XLA's CPU backend computes some of FCN's layers several times slower than PyTorch's oneDNN, and
which ones depends on the CPU (benchmarks/RESULTS.md has a table per CPU model). The same layers can
be written as matrix products or elementwise passes; those forms live here, so that
`layers.py` reads as the Caffe geometry alone. Each form is a switch of `Forms`:

- `conv_library`: which library XLA hands the convolutions to: 'ynnpack' (XLA's default) or
  'eigen' (XLA's older path; a compiler option of the jitted program, so `jit` below sets it). On
  an AMD EPYC YNNPACK's was faster overall; on an Intel Sapphire Rapids its kernel gradients run at
  a quarter of Eigen's speed (conv3_2 at 256x256: 382 ms against 113 ms).
- `im2col`: layers with kernels at least IM2COL_MIN_KERNEL wide (fc6: 7x7 over a 15x15 map), 1x1
  layers and the sub-pixel convolution of the learned upsamplings as patches x kernel dots;
  autodiff of that form gives dots for both gradients.
- `shifted_dw`: the kernel gradient of stride-1 layers with output maps of at least
  `shifted_dw_min_pixels` pixels as k_h row-shifted dots instead of XLA's convolution (see
  `_shifted_rows_dw`). The threshold is measured too: under YNNPACK on a Sapphire Rapids the
  shifted form wins 3-4x down to 56x56 maps (GoogLeNet's conv3: 101 -> 35 ms); under Eigen,
  Eigen's own kernel gradient is as fast or faster; on an AMD EPYC it won above 2^15 pixels.
- `shifted_dw_input`: the same for the first convolution (at most FEW_INPUT_CHANNELS input
  channels: colour, depth, HHA), at any map size: on a Sapphire Rapids XLA's kernel gradient of
  conv1_1 at 454x454 took 274 ms (YNNPACK and Eigen alike), the shifted form 35 ms.
- `pool_grad`: max-pool gradients without select_and_scatter (one elementwise pass for
  non-overlapping windows, window^2 strided passes for overlapping ones).

Every form computes the same numbers up to float summation order (tests/test_cpu_convs.py,
tests/test_layers.py). Which forms run is decided once per CPU model and jax version: measured at
first use (small probes, under a minute, `measure`) and cached in
~/.cache/fcn_jax/cpu_forms.json, or set with FCN_JAX_CPU_FORMS (see `from_spec`). Other backends
use XLA's own forms, except the non-overlapping pool gradient (exact, and cheap everywhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.errors import UserError

ENV_VAR = 'FCN_JAX_CPU_FORMS'
CONV_LIBRARIES = ('ynnpack', 'eigen')
# XLA's per-program option: the default hands dots and convolutions (with fused elementwise work)
# to YNNPACK; keeping only individual dots there sends the convolutions to Eigen.
_LIBRARY_OPTIONS = {
    'ynnpack': None,
    'eigen': {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
}

IM2COL_MAX_BYTES = 1 << 29    # patches larger than this (512 MiB) stay on the convolution path
IM2COL_MIN_KERNEL = 5         # kernels at least this wide: the whole layer as im2col + dot
DW_SHIFT_MIN_PIXELS = 1 << 15  # stride-1 layers with an output map this large: shifted-row dW
FEW_INPUT_CHANNELS = 8         # a first convolution (shifted_dw_input)
# The kernel-gradient probes (map side, C_in, C_out), largest map first: conv1_2-like just above
# 2^15 pixels, GoogLeNet's conv3 / VGG16's conv3 scale, GoogLeNet's 56x56 inception scale.
DW_PROBES = ((184, 64, 64), (112, 64, 192), (56, 192, 128))


class CpuFormsError(UserError, ValueError):
  """FCN_JAX_CPU_FORMS (or a Forms field) has a value this module does not know."""


@dataclasses.dataclass(frozen=True)
class Forms:
  """Which CPU forms the layers take (read at trace time)."""

  conv_library: str = 'ynnpack'
  im2col: bool = True
  shifted_dw: bool = True
  pool_grad: bool = True
  shifted_dw_input: bool = True
  shifted_dw_min_pixels: int = DW_SHIFT_MIN_PIXELS

  def __post_init__(self):
    if self.conv_library not in CONV_LIBRARIES:
      raise CpuFormsError(f'conv_library must be one of {CONV_LIBRARIES}, got {self.conv_library!r}')

  def compiler_options(self) -> dict[str, Any] | None:
    """XLA compiler options of a program traced with these forms (None: XLA's defaults)."""
    return _LIBRARY_OPTIONS[self.conv_library]

  def describe(self) -> str:
    return ','.join(f'{f.name}={_format(getattr(self, f.name))}' for f in dataclasses.fields(self))


TUNED_ON_AMD = Forms()  # every form on, YNNPACK convolutions: the AMD EPYC choice
PLAIN_XLA = Forms('ynnpack', im2col=False, shifted_dw=False, pool_grad=False,
                  shifted_dw_input=False)
ACCELERATOR = Forms('ynnpack', im2col=False, shifted_dw=False, pool_grad=True,
                    shifted_dw_input=False)  # GPU / TPU


def _format(value) -> str:
  return str(int(value)) if isinstance(value, bool) else str(value)


def from_spec(spec: str) -> Forms:
  """Forms from FCN_JAX_CPU_FORMS: 'measure' (measure again now), 'default' (the AMD-tuned set),
  'off' (plain XLA), or fields such as 'conv_library=eigen,shifted_dw=0' over the default."""
  spec = spec.strip()
  if spec == 'default':
    return TUNED_ON_AMD
  if spec == 'off':
    return PLAIN_XLA
  values: dict[str, Any] = {}
  names = {f.name: f.type for f in dataclasses.fields(Forms)}
  for item in filter(None, spec.split(',')):
    key, sep, value = item.partition('=')
    key, value = key.strip(), value.strip()
    if not sep or key not in names:
      raise CpuFormsError(f'{ENV_VAR}={spec!r}: expected measure, default, off or a comma-separated '
                       f'list of {", ".join(f"{n}=..." for n in names)}; {item!r} is not one')
    if key == 'conv_library':
      values[key] = value
    elif names[key] in ('int', int):
      if not value.isdigit():
        raise CpuFormsError(f'{ENV_VAR}: {key} takes a whole number, got {value!r}')
      values[key] = int(value)
    elif value in ('0', '1', 'true', 'false'):
      values[key] = value in ('1', 'true')
    else:
      raise CpuFormsError(f'{ENV_VAR}: {key} takes 0 or 1, got {value!r}')
  return dataclasses.replace(TUNED_ON_AMD, **values)


# ---------------------------------------------------------------------------------------------
# Which forms run: an override (`use`), else FCN_JAX_CPU_FORMS, else the cache, else a measurement.

_override: list[Forms] = []
_resolved: dict[str, Forms] = {}


@contextlib.contextmanager
def use(forms: Forms) -> Iterator[Forms]:
  """Trace (and jit with `jit`) inside this block with `forms` (A/B benchmarks, tests)."""
  _override.append(forms)
  try:
    yield forms
  finally:
    _override.pop()


def on_cpu() -> bool:
  return jax.default_backend() == 'cpu'


def current(backbone: str = 'vgg16') -> Forms:
  """The forms a net on `backbone` takes now: ACCELERATOR off the CPU, otherwise this machine's
  (the best convolution library differs between nets: VGG16's wide 3x3 layers and GoogLeNet's
  many small ones)."""
  if _override:
    return _override[-1]
  if not on_cpu():
    return ACCELERATOR
  return for_this_machine(backbone)


def jit(fn: Callable, forms: Forms | None = None, **kwargs) -> Callable:
  """jax.jit with the compiler options of `forms` (the model's; None: `current()`)."""
  options = (forms or current()).compiler_options() if on_cpu() else None
  return jax.jit(fn, compiler_options=options, **kwargs)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown CPU'


def machine_key() -> str:
  """What the choice is cached under: the CPU model, its core count and the jax version."""
  return f'{cpu_model()} | {os.cpu_count()} cores | jax {jax.__version__}'


# The convolution-library probe per backbone: the backbone's first layers (through this one) at a
# small input, forward and gradients, as the net runs them (bias or frozen BatchNorm, ReLU, pools:
# YNNPACK fuses some of them into its convolutions). A lone convolution misled: on a Sapphire
# Rapids Eigen wins it for GoogLeNet's shapes, YNNPACK wins GoogLeNet's training step.
PROBE_SLICES = {'vgg16': 'conv3_1', 'alexnet': 'conv4', 'caffenet': 'conv4',
                'googlenet': 'inception3b'}
PROBE_SIDE = 64  # input side (the first convolution pads it by 100)


def cache_path() -> pathlib.Path:
  root = os.environ.get('FCN_JAX_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'fcn_jax')
  return pathlib.Path(root) / 'cpu_forms.json'


def _read_cache(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}  # absent or damaged: measure again (and rewrite it)


def _write_cache(path: pathlib.Path, key: str, entry: dict) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.cpu_forms.', suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
  except OSError as e:
    print(f'fcn_jax: could not cache the CPU forms in {path} ({e}); they are measured again by the '
          'next process', file=sys.stderr)


def for_this_machine(backbone: str = 'vgg16') -> Forms:
  """This machine's forms for `backbone`: FCN_JAX_CPU_FORMS, else the cached choice, else
  measured (and cached). In a multi-process job: FCN_JAX_CPU_FORMS or the default set."""
  spec = os.environ.get(ENV_VAR, '').strip()
  key = f'{machine_key()} | {backbone}'
  if spec and spec != 'measure':
    if spec not in _resolved:
      _resolved[spec] = from_spec(spec)
    return _resolved[spec]
  if key in _resolved:  # 'measure' too: measured once per process
    return _resolved[key]
  if jax.process_count() > 1:
    # Every process of a multi-host job must trace the same program, and measurements may differ
    # between hosts: the fixed default set, unless FCN_JAX_CPU_FORMS names one for all of them.
    _resolved[key] = TUNED_ON_AMD
    return TUNED_ON_AMD
  path = cache_path()
  entry = None if spec == 'measure' else _read_cache(path).get(key)
  forms = None
  if entry:
    try:
      forms = Forms(**entry['forms'])
    except (TypeError, KeyError, ValueError):
      forms = None  # written by another version of this module: measure again
  if forms is None:
    print(f'fcn_jax: choosing the CPU forms for {key} (once, under a minute; cached in {path})',
          file=sys.stderr, flush=True)
    forms, timings = measure(backbone)
    _write_cache(path, key, {
        'forms': dataclasses.asdict(forms), 'timings_ms': timings,
        'measured_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')})
    print(f'fcn_jax: CPU forms {forms.describe()}', file=sys.stderr, flush=True)
  _resolved[key] = forms
  return forms


def measure(backbone: str = 'vgg16', repeats: int = 3) -> tuple[Forms, dict[str, float]]:
  """Time each form against XLA's own on small probes at FCN-VGG16 sizes; keep the faster.

  Returns the forms and the probe timings (ms). Runs outside any trace (it may be reached while
  a model is being traced: the probes are evaluated eagerly).
  """
  if backbone not in PROBE_SLICES:
    raise CpuFormsError(f'no CPU-form probe for backbone {backbone!r}; known: {sorted(PROBE_SLICES)}')
  with jax.ensure_compile_time_eval():
    return _measure(backbone, repeats)


def _time_ms(fn: Callable, args: tuple, options: dict | None, repeats: int) -> float:
  compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t)
  return 1e3 * statistics.median(ts)


def _probe_args(*shapes) -> tuple:
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes)


def _backbone_slice(backbone: str, forms: Forms) -> tuple[Callable, tuple]:
  """(fn, args): forward and gradients of the backbone's first layers, traced with `forms`."""
  from fcn_jax.models import backbones  # backbones imports this module
  spec = backbones.get_backbone(backbone)
  names = [getattr(layer, 'name', None) for layer in spec]
  layers_ = spec[:names.index(PROBE_SLICES[backbone]) + 1]

  class Slice(nn.Module):
    @nn.compact
    def __call__(self, x):
      return backbones.apply_backbone(layers_, x, width=1.0, dtype=jnp.float32, train=False,
                                      forms=forms)['out']

  module = Slice()
  (x,) = _probe_args((1, PROBE_SIDE, PROBE_SIDE, 3))
  variables = jax.jit(module.init)(jax.random.key(0), x)

  def fn(variables, x):
    return jax.grad(lambda v, x_: jnp.sum(jnp.square(module.apply(v, x_))), argnums=(0, 1))(
        variables, x)
  return fn, (variables, x)


def _measure(backbone: str, repeats: int) -> tuple[Forms, dict[str, float]]:
  timings: dict[str, float] = {}
  same = ((1, 1), (1, 1))

  # 1. The convolution library, on the backbone's first layers (see PROBE_SLICES).
  for lib in CONV_LIBRARIES:
    forms = dataclasses.replace(TUNED_ON_AMD, conv_library=lib)
    fn, args = _backbone_slice(backbone, forms)
    timings[f'conv_{lib}'] = _time_ms(fn, args, forms.compiler_options(), repeats)
  library = min(CONV_LIBRARIES, key=lambda lib: timings[f'conv_{lib}'])
  options = _LIBRARY_OPTIONS[library]

  # 2. Shifted-row kernel gradients, from large maps down: the threshold is the smallest probe
  # map from which on the shifted form wins every probe (none: off).
  shifted_wins_from = None
  for side, c_in, c_out in DW_PROBES:  # largest first
    x, g = _probe_args((1, side, side, c_in), (1, side, side, c_out))
    w_shape = (3, 3, c_in, c_out)
    xla_dw = lambda x, g, w_shape=w_shape: jax.vjp(
        lambda w_: _lax_conv_nhwc(x, w_, (1, 1), same), jnp.zeros(w_shape, x.dtype))[1](g)[0]
    timings[f'dw_xla_{side}'] = _time_ms(xla_dw, (x, g), options, repeats)
    timings[f'dw_shifted_{side}'] = _time_ms(
        lambda x, g, w_shape=w_shape: _shifted_rows_dw(x, g, w_shape, same, None), (x, g),
        options, repeats)
    if timings[f'dw_shifted_{side}'] >= timings[f'dw_xla_{side}']:
      break
    shifted_wins_from = side * side

  # 2b. The same for a first convolution: 3 input channels and FCN's padding of 100 (which made
  # XLA's kernel gradient slow: a correlation with a window the size of the input).
  first_pad = ((100, 100), (100, 100))
  x, g = _probe_args((1, 96, 96, 3), (1, 294, 294, 64))
  w_in = (3, 3, 3, 64)
  xla_dw_in = lambda x, g: jax.vjp(lambda w_: _lax_conv_nhwc(x, w_, (1, 1), first_pad),
                                   jnp.zeros(w_in, x.dtype))[1](g)[0]
  timings['dw_input_xla'] = _time_ms(xla_dw_in, (x, g), options, repeats)
  timings['dw_input_shifted'] = _time_ms(
      lambda x, g: _shifted_rows_dw(x, g, w_in, first_pad, None), (x, g), options, repeats)

  # 3. im2col for wide kernels: an fc6-like 7x7 layer at a quarter of its channels.
  x, w, g = _probe_args((1, 15, 15, 256), (7, 7, 256, 1024), (1, 9, 9, 1024))
  valid = ((0, 0), (0, 0))

  def wide_fwd_bwd(conv):
    def fn(x, w, g):
      y, vjp = jax.vjp(lambda x_, w_: conv(x_, w_, (1, 1), valid), x, w)
      return y, *vjp(g)
    return fn

  timings['wide_xla'] = _time_ms(wide_fwd_bwd(_lax_conv_nhwc), (x, w, g), options, repeats)
  timings['wide_im2col'] = _time_ms(
      wide_fwd_bwd(lambda x_, w_, s, p: _im2col_conv(x_, w_, s, p, None)), (x, w, g), options,
      repeats)

  # 4. Pool gradients: a 2x2 stride-2 pool (VGG16's pool2) and a 3x3 stride-2 one (GoogLeNet's).
  (x,) = _probe_args((1, 112, 112, 128))

  def pool_grad(pool):
    return lambda x: jax.grad(lambda v: jnp.sum(pool(v) ** 2))(x)

  xla_pool = lambda window: (lambda v: nn.max_pool(v, (window, window), (2, 2), ((0, 1), (0, 1))))
  timings['pool_xla'] = (_time_ms(pool_grad(xla_pool(2)), (x,), options, repeats)
                         + _time_ms(pool_grad(xla_pool(3)), (x,), options, repeats))
  timings['pool_ours'] = (
      _time_ms(pool_grad(lambda v: block_max_pool(v, 2)), (x,), options, repeats)
      + _time_ms(pool_grad(lambda v: window_max_pool(v, 3, 2, ((0, 1), (0, 1)))), (x,), options,
                 repeats))

  forms = Forms(conv_library=library,
                im2col=timings['wide_im2col'] < timings['wide_xla'],
                shifted_dw=shifted_wins_from is not None,
                shifted_dw_min_pixels=shifted_wins_from or DW_SHIFT_MIN_PIXELS,
                pool_grad=timings['pool_ours'] < timings['pool_xla'],
                shifted_dw_input=timings['dw_input_shifted'] < timings['dw_input_xla'])
  return forms, {k: round(v, 2) for k, v in timings.items()}


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
  """Max pooling with explicit (-inf) padding, in the form `current()` picks; `blocks`: the
  windows tile the input (window == stride, only the ceil-mode padding on the right)."""
  forms = forms or current()
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
  """lax.conv_general_dilated, in the matrix-product forms `forms` (None: `current()`) picks.

  Pass as `nn.Conv(..., conv_general_dilated=cpu_forms.conv_with(forms))`.
  """
  forms = forms or current()
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
  if (forms or current()).im2col and on_cpu() and patch_bytes <= IM2COL_MAX_BYTES:
    return _im2col_conv(x, kernel, (1, 1), pads, None)
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=pads,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
