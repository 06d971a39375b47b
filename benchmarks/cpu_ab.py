"""Interleaved A/B on CPU of one training step (or forward pass): fcn_jax with this machine's CPU
forms, with other sets of forms (fcn_jax.models.cpu_forms), and PyTorch eager.

    python -m benchmarks.cpu_ab --arch fcn8s --size 256 --rounds 3 --variants jax torch
    python -m benchmarks.cpu_ab --variants jax jax-baseline forms:conv_library=eigen,shifted_dw=0

Variants: `jax` (the forms this machine chose: measured at first use and cached, or
FCN_JAX_CPU_FORMS), `jax-amd` (every form, YNNPACK convolutions: the AMD EPYC choice),
`jax-eigen` (every form, Eigen convolutions), `jax-baseline` (plain XLA), `forms:<spec>` (any
set, as FCN_JAX_CPU_FORMS spells it) and `torch`. The variants take turns, one step each per
round, so a change in the machine's load (the development machine is shared) hits all of them
alike; medians over the rounds are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import run
from fcn_jax.models import cpu_forms

NAMED_FORMS = {
    'jax-amd': cpu_forms.TUNED_ON_AMD,
    'jax-eigen': dataclasses.replace(cpu_forms.TUNED_ON_AMD, conv_library='eigen'),
    'jax-baseline': cpu_forms.PLAIN_XLA,
}


def forms_of(variant: str) -> cpu_forms.Forms:
  if variant == 'jax':
    return cpu_forms.current()
  if variant.startswith('forms:'):
    return cpu_forms.from_spec(variant[len('forms:'):])
  return NAMED_FORMS[variant]


def jax_stepper(arch: str, size: int, batch: int, width: float, dtype: str, forms, step: str):
  """A closure running one compiled training step (or forward pass) traced with `forms`."""
  from fcn_jax import models, optim, train as train_lib
  model, variables = run._model_and_variables(arch, width, dtype)
  model = model.clone(forms=forms)  # the model's forms: traced into the program, and its options
  data = run._batch(batch, size)
  t = time.perf_counter()
  if step == 'forward':
    images = jax.numpy.asarray(data['image'])
    compiled = cpu_forms.jit(lambda v, x: model.apply(v, x, train=False), forms=forms).lower(
        variables, images).compile()
  else:
    tx = optim.make_optimizer(learning_rate=1e-4, momentum=0.9, weight_decay=5e-4,
                              params=variables['params'],
                              frozen=models.frozen_mask(model, variables['params']))
    mesh = train_lib.make_mesh(jax.devices()[:1])
    state = train_lib.replicate(
        train_lib.create_train_state(model, tx, variables, jax.random.key(1)), mesh)
    b = train_lib.shard_batch(data, mesh)
    compiled = train_lib.compile_train_step(model, tx, mesh, normalize_loss=True,
                                            num_classes=run.NUM_CLASSES).lower(state, b).compile()
  compile_s = time.perf_counter() - t
  if step == 'forward':
    return (lambda: jax.block_until_ready(compiled(variables, images))), compile_s
  box = [state]

  def train_step():
    box[0], m = compiled(box[0], b)
    jax.block_until_ready(m['loss'])
  return train_step, compile_s


def torch_stepper(arch: str, size: int, batch: int, width: float, step: str):
  import torch
  import torch.nn.functional as F
  from benchmarks import torch_models
  torch.manual_seed(0)
  model = torch_models.build(arch, width)
  data = run._batch(batch, size)
  x = torch.from_numpy(data['image']).permute(0, 3, 1, 2).contiguous()
  if step == 'forward':
    model.eval()

    def forward():
      with torch.no_grad():
        model(x)
    return forward, 0.0
  model.train()
  opt = torch_models.make_optimizer(model)
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
  p.add_argument('--step', default='train', choices=('train', 'forward'))
  p.add_argument('--variants', nargs='+', default=['jax', 'jax-baseline', 'torch'],
                 help=f'jax, {", ".join(NAMED_FORMS)}, forms:<spec>, torch')
  a = p.parse_args(argv)
  for v in a.variants:
    if v not in ('jax', 'torch', *NAMED_FORMS) and not v.startswith('forms:'):
      p.error(f'unknown variant {v!r}: choose from jax, {", ".join(NAMED_FORMS)}, forms:<spec>, '
              'torch')
  versions = f'jax {jax.__version__}'
  if 'torch' in a.variants:
    import torch
    versions += f', torch {torch.__version__} ({torch.get_num_threads()} threads)'
  print(f'{" ".join(sys.argv)}\n{run.cpu_name()} ({os.cpu_count()} cores); {versions}; load average at start: '
        f'{os.getloadavg()}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  steppers = {}
  for v in a.variants:
    if v == 'torch':
      steppers[v] = torch_stepper(a.arch, a.size, a.batch, a.width, a.step)
    else:
      forms = forms_of(v)
      print(f'{v}: CPU forms {forms.describe()}', flush=True)
      steppers[v] = jax_stepper(a.arch, a.size, a.batch, a.width, a.dtype, forms, a.step)
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
  what = 'training step' if a.step == 'train' else 'forward pass'
  print(f'\n{a.arch} {a.size}x{a.size} batch {a.batch} width {a.width:g} {a.dtype}, {what}, '
        f'median of {a.rounds} interleaved rounds; load average at end {os.getloadavg()}')
  print('| variant | median s | min s | torch / variant | CPU-s per step (median) |\n|---|---|---|---|---|')
  t_torch = statistics.median(times['torch']) if 'torch' in times else None
  for v, ts in times.items():
    med = statistics.median(ts)
    print(f'| {v} | {med:.2f} | {min(ts):.2f} | ' + (f'{t_torch / med:.2f} |' if t_torch else '- |')
          + f' {statistics.median(cpu[v]):.2f} |')


if __name__ == '__main__':
  sys.exit(main())
