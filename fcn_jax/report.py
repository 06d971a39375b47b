"""Run outputs: metrics.jsonl + TensorBoard events, results.json and the paper's Table 2 in Markdown."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Sequence

def _step_of(line: str) -> float:
  try:
    return float(json.loads(line).get('step', -1))
  except ValueError:
    return math.inf  # a line cut short by a kill: dropped with the records after the checkpoint


SCORE_COLUMNS = (('pixel_acc', 'pixel acc.'), ('mean_acc', 'mean acc.'), ('mean_iu', 'mean IU'),
                 ('fw_iu', 'f.w. IU'))


class MetricWriter:
  """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, resume_step: int | None = None):
    """resume_step: the checkpoint step a resumed run restarts from; records after it (written by
    the interrupted run past its last checkpoint, and about to be written again) are dropped, so
    that every step appears once."""
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if resume_step is not None and self.path.exists():
        self._drop_after(resume_step)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))
      except ImportError:  # TensorBoard is a convenience; metrics.jsonl is the record.
        self._tb = None

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
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f'{kind}/{k}', v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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


def write_results(workdir: str | pathlib.Path, name: str, scores: Mapping[str, Any],
                  class_names: Sequence[str], extra: Mapping[str, Any] | None = None) -> None:
  """results.json (the four scores and per-class IU) and results.md (Table 2 format)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  record = {'name': name, **{k: _jsonable(scores[k]) for k, _ in SCORE_COLUMNS},
            'per_class_iu': dict(zip(class_names, _jsonable(list(scores['per_class_iu'])))),
            **(extra or {})}
  (workdir / 'results.json').write_text(json.dumps(record, indent=2) + '\n')
  (workdir / 'results.md').write_text(table_markdown([(name, scores)], class_names) + '\n')


def table_markdown(rows: Sequence[tuple[str, Mapping[str, Any]]],
                   class_names: Sequence[str] | None = None) -> str:
  """The paper's Table 2: net | pixel acc. | mean acc. | mean IU | f.w. IU, in percent."""
  lines = ['| net | ' + ' | '.join(title for _, title in SCORE_COLUMNS) + ' |',
           '|---|' + '---:|' * len(SCORE_COLUMNS)]
  for name, scores in rows:
    lines.append(f'| {name} | ' + ' | '.join(f'{100 * scores[k]:.1f}' for k, _ in SCORE_COLUMNS) + ' |')
  if class_names is not None:
    lines += ['', '| class | ' + ' | '.join(name for name, _ in rows) + ' |',
              '|---|' + '---:|' * len(rows)]
    for i, cls in enumerate(class_names):
      cells = []
      for _, scores in rows:
        iu = scores['per_class_iu'][i]
        cells.append('n/a' if iu is None or (isinstance(iu, float) and math.isnan(iu)) else f'{100 * iu:.1f}')
      lines.append(f'| {cls} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
