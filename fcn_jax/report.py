"""Run outputs: metrics.jsonl (mirrored to the trackers of fcn_jax.tracking), results.json and the
paper's Table 2 in Markdown."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

from fcn_jax import tracking
from fcn_jax.errors import Preempted


def _step_of(line: str) -> float:
  try:
    return float(json.loads(line).get('step', -1))
  except ValueError:
    return math.inf  # a line cut short by a kill: dropped with the records after the checkpoint


SCORE_COLUMNS = (('pixel_acc', 'pixel acc.'), ('mean_acc', 'mean acc.'), ('mean_iu', 'mean IU'),
                 ('fw_iu', 'f.w. IU'))


class MetricWriter:
  """Appends one JSON object per record to metrics.jsonl (the record) and mirrors its scalars to
  the trackers config.tracking picks (fcn_jax.tracking: TensorBoard, MLflow, W&B)."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True,
               resume_step: int | None = None, config: Any = None):
    """resume_step: the checkpoint step a resumed run restarts from; records after it (written by
    the interrupted run past its last checkpoint, and about to be written again) are dropped, so
    that every step appears once. config: the run's (config.tracking picks the trackers, its
    fields are their parameters); None: TensorBoard alone, without parameters."""
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._trackers: list[tracking.Tracker] = []
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if resume_step is not None and self.path.exists():
        self._drop_after(resume_step)
      elif resume_step is None:
        self.set_aside()
      self._trackers = tracking.open_trackers(
          config if config is not None else {'tracking': 'tensorboard'}, self.path.parent,
          resume_step=resume_step)
      if config is not None:
        params = tracking.flat_params(config)
        for tracker in self._trackers:
          tracker.log_params(params)

  def set_aside(self) -> list[pathlib.Path]:
    """A run that starts from step 0 starts a fresh history: metrics.jsonl, tensorboard/ and the
    tracker run ids (tracking.json) of an earlier attempt (one that stopped before its first
    checkpoint) move to <name>.before-<time>."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    moved = []
    for path in (self.path, self.path.parent / 'tensorboard',
                 self.path.parent / tracking.STATE_FILE):
      if path.exists():
        target = path.with_name(f'{path.stem}.before-{stamp}{path.suffix}')
        path.rename(target)
        moved.append(target)
    if moved:
      print(f'starting from step 0: the earlier history is kept aside as '
            f'{", ".join(p.name for p in moved)}', flush=True)
    return moved

  def _drop_after(self, step: int) -> None:
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
      tmp = self.path.with_name(self.path.name + '.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(self.path)

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'kind': kind, **{k: _jsonable(v) for k, v in values.items()}}
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    numbers = tracking.scalars(values)
    for tracker in self._trackers:
      tracker.log(int(step), kind, numbers)

  def close(self) -> None:
    """Ends the trackers' runs (finished; killed when closed while errors.Preempted propagates,
    failed under another error); later records go to metrics.jsonl alone."""
    error = sys.exc_info()[1]
    status = ('finished' if error is None else
              'killed' if isinstance(error, (Preempted, KeyboardInterrupt)) else 'failed')
    trackers, self._trackers = self._trackers, []
    for tracker in trackers:
      tracker.close(status)


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(v: Any) -> Any:
  if hasattr(v, 'tolist'):
    v = v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, list):
    return [_jsonable(x) for x in v]
  return v


# The paper's rows for the reference recipes (experiments/<name>.py), in percent: NYUDv2 Table 4,
# SIFT Flow Table 5 (semantic scores over the classes present in test; geometric pixel accuracy),
# PASCAL-Context (PAMI, 59-class metrics).
PAPER_ROWS: dict[str, tuple[str, dict[str, float]]] = {
    'nyud_fcn32s_color': ('paper Table 4, FCN-32s RGB', dict(zip(
        ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'), (60.0, 42.2, 29.2, 43.9)))),
    'nyud_fcn32s_color_d': ('paper Table 4, FCN-32s RGB-D', dict(zip(
        ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'), (61.5, 42.4, 30.5, 45.5)))),
    'nyud_fcn32s_hha': ('paper Table 4, FCN-32s HHA', dict(zip(
        ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'), (57.1, 35.2, 24.2, 40.4)))),
    'nyud_fcn32s_color_hha': ('paper Table 4, FCN-32s RGB-HHA', dict(zip(
        ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'), (64.3, 44.9, 32.8, 48.0)))),
    'nyud_fcn16s_color_hha': ('paper Table 4, FCN-16s RGB-HHA', dict(zip(
        ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'), (65.4, 46.1, 34.0, 49.5)))),
    'siftflow_fcn16s': ('paper Table 5, FCN-16s', {
        'pixel_acc': 85.2, 'mean_acc': 51.7, 'mean_iu': 39.5, 'fw_iu': 76.1,
        'geometric_pixel_acc': 94.3}),
    'pascalcontext_fcn8s': ('PAMI, FCN-8s (59 classes)', dict(zip(
        ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu'), (65.9, 46.5, 35.1, 51.0)))),
}


def write_results(workdir: str | pathlib.Path, name: str, scores: Mapping[str, Any],
                  class_names: Sequence[str], extra: Mapping[str, Any] | None = None,
                  notes: Sequence[str] = ()) -> None:
  """results.json (the four scores and per-class IU; every head's for several heads) and
  results.md (Table 2 format, beside the paper's row for the reference recipes; `notes` are
  paragraphs after it)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  record = {'name': name, **{k: _jsonable(scores[k]) for k, _ in SCORE_COLUMNS},
            'per_class_iu': dict(zip(class_names, _jsonable(list(scores['per_class_iu'])))),
            **_jsonable_tree(extra or {})}
  heads = scores.get('heads') or {}
  if heads:
    record['heads'] = {h: {k: _jsonable(v[k]) for k, _ in SCORE_COLUMNS} for h, v in heads.items()}
  (workdir / 'results.json').write_text(json.dumps(record, indent=2) + '\n')
  text = table_markdown([(name, scores)] + paper_rows(name), class_names)
  for head, head_scores in list(heads.items())[1:]:
    text += (f'\n\n{head} head: pixel acc. {100 * head_scores["pixel_acc"]:.1f}'
             + ''.join(f' (paper {v["geometric_pixel_acc"]:.1f})'
                       for _, v in paper_rows(name, raw=True)
                       if head == 'geometric' and 'geometric_pixel_acc' in v))
  absent = absent_classes(scores, class_names)
  if absent:
    text += '\n\n' + absent_note(absent)
  for note in notes:
    text += '\n\n' + note
  (workdir / 'results.md').write_text(text + '\n')


def run_notes(summary: Mapping[str, Any]) -> list[str]:
  """results.md's lines for a training run's summary (loop.Trainer.summary): the weights scored,
  the best checkpoint, an early stop."""
  notes = []
  if summary.get('weights') == 'ema':
    raw = summary.get('raw_weights') or {}
    notes.append(f'Scores of the moving average of the weights (EMA, decay '
                 f'{summary.get("ema_decay")}), the weights inference loads; the trained weights: '
                 + ', '.join(f'{title} {100 * raw[k]:.1f}' for k, title in SCORE_COLUMNS
                             if raw.get(k) is not None) + '.')
  best = summary.get('best_checkpoint')
  if best:
    notes.append(f'Best checkpoint (by {best["by"]}): step {best["step"]}.')
  stopped = summary.get('early_stopping')
  if stopped:
    notes.append(f'Stopped early at step {stopped["step"]}: {stopped["reason"]}.')
  return notes


def _jsonable_tree(v: Any) -> Any:
  if isinstance(v, Mapping):
    return {str(k): _jsonable_tree(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable_tree(x) for x in v]
  return _jsonable(v)


def absent_classes(scores: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
  """The classes with no ground-truth pixel in the evaluated split (their accuracy is undefined)."""
  acc = scores.get('per_class_acc')
  if acc is None:
    return []
  return [str(n) for n, a in zip(class_names, acc) if a is None or not math.isfinite(a)]


def absent_note(absent: Sequence[str]) -> str:
  """Why the mean IU leaves classes out: said wherever a score is shown (a mean over the classes
  present can flatter a setup where a class was never labelled)."""
  return (f'Note: {len(absent)} class(es) have no pixels in this split and are left out of mean '
          f'acc. / mean IU: {", ".join(absent[:10])}{", ..." if len(absent) > 10 else ""}.')


def paper_rows(name: str, raw: bool = False) -> list[tuple[str, dict]]:
  """[(label, scores as fractions)] of the paper's row for experiment `name` (none elsewhere)."""
  name = name.replace('-', '_')  # a reference net's name (siftflow-fcn16s) is its recipe's
  if name not in PAPER_ROWS:
    return []
  label, values = PAPER_ROWS[name]
  if raw:
    return [(label, values)]
  return [(label, {k: v / 100 for k, v in values.items()})]


def table_markdown(rows: Sequence[tuple[str, Mapping[str, Any]]],
                   class_names: Sequence[str] | None = None) -> str:
  """The paper's Table 2: net | pixel acc. | mean acc. | mean IU | f.w. IU, in percent."""
  lines = ['| net | ' + ' | '.join(title for _, title in SCORE_COLUMNS) + ' |',
           '|---|' + '---:|' * len(SCORE_COLUMNS)]
  for name, scores in rows:
    lines.append(f'| {name} | '
                 + ' | '.join(f'{100 * scores[k]:.1f}' for k, _ in SCORE_COLUMNS) + ' |')
  measured = [(name, scores) for name, scores in rows
              if 'per_class_iu' in scores]  # not the paper's
  if class_names is not None:
    lines += ['', '| class | ' + ' | '.join(name for name, _ in measured) + ' |',
              '|---|' + '---:|' * len(measured)]
    for i, cls in enumerate(class_names):
      cells = []
      for _, scores in measured:
        iu = scores['per_class_iu'][i]
        cells.append('n/a' if iu is None or (isinstance(iu, float) and math.isnan(iu))
                     else f'{100 * iu:.1f}')
      lines.append(f'| {cls} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
