"""The shared `main` of every experiment: flags, demo data, staged initialisation, then train."""

from __future__ import annotations

import pathlib
import shlex
import sys

from absl import app, flags
import ml_collections
from ml_collections import config_flags

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / 'configs'


def config_path(arch: str, preset: str | None = None) -> str:
  path = str(CONFIG_DIR / f'{arch}.py')
  return f'{path}:{preset}' if preset else path


def load_config(arch: str, preset: str | None = None) -> ml_collections.ConfigDict:
  from experiments.configs import common
  return common.get_config(arch, preset or 'paper')


def prepare_demo_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Demo preset: writes the synthetic VOC-format tree (once) and points the dataset at it."""
  if config.preset != 'demo' or config.dataset.manual_dir:
    return
  from fcn_jax.data import synthetic
  from fcn_jax import distributed
  s = config.synthetic
  root = workdir.parent / 'synthetic_voc'

  def write():
    if not (root / 'VOCdevkit').exists():
      synthetic.write_voc_tree(root, num_train=s.num_train, num_val=s.num_val, seed=s.seed,
                               min_size=s.min_size, max_size=s.max_size)
  distributed.main_process_first(write, 'fcn_jax.demo_data')  # no race on a shared filesystem
  with config.unlocked():
    config.dataset.manual_dir = str(root)
    config.dataset.data_dir = config.dataset.data_dir or str(workdir.parent / 'tfds')


def resolve_init(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Staged nets start from their predecessor: use config.init_from, train the predecessor first
  (config.train_predecessor), or stop with the exact command to run."""
  from experiments.configs import common
  pred = common.PREDECESSOR.get(config.arch)
  if pred is None or config.init_from:
    return
  pred_dir = workdir.parent / pred
  if (pred_dir / 'results.json').exists():
    checkpoint = pred_dir / 'checkpoints'
  elif config.train_predecessor:
    pred_config = load_config(pred, config.preset)
    for key in ('seed', 'dataset', 'model', 'preprocessing', 'train_predecessor'):
      pred_config[key] = config[key]
    if pred_config.preset == 'demo':
      pred_config.synthetic = config.synthetic
    from fcn_jax import distributed
    if distributed.is_main():
      print(f'{config.arch} starts from a trained {pred}: training it first in {pred_dir}')
    run(pred_config, pred_dir)
    checkpoint = pred_dir / 'checkpoints'
  else:
    preset = f':{config.preset}' if config.preset else ''
    raise SystemExit(
        f'{config.arch} is initialised from a trained {pred} (the paper\'s staged training), and no '
        f'checkpoint was given. Either train it first:\n'
        f'  python -m experiments.{pred} --workdir {shlex.quote(str(pred_dir))} '
        f'--config experiments/configs/{pred}.py{preset}\n'
        f'and then pass --config.init_from={shlex.quote(str(pred_dir / "checkpoints"))}, or add '
        f'--config.train_predecessor=True to do both in one command.')
  with config.unlocked():
    config.init_from = str(checkpoint)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  from fcn_jax import data as data_lib
  from fcn_jax import train
  workdir = pathlib.Path(workdir).expanduser().resolve()
  prepare_demo_data(config, workdir)
  resolve_init(config, workdir)
  try:
    return train.train_and_evaluate(config, workdir)
  except data_lib.MissingDataError as e:
    raise SystemExit(f'{e}\n\nFrom the command line: --config.dataset.manual_dir=DIR (the archives or '
                     f'trees above) or --config.dataset.download=True; prepared data is kept under '
                     f'--config.dataset.data_dir={config.dataset.data_dir}.'
                     f'\n\nNo data yet? The demo runs end to end on a synthetic VOC-format set: '
                     f'`make demo`, or `python -m experiments.{config.arch} --workdir runs/demo/'
                     f'{config.arch} --config experiments/configs/{config.arch}.py:demo`.') from None
  except train.NonFiniteLossError as e:
    raise SystemExit(str(e)) from None


def define_distributed_flags() -> None:
  """Multi-host flags (see fcn_jax.distributed): every process runs the same command plus its id."""
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                    'auto: connect the processes when a coordinator / several processes are given '
                    '(flags or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or a Cloud '
                    'TPU pod slice, SLURM or Open MPI job is detected; on: always call '
                    'jax.distributed.initialize; off: single process.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, the same for all processes.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (usually one per host).')
  flags.DEFINE_integer('process_id', None, 'This process\'s id, 0 .. num_processes - 1.')
  flags.DEFINE_string('local_device_ids', None, 'Comma-separated local accelerator ids this process uses '
                      '(several processes per GPU host).')


def initialize_distributed() -> bool:
  """jax.distributed from the flags / environment; quiets absl logging on processes other than 0."""
  from absl import logging as absl_logging
  from fcn_jax import distributed
  f = flags.FLAGS
  multi = distributed.initialize(f.coordinator_address, f.num_processes, f.process_id, f.local_device_ids,
                                 mode=f.distributed)
  if multi and not distributed.is_main():
    absl_logging.set_verbosity(absl_logging.ERROR)
  return multi


def quiet_logs() -> None:
  """Library INFO logs (orbax, TFDS) drown the progress bar; keep warnings and errors."""
  from absl import logging
  logging.set_verbosity(logging.WARNING)


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache at `path` ('' leaves it off): programs compiled once (each
  native evaluation size, the train step) load from disk in later runs instead of recompiling."""
  if not path:
    return
  import jax
  jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(path).expanduser()))


def main(arch: str) -> None:
  """Entry point of experiments/<arch>.py."""
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and figures.', required=True)
  config_flags.DEFINE_config_file('config', config_path(arch),
                                  'Config file, optionally with :preset (paper | heavy | demo).',
                                  lock_config=True)
  define_distributed_flags()

  def _main(argv):
    quiet_logs()
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config = flags.FLAGS.config
    if config.arch != arch:
      raise app.UsageError(f'--config is for {config.arch}, but this is experiments.{arch}')
    initialize_distributed()  # before any JAX computation
    enable_compilation_cache(config.get('compilation_cache_dir', ''))
    run(config, flags.FLAGS.workdir)

  app.run(_main)
