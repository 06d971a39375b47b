"""Whole-split evaluation: one confusion matrix per head, accumulated on device across devices and
hosts; per-image scores and the worst images when asked (`ImageAnalysis`); the examples figures
show."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fcn_jax import data as data_lib
from fcn_jax import distributed
from fcn_jax import metrics as metrics_lib
from fcn_jax import progress as progress_lib
from fcn_jax.parallel import host_copy, make_mesh, replicate, shard_batch
from fcn_jax.train.step import compile_eval_step, label_key

SCORE_KEYS = ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu')


@dataclasses.dataclass
class ImageAnalysis:
  """What the split's scores hide, for `evaluate(..., analysis=ImageAnalysis())`:
  experiments.evaluate asks for it; training-time evaluation does not, and pays nothing for it.

  `evaluate` fills in `confusion` ({head: the split's int64 matrix, summed over processes}),
  `images` (one record per image of the first head, in batch order: index, file_name, pixel_acc,
  mean_iu, pixels, correct, classes; padding examples of the last batch are skipped) and
  `worst_images` (the `worst` records of lowest mean IU, lowest first, ties by index, each with its
  (H, W) `label` and `prediction` as evaluated, padding included). Per-image matrices are counted
  on the host with the split matrix's rule, and must add up to it (checked).
  """
  worst: int = 8
  confusion: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
  images: list[dict] = dataclasses.field(default_factory=list, repr=False)
  worst_images: list[dict] = dataclasses.field(default_factory=list, repr=False)
  _summed: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def add(self, labels: np.ndarray, predictions: np.ndarray, names, num_classes: int,
          exclude: tuple[int, ...] = ()) -> None:
    """One batch of the first head: (N, H, W) labels and predictions, N file names."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    confusions = metrics_lib.image_confusions(labels, predictions, num_classes)
    batch_total = confusions.sum(axis=0)
    self._summed = batch_total if self._summed is None else self._summed + batch_total
    per_image = metrics_lib.image_scores(confusions, exclude)
    names = list(names) if names is not None else [''] * len(labels)
    for i in range(len(labels)):
      if not names[i] and per_image['pixels'][i] == 0:
        continue  # a padding example (pipeline.eval_batches fills the last batch with them)
      record = {'index': len(self.images), 'file_name': str(names[i]),
                **{k: v[i].item() for k, v in per_image.items()}}
      self.images.append(record)
      key = (record['mean_iu'], record['index'])
      if self.worst > 0 and np.isfinite(record['mean_iu']) and (
          len(self.worst_images) < self.worst
          or key < (self.worst_images[-1]['mean_iu'], self.worst_images[-1]['index'])):
        self.worst_images.append({**record, 'label': labels[i].copy(),
                                  'prediction': predictions[i].copy()})
        self.worst_images.sort(key=lambda r: (r['mean_iu'], r['index']))
        del self.worst_images[self.worst:]

  def check(self, confusion: np.ndarray) -> None:
    """The images' matrices add up to the split's (this process's share): the same pixels count."""
    summed = np.zeros_like(confusion) if self._summed is None else self._summed
    if not np.array_equal(summed, confusion):
      raise RuntimeError('per-image confusion matrices do not add up to the split\'s '
                         f'({int(summed.sum())} pixels against {int(confusion.sum())})')


def evaluate(model: nn.Module, variables: dict, batches: Iterable[dict], *,
             num_classes: int | None = None,
             mesh: Mesh | None = None, keep_predictions: int = 0, progress: bool = False,
             exclude: dict[str, tuple[int, ...]] | None = None,
             analysis: ImageAnalysis | None = None) -> tuple[dict, list]:
  """Accumulates ONE confusion matrix over the split (on device, across devices and hosts).

  Returns (scores, kept) with kept = up to `keep_predictions` (file_name, image, label, prediction)
  tuples for figures.

  With several processes each one evaluates the batches it was given (its shard of the split) on its
  own devices, with no cross-process step: shards may differ in length and, at native size, in image
  shape. The confusion matrices are then summed over the processes, so every process returns the
  scores of the whole split. `variables` must be replicated (or identical host values everywhere).
  Several heads: the first head's scores, plus 'heads': {head: scores}. `exclude` {head: class
  ids} leaves classes out of a head's mean accuracy and mean IU (the dataset's protocol).
  The class counts are the model's; `num_classes`, if given, must equal its first head's.
  `analysis`: an `ImageAnalysis` to fill in (per-image scores of this process's images, the worst
  ones, the split's matrices); None (training) keeps the loop as it is.
  """
  if num_classes is not None and num_classes != model.num_classes[0]:
    raise ValueError(f'num_classes={num_classes}, but the model predicts {model.num_classes[0]}')
  mesh = mesh or make_mesh()
  if jax.process_count() > 1:
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    variables = host_copy(variables)
    mesh = make_mesh(local)
  variables = replicate(variables, mesh)
  confusion = replicate({h: jnp.zeros((n, n), jnp.int32)
                         for h, n in zip(model.head_names, model.num_classes)}, mesh)
  exclude = exclude or {}
  first = model.head_names[0]
  steps: dict[bool, Callable] = {}
  kept = []
  pending = None  # the previous batch's (labels, predictions, names) for `analysis`
  iterator = batches
  if progress:
    iterator = progress_lib.track(batches, desc='eval', unit='batches')
  for batch in iterator:
    n = batch['image'].shape[0]
    sharded = n % mesh.devices.size == 0
    if sharded not in steps:
      steps[sharded] = compile_eval_step(model, mesh, batch_sharded=sharded)
    keys = ['image'] + [label_key(model, h) for h in model.head_names]
    device_batch = (shard_batch({k: batch[k] for k in keys}, mesh) if sharded
                    else {k: replicate(np.asarray(batch[k]), mesh) for k in keys})
    confusion, predictions = steps[sharded](variables, device_batch, confusion)
    if analysis is not None:  # one batch behind: the device runs this one meanwhile
      if pending is not None:
        analysis.add(*pending, model.num_classes[0], exclude.get(first, ()))
      pending = (batch[label_key(model, first)], predictions, batch.get('file_name'))
    if len(kept) < keep_predictions:
      local_preds = np.asarray(predictions)
      names = batch.get('file_name', [''] * len(local_preds))
      for i in range(min(len(local_preds), keep_predictions - len(kept))):
        first_labels = batch[label_key(model, model.head_names[0])]
        if (first_labels[i] != 255).any():
          kept.append((str(names[i]), batch['image'][i], first_labels[i], local_preds[i]))
  if pending is not None:
    analysis.add(*pending, model.num_classes[0], exclude.get(first, ()))
  own = {h: np.asarray(jax.device_get(confusion[h])) for h in model.head_names}  # this process's
  totals = {h: np.asarray(distributed.sum_across_processes(own[h]), np.int64)
            for h in model.head_names}  # in the model's head order (jax sorts dict keys)
  by_head = {h: metrics_lib.segmentation_scores(totals[h], exclude.get(h, ()))
             for h in model.head_names}
  if analysis is not None:
    analysis.check(own[first].astype(np.int64))
    analysis.confusion = totals
  scores = dict(by_head[model.head_names[0]])
  if len(by_head) > 1:  # the first head's scores drive "best"; every head's are kept
    scores['heads'] = by_head
  return scores, kept

def first_examples(config: ml_collections.ConfigDict, source,
                   count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """The first `count` examples of a split as (file_name, uint8 RGB image, label) for figures."""
  out = []
  for i in range(min(count, len(source))):
    record = source[i]
    image, label = data_lib.decode_example(record)
    out.append((data_lib.file_name(record), image, label))
  return out
