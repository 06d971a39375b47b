"""The CPU forms of FCN's convolution and pooling layers, as data: which library XLA hands the
convolutions to and which layers take matrix-product or elementwise forms
(fcn_jax.models.cpu_kernels computes them; fcn_jax.tune measures which of them this machine runs
best).


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
from typing import Any, Callable, Iterator

import jax

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
      raise CpuFormsError(f'conv_library must be one of {CONV_LIBRARIES}, '
                          f'got {self.conv_library!r}')

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
      raise CpuFormsError(f'{ENV_VAR}={spec!r}: expected measure, default, off or a '
                          f'comma-separated list of {", ".join(f"{n}=..." for n in names)}; '
                          f'{item!r} is not one')
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
# Which forms a trace without its own takes: an override (`use`), else the default set.

_override: list[Forms] = []


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


def active() -> Forms:
  """The forms of a layer traced without any (forms=None): the innermost `use` block's, else the
  default set (ACCELERATOR off the CPU). Models built by `models.build` always carry their own,
  chosen for this machine by fcn_jax.tune."""
  if _override:
    return _override[-1]
  return TUNED_ON_AMD if on_cpu() else ACCELERATOR


def jit(fn: Callable, forms: Forms | None = None, **kwargs) -> Callable:
  """jax.jit with the compiler options of `forms` (the model's; None: `active()`)."""
  options = (forms or active()).compiler_options() if on_cpu() else None
  return jax.jit(fn, compiler_options=options, **kwargs)
