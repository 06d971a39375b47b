"""Which CPU forms this machine runs best, per backbone: measured once at first use (small probes,
15-30 s), cached in ~/.cache/fcn_jax/cpu_forms.json per CPU model, core count and jax version, or
set with FCN_JAX_CPU_FORMS ('measure' | 'default' | 'off' | 'conv_library=eigen,...'; see
fcn_jax.models.forms.from_spec). `python -m fcn_jax.tune [BACKBONE ...]` measures again on purpose
(on an idle machine: a busy one can make a slower set look faster) and prints the timings.

Entry points (training, checkpoint.load_inference, the benchmarks) give their models `tuned(model)`:
the `use` override, ACCELERATOR off the CPU, else this machine's forms; models.build() alone never
measures (it takes the default set).
"""

from __future__ import annotations

import argparse
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
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.models import backbones
from fcn_jax.models.cpu_kernels import (_im2col_conv, _lax_conv_nhwc, _shifted_rows_dw,
                                        block_max_pool, window_max_pool)
from fcn_jax.models.forms import (_LIBRARY_OPTIONS, ACCELERATOR, CONV_LIBRARIES, DW_PROBES,
                                  DW_SHIFT_MIN_PIXELS, ENV_VAR, TUNED_ON_AMD, CpuFormsError, Forms,
                                  _override, from_spec, on_cpu)

_resolved: dict[str, Forms] = {}


# Backbones measured as another: vgg16_bn's convolutions have VGG16's shapes.
MEASURED_AS = {'vgg16_bn': 'vgg16', 'resnet101': 'resnet50'}


def tuned(model):
  """`model` (an FCN from models.build) with the forms this machine runs best for its backbone."""
  return model.clone(forms=current(model.arch.backbone))


def current(backbone: str = 'vgg16') -> Forms:
  """The forms a net on `backbone` takes now: the innermost `forms.use` block's, ACCELERATOR off
  the CPU, otherwise this machine's (the best convolution library differs between nets: VGG16's
  wide 3x3 layers and GoogLeNet's many small ones); a backbone of MEASURED_AS takes the forms of
  the one it is measured as."""
  if _override:
    return _override[-1]
  if not on_cpu():
    return ACCELERATOR
  return for_this_machine(MEASURED_AS.get(backbone, backbone))


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
                'googlenet': 'inception3b', 'resnet50': 'layer1'}
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
    raise CpuFormsError(f'no CPU-form probe for backbone {backbone!r}; '
                        f'known: {sorted(PROBE_SLICES)}')
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


def main(argv: list[str] | None = None) -> int:
  """`python -m fcn_jax.tune [BACKBONE ...]`: measure this machine's forms again and cache them."""
  parser = argparse.ArgumentParser(prog='python -m fcn_jax.tune', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('backbones', nargs='*', default=['vgg16'],
                      help=f'backbones to measure (default vgg16; '
                           f'known: {", ".join(PROBE_SLICES)})')
  args = parser.parse_args(argv)
  unknown = [b for b in args.backbones if b not in PROBE_SLICES]
  if unknown:
    parser.error(f'unknown backbone {unknown[0]!r}; choose from {", ".join(PROBE_SLICES)}')
  path = cache_path()
  for backbone in args.backbones:
    key = f'{machine_key()} | {backbone}'
    print(f'measuring the CPU forms for {key} (keep the machine otherwise idle)', flush=True)
    forms, timings = measure(backbone)
    _write_cache(path, key, {
        'forms': dataclasses.asdict(forms), 'timings_ms': timings,
        'measured_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')})
    _resolved[key] = forms
    print(f'  {forms.describe()}\n  probes (ms): '
          + ', '.join(f'{k} {v}' for k, v in timings.items()))
  print(f'cached in {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
