"""The training loop: resolve the run, then steps with periodic actions (log, evaluate, checkpoint,
preemption); SIGTERM / Ctrl-C save and stop, the same command resumes."""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fcn_jax import checkpoint as ckpt_lib
from fcn_jax import config_checks, distributed, report
from fcn_jax import progress as progress_lib
from fcn_jax import workdir as workdir_lib
from fcn_jax.distributed import log
from fcn_jax.errors import Preempted, UserError
from fcn_jax.parallel import (PREFETCH, DevicePrefetcher, gather_data_state, host_copy,
                              local_data_state, make_mesh, replicate)
from fcn_jax.train.artifacts import final_report
from fcn_jax.train.evaluation import SCORE_KEYS, evaluate
from fcn_jax.train.inputs import eval_batches, train_iterator
from fcn_jax.train.monitor import Choice, EarlyStopping, best_choice, best_metrics, loop_state
from fcn_jax.train.setup import RunSpec, resolve_run, start_summary
from fcn_jax.train.step import (compile_train_step, create_train_state, model_from_config,
                                optimizer_from_config)
from fcn_jax.train.transfer import initial_variables


class NonFiniteLossError(RuntimeError):
  pass


class StopRequest:
  """SIGTERM / SIGINT turned into a request that the loop honours at the next optimiser update:
  save a checkpoint there and exit, so the same command resumes.

  One process: our own handlers (a second Ctrl-C interrupts at once). Several processes: SIGTERM is
  left to jax's preemption service, and all processes agree on the step to save at through
  `multihost_utils.reached_preemption_sync_point`, called at every update.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict = {}

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is not threading.main_thread():
      return self
    names = ('SIGTERM', 'SIGINT') if jax.process_count() == 1 else ()
    for name in names:
      signum = getattr(signal, name)
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:  # a second Ctrl-C does not wait for the checkpoint
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def reached(self, update: int) -> bool:
    """True at the update where every process should save and stop."""
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(update):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None

def _take_workdir_lock(workdir: pathlib.Path) -> workdir_lib.WorkdirLock | None:
  """Process 0 takes the workdir's lock; every process stops if it could not."""
  lock, error = None, b''
  if jax.process_index() == 0:
    lock = workdir_lib.WorkdirLock(workdir, log=log)
    try:
      lock.acquire()
    except workdir_lib.WorkdirBusyError as e:
      error, lock = str(e).encode(), None
  error = distributed.allgather_bytes(error)[0]
  if error:
    raise workdir_lib.WorkdirBusyError(error.decode())
  return lock

