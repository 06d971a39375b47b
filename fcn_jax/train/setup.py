"""What a run resolves before its first step, writing nothing: classes, step count, class weights,
the data-dependent config fields checked against the data, the checkpoint metadata, a summary."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from fcn_jax import checkpoint as ckpt_lib
from fcn_jax import config_checks, preprocessing
from fcn_jax import data as data_lib
from fcn_jax import models, paths
from fcn_jax import workdir as workdir_lib
from fcn_jax.cli import plural
from fcn_jax.distributed import log
from fcn_jax.errors import UserError
from fcn_jax.train import monitor
from fcn_jax.train.inputs import data_sources, input_layout
from fcn_jax.train.step import model_config


def metadata_from_config(config: ml_collections.ConfigDict, classes=None,
                         heads: dict | None = None) -> dict:
  """What inference needs, with no training config: stored in every checkpoint. `classes` (a
  data.ClassInfo) adds the palette and the ignore label; `heads` (data.head_classes) each head's
  classes for a net with several heads."""
  extra = {}
  if classes is not None:
    extra = {'palette': np.asarray(classes.palette).tolist(),
             'ignore_label': int(classes.ignore_label),
             'dataset': config.dataset.name, 'data': dataset_identity(config)}
  if heads and len(heads) > 1:
    extra['heads'] = [{'name': h, 'num_classes': c.num_classes, 'class_names': list(c.names),
                       'palette': np.asarray(c.palette).tolist(), 'eval_exclude': list(e)}
                      for h, (c, e) in heads.items()]
    first = extra['heads'][0]
    extra['palette'] = first['palette']
  modalities, _ = input_layout(config)
  if modalities:
    extra['modalities'] = [{'name': m, 'preprocessing': p} for m, p in modalities]
  ema_decay = float(config.get('ema_decay', 0.0) or 0.0)
  if ema_decay:
    extra['ema_decay'] = ema_decay
  return {
      **ckpt_lib.model_metadata(model_config(config)),
      'preprocessing': config.preprocessing,
      'class_names': list(config.class_names),
      # Not needed for inference; a resumed run must match them (fcn_jax.workdir).
      'optimizer': config.optim.get('algorithm', 'sgd'),
      'accumulate_steps': config.accumulate_steps,
      'source': f'trained with fcn_jax ({config.get("preset", "custom")} preset)',
      'experiment': config.get('name', config.arch),
      # The weights checkpoint.load_inference reads by default: the moving average when kept.
      'inference_weights': 'ema' if ema_decay else 'params',
      'best_metric': config.get('best_metric', 'mean_iu') or 'mean_iu',
      'best_head': config.get('best_head', '') or models.ARCHS[config.arch].heads[0].name,
      **extra,
  }

def dataset_identity(config: ml_collections.ConfigDict) -> dict:
  """Where a run's data is and how it is read, stored in every checkpoint as metadata['data'] so
  that evaluation and prediction find the same data without being told again."""
  d = config.dataset
  eval_name, eval_split = data_lib.eval_dataset(d.name, d.eval_name, d.eval_split)
  expand = lambda p: str(pathlib.Path(p).expanduser().resolve()) if p else ''
  options = data_lib.source_options(d)
  return {'name': d.name, **options, 'root': expand(options['root']),
          'classes_file': expand(options['classes_file']),
          'data_dir': expand(d.data_dir or str(paths.cache_dir() / 'tfds')),
          'manual_dir': expand(d.manual_dir), 'train_split': d.train_split,
          'eval_name': eval_name, 'eval_split': eval_split}

def resolve_num_updates(config: ml_collections.ConfigDict, num_train_images: int) -> int:
  """Optimiser updates to train for: config.num_train_steps when > 0, else config.total_epochs
  passes over the training set at batch_size x accumulate_steps images per update (resolved here,
  at run time, so that --config.batch_size changes the step count and not the epochs)."""
  if config.num_train_steps and config.num_train_steps > 0:
    return int(config.num_train_steps)
  epochs = config.get('total_epochs') or 0
  if epochs <= 0:
    raise UserError('set config.num_train_steps (optimiser updates) or config.total_epochs (> 0)')
  images_per_update = config.batch_size * config.accumulate_steps
  return max(1, math.ceil(epochs * num_train_images / images_per_update))

def resolve_head_classes(config: ml_collections.ConfigDict, heads: dict) -> None:
  """A net with several heads: config.model.num_classes from the dataset's heads
  (data.head_classes), which must be the arch's (SIFT Flow: semantic, geometric)."""
  names = [h.name for h in models.ARCHS[config.arch].heads]
  if sorted(map(str, heads)) != sorted(names):
    raise UserError(f'{config.arch} has the heads {", ".join(names)}, but the dataset '
                    f'{config.dataset.name} labels {", ".join(map(str, heads))}; choose an arch '
                    f'with those heads (e.g. fcn16s_two_heads for sift_flow)')
  counts = tuple(heads[h][0].num_classes for h in names)
  given = config.model.num_classes
  if given and tuple(np.atleast_1d(given)) != counts:
    raise UserError(f'config.model.num_classes={given}, but the dataset\'s heads have {counts} '
                    f'classes; leave it at 0 (from the dataset)')
  model = config.model.to_dict()
  model['num_classes'] = counts
  config.model = ml_collections.ConfigDict(model)
  config.class_names = tuple(heads[names[0]][0].names)

