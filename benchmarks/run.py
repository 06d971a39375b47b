"""FCN benchmark suite: JAX (fcn_jax) side by side with PyTorch, in one command.

    python -m benchmarks.run --profile cpu      # 2-core development machine (256x256, batch 1)
    python -m benchmarks.run --profile gpu      # the issue's sizes (500x500, batch 20 or what fits)
    python -m benchmarks.run --profile smoke    # seconds: width 1/16, 64x64, one repeat (tests)

Per network (FCN-AlexNet, FCN-VGG16 32s and 8s, FCN-GoogLeNet), per compute dtype (float32,
bfloat16 with float32 parameters and loss), three measurements:
  fwd-latency   forward at batch 1 (the paper's Table 1 column), ms
  fwd-batch     forward throughput at the throughput batch, images/s
  train         full training step (loss, gradients, the fcn_jax SGD) at the training batch, images/s
Each with: the median time of `--repeats` timed calls after `--warmup` untimed ones, with the
device synchronised (block_until_ready / torch.cuda.synchronize) around every call; compile time
(jit lower + compile); memory (device peak where the backend reports it, else XLA's static
estimate); FLOPs from XLA's cost analysis and the achieved rate as a fraction of the matmul peak
measured on the same device in the same run; and PyTorch eager and torch.compile times with the
ratio torch / jax (> 1: JAX is faster).

torch is optional: without it the torch columns read "-". Timings never fail anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax import cli as cli_lib
from fcn_jax import models
from fcn_jax import optim
from fcn_jax import train as train_lib
from fcn_jax.models import forms as forms_lib
from fcn_jax import tune

NETS = ('fcn_alexnet', 'fcn32s', 'fcn8s', 'fcn_googlenet')
MEASUREMENTS = ('fwd-latency', 'fwd-batch', 'train')
NUM_CLASSES = 21
TRACE_DIR = ''  # --trace_dir: profile three training steps per net and dtype


@dataclasses.dataclass
class Profile:
  size: int                 # square input side
  width: float              # backbone channel multiplier
  batch: int                # forward throughput batch
  train_batch: int          # training batch (halved until it fits)
  repeats: int
  warmup: int
  dtypes: tuple[str, ...]
  torch_compile: bool
  matmul_n: int             # side of the square matmul of the peak probe
  pipeline_seconds: float   # 0: skip the input pipeline benchmark


PROFILES = {
    'smoke': Profile(size=64, width=1 / 16, batch=2, train_batch=2, repeats=1, warmup=1,
                     dtypes=('float32',), torch_compile=False, matmul_n=256, pipeline_seconds=0),
    'cpu': Profile(size=256, width=1.0, batch=2, train_batch=1, repeats=3, warmup=1,
                   dtypes=('float32',), torch_compile=True, matmul_n=2048,
                   pipeline_seconds=5),
    'gpu': Profile(size=500, width=1.0, batch=20, train_batch=20, repeats=20, warmup=3,
                   dtypes=('float32', 'bfloat16'), torch_compile=True, matmul_n=8192,
                   pipeline_seconds=10),
}

COLUMNS = ('net', 'measure', 'dtype', 'input', 'jax ms', 'jax img/s', 'compile s', 'mem GiB',
           'GFLOP', 'TFLOP/s', '% peak', 'torch ms', 'torch/jax', 'compiled ms', 'compiled/jax')


# --------------------------------------------------------------------------------------------------
# Timing helpers


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[Any], Any]) -> float:
  """Median seconds of `fn()` over `repeats` calls after `warmup`, synchronised around each call."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    sync(None)
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _jax_sync(x):
  if x is not None:
    jax.block_until_ready(x)
  return x


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    flops = cost.get('flops') if cost else None
    return float(flops) if flops and flops > 0 else None
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def _jax_memory_gib(compiled) -> float | None:
  """Device peak where the backend tracks it (GPU/TPU, cumulative over the process), else XLA's
  static estimate for this program (arguments + outputs + temporaries - aliased)."""
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    pass
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30
  except Exception:  # noqa: BLE001
    return None


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
  """Measured FLOP/s of an n x n x n matmul chain on the default device (the 'peak' we divide by)."""
  k = jax.random.key(0)
  a = jax.random.normal(k, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.fold_in(k, 1), (n, n), jnp.float32).astype(dtype)
  chain = 4 if jax.default_backend() != 'cpu' else 1

  @jax.jit
  def f(a, b):
    for _ in range(chain):
      a = (a @ b).astype(dtype) * jnp.asarray(1e-2, dtype)
    return a

  t = _median_time(lambda: f(a, b), repeats, 2, _jax_sync)
  return 2.0 * n**3 * chain / t


