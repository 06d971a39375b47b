"""The data a run reads: its TFDS sources (prepared on first use), the training iterator of this
process's shard, and the evaluation batches."""

from __future__ import annotations

from typing import Iterable

import jax
import ml_collections

from fcn_jax import data as data_lib
from fcn_jax import distributed, models, paths
from fcn_jax.data import pipeline


def data_sources(config: ml_collections.ConfigDict):
  """(train source, eval source) through our TFDS builders (prepared on first use)."""
  d = config.dataset
  kwargs = dict(data_dir=d.data_dir or str(paths.cache_dir() / 'tfds'),
                manual_dir=d.manual_dir or None, download=d.download, **data_lib.source_options(d))
  eval_name, eval_split = data_lib.eval_dataset(d.name, d.eval_name, d.eval_split)

  def sources():
    train = data_lib.get_data_source(d.name, d.train_split, **kwargs)
    evals = data_lib.get_data_source(eval_name, eval_split, **kwargs)
    return train, evals
  # Preparation (first use) by process 0 first: processes sharing a filesystem must not race.
  return distributed.main_process_first(sources, 'fcn_jax.data_sources')

def train_iterator(config: ml_collections.ConfigDict, source, *, batch_size: int, shard_index: int,
                   shard_count: int):
  """This process's training batches (`batch_size` of the global config.batch_size images): a grain
  iterator over its shard of the examples, with get_state() / set_state()."""
  modalities, heads = input_layout(config)
  loader = pipeline.train_loader(
      source, batch_size=batch_size, crop_size=config.crop_size,
      preprocessing=config.preprocessing, seed=config.seed,
      scale_range=tuple(config.scale_range) if config.scale_range else None, flip=config.flip,
      worker_count=config.data_workers, shard_index=shard_index, shard_count=shard_count,
      modalities=modalities, heads=heads, color_jitter=config.get('color_jitter', 0.0))
  return iter(loader)

def input_layout(config: ml_collections.ConfigDict) -> tuple[list | None, list[str]]:
  """(modalities, head names) of the configured net: config.modalities [(name, preprocessing)]
  for a net with several inputs (None: the colour image with config.preprocessing), and the
  arch's heads. The pipelines put every modality and label map through the same crop and flip."""
  modalities = [tuple(m) for m in config.get('modalities', ())] or None
  return modalities, [h.name for h in models.ARCHS[config.arch].heads]

def eval_batches(config: ml_collections.ConfigDict, source) -> Iterable[dict]:
  modalities, heads = input_layout(config)
  return pipeline.eval_batches(
      source, preprocessing=config.preprocessing, batch_size=config.eval_batch_size,
      pad_to=config.eval_pad_to or None, shard_index=jax.process_index(),
      shard_count=jax.process_count(), modalities=modalities, heads=heads)
