"""Cheap checks of a training config, run before any data is prepared or any model is built: every
problem at once, each naming the config field, its value and what it accepts."""

from __future__ import annotations

import os
from typing import Callable

import ml_collections

from fcn_jax import data as data_lib
from fcn_jax import losses, models, optim, preprocessing, pretrained, report, tracking
from fcn_jax.errors import UserError

DTYPES = ('float32', 'bfloat16', 'float16')
ALGORITHMS = ('sgd', 'adam')
SCORES = tuple(k for k, _ in report.SCORE_COLUMNS)  # evaluation's scores (higher is better)


def _recorder(c: ml_collections.ConfigDict, out: list[str]):
  """need(ok, field, accepts): records a problem with config field `field` unless `ok`."""

  def need(ok: bool, field: str, accepts: str) -> None:
    if not ok:
      value = c
      for part in field.split('.'):
        value = value.get(part) if isinstance(value, ml_collections.ConfigDict) else None
      out.append(f'config.{field}={value!r}: {accepts}')
  return need


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_model(c: ml_collections.ConfigDict, need) -> None:
  need(c.arch in models.ARCHS, 'arch', f'one of {", ".join(sorted(models.ARCHS))}')
  m = c.model
  counts = m.num_classes if isinstance(m.num_classes, (tuple, list)) else None
  need((isinstance(m.num_classes, int) and (m.num_classes == 0 or m.num_classes >= 2)) or
       (counts is not None and all(isinstance(n, int) and n >= 2 for n in counts)),
       'model.num_classes', '0 (from the dataset), an integer >= 2 (background and a class), or '
       'one such count per head for a net with several heads')
  need(_number(m.width) and m.width > 0, 'model.width', 'a number > 0 (1.0 = the paper\'s nets)')
  need(m.dtype in DTYPES, 'model.dtype', f'one of {", ".join(DTYPES)}')
  dropout = m.get('dropout_rate')
  need(dropout is None or (_number(dropout) and 0 <= dropout < 1), 'model.dropout_rate',
       'None (0.5, the paper) or a number in [0, 1)')
  if c.class_names and isinstance(m.num_classes, int) and m.num_classes:
    need(len(c.class_names) == m.num_classes, 'class_names',
         f'{m.num_classes} names, one per class (config.model.num_classes)')


def _preprocessing_known(name) -> bool:
  """A preset, 'dataset', or a resolved data_statistics(...) name."""
  if name == preprocessing.DATASET or name in preprocessing.PRESETS:
    return True
  try:
    return preprocessing.is_statistics(name) and bool(preprocessing.get(name))
  except ValueError:
    return False


def _check_inputs(c: ml_collections.ConfigDict, need) -> None:
  """The preprocessing, the input modalities and model.in_channels, against the arch's input
  channels ('dataset' statistics: against the data, in check_inputs_against_data)."""
  presets = ', '.join(sorted(preprocessing.PRESETS))
  known_preprocessing = _preprocessing_known(c.preprocessing)
  need(known_preprocessing, 'preprocessing', f'one of {presets}, or {preprocessing.DATASET} (the '
       'training data\'s per-channel statistics: TIFF bands, 16-bit PNG)')
  modalities = tuple(c.get('modalities', ()) or ())
  known = ('color', 'hha', 'depth')
  well_formed = all(isinstance(m, (tuple, list)) and len(m) == 2 and m[0] in known
                    and m[1] in preprocessing.PRESETS for m in modalities)
  need(well_formed, 'modalities', f'() (the colour image) or ((name, preprocessing), ...) with '
       f'names from {", ".join(known)} and presets from {presets}')
  in_channels = c.model.get('in_channels', 0)
  counted = isinstance(in_channels, int) and not isinstance(in_channels, bool) and in_channels >= 0
  need(counted, 'model.in_channels', '0 (from the inputs) or a channel count >= 1')
  if c.arch not in models.ARCHS or not (well_formed and known_preprocessing and counted):
    return
  spec = models.ARCHS[c.arch]
  need(not in_channels or len(spec.streams) == 1, 'model.in_channels',
       f'0 for {c.arch} (its {len(spec.streams)} input streams keep their channels)')
  if modalities:
    channels = sum(preprocessing.get(p).channels for _, p in modalities)
  elif c.preprocessing == preprocessing.DATASET:
    return  # the data's channel count, known once it is prepared
  else:
    channels = preprocessing.get(c.preprocessing).channels
  if in_channels:
    need(channels == in_channels, 'model.in_channels',
         f'0 or {channels}, the channels of the inputs (other counts: --config.preprocessing='
         f'{preprocessing.DATASET}, with images of that many bands)')
  else:
    wanted = spec.input_channels
    need(channels == wanted, 'modalities', f'inputs with {wanted} channels in all for {c.arch} '
         f'(these give {channels}; e.g. colour + depth for fcn32s_early_fusion, colour + HHA for '
         f'the late-fusion nets)')