def _write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                  resumed_at: int | None) -> None:
  """config.json of this run; a resumed run with a changed config keeps the previous one beside
  it."""
  path = workdir / 'config.json'
  text = config.to_json_best_effort(indent=2) + '\n'
  if path.exists() and resumed_at is not None and path.read_text() != text:
    path.replace(workdir / f'config.before_step{resumed_at}.json')
  path.write_text(text)

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains `config.arch`, evaluating on a schedule; resumes from the latest checkpoint in workdir.

  Every count (num_train_steps, log_every, eval_every, checkpoint_every, the checkpoint and metric
  steps) is in optimiser updates; with accumulate_steps k an update is k jit micro-steps.
  Returns the final evaluation scores: those of the moving average of the weights when
  config.ema_decay > 0 (the trained weights' under 'raw_weights'), as in results.json.
  config.early_stopping_metric stops the run before num_train_steps when that score stops
  improving (final checkpoint, results and figures at that step). Writes metrics.jsonl,
  TensorBoard events, checkpoints/, results.json, results.md and figures/ in workdir. SIGTERM or
  Ctrl-C saves a checkpoint at the next update and raises errors.Preempted; the same call resumes
  from it. The config is checked against the data before the first step; a run refused there
  leaves nothing behind in workdir.
  """

  config_checks.check_train_config(config)
  workdir = pathlib.Path(workdir).expanduser()
  mesh = make_mesh()
  if config.batch_size % mesh.devices.size or config.batch_size % jax.process_count():
    raise UserError(f'config.batch_size={config.batch_size} must be a multiple of the '
                    f'{mesh.devices.size} devices (the batch is split across them)')
  created = [p for p in (workdir, *workdir.parents) if not p.exists()]
  lock = _take_workdir_lock(workdir)
  started = []
  try:
    return _train_and_evaluate(config.copy_and_resolve_references(), workdir, mesh, started)
  finally:
    if lock is not None:
      lock.release()
    if not started and jax.process_index() == 0:
      for path in created:  # refused before the first step: remove the folders it made, if empty
        try:
          path.rmdir()
        except OSError:
          break

def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: Mesh,
                        started: list) -> dict:
  run = resolve_run(config, workdir)
  log(start_summary(config, run, workdir))
  started.append(True)  # from here on a refusal is not "before the first step"
  if jax.process_index() == 0:
    _write_config(workdir, config, run.latest)
  trainer = Trainer.create(config, run, workdir, mesh)
  scores = trainer.train()
  if jax.process_index() == 0:
    final_report(config, run, trainer.model, host_copy(trainer.state.inference_variables()),
                 scores, workdir, trainer.final_step, extra=trainer.summary(scores))
  trainer.checkpointer.close()
  return scores


@dataclasses.dataclass
class Trainer:
  """The loop's state and its periodic actions (log, evaluate, checkpoint, preemption)."""
  config: ml_collections.ConfigDict
  run: RunSpec
  workdir: pathlib.Path
  mesh: Mesh
  model: Any
  state: Any
  step_fn: Any
  batches: DevicePrefetcher
  checkpointer: ckpt_lib.Checkpointer
  writer: report.MetricWriter
  progress: progress_lib.Progress
  meter: 'StepMeter'
  start: int
  best: Choice  # what ranks the checkpoints
  early_stopping: EarlyStopping | None = None
  final_step: int = 0  # set by train: num_train_steps, or where it stopped early
  stop_reason: str = ''

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, run: RunSpec, workdir: pathlib.Path,
             mesh: Mesh) -> 'Trainer':
    """The model, its state (initialised, or restored from run.latest) and the data iterator."""
    is_main = jax.process_index() == 0
    checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints',
                                         max_to_keep=config.keep_checkpoints)
    model = model_from_config(config)
    init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    init_config = config
    if run.latest is not None:
      init_config = config.copy_and_resolve_references()
      init_config.init_from = ''  # the checkpoint has everything
    variables = initial_variables(model, init_config, init_rng, log=log)
    tx = optimizer_from_config(config, model, variables['params'])
    ema_decay = float(config.get('ema_decay', 0.0) or 0.0)
    state = create_train_state(model, tx, variables, state_rng, ema=ema_decay > 0)
    best, early_stopping = best_choice(config), EarlyStopping.from_config(config)
    # Each process reads only its shard and feeds its slice of every global batch.
    train_iter = train_iterator(config, run.train_source,
                                batch_size=config.batch_size // jax.process_count(),
                                shard_index=jax.process_index(), shard_count=jax.process_count())
    if run.latest is not None:
      state = _restore(checkpointer, state, run.latest, train_iter, workdir)
      _resume_selection(checkpointer, run.latest, best, early_stopping, model.head_names[0])
    state = replicate(state, mesh)
    step_fn = compile_train_step(model, tx, mesh, normalize_loss=config.loss_normalize,
                                 loss=config.get('loss', 'ce'), class_weights=run.class_weights,
                                 ema_decay=ema_decay, accumulate_steps=config.accumulate_steps,
                                 aux_weight=config.get('aux_loss_weight', 0.5))
    writer = report.MetricWriter(workdir, enabled=is_main, resume_step=run.latest, config=config)
    start = int(jax.device_get(state.step)) // config.accumulate_steps
    progress = progress_lib.Progress(config.num_train_steps, start, desc=config.arch,
                                     enabled=is_main, log=log)
    return cls(config, run, workdir, mesh, model, state, step_fn,
               DevicePrefetcher(train_iter, mesh, size=PREFETCH), checkpointer, writer, progress,
               StepMeter(writer, progress, config.batch_size, workdir), start, best,
               early_stopping)

  def evaluate(self, step: int) -> dict:
    """The scores of the weights inference uses: with an EMA, the average's (metrics.jsonl kind
    'eval_ema'), the trained weights' (kind 'eval') under 'raw_weights'."""
    self.meter.flush(step)
    raw = self._evaluate(step, self.state.variables(), 'eval', '')
    if not self.state.ema:
      return raw
    return {**self._evaluate(step, self.state.ema, 'eval_ema', ' (EMA weights)'),
            'raw_weights': raw}

  def _evaluate(self, step: int, variables: dict, kind: str, label: str) -> dict:
    scores, _ = evaluate(self.model, variables, eval_batches(self.config, self.run.eval_source),
                         mesh=self.mesh, exclude=self.run.eval_exclude)
    first_head = self.model.head_names[0]
    others = {h: v for h, v in scores.get('heads', {}).items() if h != first_head}
    self.writer.write(step, kind, {k: scores[k] for k in SCORE_KEYS} | {
        f'{h}/{k}': v[k] for h, v in others.items() for k in SCORE_KEYS})
    log(f'step {step}: {self.run.eval_split}{label}: '
        + ', '.join(f'{k} {100 * scores[k]:.2f}' for k in SCORE_KEYS)
        + ''.join(f'; {h} pixel_acc {100 * v["pixel_acc"]:.2f}' for h, v in others.items()))
    return scores

  def save(self, step: int, scores: dict | None) -> None:
    self.meter.flush(step)  # never checkpoint a state that followed a non-finite loss
    metrics = None if scores is None else best_metrics(scores, self.best, self.model.head_names[0])
    # Every process calls save (orbax synchronises them); host arrays are written by process 0.
    self.checkpointer.save(step, host_copy(self.state), metadata=self.run.metadata,
                           data_state=gather_data_state(self.batches.consumed_state),
                           metrics=metrics, loop_state=loop_state(self.early_stopping))

  def summary(self, scores: dict) -> dict:
    """What results.json says besides the scores: which weights, the best checkpoint, why the run
    stopped."""
    first = self.model.head_names[0]
    out = {'weights': 'ema' if self.state.ema else 'params'}
    if self.state.ema:
      out['ema_decay'] = float(self.config.get('ema_decay', 0.0))
      raw = scores.get('raw_weights') or {}
      out['raw_weights'] = {k: raw[k] for k in SCORE_KEYS if k in raw}
    best_step = self.checkpointer.best_step()
    if best_step is not None:
      out['best_checkpoint'] = {'step': best_step, 'by': self.best.describe(first)}
    if self.stop_reason:
      out['early_stopping'] = {'step': self.final_step, 'reason': self.stop_reason}
    return out

  def train(self) -> dict:
    """Steps to config.num_train_steps; returns the last evaluation's scores."""
    c, k, total = self.config, self.config.accumulate_steps, self.config.num_train_steps
    early, first = self.early_stopping, self.model.head_names[0]
    self.final_step, end = max(self.start, total), total
    if self.start > total:
      log(f'{self.workdir} is already at step {self.start}, past config.num_train_steps={total}: '
          f'nothing to train; evaluating step {self.start}')
    elif early is not None and early.stopped and self.start < total:
      self.stop_reason = early.reason(first)
      self.final_step = end = self.start
      log(f'{self.workdir} stopped early at step {self.start}: {self.stop_reason}. Nothing to '
          f'train (raise config.early_stopping_patience, or set config.early_stopping_metric="" '
          f'to go on); evaluating step {self.start}')
    last_scores = None
    try:
      with StopRequest() as stop:
        for micro in range(self.start * k + 1, end * k + 1):
          self.state, m = self.step_fn(self.state, next(self.batches))
          self.meter.add(m)
          if micro % k:
            continue  # mid-accumulation: nothing to log, evaluate or save
          step = micro // k
          self.progress.update(step)
          last = step == total
          if _every(c.log_every, step) or last:
            self.meter.flush(step)
          scores = None
          if _every(c.eval_every, step) or last:
            scores = last_scores = self.evaluate(step)
          stopping = scores is not None and early is not None and early.update(step, scores)
          if _every(c.checkpoint_every, step) or scores is not None or last:
            self.save(step, scores)
          if stopping and not last:
            self.stop_reason, self.final_step = early.reason(first), step
            log(f'early stopping: {self.stop_reason}; stopped at step {step} of {total} (the '
                f'final checkpoint, results and figures are this step\'s; the best checkpoint, '
                f'by {self.best.describe(first)}, is step {self.checkpointer.best_step()})')
            break
          if not last and stop.reached(step):
            self.save(step, None)
            raise Preempted(f'{stop.signal_name}: saved step {step} of {total} to '
                            f'{self.workdir / "checkpoints"}; run the same command to resume.',
                            stop.signal_name)
    except KeyboardInterrupt:
      # A second Ctrl-C (or one with several processes): stop now; the last checkpoint is kept.
      raise Preempted(f'interrupted; the last checkpoint in {self.workdir / "checkpoints"} (step '
                      f'{self.checkpointer.latest_step()}) is kept: run the same command to '
                      f'resume.', 'SIGINT') from None
    finally:
      self.progress.close()
      self.checkpointer.wait_until_finished()
      self.writer.close()
    if last_scores is None:  # resumed a finished (or stopped) run: evaluate the final state
      last_scores = self.evaluate(self.final_step)
    return last_scores


