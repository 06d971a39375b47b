"""The shared `main` of every experiment: flags, demo data, staged initialisation, then train."""

from __future__ import annotations

import importlib.util
import pathlib
import shlex
import sys

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from fcn_jax import cli as cli_lib
from fcn_jax import config_checks, distributed, paths, train
from fcn_jax import data as data_lib
from fcn_jax.data import synthetic
from fcn_jax.errors import UserError, user_errors_as_exit

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / 'configs'


def config_path(arch: str, preset: str | None = None) -> str:
  path = str(CONFIG_DIR / f'{arch}.py')
  return f'{path}:{preset}' if preset else path


def load_config(name: str, preset: str | None = None) -> ml_collections.ConfigDict:
  """The config that experiments/configs/<name>.py's get_config(preset) returns: read from the
  file itself, so that --help, the predecessor of a staged net and error messages see the edits a
  user made there."""
  path = CONFIG_DIR / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'_fcn_jax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset or 'paper')


def demo_data_root(config: ml_collections.ConfigDict) -> pathlib.Path:
  """The demo's synthetic VOC-format tree in the cache (fcn_jax.paths), one per generator
  setting."""
  s = config.synthetic
  return (paths.cache_dir() / 'synthetic' /
          f'voc-{s.num_train}-{s.num_val}-{s.min_size}-{s.max_size}-seed{s.seed}')


def prepare_demo_data(config: ml_collections.ConfigDict) -> None:
  """Demo preset without a dataset of the user's: writes the synthetic VOC-format tree (once, into
  the cache, atomically) and points the dataset at it and at its prepared TFDS files beside it."""
  if (config.preset != 'demo' or config.dataset.manual_dir
      or config.dataset.name != 'voc_segmentation/2012'):
    return  # a dataset of the user's
  s = config.synthetic
  root = demo_data_root(config)

  def write():
    if not (root / 'VOCdevkit').exists():
      synthetic.write_voc_tree_atomically(root, num_train=s.num_train, num_val=s.num_val,
                                          seed=s.seed, min_size=s.min_size, max_size=s.max_size)
  distributed.main_process_first(write, 'fcn_jax.demo_data')  # no race on a shared filesystem
  with config.unlocked():
    config.dataset.manual_dir = str(root)
    config.dataset.data_dir = config.dataset.data_dir or str(root / 'tfds')