def _statistics_preprocessing(c: ml_collections.ConfigDict, train_source, form: dict,
                              log: Callable[[str], None]) -> str:
  """The data_statistics(...) name of the training split's per-channel mean and std (a constant
  channel gets std 1: it is centred, not divided by 0)."""
  d = c.dataset
  stats = data_lib.channel_statistics(train_source)
  if not stats:
    if form:
      raise UserError(f'config.preprocessing={preprocessing.DATASET}: the dataset {d.name} at '
                      f'{d.root} was prepared by an older fcn_jax, without channel statistics; '
                      f'delete its folder under {d.data_dir or "the data_dir"} (config.dataset.'
                      'data_dir) to prepare it again')
    raise UserError(f'config.preprocessing={preprocessing.DATASET} takes the statistics of a '
                    f'dataset of your own (folder, pairs, ...), computed while preparing it; '
                    f'{d.name} has none: use a preset ({", ".join(sorted(preprocessing.PRESETS))})')
  std = [s if s > 0 else 1.0 for s in stats['std']]
  name = preprocessing.data_statistics(stats['mean'], std, form.get('dtype') or 'uint8')
  p = preprocessing.get(name)
  log(f'preprocessing: the per-channel statistics of {d.train_split!r} ({p.channels} channels, '
      f'{p.dtype}): mean {", ".join(f"{m:.6g}" for m in p.mean)}; std '
      f'{", ".join(f"{v:.6g}" for v in p.std)}'
      + (' (constant channels: std 1)' if std != list(stats['std']) else ''))
  return name


def check_inputs_against_data(c: ml_collections.ConfigDict, train_source,
                              log: Callable[[str], None] = print) -> None:
  """The inputs against the prepared data, before anything is built: resolves
  preprocessing='dataset' into the training split's statistics and model.in_channels=0 into the
  data's channel count where the arch's differs (both edited in place, so that the checkpoint
  records them); stops on images the preprocessing cannot take (16-bit or multi-band data with an
  RGB preset, another channel count or type than the statistics')."""
  form = data_lib.input_format(train_source)
  modalities = tuple(c.get('modalities', ()) or ())
  if c.preprocessing == preprocessing.DATASET:
    if modalities:
      raise UserError(f'config.preprocessing={preprocessing.DATASET} normalises the image alone; '
                      'with config.modalities each modality names its preset')
    c.preprocessing = _statistics_preprocessing(c, train_source, form, log)
  if modalities or not form:  # NYUD's modalities, VOC: their presets, as always
    return
  p = preprocessing.get(c.preprocessing)
  where = f'{c.dataset.name} at {c.dataset.root}' if c.dataset.get('root') else c.dataset.name
  takes = f'{p.dtype or "any"} ' if p.stored else 'uint8 RGB '
  if (form['channels'] != p.channels or (not p.stored and form['dtype'] != 'uint8')
      or (p.stored and p.dtype and form['dtype'] != p.dtype)):
    raise UserError(f'the images of {where} have {form["channels"]} channel(s) of '
                    f'{form["dtype"]}, but config.preprocessing={c.preprocessing!r} takes '
                    f'{p.channels}-channel {takes}inputs: set --config.preprocessing='
                    f'{preprocessing.DATASET} (the data\'s own per-channel statistics)')
  in_channels = c.model.get('in_channels', 0) or 0
  if not in_channels and p.channels != models.ARCHS[c.arch].input_channels:
    c.model.in_channels = p.channels
    log(f'model: {c.arch}\'s first convolution takes the data\'s {p.channels} channels '
        '(config.model.in_channels=0: from the inputs)')
  elif in_channels and in_channels != p.channels:
    raise UserError(f'config.model.in_channels={in_channels}, but the images of {where} have '
                    f'{p.channels} channel(s); leave it at 0 (from the data)')