def _every(n: int, step: int) -> bool:
  return n > 0 and step % n == 0

def _restore(checkpointer, state, latest: int, train_iter, workdir: pathlib.Path):
  """The state at step `latest`. config.ema_decay may change across a resume: an average that the
  checkpoint lacks starts from its weights; one this run does not keep is left out."""
  has_ema = checkpointer.has_ema(latest)
  start_ema = bool(state.ema) and not has_ema
  try:
    state, data_state, _ = checkpointer.restore(state.replace(ema={}) if start_ema else state,
                                                latest)
  except (ValueError, KeyError, TypeError) as e:
    raise workdir_lib.IncompatibleResumeError(
        f'the checkpoint {checkpointer.directory}/{latest} does not fit this config '
        f'({type(e).__name__}: {str(e).splitlines()[0][:300]}). Use a new --workdir, or '
        f'--config.init_from={checkpointer.directory} to start from its weights.') from None
  data_state = local_data_state(data_state)
  if data_state is not None:
    train_iter.set_state(data_state)
  log(f'resumed from {workdir / "checkpoints"} at step {latest}')
  if start_ema:
    state = state.replace(ema=jax.tree.map(jnp.copy, state.variables()))
    log(f'the checkpoint at step {latest} holds no moving average of the weights (trained with '
        f'config.ema_decay=0): the average starts from its weights')
  elif has_ema and not state.ema:
    log(f'config.ema_decay=0: the moving average of the weights in the checkpoint at step '
        f'{latest} is not kept; evaluation, results and inference use the trained weights')
  return state