def resolve_classes(config: ml_collections.ConfigDict, classes, heads: dict | None = None) -> None:
  """Sets config.model.num_classes and config.class_names from the dataset's classes (0 and ()
  mean "from the dataset"); a config that contradicts them stops, naming the field. `heads`
  (data.head_classes) for a net with several heads."""
  if len(models.ARCHS[config.arch].heads) > 1:
    return resolve_head_classes(config, heads or {None: (classes, ())})
  if heads and len(heads) > 1:
    raise UserError(f'the dataset {config.dataset.name} labels several heads '
                    f'({", ".join(map(str, heads))}); {config.arch} has one: choose an arch with '
                    f'those heads (e.g. fcn16s_two_heads)')
  n = classes.num_classes
  d = config.dataset
  where = f'{d.name}' + (f' at {d.root}' if d.get('root') else '')
  if config.model.num_classes and config.model.num_classes != n:
    raise UserError(f'config.model.num_classes={config.model.num_classes}, but the dataset {where} '
                    f'has {n} classes ({", ".join(classes.names[:6])}{", ..." if n > 6 else ""}); '
                    f'leave it at 0 (from the dataset) or fix the dataset\'s class list')
  if config.class_names and tuple(config.class_names) != tuple(classes.names):
    raise UserError(f'config.class_names={tuple(config.class_names)[:6]}... differ from the '
                    f'dataset {where}\'s {tuple(classes.names)[:6]}...; leave it empty (from the '
                    f'dataset)')
  config.model.num_classes = n
  config.class_names = tuple(classes.names)

def loss_class_weights(config: ml_collections.ConfigDict, train_source) -> tuple[float, ...] | None:
  """config.loss_class_weights as per-class loss weights: 'none' (None), 'median_frequency'
  (median(f) / f_c with f_c the class's share of the training pixels; absent classes 0),
  'median_frequency:P' (those weights to the power P: 0.5 balances more gently), or the weights
  themselves ('1,2,0.5' or a list), one per class."""
  spec = config.get('loss_class_weights', 'none')
  n = config.model.num_classes
  if spec in (None, '', 'none'):
    return None
  if isinstance(spec, str) and spec.split(':')[0] == 'median_frequency':
    power = _median_frequency_power(spec)
    counts = np.asarray(data_lib.pixel_counts(train_source, n, progress=jax.process_index() == 0),
                        np.float64)
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    weights = np.where(present, np.median(freq[present]) / np.where(present, freq, 1.0), 0.0)
    weights = np.where(present, weights ** power, 0.0)
  else:
    try:
      values = spec if isinstance(spec, (list, tuple)) else str(spec).strip('[]() ').split(',')
      weights = np.asarray([float(v) for v in values], np.float64)
    except ValueError:
      raise UserError(f'config.loss_class_weights={spec!r}: none, median_frequency[:P], or one '
                      f'weight per class (e.g. "1,2,0.5")') from None
    if weights.shape != (n,) or (weights < 0).any():
      raise UserError(f'config.loss_class_weights: {weights.size} weights for {n} classes; give '
                      f'{n} non-negative numbers')
  log('class weights: ' + ', '.join(f'{name} {w:.3g}' for name, w in
                                      zip(config.class_names, weights)))
  return tuple(float(w) for w in weights)