def _check_loop(c: ml_collections.ConfigDict, need) -> None:
  """Batch sizes, step counts, crops and scales of the training loop and the evaluation."""
  for field in ('batch_size', 'accumulate_steps', 'eval_batch_size', 'keep_checkpoints'):
    need(isinstance(c[field], int) and c[field] >= 1, field, 'an integer >= 1')
  for field in ('num_train_steps', 'log_every', 'eval_every', 'checkpoint_every', 'data_workers'):
    need(isinstance(c[field], int) and c[field] >= 0, field, 'an integer >= 0')
  need(isinstance(c.crop_size, int) and c.crop_size >= 0, 'crop_size',
       'an integer >= 1, or 0 (the training images\' largest side)')
  need(isinstance(c.eval_pad_to, int) and c.eval_pad_to >= -1, 'eval_pad_to',
       '0 (native size), -1 (the evaluation images\' largest side) or a size S > 0')
  epochs = c.get('total_epochs') or 0
  need(_number(epochs) and epochs >= 0, 'total_epochs', 'a number >= 0')
  if isinstance(c.num_train_steps, int) and _number(epochs):
    need(c.num_train_steps > 0 or epochs > 0, 'num_train_steps',
         'an integer > 0, or 0 with config.total_epochs > 0')
  sr = tuple(c.scale_range or ())
  need(sr == () or (len(sr) == 2 and all(_number(v) and v > 0 for v in sr) and sr[0] <= sr[1]),
       'scale_range', '() or (low, high) with 0 < low <= high')
  jitter = c.get('color_jitter', 0.0)
  need(_number(jitter) and 0 <= jitter < 1, 'color_jitter', 'a number in [0, 1) (0 = off)')
  need(not jitter or c.preprocessing != preprocessing.DATASET, 'color_jitter',
       '0 with preprocessing=dataset (the jitter is for 8-bit photographs, not stored bands)')


def _check_optim(c: ml_collections.ConfigDict, need) -> None:
  problem = losses.loss_spec_problem(c.get('loss', 'ce'))
  need(problem is None, 'loss', problem or '')
  o = c.optim
  need(_number(o.learning_rate) and o.learning_rate >= 0, 'optim.learning_rate',
       'a number >= 0')
  need(o.get('algorithm', 'sgd') in ALGORITHMS, 'optim.algorithm',
       f'one of {", ".join(ALGORITHMS)}')
  need(o.schedule in optim.SCHEDULES, 'optim.schedule', f'one of {", ".join(optim.SCHEDULES)}')
  warmup = o.get('warmup_steps', 0)
  need(isinstance(warmup, int) and warmup >= 0 and not (0 < c.num_train_steps <= warmup),
       'optim.warmup_steps', 'a whole number >= 0, below num_train_steps')
  need(_number(o.get('warmup_ratio', 0.001)) and 0 <= o.get('warmup_ratio', 0.001) <= 1,
       'optim.warmup_ratio', 'a number in [0, 1]')
  need(o.schedule != 'step' or (isinstance(o.get('step_every', 0), int)
                                and o.get('step_every', 0) >= 1), 'optim.step_every',
       "a whole number >= 1 (updates between rate drops) with optim.schedule='step'")
  need(_number(o.get('step_gamma', 0.1)) and 0 < o.get('step_gamma', 0.1) <= 1,
       'optim.step_gamma', 'a number in (0, 1]')
  need(_number(o.get('poly_power', 0.9)) and o.get('poly_power', 0.9) > 0, 'optim.poly_power',
       'a number > 0')


