"""Experiment trackers behind one interface, picked by `config.tracking` (comma-separated names):
TensorBoard (the default), MLflow (a local file store, no server) and Weights & Biases (offline by
default). metrics.jsonl (report.MetricWriter) stays the record; trackers mirror it.

A resumed run logs into the same MLflow / W&B run: the run ids are kept in WORKDIR/tracking.json,
written as soon as a run is created, so a run killed with SIGKILL is continued too. Trackers only
append: the records an interrupted run wrote past its last checkpoint stay in MLflow / W&B, and the
resumed run logs those steps again (the latest value of a step is the one in metrics.jsonl).
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import pathlib
import sys
import time
import uuid
from typing import Any, Mapping, Protocol

from fcn_jax.errors import UserError

# name -> the module it needs (the `tracking` extra installs mlflow-skinny and wandb).
TRACKERS = {'tensorboard': 'tensorboardX', 'mlflow': 'mlflow', 'wandb': 'wandb'}
INSTALL = "pip install -e '.[tracking]'"
STATE_FILE = 'tracking.json'  # the MLflow / W&B run ids a resumed run continues
WANDB_MODES = ('offline', 'online', 'disabled')
DEFAULT_WANDB_PROJECT = 'fcn_jax'
STATUSES = ('finished', 'killed', 'failed')


class Tracker(Protocol):
  """What MetricWriter mirrors metrics.jsonl to."""

  def log_params(self, params: Mapping[str, Any]) -> None:
    """The run's config, flattened ('optim.learning_rate': 1e-4), once at the start."""

  def log(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
    """One record's finite scalars, as `kind/name` at `step` (optimiser updates)."""

  def close(self, status: str = 'finished') -> None:
    """status: finished | killed (preempted: resumable) | failed."""


def names(spec: str | None) -> tuple[str, ...]:
  """'tensorboard, mlflow' -> ('tensorboard', 'mlflow'); '' -> () (metrics.jsonl only)."""
  return tuple(dict.fromkeys(n.strip().lower() for n in (spec or '').split(',') if n.strip()))


def _installed(module: str) -> bool:
  if module in sys.modules:
    return sys.modules[module] is not None  # None: imports of it are blocked
  return importlib.util.find_spec(module) is not None


def spec_problem(spec: Any) -> str | None:
  """Why config.tracking cannot be used (unknown names, packages not installed), or None; cheap:
  checked with the config, before any data is prepared."""
  if not isinstance(spec, str):
    return f'a comma-separated string of {", ".join(TRACKERS)} (\'\' = metrics.jsonl only)'
  unknown = [n for n in names(spec) if n not in TRACKERS]
  if unknown:
    return (f'unknown tracker {", ".join(map(repr, unknown))}; a comma-separated list of '
            f'{", ".join(TRACKERS)} (\'\' = metrics.jsonl only), e.g. \'tensorboard,mlflow\'')
  missing = [n for n in names(spec) if not _installed(TRACKERS[n])]
  if missing:
    fix = 'pip install tensorboardX' if missing == ['tensorboard'] else INSTALL
    return (f'{", ".join(missing)} needs {", ".join(TRACKERS[n] for n in missing)}, which is not '
            f'installed: {fix} (or leave {", ".join(missing)} out of config.tracking)')
  return None


def flat_params(config: Any) -> dict[str, Any]:
  """A ConfigDict (or nested mapping) as {'dotted.name': value}; sequences and None as text."""
  tree = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  out = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(f'{prefix}{k}.', v)
    elif isinstance(node, (bool, int, float, str)):
      out[prefix[:-1]] = node
    else:
      out[prefix[:-1]] = json.dumps(node, default=str)
  visit('', tree)
  return out


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
  """The finite numbers of a record (what trackers plot); lists, text and NaN are left out."""
  return {k: float(v) for k, v in values.items()
          if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}


def read_state(workdir: str | pathlib.Path) -> dict:
  path = pathlib.Path(workdir) / STATE_FILE
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return {}


def _save_state(workdir: pathlib.Path, name: str, entry: Mapping[str, Any]) -> None:
  """Written before the first record, atomically: a run killed at any point is continued."""
  state = read_state(workdir) | {name: dict(entry)}
  tmp = workdir / (STATE_FILE + '.tmp')
  tmp.write_text(json.dumps(state, indent=2) + '\n')
  tmp.replace(workdir / STATE_FILE)


def open_trackers(config: Any, workdir: str | pathlib.Path, *,
                  resume_step: int | None) -> list[Tracker]:
  """The trackers config.tracking names, started (resume_step None: new MLflow / W&B runs; else
  the runs in WORKDIR/tracking.json are continued). A tracker that cannot start raises UserError."""
  problem = spec_problem(config.get('tracking', 'tensorboard'))
  if problem:
    raise UserError(f'config.tracking={config.get("tracking")!r}: {problem}')
  workdir = pathlib.Path(workdir)
  makers = {'tensorboard': TensorBoardTracker, 'mlflow': MLflowTracker, 'wandb': WandbTracker}
  out = []
  try:
    for name in names(config.get('tracking', 'tensorboard')):
      out.append(makers[name](config, workdir, resume_step))
  except BaseException:
    for tracker in out:
      tracker.close('failed')
    raise
  return out


class TensorBoardTracker:
  """Scalars and the config (as a text table) in WORKDIR/tensorboard (tensorboardX)."""

  def __init__(self, config: Any, workdir: pathlib.Path, resume_step: int | None):
    from tensorboardX import SummaryWriter
    del config
    self._step = resume_step or 0
    self._tb = SummaryWriter(str(workdir / 'tensorboard'))

  def log_params(self, params: Mapping[str, Any]) -> None:
    rows = ''.join(f'| {k} | {v} |\n' for k, v in params.items())
    self._tb.add_text('config', '| field | value |\n|---|---|\n' + rows, self._step)

  def log(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
    for k, v in scalars.items():
      self._tb.add_scalar(f'{kind}/{k}', v, step)
    self._tb.flush()

  def close(self, status: str = 'finished') -> None:
    del status
    self._tb.close()


class MLflowTracker:
  """An MLflow run in experiment config.name: params, then metrics `kind/name` by step, through the
  client API (no global active run). config.tracking_uri '' = file:WORKDIR/mlruns (read it with
  `mlflow ui --backend-store-uri WORKDIR/mlruns`)."""

  def __init__(self, config: Any, workdir: pathlib.Path, resume_step: int | None):
    uri = config.get('tracking_uri', '') or (workdir.resolve() / 'mlruns').as_uri()
    if uri.startswith('file:'):
      # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked for; a
      # tracking_uri such as sqlite:///PATH/mlflow.db (with sqlalchemy) or a server avoids it.
      os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    self._Metric, self._Param, self._Tag = Metric, Param, RunTag
    self._max_len, self._resume_step = MAX_PARAM_VAL_LENGTH, resume_step
    try:
      self.client = MlflowClient(tracking_uri=uri)
      self.run_id = self._continued(workdir, uri, resume_step, MlflowException)
      if self.run_id is None:
        name = config.get('name', '') or config.get('arch', 'fcn_jax')
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=workdir.resolve().name,
                                             tags={'workdir': str(workdir.resolve())}).info.run_id
        _save_state(workdir, 'mlflow', {'run_id': self.run_id, 'tracking_uri': uri})
    except MlflowException as e:
      raise UserError(f'config.tracking_uri={uri!r}: MLflow could not open it ({e}); \'\' keeps '
                      f'runs in WORKDIR/mlruns') from e

  def _continued(self, workdir: pathlib.Path, uri: str, resume_step: int | None,
                 error: type) -> str | None:
    """The run id a resumed run continues (set running again), or None."""
    kept = read_state(workdir).get('mlflow', {})
    if resume_step is None or kept.get('tracking_uri') != uri or not kept.get('run_id'):
      return None
    try:
      self.client.update_run(kept['run_id'], status='RUNNING')
    except error:  # deleted from the store: a new run
      return None
    return kept['run_id']

  def log_params(self, params: Mapping[str, Any]) -> None:
    """MLflow params never change: on resume, a field whose value changed is a tag
    `resumed_at_<step>.<field>` instead."""
    logged = self.client.get_run(self.run_id).data.params
    text = {k: str(v)[:self._max_len] for k, v in params.items()}
    new = [self._Param(k, v) for k, v in text.items() if k not in logged]
    changed = [self._Tag(f'resumed_at_{self._resume_step}.{k}', v) for k, v in text.items()
               if k in logged and logged[k] != v]
    for i in range(0, max(len(new), len(changed)), 100):  # log_batch's limit per call
      self.client.log_batch(self.run_id, params=new[i:i + 100], tags=changed[i:i + 100])

  def log(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
    now = int(time.time() * 1000)
    metrics = [self._Metric(f'{kind}/{k}', v, now, step) for k, v in scalars.items()]
    if metrics:
      self.client.log_batch(self.run_id, metrics=metrics)

  def close(self, status: str = 'finished') -> None:
    self.client.set_terminated(self.run_id, status=status.upper())


class WandbTracker:
  """A W&B run (project config.wandb_project, mode config.wandb_mode: offline by default, synced
  later with `wandb sync WORKDIR/wandb/offline-run-*`), charted against the `step` field."""

  def __init__(self, config: Any, workdir: pathlib.Path, resume_step: int | None):
    import wandb
    mode = config.get('wandb_mode', 'offline') or 'offline'
    project = config.get('wandb_project', '') or DEFAULT_WANDB_PROJECT
    kept = read_state(workdir).get('wandb', {})
    run_id = kept.get('id') if resume_step is not None and kept.get('project') == project else None
    if run_id is None:
      run_id = uuid.uuid4().hex[:12]
      _save_state(workdir, 'wandb', {'id': run_id, 'project': project})
    try:
      # create_new: this run object alone, whatever other run the process has open.
      self.run = wandb.init(project=project, id=run_id, resume='allow', mode=mode, dir=workdir,
                            name=workdir.resolve().name, reinit='create_new',
                            group=config.get('name', '') or config.get('arch', None))
    except wandb.errors.Error as e:
      raise UserError(f'config.wandb_mode={mode!r}: W&B could not start ({e}); \'offline\' needs '
                      f'no account or network') from e
    # The step is a field, not W&B's own counter: a resumed run repeats the steps after its
    # checkpoint, which W&B would drop as out of order.
    self.run.define_metric('step')
    self.run.define_metric('*', step_metric='step')

  def log_params(self, params: Mapping[str, Any]) -> None:
    self.run.config.update(dict(params), allow_val_change=True)

  def log(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
    self.run.log({'step': step, **{f'{kind}/{k}': v for k, v in scalars.items()}})

  def close(self, status: str = 'finished') -> None:
    self.run.finish(exit_code=0 if status == 'finished' else 1)
