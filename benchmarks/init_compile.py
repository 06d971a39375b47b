"""Compile-and-run seconds of a model's initialisation with jax's partitionable threefry against
the sequential one `models.init_variables` traces with, each in a fresh process.

    python -m benchmarks.init_compile [--arch fcn8s] [--width 0.0625]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from benchmarks import run

PROBE = '''
import sys, time, jax, jax.numpy as jnp
from fcn_jax import models
model = models.build(sys.argv[1], width=float(sys.argv[2]))
images = jnp.zeros((1, 1, 1, model.arch.input_channels), jnp.float32)
init = jax.jit(lambda r: model.init({'params': r, 'dropout': r}, images, train=False))
t0 = time.perf_counter()
with jax.threefry_partitionable(sys.argv[3] == 'partitionable'):
  jax.block_until_ready(init(jax.random.key(0)))
print(f'{time.perf_counter() - t0:.1f}')
'''


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--arch', default='fcn8s')
  p.add_argument('--width', type=float, default=1 / 16)
  a = p.parse_args()
  env = {**os.environ, 'FCN_JAX_CPU_FORMS': 'default'}
  print(f'{run.cpu_name()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.2f}; {a.arch} '
        f'width {a.width:g}: seconds to compile and run the initialisation, a fresh process each')
  for form in ('partitionable', 'sequential'):
    out = subprocess.run([sys.executable, '-c', PROBE, a.arch, str(a.width), form], env=env,
                         capture_output=True, text=True, check=True).stdout.split()[-1]
    print(f'| {form} threefry | {out} s |')


if __name__ == '__main__':
  main()
