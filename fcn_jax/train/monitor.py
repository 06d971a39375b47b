"""What the loop does with evaluation scores: the one score that ranks checkpoints ("best") and the
one that early stopping watches, each a metric of a head, of the weights inference uses (the moving
average when config.ema_decay > 0)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from fcn_jax import checkpoint as ckpt_lib


def score_of(scores: dict, metric: str, head: str | None = None) -> float:
  """`metric` of `head` in evaluation scores (`evaluate`'s: the first head's at the top, every
  head's under 'heads' for several heads); None or the first head: the top level. NaN for an
  undefined score (e.g. mean IU with no class present)."""
  chosen = scores
  if head and 'heads' in scores:
    chosen = scores['heads'][head]
  value = chosen.get(metric)
  return math.nan if value is None else float(value)


def weights_name(config: ml_collections.ConfigDict) -> str:
  """'ema' when the run keeps a moving average of the weights (and uses it), else 'params'."""
  return 'ema' if config.get('ema_decay', 0.0) else 'params'


@dataclasses.dataclass(frozen=True)
class Choice:
  """A score of the evaluation: `metric` of `head` ('' = the first head) of `weights`."""
  metric: str
  head: str
  weights: str

  def value(self, scores: dict) -> float:
    return score_of(scores, self.metric, self.head)

  def describe(self, first_head: str) -> str:
    head = f' of the {self.head} head' if self.head and self.head != first_head else ''
    weights = ' (EMA weights)' if self.weights == 'ema' else ''
    return f'{self.metric}{head}{weights}'


def best_choice(config: ml_collections.ConfigDict) -> Choice:
  """What picks the "best" checkpoint: config.best_metric of config.best_head."""
  return Choice(config.get('best_metric', 'mean_iu') or 'mean_iu', config.get('best_head', ''),
                weights_name(config))


def best_metrics(scores: dict, choice: Choice, first_head: str) -> dict:
  """The metrics a checkpoint is saved with: the scores plus the value that ranks it
  (checkpoint.BEST_KEY) and what that value is ('best_by')."""
  value = choice.value(scores)
  return {**scores, ckpt_lib.BEST_KEY: None if math.isnan(value) else value,
          'best_by': choice.describe(first_head)}


@dataclasses.dataclass
class EarlyStopping:
  """Stops after `patience` evaluations in a row without a gain of more than `min_delta` over the
  best value so far (every score here grows with quality). Its state is saved in every checkpoint
  (`state`, `restore`), so a resumed run keeps its count."""
  choice: Choice
  patience: int
  min_delta: float = 0.0
  best: float | None = None
  best_step: int | None = None
  waited: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'EarlyStopping | None':
    metric = config.get('early_stopping_metric', '')
    if not metric:
      return None
    return cls(Choice(metric, config.get('best_head', ''), weights_name(config)),
               int(config.early_stopping_patience), float(config.early_stopping_min_delta))

  def update(self, step: int, scores: dict) -> bool:
    """Counts one evaluation; True when the run should stop."""
    value = self.choice.value(scores)
    if math.isfinite(value) and (self.best is None or value > self.best + self.min_delta):
      self.best, self.best_step, self.waited = value, int(step), 0
    else:
      self.waited += 1
    return self.stopped

  @property
  def stopped(self) -> bool:
    return self.waited >= self.patience

  def reason(self, first_head: str) -> str:
    best = ('no finite value yet' if self.best is None
            else f'best {100 * self.best:.2f} at step {self.best_step}')
    return (f'{self.choice.describe(first_head)} has not improved by more than '
            f'{self.min_delta:g} for {self.waited} evaluations (patience '
            f'{self.patience}; {best})')

  def state(self) -> dict:
    return {'metric': self.choice.metric, 'head': self.choice.head,
            'weights': self.choice.weights, 'best': self.best, 'best_step': self.best_step,
            'waited': self.waited}

  def restore(self, saved: dict | None) -> bool:
    """Takes the count of a checkpoint's state when it watched the same score; False (and a fresh
    count) when it watched another or none."""
    if not saved or [saved.get(k) for k in ('metric', 'head', 'weights')] != [
        self.choice.metric, self.choice.head, self.choice.weights]:
      return False
    self.best, self.best_step, self.waited = saved['best'], saved['best_step'], saved['waited']
    return True


def loop_state(early_stopping: EarlyStopping | None) -> dict[str, Any]:
  """What a checkpoint keeps of the loop besides the train state."""
  return {'early_stopping': early_stopping.state() if early_stopping is not None else None}
