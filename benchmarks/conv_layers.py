"""Per-layer view of the CPU gap: one VGG16 convolution per block at the FCN sizes, forward, gradient
with respect to the input and with respect to the kernel: XLA's convolution (lax, NHWC) with its
two CPU libraries (YNNPACK, XLA's default, and Eigen), fcn_jax's `cpu_kernels.conv_general_dilated`
with this machine's forms for VGG16 (or --forms SPEC) and PyTorch (oneDNN, NCHW).

    python -m benchmarks.conv_layers --size 256

The sizes follow FCN-VGG16 on a size x size image (conv1 sees size + 198 after the pad of 100).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax import cli as cli_lib
from fcn_jax.models import forms as forms_lib
from fcn_jax.models import cpu_kernels
from fcn_jax import tune


def _median(fn, repeats, sync):
  sync(fn())
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    sync(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def layers_for(size: int):
  """(name, map side, C_in, C_out): conv1_1, then each block's first and second convolution."""
  h = size + 198
  out = [('conv1_1', h, 3, 64)]
  for block, c in enumerate((64, 128, 256, 512, 512), 1):
    if block in (2, 3, 4):
      out.append((f'conv{block}_1', h, c // 2, c))
    out.append((f'conv{block}_2', h, c, c))
    h = math.ceil(h / 2)
  out.append(('fc6', h, 512, 4096))
  return out


def main(argv=None):
  p = cli_lib.ArgumentParser()
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--no_torch', action='store_true')
  p.add_argument('--layers', nargs='*', default=None)
  p.add_argument('--forms', default=None, help='CPU forms as FCN_JAX_CPU_FORMS spells them '
                 "(default: this machine's for VGG16)")
  a = p.parse_args(argv)
  forms = forms_lib.from_spec(a.forms) if a.forms else tune.current('vgg16')
  sync = lambda x: jax.block_until_ready(x)
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r} load {os.getloadavg()[0]:.2f}; fcn_jax '
        f'CPU forms {forms.describe()}')
  print('| layer | HxW | Cin->Cout | GFLOP | op | XLA YNNPACK ms | XLA Eigen ms | fcn_jax ms | '
        'torch ms | torch/fcn_jax |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for name, h, c_in, c_out in layers_for(a.size):
    if a.layers and name not in a.layers:
      continue
    k = 7 if name == 'fc6' else 3
    pad = 0 if name == 'fc6' else 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, h, h, c_in), np.float32)
    w = rng.standard_normal((k, k, c_in, c_out), np.float32) * 0.05
    ho = h + 2 * pad - k + 1
    g = rng.standard_normal((1, ho, ho, c_out), np.float32)
    gflop = 2 * ho * ho * k * k * c_in * c_out / 1e9
    def timings(conv_fn, options):
      conv = lambda x, w: conv_fn(x, w, (1, 1), [(pad, pad)] * 2,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      fwd = jax.jit(conv, compiler_options=options)
      dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
                   compiler_options=options)
      dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
                   compiler_options=options)
      return {'fwd': _median(lambda: fwd(xj, wj), a.repeats, sync),
              'dx': _median(lambda: dx(xj, wj, gj), a.repeats, sync),
              'dw': _median(lambda: dw(xj, wj, gj), a.repeats, sync)}
    xj, wj, gj = map(jnp.asarray, (x, w, g))
    lax_conv = jax.lax.conv_general_dilated
    ynn = timings(lax_conv, forms_lib.Forms(conv_library='ynnpack').compiler_options())
    eigen = timings(lax_conv, forms_lib.Forms(conv_library='eigen').compiler_options())
    jt = timings(cpu_kernels.conv_with(forms), forms.compiler_options())
    tt = {}
    if not a.no_torch:
      import torch
      import torch.nn.functional as F
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
      wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
      gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
      with torch.no_grad():
        tt['fwd'] = _median(lambda: F.conv2d(xt, wt, padding=pad), a.repeats, lambda v: v)
        tt['dx'] = _median(lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, padding=pad),
                           a.repeats, lambda v: v)
        tt['dw'] = _median(lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, padding=pad),
                           a.repeats, lambda v: v)
    for op in ('fwd', 'dx', 'dw'):
      t = tt.get(op)
      print(f'| {name} | {h}x{h} | {c_in}->{c_out} | {gflop:.1f} | {op} | {1e3 * ynn[op]:.0f} | '
            f'{1e3 * eigen[op]:.0f} | {1e3 * jt[op]:.0f} | ' + (f'{1e3 * t:.0f} | {t / jt[op]:.2f} |' if t else '- | - |'),
            flush=True)
  print(f'load at end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  sys.exit(main())
