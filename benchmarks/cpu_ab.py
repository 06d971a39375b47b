"""Interleaved A/B of one training step on CPU: fcn_jax as shipped, with its CPU speed-ups switched
off one at a time (layers.CPU_MATMUL_CONVS, layers.BLOCK_POOL), and PyTorch eager.

    python -m benchmarks.cpu_ab --arch fcn8s --size 256 --rounds 3

The variants take turns, one step each per round, so a change in the machine's load (the
development machine is shared) hits all of them alike; medians over the rounds are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import run
from fcn_jax.models import layers


VARIANTS = {  # name: (layers.CPU_MATMUL_CONVS, layers.BLOCK_POOL)
    'jax': (True, True), 'jax-lax-convs': (False, True), 'jax-xla-pool': (True, False),
    'jax-baseline': (False, False)}


def jax_stepper(arch: str, size: int, batch: int, width: float, dtype: str, variant: str):
  # Both switches are read at trace time, i.e. inside lower() below.
  layers.CPU_MATMUL_CONVS, layers.BLOCK_POOL = VARIANTS[variant]
  prof = run.Profile(size=size, width=width, batch=batch, train_batch=batch, repeats=1, warmup=0,
                     dtypes=(dtype,), torch_compile=False, matmul_n=0, pipeline_seconds=0)
  # Reuse the suite's setup, but keep the compiled step and state to call in turns.
  from fcn_jax import models, optim, train as train_lib
  model, variables = run._model_and_variables(arch, width, dtype)
  tx = optim.make_optimizer(learning_rate=1e-4, momentum=0.9, weight_decay=5e-4,
                            params=variables['params'],
                            frozen=models.frozen_mask(model, variables['params']))
  mesh = train_lib.make_mesh(jax.devices()[:1])
  state = train_lib.replicate(train_lib.create_train_state(model, tx, variables, jax.random.key(1)),
                              mesh)
  b = train_lib.shard_batch(run._batch(batch, size), mesh)
  t = time.perf_counter()
  compiled = train_lib.compile_train_step(model, tx, mesh, normalize_loss=True,
                                          num_classes=run.NUM_CLASSES).lower(state, b).compile()
  compile_s = time.perf_counter() - t
  layers.CPU_MATMUL_CONVS, layers.BLOCK_POOL = True, True
  box = [state]

  def step():
    box[0], m = compiled(box[0], b)
    jax.block_until_ready(m['loss'])
  return step, compile_s


def torch_stepper(arch: str, size: int, batch: int, width: float):
  import torch
  import torch.nn.functional as F
  from benchmarks import torch_models
  torch.manual_seed(0)
  model = torch_models.build(arch, width).train()
  opt = torch_models.make_optimizer(model)
  data = run._batch(batch, size)
  x = torch.from_numpy(data['image']).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(data['label']).long()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y, ignore_index=255)
    loss.backward()
    opt.step()
  return step, 0.0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--arch', default='fcn8s', choices=run.NETS)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--variants', nargs='+', default=['jax', 'jax-baseline', 'torch'],
                 choices=[*VARIANTS, 'torch'])
  a = p.parse_args(argv)
  print(f'{" ".join(sys.argv)}\nload average at start: {os.getloadavg()}; XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  steppers = {}
  for v in a.variants:
    if v == 'torch':
      steppers[v] = torch_stepper(a.arch, a.size, a.batch, a.width)
    else:
      steppers[v] = jax_stepper(a.arch, a.size, a.batch, a.width, a.dtype, v)
    steppers[v][0]()  # warm-up
    print(f'{v}: compiled in {steppers[v][1]:.1f} s', flush=True)
  times = {v: [] for v in steppers}
  cpu = {v: [] for v in steppers}
  order = list(steppers)
  for r in range(a.rounds):
    for v in (order if r % 2 == 0 else order[::-1]):  # alternate the order: no variant always first
      step = steppers[v][0]
      t, c = time.perf_counter(), time.process_time()
      step()
      times[v].append(time.perf_counter() - t)
      cpu[v].append(time.process_time() - c)
    print(f'round {r}: ' + ', '.join(f'{v} {times[v][-1]:.2f} s' for v in times)
          + f' (load {os.getloadavg()[0]:.2f})', flush=True)
  print(f'\n{a.arch} {a.size}x{a.size} batch {a.batch} width {a.width:g} {a.dtype}, training step, '
        f'median of {a.rounds} interleaved rounds; load average at end {os.getloadavg()}')
  print('| variant | median s | min s | torch / variant | CPU-s per step (median) |\n|---|---|---|---|---|')
  t_torch = statistics.median(times['torch']) if 'torch' in times else None
  for v, ts in times.items():
    med = statistics.median(ts)
    print(f'| {v} | {med:.2f} | {min(ts):.2f} | ' + (f'{t_torch / med:.2f} |' if t_torch else '- |')
          + f' {statistics.median(cpu[v]):.2f} |')


if __name__ == '__main__':
  sys.exit(main())
