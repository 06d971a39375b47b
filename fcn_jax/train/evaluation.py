"""Whole-split evaluation: one confusion matrix per head, accumulated on device across devices and
hosts; the examples figures show."""

from __future__ import annotations

from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from fcn_jax import data as data_lib
from fcn_jax import distributed
from fcn_jax import metrics as metrics_lib
from fcn_jax.parallel import host_copy, make_mesh, replicate, shard_batch
from fcn_jax.train.step import compile_eval_step, label_key

SCORE_KEYS = ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu')


def evaluate(model: nn.Module, variables: dict, batches: Iterable[dict], *,
             num_classes: int | None = None,
             mesh: Mesh | None = None, keep_predictions: int = 0, progress: bool = False,
             exclude: dict[str, tuple[int, ...]] | None = None) -> tuple[dict, list]:
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
  steps: dict[bool, Callable] = {}
  kept = []
  iterator = batches
  if progress:
    iterator = tqdm(batches, desc='eval', unit='batch', leave=False)
  for batch in iterator:
    n = batch['image'].shape[0]
    sharded = n % mesh.devices.size == 0
    if sharded not in steps:
      steps[sharded] = compile_eval_step(model, mesh, batch_sharded=sharded)
    keys = ['image'] + [label_key(model, h) for h in model.head_names]
    device_batch = (shard_batch({k: batch[k] for k in keys}, mesh) if sharded
                    else {k: replicate(np.asarray(batch[k]), mesh) for k in keys})
    confusion, predictions = steps[sharded](variables, device_batch, confusion)
    if len(kept) < keep_predictions:
      local_preds = np.asarray(predictions)
      names = batch.get('file_name', [''] * len(local_preds))
      for i in range(min(len(local_preds), keep_predictions - len(kept))):
        first_labels = batch[label_key(model, model.head_names[0])]
        if (first_labels[i] != 255).any():
          kept.append((str(names[i]), batch['image'][i], first_labels[i], local_preds[i]))
  exclude = exclude or {}
  by_head = {h: metrics_lib.segmentation_scores(  # in the model's head order (jax sorts dict keys)
      distributed.sum_across_processes(np.asarray(jax.device_get(confusion[h]))),
      exclude.get(h, ()))
      for h in model.head_names}
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