def torch_matmul_peak(dtype: str, n: int, device: str, repeats: int = 5) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  td = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  a = torch.randn(n, n, device=device).to(td)
  b = torch.randn(n, n, device=device).to(td)
  sync = _torch_sync(device)
  t = _median_time(lambda: a @ b, repeats, 2, sync)
  return 2.0 * n**3 / t


# --------------------------------------------------------------------------------------------------
# JAX side


def _batch(n: int, size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  image = rng.normal(0, 50, (n, size, size, 3)).astype(np.float32)
  label = rng.integers(0, NUM_CLASSES, (n, size, size)).astype(np.int32)
  label[:, :4] = 255  # a void border, as in VOC
  return {'image': image, 'label': label}


@functools.lru_cache(maxsize=4)
def _model_and_variables(arch: str, width: float, dtype: str, options: tuple = ()):
  """`options`: further models.build fields as (name, value) pairs (a preset's model config)."""
  kwargs = dict(options)
  model = tune.tuned(models.build(arch, NUM_CLASSES, width=width, dtype=jnp.dtype(dtype), **kwargs))
  # Parameters are float32 whatever the compute dtype, so both dtypes share one initialisation.
  variables = models.init_variables(models.build(arch, NUM_CLASSES, width=width, **kwargs),
                                    jax.random.key(0))
  return model, jax.tree.map(np.asarray, variables)


def jax_forward(arch, prof: Profile, dtype: str, n: int) -> dict:
  model, variables = _model_and_variables(arch, prof.width, dtype)
  variables = jax.device_put(variables)
  images = jnp.asarray(_batch(n, prof.size)['image'])
  fn = forms_lib.jit(lambda v, x: model.apply(v, x, train=False), forms=model.forms)
  t0 = time.perf_counter()
  compiled = fn.lower(variables, images).compile()
  compile_s = time.perf_counter() - t0
  sec = _median_time(lambda: compiled(variables, images), prof.repeats, prof.warmup, _jax_sync)
  return dict(sec=sec, compile_s=compile_s, flops=_cost_flops(compiled),
              mem_gib=_jax_memory_gib(compiled))


def train_setup(model, variables: dict, batch: dict):
  """(state, sharded batch, jitted step) of the library's training step on one device, with the
  benchmarks' optimiser (SGD momentum 0.9, weight decay 5e-4, the upsampling frozen)."""
  tx = optim.make_optimizer(learning_rate=1e-4, momentum=0.9, weight_decay=5e-4,
                            params=variables['params'],
                            frozen=models.frozen_mask(model, variables['params']))
  mesh = train_lib.make_mesh(jax.devices()[:1])
  state = train_lib.replicate(
      train_lib.create_train_state(model, tx, variables, jax.random.key(1)), mesh)
  step = train_lib.compile_train_step(model, tx, mesh, normalize_loss=True)
  return state, train_lib.shard_batch(batch, mesh), step


def jax_train(arch, prof: Profile, dtype: str, n: int) -> dict:
  """The library's own training step (train.compile_train_step: jit, sharded batch, donated state)."""
  model, variables = _model_and_variables(arch, prof.width, dtype)
  state, batch, step = train_setup(model, variables, _batch(n, prof.size))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def call():
    box[0], m = compiled(box[0], batch)
    return m['loss']

  sec = _median_time(call, prof.repeats, prof.warmup, _jax_sync)
  if TRACE_DIR:
    # An XProf/TensorBoard trace of three steps: where a goal is missed, this says why.
    with jax.profiler.trace(os.path.join(TRACE_DIR, f'{arch}-{dtype}-train')):
      for _ in range(3):
        _jax_sync(call())
  loss = float(call())
  if not np.isfinite(loss):
    raise FloatingPointError(f'{arch} {dtype}: non-finite loss {loss}')
  return dict(sec=sec, compile_s=compile_s, flops=_cost_flops(compiled),
              mem_gib=_jax_memory_gib(compiled))


# --------------------------------------------------------------------------------------------------
# PyTorch side (optional)


def _torch_sync(device: str):
  import torch

  def sync(x):
    if device == 'cuda':
      torch.cuda.synchronize()
    return x
  return sync


def _torch_setup(arch, prof: Profile, device: str):
  import torch
  from benchmarks import torch_models
  torch.manual_seed(0)
  model = torch_models.build(arch, prof.width, NUM_CLASSES).to(device)
  if device == 'cuda':
    model = model.to(memory_format=torch.channels_last)
  return model


def _autocast(device: str, dtype: str):
  import contextlib
  import torch
  if dtype == 'float32':
    return contextlib.nullcontext()
  return torch.autocast(device_type=device, dtype=torch.bfloat16)


def torch_measure(arch, prof: Profile, dtype: str, measure: str, n: int, device: str,
                  compiled: bool) -> float:
  """Median seconds of one forward (no grad) or one training step in PyTorch."""
  import torch
  import torch.nn.functional as F
  from benchmarks import torch_models
  model = _torch_setup(arch, prof, device)
  b = _batch(n, prof.size)
  x = torch.from_numpy(b['image']).permute(0, 3, 1, 2).contiguous().to(device)
  if device == 'cuda':
    x = x.to(memory_format=torch.channels_last)
  y = torch.from_numpy(b['label']).long().to(device)
  sync = _torch_sync(device)
  net = torch.compile(model) if compiled else model
  if measure == 'train':
    model.train()
    opt = torch_models.make_optimizer(model)

    def call():
      opt.zero_grad(set_to_none=True)
      with _autocast(device, dtype):
        logits = net(x)
      loss = F.cross_entropy(logits.float(), y, ignore_index=255)
      loss.backward()
      opt.step()
      return loss
  else:
    model.eval()

    def call():
      with torch.inference_mode(), _autocast(device, dtype):
        return net(x)
  warmup = prof.warmup + (2 if compiled else 0)  # torch.compile compiles on the first calls
  return _median_time(call, prof.repeats, warmup, sync)


# --------------------------------------------------------------------------------------------------
# The suite


def _fmt(v, spec):
  if v is None:
    return '-'
  if isinstance(v, str):
    return v
  return format(v, spec)


def _is_oom(e: BaseException) -> bool:
  s = str(e)
  return 'RESOURCE_EXHAUSTED' in s or 'out of memory' in s.lower()


def run_row(arch: str, measure: str, dtype: str, prof: Profile, peaks: dict, torch_device: str | None,
            log) -> dict:
  n = {'fwd-latency': 1, 'fwd-batch': prof.batch, 'train': prof.train_batch}[measure]
  row = {'net': arch, 'measure': measure, 'dtype': dtype}
  result = None
  while True:
    try:
      result = (jax_train if measure == 'train' else jax_forward)(arch, prof, dtype, n)
      break
    except Exception as e:  # noqa: BLE001
      if _is_oom(e) and n > 1:
        log(f'  {arch} {measure} {dtype}: batch {n} does not fit; trying {n // 2}')
        n //= 2
        continue
      log(f'  {arch} {measure} {dtype}: JAX failed: {type(e).__name__}: {str(e)[:300]}')
      row['error'] = f'{type(e).__name__}'
      break
  row['input'] = f'{prof.size}x{prof.size}x{n}'
  row['batch'] = n
  if result:
    sec = result['sec']
    row.update(jax_ms=1e3 * sec, jax_img_s=n / sec, compile_s=result['compile_s'],
               mem_gib=result['mem_gib'])
    if result['flops']:
      rate = result['flops'] / sec
      row.update(gflop=result['flops'] / 1e9, tflop_s=rate / 1e12,
                 pct_peak=100 * rate / peaks[dtype] if peaks.get(dtype) else None)
  if torch_device:
    for key, compiled in (('torch_ms', False), ('compiled_ms', True)):
      if compiled and not prof.torch_compile:
        continue
      try:
        row[key] = 1e3 * torch_measure(arch, prof, dtype, measure, n, torch_device, compiled)
      except Exception as e:  # noqa: BLE001 - torch.compile may not work everywhere
        log(f'  {arch} {measure} {dtype}: torch{" compile" if compiled else ""} failed: '
            f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}')
        row[key] = None
        row[key.replace('_ms', '_error')] = type(e).__name__
  if row.get('jax_ms'):
    for key, ratio in (('torch_ms', 'torch_ratio'), ('compiled_ms', 'compiled_ratio')):
      if row.get(key):
        row[ratio] = row[key] / row['jax_ms']
  log('  ' + ' | '.join(_row_cells(row)))
  return row


def _row_cells(row: dict) -> list[str]:
  return [row['net'], row['measure'], row['dtype'], row.get('input', '-'),
          _fmt(row.get('jax_ms'), '.1f') if 'error' not in row else f'error ({row["error"]})',
          _fmt(row.get('jax_img_s'), '.2f'), _fmt(row.get('compile_s'), '.1f'),
          _fmt(row.get('mem_gib'), '.2f'), _fmt(row.get('gflop'), '.1f'),
          _fmt(row.get('tflop_s'), '.3f'), _fmt(row.get('pct_peak'), '.0f'),
          _fmt(row.get('torch_ms'), '.1f'), _fmt(row.get('torch_ratio'), '.2f'),
          _fmt(row.get('compiled_ms'), '.1f'), _fmt(row.get('compiled_ratio'), '.2f')]


def markdown_table(rows: list[dict]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(_row_cells(r)) + ' |' for r in rows]
  return '\n'.join(lines)


def environment() -> dict:
  env = {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'host': platform.node(), 'cpu': cpu_name(), 'cores': os.cpu_count(),
      'python': platform.python_version(), 'jax': jax.__version__,
      'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
      'cpu_forms': tune.current().describe() if jax.default_backend() == 'cpu' else '-',
  }
  try:
    import flax
    env['flax'] = flax.__version__
  except ImportError:
    pass
  try:
    import torch
    env['torch'] = torch.__version__
    env['torch_threads'] = torch.get_num_threads()
  except ImportError:
    env['torch'] = 'not installed'
  try:
    env['loadavg'] = ' '.join(f'{v:.2f}' for v in os.getloadavg())
  except OSError:
    pass
  return env


cpu_name = tune.cpu_model  # the CPU model string every table records


def pipeline_rate(seconds: float, crop: int, batch: int, log) -> dict | None:
  try:
    from fcn_jax.data import pipeline
    r = pipeline.benchmark(num_images=16, crop_size=crop, batch_size=batch, seconds=seconds,
                           worker_counts=(0, min(2, os.cpu_count() or 1)))
    return {str(k): v for k, v in r.items()}
  except Exception as e:  # noqa: BLE001
    log(f'input pipeline benchmark failed: {type(e).__name__}: {e}')
    return None


def main(argv=None) -> int:
  p = cli_lib.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--profile', choices=sorted(PROFILES), default='cpu')
  p.add_argument('--nets', nargs='+', choices=NETS, default=list(NETS))
  p.add_argument('--measures', nargs='+', choices=MEASUREMENTS, default=list(MEASUREMENTS))
  p.add_argument('--dtypes', nargs='+', choices=('float32', 'bfloat16'), default=None)
  p.add_argument('--size', type=int, default=None, help='override the profile input side')
  p.add_argument('--width', type=float, default=None)
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--train_batch', type=int, default=None)
  p.add_argument('--repeats', type=int, default=None)
  p.add_argument('--no_torch', action='store_true')
  p.add_argument('--no_torch_compile', action='store_true')
  p.add_argument('--pipeline_seconds', type=float, default=None)
  p.add_argument('--trace_dir', default='', help='write a jax.profiler trace of the train steps')
  p.add_argument('--json', default=None, help='also write the rows and environment as JSON here')
  p.add_argument('--output', default=None, help='write the Markdown report here')
  a = p.parse_args(argv)

  prof = dataclasses.replace(PROFILES[a.profile])
  for field, value in (('size', a.size), ('width', a.width), ('batch', a.batch),
                       ('train_batch', a.train_batch), ('repeats', a.repeats),
                       ('pipeline_seconds', a.pipeline_seconds)):
    if value is not None:
      setattr(prof, field, value)
  if a.dtypes:
    prof.dtypes = tuple(a.dtypes)
  if a.no_torch_compile:
    prof.torch_compile = False
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  global TRACE_DIR
  TRACE_DIR = a.trace_dir

  torch_device = None
  if not a.no_torch:
    try:
      import torch
      torch_device = 'cuda' if torch.cuda.is_available() else 'cpu'
      if jax.default_backend() == 'cpu':
        torch_device = 'cpu'
    except ImportError:
      log('torch not installed: JAX columns only')

  env = environment()
  command = 'python -m benchmarks.run ' + ' '.join(sys.argv[1:] if argv is None else argv)
  log(f'{command}\n{json.dumps(env)}\nprofile: {prof}')
  peaks, torch_peaks = {}, {}
  for dtype in prof.dtypes:
    peaks[dtype] = matmul_peak(dtype, prof.matmul_n)
    if torch_device:
      torch_peaks[dtype] = torch_matmul_peak(dtype, prof.matmul_n, torch_device)
    log(f'matmul peak {dtype} (n={prof.matmul_n}): JAX {peaks[dtype] / 1e12:.3f} TFLOP/s'
        + (f', torch {torch_peaks[dtype] / 1e12:.3f} TFLOP/s' if torch_peaks.get(dtype) else ''))

  rows = []
  for arch in a.nets:
    for dtype in prof.dtypes:
      for measure in a.measures:
        rows.append(run_row(arch, measure, dtype, prof, peaks, torch_device, log))

  pipe = None
  if prof.pipeline_seconds > 0:
    pipe = pipeline_rate(prof.pipeline_seconds, min(prof.size, 320), max(1, prof.train_batch), log)

  report = render(command, env, prof, peaks, torch_peaks, rows, pipe)
  print(report)
  if a.output:
    pathlib.Path(a.output).write_text(report)
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(
        {'command': command, 'env': env, 'profile': dataclasses.asdict(prof), 'peaks': peaks,
         'torch_peaks': torch_peaks, 'rows': rows, 'pipeline': pipe}, indent=1, default=str))
  return 0