def _check_selection(c: ml_collections.ConfigDict, need) -> None:
  """The moving average of the weights, the score that picks "best", early stopping."""
  decay = c.get('ema_decay', 0.0)
  need(_number(decay) and 0 <= decay < 1, 'ema_decay',
       'a number in [0, 1): 0 (off) or the decay of the moving average, e.g. 0.999')
  need(c.get('best_metric', 'mean_iu') in SCORES, 'best_metric', f'one of {", ".join(SCORES)}')
  heads = [h.name for h in models.ARCHS[c.arch].heads] if c.arch in models.ARCHS else None
  head = c.get('best_head', '')
  need(head == '' or heads is None or head in heads, 'best_head',
       f'\'\' (the first head) or one of {c.arch}\'s heads: {", ".join(heads or ())}')
  metric = c.get('early_stopping_metric', '')
  need(metric in ('', *SCORES), 'early_stopping_metric',
       f'\'\' (off) or one of {", ".join(SCORES)}')
  if not metric:
    return
  patience = c.get('early_stopping_patience')
  need(isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1,
       'early_stopping_patience', 'an integer >= 1 (evaluations without improvement)')
  delta = c.get('early_stopping_min_delta')
  need(_number(delta) and delta >= 0, 'early_stopping_min_delta',
       'a number >= 0 (the gain that counts as an improvement; scores are fractions: 0.001 = '
       '0.1 points)')
  need(isinstance(c.eval_every, int) and c.eval_every > 0, 'eval_every',
       'an integer > 0 with config.early_stopping_metric (without periodic evaluations nothing is '
       'watched)')


def _check_tracking(c: ml_collections.ConfigDict, need) -> None:
  """The trackers, and that their packages are installed (before any data is prepared)."""
  problem = tracking.spec_problem(c.get('tracking', 'tensorboard'))
  need(problem is None, 'tracking', problem or '')
  need(isinstance(c.get('tracking_uri', ''), str), 'tracking_uri',
       "'' (file:WORKDIR/mlruns) or an MLflow tracking URI")
  need(isinstance(c.get('wandb_project', ''), str), 'wandb_project', "'' (fcn_jax) or a name")
  need(c.get('wandb_mode', 'offline') in tracking.WANDB_MODES, 'wandb_mode',
       f'one of {", ".join(tracking.WANDB_MODES)}')


def _check_data(c: ml_collections.ConfigDict, need, out: list[str]) -> None:
  """The dataset's splits (cheap: no data is prepared) and the checkpoint to start from."""
  d = c.dataset
  eval_name, eval_split = data_lib.eval_dataset(d.name, d.eval_name, d.eval_split)
  fraction = d.get('val_fraction', 0.1)
  need(_number(fraction) and 0 <= fraction < 1, 'dataset.val_fraction', 'a number in [0, 1)')
  for field, name, split in (('dataset.train_split', d.name, d.train_split),
                             ('dataset.eval_split', eval_name, eval_split)):
    try:
      data_lib.check_split(name, split, **data_lib.source_options(d))
    except data_lib.DataError as e:
      out.append(f'config.{field}={split!r}: {e}')
  if pretrained.is_reference(c.init_from):
    try:
      pretrained.lookup(c.init_from)
    except UserError as e:
      out.append(f'config.init_from={c.init_from!r}: {e}')
  elif c.init_from:
    need(os.path.exists(os.path.expanduser(c.init_from)), 'init_from',
         'an existing checkpoint directory (a training run\'s checkpoints/ or fcn_jax.convert '
         'output)')


def _problems(c: ml_collections.ConfigDict) -> list[str]:
  out = []
  need = _recorder(c, out)
  _check_model(c, need)
  _check_inputs(c, need)
  _check_loop(c, need)
  _check_optim(c, need)
  _check_selection(c, need)
  _check_tracking(c, need)
  _check_data(c, need, out)
  return sorted(set(out), key=out.index)


def check_train_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError listing every invalid field of a training config."""
  problems = _problems(config)
  if problems:
    raise UserError('invalid config:\n  ' + '\n  '.join(problems) +
                    '\nSet them with --config.FIELD=VALUE (python -m experiments.<arch> --help '
                    'lists the fields).')