def _resume_selection(checkpointer, latest: int, best: Choice,
                      early_stopping: EarlyStopping | None, first_head: str) -> None:
  """Carries the early-stopping count over from the checkpoint; says when "best" or early stopping
  now watch another score than the run did."""
  saved = (checkpointer.loop_state(latest) or {}).get('early_stopping')
  if early_stopping is not None and not early_stopping.restore(saved):
    log(f'early stopping on {early_stopping.choice.describe(first_head)} counts from step '
        f'{latest} (the checkpoint watched no such score)')
  best_step = checkpointer.best_step()
  if best_step is not None:
    by = (checkpointer.metrics(best_step) or {}).get('best_by', 'mean_iu')
    if by != best.describe(first_head):
      log(f'note: the best checkpoint so far (step {best_step}) was ranked by {by}; from here on '
          f'evaluations are ranked by {best.describe(first_head)}, against its value as it is')

class StepMeter:
  """Sums the on-device step metrics and fetches them only at log time (no sync per step)."""

  def __init__(self, writer, progress, batch_size: int, workdir: pathlib.Path):
    self.writer, self.progress, self.batch_size, self.workdir = (writer, progress, batch_size,
                                                                 workdir)
    self.pending = None
    self.t_last, self.step_last = time.perf_counter(), progress.start

  def add(self, metrics: dict) -> None:
    self.pending = metrics if self.pending is None else jax.tree.map(jnp.add, self.pending, metrics)

  def flush(self, step: int) -> None:
    """Fetches the on-device metrics since the last flush; stops on a non-finite loss."""
    if self.pending is None:
      return
    m = jax.device_get(self.pending)
    self.pending = None
    if int(m['nonfinite']):
      raise NonFiniteLossError(
          f'non-finite loss in {int(m["nonfinite"])} micro-steps of the updates '
          f'{self.step_last + 1}..{step}; stopping. The last good checkpoint in '
          f'{self.workdir / "checkpoints"} is intact. Lower config.optim.learning_rate (a '
          f'normalised-loss lr with config.loss_normalize=False is the usual cause).')
    now = time.perf_counter()
    n = int(m['steps'])
    values = {'loss': float(m['loss']) / n,
              'pixel_acc': float(m['correct_pixels']) / max(int(m['valid_pixels']), 1),
              'images_per_sec': n * self.batch_size / max(now - self.t_last, 1e-9)}
    self.writer.write(step, 'train', values)
    self.progress.metrics(step, values)
    self.t_last, self.step_last = now, step