def resolve_init(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Staged nets start from their predecessor: use config.init_from, train the predecessor first
  (config.train_predecessor), or stop with the exact command to run."""
  from experiments.configs import common
  name = config.get('name', config.arch)
  pred = common.predecessor(name)
  if pred is None or config.init_from:
    return
  pred_dir = workdir.parent / pred
  if (pred_dir / 'results.json').exists():
    checkpoint = pred_dir / 'checkpoints'
  elif config.train_predecessor:
    pred_config = load_config(pred, config.preset)
    for key in ('seed', 'dataset', 'model', 'preprocessing', 'modalities', 'train_predecessor'):
      pred_config[key] = config[key]
    if pred_config.preset == 'demo':
      pred_config.synthetic = config.synthetic
    if distributed.is_main():
      print(f'{name} starts from a trained {pred}: training it first in {pred_dir}')
    run(pred_config, pred_dir)
    checkpoint = pred_dir / 'checkpoints'
  else:
    preset = f':{config.preset}' if config.preset else ''
    raise SystemExit(
        f'{name} is initialised from a trained {pred} (the paper\'s staged training), and no '
        f'checkpoint was given. Either train it first:\n'
        f'  python -m experiments.{pred} --workdir {shlex.quote(str(pred_dir))} '
        f'--config experiments/configs/{pred}.py{preset}\n'
        f'and then pass --config.init_from={shlex.quote(str(pred_dir / "checkpoints"))}, or add '
        f'--config.train_predecessor=True to do both in one command.')
  with config.unlocked():
    config.init_from = str(checkpoint)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir).expanduser().resolve()
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f'--workdir {workdir} is a file, not a directory')
  config_checks.check_train_config(config)  # before any data is written or prepared
  prepare_demo_data(config)
  resolve_init(config, workdir)
  try:
    return train.train_and_evaluate(config, workdir)
  except data_lib.MissingDataError as e:
    if config.dataset.name in data_lib.CUSTOM_FORMATS:  # the message names the layout to fix
      raise UserError(f'{e}\n(config.dataset.root={config.dataset.root}; README: "Train on your '
                      f'own data")') from None
    raise SystemExit(f'{e}\n\nFrom the command line: --config.dataset.manual_dir=DIR (the archives '
                     f'or trees above) or --config.dataset.download=True; prepared data is kept '
                     f'under --config.dataset.data_dir={config.dataset.data_dir}.'
                     f'\n\nNo data yet? The demo runs end to end on a synthetic VOC-format set: '
                     f'`make demo`, or `python -m experiments.{config.arch} '
                     f'--workdir runs/demo/{config.arch} '
                     f'--config experiments/configs/{config.arch}.py:demo`.') from None
  except train.NonFiniteLossError as e:
    raise SystemExit(str(e)) from None


def define_distributed_flags() -> None:
  """Multi-host flags (see fcn_jax.distributed): every process runs the same command plus its id."""
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                    'auto: connect the processes when a coordinator / several processes are given '
                    '(flags or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or a '
                    'Cloud TPU pod slice, SLURM or Open MPI job is detected; on: always call '
                    'jax.distributed.initialize; off: single process.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, the same for all processes.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (usually one per host).')
  flags.DEFINE_integer('process_id', None, 'This process\'s id, 0 .. num_processes - 1.')
  flags.DEFINE_string('local_device_ids', None,
                      'Comma-separated local accelerator ids this process uses '
                      '(several processes per GPU host).')


def initialize_distributed() -> bool:
  """jax.distributed from the flags / environment; quiets absl logging on processes other than 0."""
  from absl import logging as absl_logging
  f = flags.FLAGS
  multi = distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                                 f.local_device_ids, mode=f.distributed)
  if multi and not distributed.is_main():
    absl_logging.set_verbosity(absl_logging.ERROR)
  return multi


def quiet_logs() -> None:
  """Library INFO logs (orbax, TFDS) drown the progress bar; keep warnings and errors."""
  from absl import logging
  logging.set_verbosity(logging.WARNING)


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache at `path`: programs compiled once (each native evaluation
  size, the train step) load from disk in later runs instead of recompiling. '' sets none (jax's
  own $JAX_COMPILATION_CACHE_DIR, when set, still applies)."""
  if not path:
    return
  import jax
  jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(path).expanduser()))


def config_field_comments() -> dict[str, str]:
  """{field: what it does} from the comments beside the base config's assignments (configs/common.py
  documents each field where it sets it; the comment above a field counts when none is beside)."""
  import re
  comments, above = {}, []
  for line in (CONFIG_DIR / 'common.py').read_text().splitlines():
    stripped = line.strip()
    if stripped.startswith('def _paper('):  # the presets' own comments say why, not what
      break
    if stripped.startswith('#'):
      above.append(stripped.lstrip('# '))
      continue
    match = re.match(r'\s*c\.([\w.]+)\s*=[^#]*(?:#\s*(.*))?$', line)
    if match and match.group(1) not in comments:
      text = match.group(2) or ' '.join(above)
      if text:
        comments[match.group(1)] = text
    above = []
  return comments


def config_fields_help(config: ml_collections.ConfigDict) -> str:
  """Every config field with its value and what it does, for --help."""
  comments = config_field_comments()

  def lines(c, prefix=''):
    for key, value in sorted(c.items()):
      if isinstance(value, ml_collections.ConfigDict):
        yield from lines(value, f'{prefix}{key}.')
      else:
        text = repr(tuple(value) if isinstance(value, list) else value)
        yield f'  --config.{prefix}{key}={text if len(text) <= 70 else text[:67] + "..."}'
        if comments.get(prefix + key):
          yield f'      {comments[prefix + key]}'
  return '\n'.join(lines(config))


def _config_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _flat_keys(value, f'{prefix}{key}.')
  return keys


