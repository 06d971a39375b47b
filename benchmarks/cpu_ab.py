"""Interleaved A/B on CPU of one training step (or forward pass): fcn_jax with this machine's CPU
forms, with other sets of forms (fcn_jax.models.forms, fcn_jax.tune), and PyTorch eager.

    python -m benchmarks.cpu_ab --arch fcn8s --size 256 --rounds 3 --variants jax torch
    python -m benchmarks.cpu_ab --variants jax jax-baseline forms:conv_library=eigen,shifted_dw=0

Variants: `jax` (the forms this machine chose: measured at first use and cached, or
FCN_JAX_CPU_FORMS), `jax-amd` (every form, YNNPACK convolutions: the AMD EPYC choice),
`jax-eigen` (every form, Eigen convolutions), `jax-baseline` (plain XLA), `forms:<spec>` (any
set, as FCN_JAX_CPU_FORMS spells it) and `torch`. The variants take turns, one step each per
round, so a change in the machine's load (the development machine is shared) hits all of them
alike; medians over the rounds are reported. Each variant runs in its own process (its own allocator
and thread pools, as a user's run would have them); --same_process keeps them in one.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import sys
import time

import jax

from benchmarks import run
from experiments.configs import common as configs
from fcn_jax import cli as cli_lib
from fcn_jax.models import forms as forms_lib
from fcn_jax import tune
from fcn_jax.models import fcn as fcn_lib

# benchmarks.run's nets and torchvision's FCN-ResNet (BatchNorm trains on both sides).
ARCHS = (*run.NETS, 'fcn8s_atonce', 'fcn_resnet50', 'fcn_resnet101')
NAMED_FORMS = {
    'jax-amd': forms_lib.TUNED_ON_AMD,
    'jax-eigen': dataclasses.replace(forms_lib.TUNED_ON_AMD, conv_library='eigen'),
    'jax-baseline': forms_lib.PLAIN_XLA,
}


def forms_of(variant: str, arch: str, preset: str = '') -> forms_lib.Forms:
  if variant == 'jax':
    backbone = dict(preset_model_options(arch, preset)).get('backbone')
    return tune.current(backbone or fcn_lib.ARCHS[arch].backbone)
  if variant.startswith('forms:'):
    return forms_lib.from_spec(variant[len('forms:'):])
  return NAMED_FORMS[variant]


def preset_model_options(arch: str, preset: str) -> tuple:
  """The model fields a preset sets beyond the arch, width and dtype (the `scratch` preset: the
  vgg16_bn backbone, no dropout, no skip scales), as (name, value) pairs; () for the paper nets."""
  if not preset:
    return ()
  model = configs.get_config(arch, preset).model
  return tuple((k, v) for k, v in model.items()
               if k not in ('num_classes', 'width', 'dtype', 'in_channels'))


def jax_stepper(arch: str, size: int, batch: int, width: float, dtype: str, forms, step: str,
                preset: str = ''):
  """A closure running one compiled training step (or forward pass) traced with `forms`."""
  model, variables = run._model_and_variables(arch, width, dtype,
                                              preset_model_options(arch, preset))
  model = model.clone(forms=forms)  # the model's forms: traced into the program, and its options
  data = run._batch(batch, size)
  t = time.perf_counter()
  if step == 'forward':
    images = jax.numpy.asarray(data['image'])
    compiled = forms_lib.jit(lambda v, x: model.apply(v, x, train=False), forms=forms).lower(
        variables, images).compile()
  else:
    state, b, train_step_fn = run.train_setup(model, variables, data)
    compiled = train_step_fn.lower(state, b).compile()
  compile_s = time.perf_counter() - t
  if step == 'forward':
    return (lambda: jax.block_until_ready(compiled(variables, images))), compile_s
  box = [state]

  def train_step():
    box[0], m = compiled(box[0], b)
    jax.block_until_ready(m['loss'])
  return train_step, compile_s


def torch_stepper(arch: str, size: int, batch: int, width: float, step: str, preset: str = ''):
  import torch
  import torch.nn.functional as F
  from benchmarks import torch_models
  torch.manual_seed(0)
  model = torch_models.build(arch, width, preset=preset)
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


def _worker(conn, variant: str, a: argparse.Namespace) -> None:
  """One variant in its own process (its own allocator and thread pools): builds and warms up
  its step, then runs one step per request and sends back (wall s, CPU s)."""
  if variant == 'torch':
    step, compile_s = torch_stepper(a.arch, a.size, a.batch, a.width, a.step, a.preset)
    described = ''
  else:
    forms = forms_of(variant, a.arch, a.preset)
    step, compile_s = jax_stepper(a.arch, a.size, a.batch, a.width, a.dtype, forms, a.step,
                                  a.preset)
    described = forms.describe()
  step()  # warm-up
  conn.send((compile_s, described))
  while conn.recv() == 'step':
    t, c = time.perf_counter(), time.process_time()
    step()
    conn.send((time.perf_counter() - t, time.process_time() - c))


def main(argv=None):
  p = cli_lib.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--arch', default='fcn8s', choices=ARCHS)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--preset', default='', choices=('', 'scratch'),
                 help='scratch: the scratch preset\'s net (fcn8s_atonce on vgg16_bn, BatchNorm '
                      'that trains, \'same\' padding; PyTorch: benchmarks.torch_models.'
                      'ScratchFCN8s) instead of the arch\'s paper layout')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--step', default='train', choices=('train', 'forward'))
  p.add_argument('--same_process', action='store_true',
                 help='run every variant in this process (default: one process per variant, so '
                      'that the frameworks do not share an allocator)')
  p.add_argument('--variants', nargs='+', default=['jax', 'jax-baseline', 'torch'],
                 help=f'jax, {", ".join(NAMED_FORMS)}, forms:<spec>, torch')
  a = p.parse_args(argv)
  if a.preset == 'scratch' and a.arch != 'fcn8s_atonce':
    p.error('--preset scratch benchmarks the preset\'s FCN-8s at-once: add --arch fcn8s_atonce')
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
  runners = {}
  workers = []
  for v in a.variants:
    if a.same_process:
      if v == 'torch':
        step, compile_s = torch_stepper(a.arch, a.size, a.batch, a.width, a.step, a.preset)
      else:
        forms = forms_of(v, a.arch, a.preset)
        print(f'{v}: CPU forms {forms.describe()}', flush=True)
        step, compile_s = jax_stepper(a.arch, a.size, a.batch, a.width, a.dtype, forms, a.step,
                                      a.preset)
      step()  # warm-up

      def timed(step=step):
        t, c = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - t, time.process_time() - c
      runners[v] = timed
    else:  # built one after the other, so that compilations do not overlap
      ctx = multiprocessing.get_context('spawn')
      conn, child = ctx.Pipe()
      proc = ctx.Process(target=_worker, args=(child, v, a), daemon=True)
      proc.start()
      workers.append((proc, conn))
      compile_s, described = conn.recv()
      if described:
        print(f'{v}: CPU forms {described}', flush=True)

      def timed(conn=conn):
        conn.send('step')
        return conn.recv()
      runners[v] = timed
    print(f'{v}: compiled in {compile_s:.1f} s', flush=True)
  times = {v: [] for v in runners}
  cpu = {v: [] for v in runners}
  order = list(runners)
  for r in range(a.rounds):
    for v in (order if r % 2 == 0 else order[::-1]):  # alternate the order: no variant always first
      wall, cpu_s = runners[v]()
      times[v].append(wall)
      cpu[v].append(cpu_s)
    print(f'round {r}: ' + ', '.join(f'{v} {times[v][-1]:.2f} s' for v in times)
          + f' (load {os.getloadavg()[0]:.2f})', flush=True)
  for proc, conn in workers:
    conn.send('stop')
    proc.join(timeout=60)
  what = 'training step' if a.step == 'train' else 'forward pass'
  where = 'one process' if a.same_process else 'one process per variant'
  net = f'{a.arch} ({a.preset} preset)' if a.preset else a.arch
  print(f'\n{net} {a.size}x{a.size} batch {a.batch} width {a.width:g} {a.dtype}, {what}, '
        f'median of {a.rounds} interleaved rounds ({where}); load average at end '
        f'{os.getloadavg()}')
  print('| variant | median s | min s | torch / variant | CPU-s per step (median) |\n|---|---|---|---|---|')
  t_torch = statistics.median(times['torch']) if 'torch' in times else None
  for v, ts in times.items():
    med = statistics.median(ts)
    print(f'| {v} | {med:.2f} | {min(ts):.2f} | ' + (f'{t_torch / med:.2f} |' if t_torch else '- |')
          + f' {statistics.median(cpu[v]):.2f} |')


if __name__ == '__main__':
  sys.exit(main())