def goal_lines(env: dict, rows: list[dict]) -> list[str]:
  """The issue's targets, checked against this run's rows (informational: nothing fails)."""
  find = lambda net, measure, dtype: next(
      (r for r in rows if (r['net'], r['measure'], r['dtype']) == (net, measure, dtype)), None)
  verdict = lambda ok: 'met' if ok else 'MISSED'
  out = []
  if env['backend'] == 'cpu':
    for net in ('fcn8s', 'fcn32s'):
      r = find(net, 'train', 'float32')
      if r and r.get('torch_ratio'):
        out.append(f'- CPU goal, {net} float32 training step at least as fast as PyTorch eager: '
                   f'torch/jax = {r["torch_ratio"]:.2f} ({verdict(r["torch_ratio"] >= 1)})')
  else:
    r = find('fcn32s', 'fwd-latency', 'bfloat16')
    if r and r.get('jax_ms'):
      out.append(f'- FCN-VGG16 bf16 forward, batch 1: {r["jax_ms"]:.2f} ms, goal < 3 ms '
                 f'({verdict(r["jax_ms"] < 3)}); the paper\'s K40c: 210 ms')
    for net in NETS:
      r = find(net, 'train', 'bfloat16')
      if r and r.get('torch_ratio'):
        out.append(f'- {net} bf16 training: {r["torch_ratio"]:.2f}x PyTorch eager autocast, goal 1.3x '
                   f'({verdict(r["torch_ratio"] >= 1.3)})')
      if r and r.get('pct_peak') is not None:
        out.append(f'- {net} bf16 training: {r["pct_peak"]:.0f}% of the measured bf16 matmul peak, '
                   f'goal 40% ({verdict(r["pct_peak"] >= 40)})')
  return out + [''] if out else []