def explain_config_error(argv: list[str], arch: str, error: Exception) -> str:
  """One message for a --config / --config.FIELD mistake (an unknown field, a typo'd preset, a
  value of the wrong type), instead of the config library's chained tracebacks."""
  import difflib
  from experiments.configs import common as configs
  spec = _config_arg(argv) or config_path(arch)
  path, _, preset = spec.partition(':')
  if not pathlib.Path(path).exists():
    return f'--config {spec}: no such file (the configs are experiments/configs/<arch>.py[:PRESET])'
  if preset and preset not in configs.PRESETS:
    return (f'--config {spec}: unknown preset {preset!r}; choose one of '
            f'{", ".join(configs.PRESETS)} (e.g. --config {path}:demo)')
  try:
    config = load_config(arch, preset or 'paper')
  except Exception:  # a config file of the user's: report its own error below
    config = None
  if config is not None:
    keys = _flat_keys(config)
    for arg in argv:
      if arg.startswith('--config.'):
        field = arg[len('--config.'):].split('=', 1)[0]
        if field not in keys:
          parent = field.rpartition('.')[0]
          group = [k for k in keys if k.rpartition('.')[0] == parent]
          if parent in keys:  # a typo in the last part: compare it with its siblings
            leaf = field.rpartition('.')[2]
            siblings = [k.rpartition('.')[2] for k in group]
            close = [f'{parent}.{c}' for c in difflib.get_close_matches(leaf, siblings, n=3)]
          else:
            close = difflib.get_close_matches(field, keys, n=3, cutoff=0.6)
          if close:
            hint = f'; did you mean {" or ".join("--config." + c for c in close)}?'
          elif parent in keys:
            hint = (f'; config.{parent} has: '
                    f'{", ".join(sorted(k.rpartition(".")[2] for k in group))}')
          else:
            hint = ''
          return (f'{arg}: config has no field {field!r}{hint} '
                  f'(python -m experiments.{arch} --help lists the fields)')
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  return f'bad --config value: {str(cause) or type(cause).__name__}'


def main(arch: str) -> None:
  """Entry point of experiments/<arch>.py."""
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and figures (created if '
                      'missing; the same command resumes a run there).', required=True)
  try:  # the config library applies the --config.FIELD overrides of sys.argv here already
    config_flags.DEFINE_config_file('config', config_path(arch),
                                    'Config file, optionally with :preset (paper | heavy | demo). '
                                    'Any field is set with --config.FIELD=VALUE (listed above).',
                                    lock_config=True)
  except Exception as e:
    print(f'error: {explain_config_error(sys.argv[1:], arch, e)}', file=sys.stderr)
    raise SystemExit(2) from None
  define_distributed_flags()
  # --help lists the flags of the main module only: adopt these, and list the config fields.
  main_module = sys.modules['__main__']
  for name in ('workdir', 'config', 'distributed', 'coordinator_address', 'num_processes',
               'process_id', 'local_device_ids'):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  main_module.__doc__ = (
      f'{(main_module.__doc__ or "").strip()}\n\n'
      f'Config fields (paper preset defaults; the demo and heavy presets change some). Step counts '
      f'and cadences are optimiser updates; num_train_steps=0 trains for total_epochs:\n'
      f'{config_fields_help(load_config(arch, "paper"))}\n')

  def parse(argv: list[str]) -> list[str]:
    argv = argv[:1] + cli_lib.normalize_flags(argv[1:], flags.FLAGS)
    try:
      return flags.FLAGS(argv)
    except SystemExit:  # absl's --help exits 1; help that was asked for is a success
      if any(a in ('--help', '-h', '-?', '--helpshort', '--helpfull') for a in argv[1:]):
        raise SystemExit(0) from None
      raise
    except flags.Error as e:
      if 'config' not in str(e):
        print(f'error: {e}\nPass --help to see the flags.', file=sys.stderr)
        raise SystemExit(2) from None
      print(f'error: {explain_config_error(argv, arch, e)}', file=sys.stderr)
      raise SystemExit(2) from None
    except Exception as e:  # raised while loading or overriding --config
      print(f'error: {explain_config_error(argv, arch, e)}', file=sys.stderr)
      raise SystemExit(2) from None

  def _main(argv):
    quiet_logs()
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config = flags.FLAGS.config
    if config.get('name', config.arch) != arch:
      raise app.UsageError(f'--config is for {config.get("name", config.arch)}, but this is '
                           f'experiments.{arch}')
    with user_errors_as_exit():
      initialize_distributed()  # before any JAX computation
      enable_compilation_cache(config.get('compilation_cache_dir', ''))
      run(config, flags.FLAGS.workdir)

  app.run(_main, flags_parser=parse)
