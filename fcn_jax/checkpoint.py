"""Checkpoints that keep the latest AND the best (by mean IU, or the run's chosen score) training
states, and inference bundles.

Layout (one orbax CheckpointManager per directory; every step is written to a temporary directory
and renamed when complete, so a run killed mid-save leaves the previous checkpoints restorable):

    directory/
      <step>/
        variables/    {'params', maybe 'batch_stats'} of the state (orbax StandardSave)
        ema_variables/  the same, their exponential moving average (runs with config.ema_decay > 0;
                      what `load_inference` reads by default when present)
        train_state/  the rest of the state: opt_state, step, rng, ... (absent for inference
                      bundles)
        metadata/     JSON: arch, num_classes, width, learnable_upsampling, preprocessing,
                      class_names...
        data_state/   JSON: the data iterator state (absent when none was given)
        loop_state/   JSON: what the loop keeps besides the state (the early-stopping count)
        metrics/      JSON written by orbax when the step was evaluated (drives "best")

Kept: the `max_to_keep` most recent steps plus the step with the highest `best_score` in its metrics
(the score the run chose, config.best_metric of config.best_head; `mean_iu` in checkpoints written
without one), a preservation policy LatestN OR BestN(1), so the best survives newer, worse
checkpoints.

`save_inference` writes the same layout with a single step 0 holding only variables + metadata, so
`load_inference` / `read_metadata` read training runs and converted weights alike, without any
training configuration.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib

from fcn_jax import checkpoint_trees as trees
from fcn_jax import models, tune
from fcn_jax.errors import UserError

__all__ = ['CheckpointNotFoundError', 'Checkpointer', 'build_from_metadata', 'is_checkpoint_dir',
           'load_inference', 'model_config_of', 'model_metadata', 'read_metadata',
           'resolve_directory', 'resolve_step', 'save_inference']

VARIABLES = 'variables'
EMA_VARIABLES = 'ema_variables'
TRAIN_STATE = 'train_state'
METADATA = 'metadata'
DATA_STATE = 'data_state'
LOOP_STATE = 'loop_state'
EMA_FIELD = 'ema'  # the state's field holding the moving average, saved as EMA_VARIABLES
BEST_KEY = 'best_score'  # the metrics' value that ranks evaluated steps
BEST_METRIC = 'mean_iu'  # ranks the steps of checkpoints that carry no BEST_KEY
WEIGHTS = ('auto', 'ema', 'params')

_log = logging.getLogger(__name__)


class _QuietUnevaluated(logging.Filter):
  """Drops orbax warnings about what is normal here: steps saved without evaluation (no metrics),
  and the read-only managers that inference restores open."""

  EXPECTED = ('did not provide metrics', 'Given directory is read only',
              'read_only=True, setting save_interval_steps=0')

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in self.EXPECTED)


logging.getLogger('absl').addFilter(_QuietUnevaluated())


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """The path given as a checkpoint is missing, empty or not an fcn_jax checkpoint."""


def _is_step_dir(path: str) -> bool:
  return (os.path.basename(path).isdigit() and os.path.isdir(path) and
          any(os.path.isdir(os.path.join(path, item)) for item in (METADATA, VARIABLES)))


def is_checkpoint_dir(directory) -> bool:
  """True when `directory` holds only fcn_jax checkpoint steps (and orbax's temporary step dirs):
  what `save_inference(overwrite=True)` may replace."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return False
  entries = os.listdir(directory)
  steps = [e for e in entries if _is_step_dir(os.path.join(directory, e))]
  others = [e for e in entries if e not in steps and '.orbax-checkpoint-tmp' not in e]
  return bool(steps) and not others


def resolve_directory(path) -> str:
  """The checkpoint-manager directory for `path`: a checkpoints directory itself, a training run's
  workdir (its checkpoints/), or one step directory (`run/checkpoints/1200`). Raises
  CheckpointNotFoundError saying what was found instead."""
  directory = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.exists(directory):
    raise CheckpointNotFoundError(f'checkpoint {directory} does not exist')
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(
        f'checkpoint {directory} is a file; give the directory written by training '
        f'(WORKDIR or WORKDIR/checkpoints) or by fcn_jax.convert --out')
  if _is_step_dir(directory):
    return directory
  if any(_is_step_dir(os.path.join(directory, e)) for e in os.listdir(directory)):
    return directory
  nested = os.path.join(directory, 'checkpoints')
  if os.path.isdir(nested):
    if any(_is_step_dir(os.path.join(nested, e)) for e in os.listdir(nested)):
      return nested
    raise CheckpointNotFoundError(f'{nested} holds no checkpoint yet (the run saves its first one '
                                  f'at config.checkpoint_every)')
  what = 'is empty' if not os.listdir(directory) else 'holds no fcn_jax checkpoint'
  raise CheckpointNotFoundError(
      f'{directory} {what}: expected numbered step directories (1200/ with metadata/ and '
      f'variables/), as in a training WORKDIR/checkpoints or the output of fcn_jax.convert')


def _sanitize_metrics(metrics: dict | None) -> dict | None:
  if metrics is None:
    return None
  return trees.to_json(metrics)


def _best_value(metrics: Any) -> float:
  value = metrics[BEST_KEY] if BEST_KEY in metrics else metrics[BEST_METRIC]
  value = math.nan if value is None else float(value)
  return -math.inf if math.isnan(value) else value


def _has_best_metric(metrics: dict | None) -> bool:
  return metrics is not None and (BEST_KEY in metrics or BEST_METRIC in metrics)


def _has_leaves(tree: Any) -> bool:
  return tree is not None and bool(jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------------
# Managers


def _manager(directory: str, *, max_to_keep: int | None, read_only: bool = False,
             async_save: bool = False) -> ocp.CheckpointManager:
  if read_only:
    policy = None
  else:
    policy = preservation_lib.AnyPreservationPolicy([
        preservation_lib.LatestN(n=max_to_keep),
        preservation_lib.BestN(get_metric_fn=_best_value, reverse=False, n=1,
                               keep_checkpoints_without_metrics=False),
    ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_value,
      best_mode='max',
      keep_checkpoints_without_metrics=True,
      preservation_policy=policy,
      create=not read_only,
      read_only=read_only,
      # Incomplete saves of a killed run (`<step>.orbax-checkpoint-tmp*`) are removed on start-up.
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save,
  )
  return ocp.CheckpointManager(os.fspath(directory), options=options)


def _step_items(directory: str, step: int) -> set[str]:
  step_dir = os.path.join(os.fspath(directory), str(step))
  try:
    return {name for name in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, name))}
  except FileNotFoundError:
    return set()


class Checkpointer:
  """Training checkpoints: the latest `max_to_keep` steps plus the best by `metrics['best_score']`
  (else `metrics['mean_iu']`).

  A state with a non-empty `ema` field (the moving average of its variables) has it written as the
  step's ema_variables/ item, which inference reads; `loop_state` (JSON) is what the loop needs
  besides the state to resume exactly.

  Saves are synchronous by default (`save` returns once the step is committed on disk); with
  `async_save=True` they finish in the background and `wait_until_finished` (or the next `save`)
  blocks until then. Either way a step appears on disk only when complete.
  """

  def __init__(self, directory, *, max_to_keep: int = 2, async_save: bool = False):
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = _manager(self.directory, max_to_keep=max_to_keep, async_save=async_save)

  def save(self, step: int, state: Any, *, metadata: dict, data_state: dict | None = None,
           metrics: dict | None = None, loop_state: dict | None = None) -> None:
    """Saves `state` at `step`. A step already on disk is left as it is (resumed runs)."""
    step = int(step)
    if step in self._manager.all_steps():
      _log.info('checkpoint step %d already exists in %s; not saving again', step, self.directory)
      return
    variables, rest = trees.split_variables(trees.storable(state))
    ema = rest.pop(EMA_FIELD, None) if isinstance(rest, dict) else None
    items = {TRAIN_STATE: ocp.args.StandardSave(rest),
             METADATA: ocp.args.JsonSave(trees.to_json(dict(metadata)))}
    if variables is not None:
      items[VARIABLES] = ocp.args.StandardSave(variables)
    if _has_leaves(ema):
      items[EMA_VARIABLES] = ocp.args.StandardSave(ema)
    if data_state is not None:
      items[DATA_STATE] = ocp.args.JsonSave(trees.to_json(data_state))
    if loop_state is not None:
      items[LOOP_STATE] = ocp.args.JsonSave(trees.to_json(loop_state))
    metrics = _sanitize_metrics(metrics)
    self._manager.save(
        step, args=ocp.args.Composite(**items), force=True,
        # Only evaluated steps carry metrics: they compete for "best"; others are just "latest".
        metrics=metrics if _has_best_metric(metrics) else None,
        custom_metadata={'metrics': metrics} if metrics is not None else None)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the highest mean IU (None when no kept step was evaluated)."""
    steps = [s for s in self._manager.all_steps() if self._manager.metrics(s) is not None]
    return self._manager.best_step() if steps else None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    return self._manager.metrics(step)

  def has_ema(self, step: int) -> bool:
    """Whether `step` holds the moving average of the weights (a run with config.ema_decay > 0)."""
    return EMA_VARIABLES in _step_items(self.directory, int(step))

  def loop_state(self, step: int) -> dict | None:
    """The `loop_state` saved with `step` (None when none was)."""
    self.wait_until_finished()
    if LOOP_STATE not in _step_items(self.directory, int(step)):
      return None
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(**{LOOP_STATE: ocp.args.JsonRestore()}))
    return trees.from_json(dict(restored[LOOP_STATE]))

  def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict | None, dict]:
    """(state, data_state, metadata) at `step` (default: latest), shaped like `target_state`.

    The moving average is read when the target has one (an error when the step holds none) and
    left on disk otherwise; checkpoints written before the state had an `ema` field restore into
    a target whose `ema` is empty."""
    self.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'no checkpoint to restore in {self.directory}')
    step = int(step)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory}; '
                              f'available: {self.all_steps()}')
    present = _step_items(self.directory, step)
    target_sd = trees.storable(target_state)
    target_vars, target_rest = trees.split_variables(target_sd)
    target_ema = target_rest.pop(EMA_FIELD, None) if isinstance(target_rest, dict) else None
    items = {TRAIN_STATE: ocp.args.StandardRestore(trees.abstract(target_rest)),
             METADATA: ocp.args.JsonRestore()}
    if target_vars is not None:
      if VARIABLES not in present:
        raise ValueError(f'checkpoint {self.directory}/{step} holds no variables')
      items[VARIABLES] = ocp.args.StandardRestore(trees.abstract(target_vars))
    if _has_leaves(target_ema):
      if EMA_VARIABLES not in present:
        raise ValueError(f'checkpoint {self.directory}/{step} holds no moving average of the '
                         f'weights (ema_variables)')
      items[EMA_VARIABLES] = ocp.args.StandardRestore(trees.abstract(target_ema))
    if DATA_STATE in present:
      items[DATA_STATE] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state_dict = restored[TRAIN_STATE]
    if target_vars is not None:
      state_dict = {**state_dict, **restored[VARIABLES]}
    if target_ema is not None:
      state_dict = {**state_dict,
                    EMA_FIELD: restored[EMA_VARIABLES] if EMA_VARIABLES in items else target_ema}
    if target_vars is not None or target_ema is not None:
      state_dict = {k: state_dict[k] for k in target_sd}  # the target's key order
    state = flax.serialization.from_state_dict(target_state, state_dict)
    state = jax.tree.map(
        lambda t, x: (jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
                      if trees.is_prng_key(t) else x),
        target_state, state)
    data_state = trees.from_json(restored[DATA_STATE]) if DATA_STATE in items else None
    return state, data_state, dict(restored[METADATA])

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------------------------------
# Inference


def save_inference(directory, variables: dict, metadata: dict, *, overwrite: bool = False) -> None:
  """Writes `variables` ({'params', maybe 'batch_stats'}) and `metadata` as a checkpoint directory.

  `metadata` must name the model (`arch`, and `num_classes`, `width`, `learnable_upsampling` when
  not the defaults) so that `load_inference` can rebuild it.
  """
  directory = os.path.abspath(os.fspath(directory))
  if 'arch' not in metadata:
    raise ValueError('metadata must contain "arch" (plus num_classes, width, ...) to rebuild the '
                     'model')
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f'{directory} is a file')
  if os.path.isdir(directory) and os.listdir(directory):
    if not overwrite:
      raise FileExistsError(f'{directory} is not empty; pass overwrite=True to replace it')
    if not is_checkpoint_dir(directory):
      raise FileExistsError(f'{directory} holds files that are not an fcn_jax checkpoint; not '
                            f'replacing it (overwrite only replaces a checkpoint directory)')
    import shutil
    shutil.rmtree(directory)
  variables = {k: v for k, v in flax.serialization.to_state_dict(variables).items()
               if k in trees.VARIABLE_COLLECTIONS and jax.tree.leaves(v)}
  if 'params' not in variables:
    raise ValueError('variables must contain "params"')
  manager = _manager(directory, max_to_keep=1)
  try:
    manager.save(0, force=True, args=ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardSave(variables),
        METADATA: ocp.args.JsonSave(trees.to_json(dict(metadata)))}))
    manager.wait_until_finished()
  finally:
    manager.close()


def _resolve(directory, which: str) -> tuple[str, int]:
  """(manager directory, step) for `which` in 'best' | 'latest' | a step number.

  `directory` may also be a step directory itself (`run/1200`).
  """
  directory = resolve_directory(directory)
  if _is_step_dir(directory):
    return os.path.dirname(directory), int(os.path.basename(directory))
  manager = _manager(directory, max_to_keep=None, read_only=True)
  try:
    steps = list(manager.all_steps())
    if not steps:
      raise CheckpointNotFoundError(f'no checkpoint in {directory}')
    if which == 'latest':
      step = manager.latest_step()
    elif which == 'best':
      evaluated = [s for s in steps if manager.metrics(s) is not None]
      step = manager.best_step() if evaluated else manager.latest_step()
    elif str(which).isdigit():
      step = int(which)
      if step not in steps:
        raise CheckpointNotFoundError(f'no checkpoint for step {step} in {directory}; available: '
                                f'{sorted(steps)}')
    else:
      raise UserError(f"which must be 'best', 'latest' or a step number, got {which!r}")
  finally:
    manager.close()
  return directory, int(step)


def resolve_step(directory, which: str = 'best') -> tuple[str, int]:
  """(checkpoint-manager directory, step) that `which` names in `directory` (see load_inference)."""
  return _resolve(directory, which)


def _read_json_item(directory: str, step: int, item: str) -> dict:
  manager = _manager(directory, max_to_keep=None, read_only=True)
  try:
    return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
  finally:
    manager.close()


def read_metadata(directory, which: str = 'best') -> dict:
  """The metadata stored with the best (else latest) checkpoint of `directory`."""
  root, step = _resolve(directory, which)
  if METADATA not in _step_items(root, step):
    raise ValueError(f'checkpoint {os.path.join(root, str(step))} has no metadata: it cannot be '
                     'used without knowing the model (arch, num_classes, width, ...)')
  return trees.from_json(dict(_read_json_item(root, step, METADATA)))


def model_metadata(model_config: dict) -> dict:
  """The checkpoint metadata describing a model: `model` (the model config, exactly the keyword
  arguments of models.build, the one source build_from_metadata reads) and read-only summaries of
  it for people and the resume checks (arch, num_classes, width, ...)."""
  model_config = {k: (v.item() if isinstance(v, np.generic) else v)
                  for k, v in model_config.items()}
  model_config['dtype'] = jnp.dtype(model_config.get('dtype') or 'float32').name
  spec = models.ARCHS[model_config['arch']]
  counts = model_config.get('num_classes')
  if isinstance(counts, (list, tuple)):
    counts = [int(c) for c in counts]
    model_config['num_classes'] = counts
  return {'model': model_config,
          **{k: v for k, v in model_config.items() if k in _MODEL_SUMMARY},
          'num_classes': counts,
          'head_names': [h.name for h in spec.heads],
          'input_channels': int(model_config.get('in_channels') or spec.input_channels)}


_MODEL_SUMMARY = ('arch', 'width', 'learnable_upsampling', 'skip_scaling', 'backbone')


def model_config_of(metadata: dict) -> dict:
  """The model config of checkpoint metadata (older checkpoints: from their top-level fields)."""
  if 'model' in metadata:
    return dict(metadata['model'])
  if 'arch' not in metadata:
    raise ValueError(f'metadata has no "model" or "arch": {sorted(metadata)}')
  legacy = ('arch', 'num_classes', 'width', 'learnable_upsampling', 'skip_scaling', 'dtype')
  return {k: metadata[k] for k in legacy if metadata.get(k) is not None}


def build_from_metadata(metadata: dict):
  """The flax module described by checkpoint metadata."""
  return tune.tuned(models.build_from_config(model_config_of(metadata)))


def load_inference(directory, which: str = 'best', weights: str = 'auto'):
  """(model, variables, metadata) from a training run or a `save_inference` directory.

  `which`: 'best' (the highest score the run chose, mean IU by default; the latest when nothing
  was evaluated), 'latest' or a step. `weights`: 'auto' reads the moving average of the weights
  when the step holds one (a run with config.ema_decay > 0: its metadata says
  inference_weights='ema') and the trained weights otherwise; 'ema' insists on the average;
  'params' reads the trained weights. Only the variables are read (no optimiser state, no
  training configuration).
  """
  if weights not in WEIGHTS:
    raise UserError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
  root, step = _resolve(directory, which)
  metadata = read_metadata(os.path.join(root, str(step)))
  model = build_from_metadata(metadata)
  present = _step_items(root, step)
  item = EMA_VARIABLES if weights != 'params' and EMA_VARIABLES in present else VARIABLES
  if weights == 'ema' and item != EMA_VARIABLES:
    raise UserError(f'checkpoint {os.path.join(root, str(step))} holds no moving average of the '
                    f'weights (trained with config.ema_decay=0); use weights="params"')
  if item not in present:
    raise ValueError(f'checkpoint {os.path.join(root, str(step))} holds no model variables')
  if item == EMA_VARIABLES:
    _log.info('%s: reading the moving average of the weights (ema_decay %s)',
              os.path.join(root, str(step)), metadata.get('ema_decay'))
  manager = _manager(root, max_to_keep=None, read_only=True)
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))
  finally:
    manager.close()
  variables = {k: v for k, v in restored[item].items()}
  variables = jax.tree.map(jnp.asarray, variables)
  return model, variables, metadata