def _median_frequency_power(spec: str) -> float:
  """P of 'median_frequency[:P]' (1 when absent)."""
  _, _, power = spec.partition(':')
  try:
    value = float(power) if power else 1.0
  except ValueError:
    value = -1.0
  if not value > 0:
    raise UserError(f'config.loss_class_weights={spec!r}: median_frequency:P takes a power P > 0 '
                    f'(e.g. median_frequency:0.5)')
  return value

def latest_checkpoint_step(directory: pathlib.Path) -> int | None:
  """The latest step in a checkpoints/ directory, without creating it."""
  if not directory.is_dir() or not any(directory.iterdir()):
    return None
  try:
    return ckpt_lib.resolve_step(directory, 'latest')[1]
  except ckpt_lib.CheckpointNotFoundError:
    return None

@dataclasses.dataclass
class RunSpec:
  """What a run resolves from its config and its data before anything is written."""
  train_source: Any
  eval_source: Any
  eval_name: str
  eval_split: str
  metadata: dict
  eval_exclude: dict
  class_weights: tuple[float, ...] | None
  latest: int | None

def _round_up(n: int, multiple: int = 32) -> int:
  return -(-int(n) // multiple) * multiple

def check_against_data(config: ml_collections.ConfigDict, train_source, eval_source,
                       eval_split: str) -> None:
  """Resolves what the config leaves to the data (eval_pad_to=-1: the evaluation images' largest
  side; crop_size=0: the training images' largest side) and stops, before the first step, on
  what cannot work with it (padding smaller than the evaluation images)."""
  # Read only where needed: without recorded sizes, a split's image headers are read.
  eval_size = data_lib.image_sizes(eval_source) if config.eval_pad_to else None
  train_size = data_lib.image_sizes(train_source) if config.crop_size <= 0 else None
  if config.eval_pad_to < 0:
    config.eval_pad_to = _round_up(max(eval_size)) if eval_size else 512
  elif config.eval_pad_to and eval_size and max(eval_size) > config.eval_pad_to:
    raise UserError(
        f'config.eval_pad_to={config.eval_pad_to}, but the evaluation split {eval_split!r} has '
        f'images up to {eval_size[0]}x{eval_size[1]} (HxW): set --config.eval_pad_to=-1 (padded to '
        f'the largest image, {_round_up(max(eval_size))}), 0 (native size, nothing padded) or at '
        f'least {max(eval_size)}')
  if config.crop_size <= 0:
    config.crop_size = _round_up(max(train_size)) if train_size else 500

def resolve_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> RunSpec:
  """Prepares the data and resolves classes, step count, class weights and the data-dependent
  fields of `config` (edited in place), checking them against the data and any checkpoint in
  workdir. Writes nothing into workdir."""
  latest = latest_checkpoint_step(workdir / 'checkpoints')
  previous = None
  if latest is not None:  # before anything is prepared (class fields left to 'auto')
    previous = ckpt_lib.read_metadata(workdir / 'checkpoints', str(latest))
    known = {k: v for k, v in metadata_from_config(config).items()
             if not (k == 'num_classes' and not v) and not (k == 'class_names' and not v)
             and not (k == 'preprocessing' and v == preprocessing.DATASET)}
    workdir_lib.check_resume_compatible(previous, known, workdir=workdir, step=latest)
  train_source, eval_source = data_sources(config)
  classes, _ = data_lib.class_info(train_source)
  heads = data_lib.head_classes(train_source)
  resolve_classes(config, classes, heads)
  config_checks.check_inputs_against_data(config, train_source, log=log)
  metadata = metadata_from_config(config, classes, heads)
  first_head = models.ARCHS[config.arch].heads[0].name
  eval_exclude = {first_head if h is None else h: e
                  for h, (_, e) in data_lib.head_classes(eval_source).items()}
  if previous is not None:
    workdir_lib.check_resume_compatible(previous, metadata, workdir=workdir, step=latest)
  eval_name, eval_split = data_lib.eval_dataset(config.dataset.name, config.dataset.eval_name,
                                                config.dataset.eval_split)
  check_against_data(config, train_source, eval_source, eval_split)
  config.num_train_steps = resolve_num_updates(config, len(train_source))
  class_weights = loss_class_weights(config, train_source)
  return RunSpec(train_source, eval_source, eval_name, eval_split, metadata, eval_exclude,
                 class_weights, latest)

def start_summary(config: ml_collections.ConfigDict, run: RunSpec, workdir: pathlib.Path) -> str:
  """What the run will do, printed before the first step."""
  d, n = config.dataset, config.model.num_classes
  names = list(config.class_names)
  where = f' at {d.root}' if d.get('root') else ''
  shown = ', '.join(names[:8]) + (', ...' if len(names) > 8 else '')
  counts = n if isinstance(n, int) else ' + '.join(map(str, n))
  images = len(run.train_source)
  epochs = config.num_train_steps * config.batch_size * config.accumulate_steps / max(images, 1)

  def size(source) -> str:
    hw = data_lib.image_sizes(source, scan=False)
    return f' (up to {hw[0]}x{hw[1]})' if hw else ''
  cadence = (f'every {config.eval_every} steps and at the end' if config.eval_every > 0
             else 'at the end')
  evaluation = ('native size, one image at a time' if not config.eval_pad_to else
                f'padded to {config.eval_pad_to}, batches of {config.eval_batch_size}')
  first_head = models.ARCHS[config.arch].heads[0].name
  best = monitor.best_choice(config).describe(first_head)
  early = monitor.EarlyStopping.from_config(config)
  lines = [
      f'{config.get("name", config.arch)} ({config.get("preset", "custom")} preset) on '
      f'{d.name}{where}: {counts} classes ({shown})',
      f'  train {d.train_split!r}: {plural(images, "image")}{size(run.train_source)}, crop '
      f'{config.crop_size}, batch {config.batch_size} -> {config.num_train_steps} steps '
      f'({epochs:.1f} epochs)',
      f'  eval {run.eval_name} {run.eval_split!r}: {plural(len(run.eval_source), "image")}'
      f'{size(run.eval_source)}, {cadence}, {evaluation}',
      f'  best checkpoint by {best}'
      + ('' if early is None else f'; early stopping after {early.patience} evaluations without '
         f'a gain > {early.min_delta:g} in {early.choice.describe(first_head)}'),
      f'  outputs: {workdir} (metrics.jsonl, tensorboard/, checkpoints/, results.md, figures/)']
  info = getattr(run.train_source, 'dataset_info', None)
  if config.get('ema_decay'):
    lines.insert(-1, f'  EMA of the weights, decay {config.ema_decay:g}: evaluated beside the '
                 f'trained weights; best, results, figures and inference use the EMA weights')
  remapped = (getattr(info, 'metadata', None) or {}).get('mask_remap')
  if remapped:
    lines.insert(1, '  masks: ' + ', '.join(f'{a} read as class {b} ({names[b]})'
                                           for a, b in remapped)
                 + ' (binary masks stored as 0/255)')
  return '\n'.join(lines)