def render(command, env, prof, peaks, torch_peaks, rows, pipe) -> str:
  out = [f'`{command}`', '',
         f'{env["date"]}; {env["cpu"]} ({env["cores"]} cores), backend {env["backend"]} '
         f'({env["device"]}); jax {env["jax"]}, flax {env.get("flax")}, torch {env.get("torch")}'
         f' ({env.get("torch_threads", "-")} threads); load average at start {env.get("loadavg")}; '
         f'XLA_FLAGS="{env["XLA_FLAGS"]}"; CPU forms {env.get("cpu_forms", "-")}', '',
         f'Profile: {prof.size}x{prof.size}, width {prof.width:g}, medians of {prof.repeats} after '
         f'{prof.warmup} warm-up. Matmul peak (n={prof.matmul_n}): ' + ', '.join(
             f'{d} JAX {peaks[d] / 1e12:.3f}' + (f' / torch {torch_peaks[d] / 1e12:.3f}'
                                                 if torch_peaks.get(d) else '') + ' TFLOP/s'
             for d in peaks), '',
         markdown_table(rows), '']
  out += goal_lines(env, rows)
  if pipe:
    out += ['Input pipeline (500x375 JPEG -> scale -> crop -> flip -> caffe_bgr), images/s: '
            + ', '.join(f'{k}: {v:.1f}' for k, v in pipe.items()), '']
  try:
    out += [f'Load average at end: {" ".join(f"{v:.2f}" for v in os.getloadavg())}', '']
  except OSError:
    pass
  return '\n'.join(out)


if __name__ == '__main__':
  sys.exit(main())
