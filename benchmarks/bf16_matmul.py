"""Can XLA's CPU backend use AMX for bfloat16? An n x n matmul in float32 and bfloat16 under XLA's
CPU library options, beside PyTorch's, and which library each compiled program calls.

    python -m benchmarks.bf16_matmul            # ONEDNN_VERBOSE=1 also shows oneDNN's kernels

On a Sapphire Rapids (AMX-BF16) PyTorch's bfloat16 matmul runs on AMX; the XLA programs convert
bfloat16 operands to float32 before the library call (the `convert` ops in the printed HLO).
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from fcn_jax import cli as cli_lib

OPTIONS = {
    'default (YNNPACK)': None,
    'Eigen': {'xla_cpu_experimental_ynn_fusion_type': ''},
    'oneDNN custom calls': {'xla_cpu_experimental_ynn_fusion_type': '',
                            'xla_cpu_experimental_onednn_custom_call': True},
    'oneDNN fusions (dot)': {'xla_cpu_experimental_ynn_fusion_type': '', 'xla_cpu_use_onednn': True,
                             'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'},
}


def _rate(fn, n: int, repeats: int) -> float:
  fn()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(ts) / 1e12


def main(argv=None) -> int:
  p = cli_lib.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--n', type=int, default=2048)
  p.add_argument('--repeats', type=int, default=5)
  a = p.parse_args(argv)
  n = a.n
  print('| dtype | program | converts to f32 | library in HLO | TFLOP/s |\n|---|---|---|---|---|')
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    for name, options in OPTIONS.items():
      compiled = jax.jit(lambda u, v: u @ v, compiler_options=options).lower(x, x).compile()
      text = compiled.as_text().lower()
      library = ('oneDNN' if 'onednn' in text else 'YNNPACK' if 'ynn' in text else 'XLA/Eigen')
      converts = 'convert(' in text
      rate = _rate(lambda: jax.block_until_ready(compiled(x, x)), n, a.repeats)
      print(f'| {jnp.dtype(dtype).name} | {name} | {converts} | {library} | {rate:.3f} |', flush=True)
  try:
    import torch
  except ImportError:
    return 0
  for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(n, n, dtype=dtype)
    print(f'| {str(dtype).split(".")[1]} | PyTorch {torch.__version__} | - | oneDNN | '
          f'{_rate(lambda: x @ x, n, a.repeats):.3f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
