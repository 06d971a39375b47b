"""Training and evaluation: pure jit-compiled steps over a device mesh, and the loop around them.

Data flows one way: TFDS source -> grain loader (per-process shard) -> global sharded batch ->
`train_step` (state replicated, batch sharded on 'data', state donated) -> on-device metrics ->
orbax checkpoint / metrics.jsonl / TensorBoard / figures (process 0 only).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fcn_jax import checkpoint as ckpt_lib
from fcn_jax.cli import plural
from fcn_jax import distributed
from fcn_jax import losses
from fcn_jax import metrics as metrics_lib
from fcn_jax import models
from fcn_jax import optim
from fcn_jax import workdir as workdir_lib
from fcn_jax.errors import Preempted, UserError
from fcn_jax.models import cpu_forms

SCORE_KEYS = ('pixel_acc', 'mean_acc', 'mean_iu', 'fw_iu')


class NonFiniteLossError(RuntimeError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # micro-steps taken (jit calls); updates = step // accumulate_steps
  params: Any
  batch_stats: Any         # frozen BatchNorm statistics (GoogLeNet); {} otherwise
  opt_state: Any
  rng: jax.Array           # base key; dropout uses fold_in(rng, step) so resumed runs replay exactly

  def variables(self, params=None) -> dict:
    v = {'params': self.params if params is None else params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v


# ---------------------------------------------------------------------------------------------
# Mesh and sharding.


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes): batch on 'data', state replicated."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ('data',))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded on the batch axis."""
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if isinstance(v, np.ndarray)}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` replicated on every device of `mesh` (of all processes), as a copy.

  Always a copy: the train step donates its state, which must not delete the caller's arrays. With
  several processes every process must pass the same values (host arrays, process-local arrays or
  arrays already replicated over any mesh); each builds its own devices' copies.
  """
  sharding = NamedSharding(mesh, P())
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding, may_alias=False)

  def put(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)  # process-local or fully replicated arrays: readable on every process
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def host_copy(tree: Any) -> Any:
  """NumPy copies of a (replicated) tree, PRNG keys as their raw key data: what checkpoints store.

  Host arrays carry no device layout, so a checkpoint written by N processes restores anywhere
  (one CPU, another mesh); orbax writes them from process 0 only.
  """
  def get(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)  # replicated arrays are readable on every process
  return jax.tree.map(get, tree)


# ---------------------------------------------------------------------------------------------
# State, steps.


def model_config(config: ml_collections.ConfigDict) -> dict:
  """The model config: config.arch and config.model as they are (the keyword arguments of
  models.build), passed to the builder and stored in every checkpoint as metadata['model']."""
  model = config.model.to_dict()
  if isinstance(model.get('num_classes'), (list, tuple)):
    model['num_classes'] = list(model['num_classes'])
  return {'arch': config.arch, **model}


def model_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  return models.build_from_config(model_config(config))


def optimizer_from_config(config: ml_collections.ConfigDict, model: nn.Module,
                          params: Any) -> optax.GradientTransformation:
  o = config.optim
  return optim.make_optimizer(
      learning_rate=o.learning_rate, momentum=o.momentum, weight_decay=o.weight_decay,
      params=params, frozen=models.frozen_mask(model, params), bias_lr_mult=o.bias_lr_mult,
      schedule=o.schedule, total_steps=config.num_train_steps, accumulate_steps=config.accumulate_steps,
      caffe=o.caffe, algorithm=o.get('algorithm', 'sgd'))


def metadata_from_config(config: ml_collections.ConfigDict, classes=None,
                         heads: dict | None = None) -> dict:
  """What inference needs, with no training config: stored in every checkpoint. `classes` (a
  data.ClassInfo) adds the palette and the ignore label; `heads` (data.head_classes) each head's
  classes for a net with several heads."""
  extra = {}
  if classes is not None:
    extra = {'palette': np.asarray(classes.palette).tolist(), 'ignore_label': int(classes.ignore_label),
             'dataset': config.dataset.name, 'data': dataset_identity(config)}
  if heads and len(heads) > 1:
    extra['heads'] = [{'name': h, 'num_classes': c.num_classes, 'class_names': list(c.names),
                       'palette': np.asarray(c.palette).tolist(), 'eval_exclude': list(e)}
                      for h, (c, e) in heads.items()]
    first = extra['heads'][0]
    extra['palette'] = first['palette']
  modalities, _ = input_layout(config)
  if modalities:
    extra['modalities'] = [{'name': m, 'preprocessing': p} for m, p in modalities]
  return {
      **ckpt_lib.model_metadata(model_config(config)),
      'preprocessing': config.preprocessing,
      'class_names': list(config.class_names),
      # Not needed for inference; a resumed run must match them (fcn_jax.workdir).
      'optimizer': config.optim.get('algorithm', 'sgd'),
      'accumulate_steps': config.accumulate_steps,
      'source': f'trained with fcn_jax ({config.get("preset", "custom")} preset)',
      'experiment': config.get('name', config.arch),
      **extra,
  }


def dataset_identity(config: ml_collections.ConfigDict) -> dict:
  """Where a run's data is and how it is read, stored in every checkpoint as metadata['data'] so
  that evaluation and prediction find the same data without being told again."""
  from fcn_jax import data as data_lib, paths
  d = config.dataset
  eval_name, eval_split = data_lib.eval_dataset(d.name, d.eval_name, d.eval_split)
  expand = lambda p: str(pathlib.Path(p).expanduser().resolve()) if p else ''
  options = data_lib.source_options(d)
  return {'name': d.name, **options, 'root': expand(options['root']),
          'classes_file': expand(options['classes_file']),
          'data_dir': expand(d.data_dir or str(paths.cache_dir() / 'tfds')),
          'manual_dir': expand(d.manual_dir), 'train_split': d.train_split,
          'eval_name': eval_name, 'eval_split': eval_split}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, variables: dict,
                       rng: jax.Array) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), rng=rng)


def label_key(model: nn.Module, head: str) -> str:
  """The batch key of a head's labels: 'label' for a single-headed net, else 'label_<head>'
  (SIFT Flow: label_semantic, label_geometric)."""
  return 'label' if len(model.head_names) == 1 else f'label_{head}'


def per_head(model: nn.Module, outputs) -> dict[str, jax.Array]:
  """The model's scores by head name (a single-headed net returns one array)."""
  return outputs if isinstance(outputs, dict) else {model.head_names[0]: outputs}


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               normalize_loss: bool, class_weights: tuple[float, ...] | None = None) -> tuple[TrainState, dict]:
  """One pure SGD micro-step. batch: image (N, H, W, C) float32 (the modalities concatenated),
  label (N, H, W) int32 (several heads: label_<head> each). The loss sums the heads' losses (the
  reference SIFT Flow nets: semantic + geometric); the pixel accuracy is the first head's."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  first = model.head_names[0]

  def loss_fn(params):
    logits = per_head(model, model.apply(state.variables(params), batch['image'], train=True,
                                         rngs={'dropout': dropout_rng}))
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    total = sum(losses.cross_entropy(logits[h], batch[label_key(model, h)], normalize=normalize_loss,
                                     class_weights=weights if h == first else None)
                for h in model.head_names)
    return total, logits[first]

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  labels = batch[label_key(model, first)]
  valid = (labels >= 0) & (labels < model.num_classes[0])
  correct = (jnp.argmax(logits, -1) == labels) & valid
  step_metrics = {
      'loss': loss,
      'nonfinite': (~jnp.isfinite(loss)).astype(jnp.int32),
      'correct_pixels': correct.sum(),
      'valid_pixels': valid.sum(),
      'steps': jnp.ones((), jnp.int32),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, step_metrics


def eval_step(variables: dict, batch: dict, confusion: dict, *,
              model: nn.Module) -> tuple[dict, jax.Array]:
  """Adds the batch's confusion matrices ({head: matrix}, one per head of the model, with its own
  class count) to `confusion` on device; returns them and the first head's predictions."""
  logits = per_head(model, model.apply(variables, batch['image'], train=False))
  out, first = {}, None
  for head, n in zip(model.head_names, model.num_classes):
    predictions = jnp.argmax(logits[head], -1).astype(jnp.int32)
    first = predictions if first is None else first
    out[head] = confusion[head] + metrics_lib.confusion_matrix(batch[label_key(model, head)],
                                                               predictions, n)
  return out, first


def compile_train_step(model, tx, mesh: Mesh, *, normalize_loss: bool,
                       class_weights: tuple[float, ...] | None = None) -> Callable:
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  fn = functools.partial(train_step, model=model, tx=tx, normalize_loss=normalize_loss,
                         class_weights=class_weights)
  return cpu_forms.jit(fn, forms=model.forms, in_shardings=(replicated, data),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))


def compile_eval_step(model, mesh: Mesh, *, batch_sharded: bool) -> Callable:
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data')) if batch_sharded else replicated
  fn = functools.partial(eval_step, model=model)
  return cpu_forms.jit(fn, forms=model.forms, in_shardings=(replicated, data, replicated),
                       out_shardings=(replicated, data), donate_argnums=(2,))


# ---------------------------------------------------------------------------------------------
# Evaluation over a whole split.


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
    from tqdm.auto import tqdm
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
      distributed.sum_across_processes(np.asarray(jax.device_get(confusion[h]))), exclude.get(h, ()))
      for h in model.head_names}
  scores = dict(by_head[model.head_names[0]])
  if len(by_head) > 1:  # the first head's scores drive "best"; every head's are kept
    scores['heads'] = by_head
  return scores, kept


# ---------------------------------------------------------------------------------------------
# Initialisation from another checkpoint (staged training, converted backbones).


def transfer_params(target: dict, source: dict) -> tuple[dict, list[str], list[str]]:
  """Copies every top-level layer of `source` whose shapes match into `target`.

  Returns (params, copied layer names, layers kept at their initialisation). FCN-16s from FCN-32s
  copies the backbone and score_fr; score_pool4 stays zero and upscore2/upscore16 bilinear.
  """
  out, copied, kept = dict(target), [], []
  for name, sub in target.items():
    src = source.get(name)
    if src is not None and jax.tree.structure(src) == jax.tree.structure(sub) and all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(sub))):
      out[name] = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), src, sub)
      copied.append(name)
    else:
      kept.append(name)
  return out, copied, kept


def initial_variables(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array,
                      log: Callable[[str], None] = print) -> dict:
  variables = jax.jit(lambda r: models.init_variables(model, r))(rng)
  variables = jax.tree.map(np.asarray, variables)
  if not config.init_from:
    return variables
  _, source, meta = ckpt_lib.load_inference(config.init_from)
  if meta.get('preprocessing') and meta['preprocessing'] != config.preprocessing:
    raise ValueError(
        f'{config.init_from} expects {meta["preprocessing"]!r} inputs but config.preprocessing is '
        f'{config.preprocessing!r}; set --config.preprocessing={meta["preprocessing"]}')
  params, copied, kept = transfer_params(variables['params'], source['params'])
  if not copied:
    raise UserError(f'no layer of {config.init_from} (arch {meta.get("arch")}, width '
                    f'{meta.get("width")}) fits {config.arch} at width {config.model.width}')
  log(f'initialised {len(copied)} layers from {config.init_from} ({meta.get("arch")}); '
      f'kept at init: {", ".join(kept) or "none"}')
  source_classes = meta.get('num_classes')
  if source_classes is not None and source_classes != config.model.num_classes:
    fresh = [k for k in kept if k.startswith('score')]
    log(f'{config.init_from} has {source_classes} classes, this run {config.model.num_classes}: '
        f'the backbone is copied, the score layers start fresh ({", ".join(fresh) or "none"})')
  variables = dict(variables, params=params)
  if 'batch_stats' in variables and 'batch_stats' in source:
    variables['batch_stats'], _, _ = transfer_params(variables['batch_stats'], source['batch_stats'])
  return variables


# ---------------------------------------------------------------------------------------------
# The loop.


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    from tqdm.auto import tqdm
    tqdm.write(msg)


def data_sources(config: ml_collections.ConfigDict):
  """(train source, eval source) through our TFDS builders (prepared on first use)."""
  from fcn_jax import data as data_lib, paths
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
  from fcn_jax.data import pipeline
  modalities, heads = input_layout(config)
  loader = pipeline.train_loader(
      source, batch_size=batch_size, crop_size=config.crop_size,
      preprocessing=config.preprocessing, seed=config.seed,
      scale_range=tuple(config.scale_range) if config.scale_range else None, flip=config.flip,
      worker_count=config.data_workers, shard_index=shard_index, shard_count=shard_count,
      modalities=modalities, heads=heads)
  return iter(loader)


class DevicePrefetcher:
  """Keeps `size` batches already sharded on the devices ahead of the train step (host decoding and
  host-to-device copies overlap the running step), each with the iterator state after it, so that a
  checkpoint records exactly the batches the model has consumed."""

  def __init__(self, iterator, mesh: Mesh, size: int = 2):
    self._iterator, self._mesh, self._size = iterator, mesh, max(size, 1)
    self._queue: collections.deque = collections.deque()
    self.consumed_state = iterator.get_state()

  def __next__(self) -> dict:
    while len(self._queue) < self._size:
      batch = shard_batch(next(self._iterator), self._mesh)
      self._queue.append((batch, self._iterator.get_state()))
    batch, self.consumed_state = self._queue.popleft()
    return batch


def gather_data_state(local_state: bytes) -> Any:
  """The data-iterator state to checkpoint: this process's own with one process, otherwise every
  process's (each reads its own shard), gathered so that process 0 writes them all."""
  if jax.process_count() == 1:
    return local_state
  return {'process_count': jax.process_count(),
          'per_process': distributed.allgather_bytes(bytes(local_state))}


def local_data_state(data_state: Any) -> Any:
  """This process's iterator state from a checkpoint's (None: restart the data order)."""
  if isinstance(data_state, dict) and 'per_process' in data_state:
    states = data_state['per_process']
    if len(states) == jax.process_count():
      return states[jax.process_index()]
    _log(f'the checkpoint was written by {len(states)} processes, this run has '
         f'{jax.process_count()}: the data order restarts (the model state is restored)')
    return None
  if jax.process_count() == 1:
    return data_state
  _log('the checkpoint was written by one process: the data order restarts (the model state is '
       'restored)')
  return None


def input_layout(config: ml_collections.ConfigDict) -> tuple[list | None, list[str]]:
  """(modalities, head names) of the configured net: config.modalities [(name, preprocessing)]
  for a net with several inputs (None: the colour image with config.preprocessing), and the
  arch's heads. The pipelines put every modality and label map through the same crop and flip."""
  modalities = [tuple(m) for m in config.get('modalities', ())] or None
  return modalities, [h.name for h in models.ARCHS[config.arch].heads]


def eval_batches(config: ml_collections.ConfigDict, source) -> Iterable[dict]:
  from fcn_jax.data import pipeline
  modalities, heads = input_layout(config)
  return pipeline.eval_batches(
      source, preprocessing=config.preprocessing, batch_size=config.eval_batch_size,
      pad_to=config.eval_pad_to or None, shard_index=jax.process_index(),
      shard_count=jax.process_count(), modalities=modalities, heads=heads)


def resolve_num_updates(config: ml_collections.ConfigDict, num_train_images: int) -> int:
  """Optimiser updates to train for: config.num_train_steps when > 0, else config.total_epochs
  passes over the training set at batch_size x accumulate_steps images per update (resolved here,
  at run time, so that --config.batch_size changes the step count and not the epochs)."""
  if config.num_train_steps and config.num_train_steps > 0:
    return int(config.num_train_steps)
  epochs = config.get('total_epochs') or 0
  if epochs <= 0:
    raise UserError('set config.num_train_steps (optimiser updates) or config.total_epochs (> 0)')
  images_per_update = config.batch_size * config.accumulate_steps
  return max(1, math.ceil(epochs * num_train_images / images_per_update))


def resolve_head_classes(config: ml_collections.ConfigDict, heads: dict) -> None:
  """A net with several heads: config.model.num_classes from the dataset's heads (data.head_classes),
  which must be the arch's (SIFT Flow: semantic, geometric)."""
  names = [h.name for h in models.ARCHS[config.arch].heads]
  if sorted(map(str, heads)) != sorted(names):
    raise UserError(f'{config.arch} has the heads {", ".join(names)}, but the dataset '
                    f'{config.dataset.name} labels {", ".join(map(str, heads))}; choose an arch '
                    f'with those heads (e.g. fcn16s_two_heads for sift_flow)')
  counts = tuple(heads[h][0].num_classes for h in names)
  given = config.model.num_classes
  if given and tuple(np.atleast_1d(given)) != counts:
    raise UserError(f'config.model.num_classes={given}, but the dataset\'s heads have {counts} '
                    f'classes; leave it at 0 (from the dataset)')
  model = config.model.to_dict()
  model['num_classes'] = counts
  config.model = ml_collections.ConfigDict(model)
  config.class_names = tuple(heads[names[0]][0].names)


def resolve_classes(config: ml_collections.ConfigDict, classes, heads: dict | None = None) -> None:
  """Sets config.model.num_classes and config.class_names from the dataset's classes (0 and ()
  mean "from the dataset"); a config that contradicts them stops, naming the field. `heads`
  (data.head_classes) for a net with several heads."""
  if len(models.ARCHS[config.arch].heads) > 1:
    return resolve_head_classes(config, heads or {None: (classes, ())})
  if heads and len(heads) > 1:
    raise UserError(f'the dataset {config.dataset.name} labels several heads '
                    f'({", ".join(map(str, heads))}); {config.arch} has one: choose an arch with '
                    f'those heads (e.g. fcn16s_two_heads)')
  n = classes.num_classes
  d = config.dataset
  where = f'{d.name}' + (f' at {d.root}' if d.get('root') else '')
  if config.model.num_classes and config.model.num_classes != n:
    raise UserError(f'config.model.num_classes={config.model.num_classes}, but the dataset {where} '
                    f'has {n} classes ({", ".join(classes.names[:6])}{", ..." if n > 6 else ""}); '
                    f'leave it at 0 (from the dataset) or fix the dataset\'s class list')
  if config.class_names and tuple(config.class_names) != tuple(classes.names):
    raise UserError(f'config.class_names={tuple(config.class_names)[:6]}... differ from the dataset '
                    f'{where}\'s {tuple(classes.names)[:6]}...; leave it empty (from the dataset)')
  config.model.num_classes = n
  config.class_names = tuple(classes.names)


def loss_class_weights(config: ml_collections.ConfigDict, train_source) -> tuple[float, ...] | None:
  """config.loss_class_weights as per-class loss weights: 'none' (None), 'median_frequency'
  (median(f) / f_c with f_c the class's share of the training pixels; absent classes 0), or the
  weights themselves ('1,2,0.5' or a list), one per class."""
  from fcn_jax import data as data_lib
  spec = config.get('loss_class_weights', 'none')
  n = config.model.num_classes
  if spec in (None, '', 'none'):
    return None
  if spec == 'median_frequency':
    counts = np.asarray(data_lib.pixel_counts(train_source, n, progress=jax.process_index() == 0),
                        np.float64)
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    weights = np.where(present, np.median(freq[present]) / np.where(present, freq, 1.0), 0.0)
  else:
    try:
      values = spec if isinstance(spec, (list, tuple)) else str(spec).strip('[]() ').split(',')
      weights = np.asarray([float(v) for v in values], np.float64)
    except ValueError:
      raise UserError(f'config.loss_class_weights={spec!r}: none, median_frequency, or one weight '
                      f'per class (e.g. "1,2,0.5")') from None
    if weights.shape != (n,) or (weights < 0).any():
      raise UserError(f'config.loss_class_weights: {weights.size} weights for {n} classes; give '
                      f'{n} non-negative numbers')
  _log('class weights: ' + ', '.join(f'{name} {w:.3g}' for name, w in
                                      zip(config.class_names, weights)))
  return tuple(float(w) for w in weights)


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
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
      return self
    names = ('SIGTERM', 'SIGINT') if jax.process_count() == 1 else ()
    for name in names:
      signum = getattr(signal, name)
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    import signal
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:  # a second Ctrl-C does not wait for the checkpoint
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __exit__(self, *exc) -> None:
    import signal
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def reached(self, update: int) -> bool:
    """True at the update where every process should save and stop."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(update):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None


def _take_workdir_lock(workdir: pathlib.Path) -> workdir_lib.WorkdirLock | None:
  """Process 0 takes the workdir's lock; every process stops if it could not."""
  lock, error = None, b''
  if jax.process_index() == 0:
    lock = workdir_lib.WorkdirLock(workdir, log=_log)
    try:
      lock.acquire()
    except workdir_lib.WorkdirBusyError as e:
      error, lock = str(e).encode(), None
  error = distributed.allgather_bytes(error)[0]
  if error:
    raise workdir_lib.WorkdirBusyError(error.decode())
  return lock


def _write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, resumed_at: int | None) -> None:
  """config.json of this run; a resumed run with a changed config keeps the previous one beside it."""
  path = workdir / 'config.json'
  text = config.to_json_best_effort(indent=2) + '\n'
  if path.exists() and resumed_at is not None and path.read_text() != text:
    path.replace(workdir / f'config.before_step{resumed_at}.json')
  path.write_text(text)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains `config.arch`, evaluating on a schedule; resumes from the latest checkpoint in workdir.

  Every count (num_train_steps, log_every, eval_every, checkpoint_every, the checkpoint and metric
  steps) is in optimiser updates; with accumulate_steps k an update is k jit micro-steps.
  Returns the final evaluation scores. Writes metrics.jsonl, TensorBoard events, checkpoints/,
  results.json, results.md and figures/ in workdir. SIGTERM or Ctrl-C saves a checkpoint at the next
  update and raises errors.Preempted; the same call resumes from it. The config is checked against
  the data before the first step; a run refused there leaves nothing behind in workdir.
  """
  from fcn_jax import config_checks

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


def latest_checkpoint_step(directory: pathlib.Path) -> int | None:
  """The latest step in a checkpoints/ directory, without creating it."""
  if not directory.is_dir() or not any(directory.iterdir()):
    return None
  try:
    return ckpt_lib.resolve_step(directory, 'latest')[1]
  except ckpt_lib.CheckpointNotFoundError:
    return None


@dataclasses.dataclass
class RunSpec:
  """What a run resolves from its config and its data before anything is written."""
  train_source: Any
  eval_source: Any
  eval_name: str
  eval_split: str
  metadata: dict
  eval_exclude: dict
  class_weights: tuple[float, ...] | None
  latest: int | None


def _round_up(n: int, multiple: int = 32) -> int:
  return -(-int(n) // multiple) * multiple


def check_against_data(config: ml_collections.ConfigDict, train_source, eval_source,
                       eval_split: str) -> None:
  """Resolves what the config leaves to the data (eval_pad_to=-1: the evaluation images' largest
  side; crop_size=0: the training images' largest side) and stops, before the first step, on
  what cannot work with it (padding smaller than the evaluation images)."""
  from fcn_jax import data as data_lib
  eval_size = data_lib.image_sizes(eval_source)
  train_size = data_lib.image_sizes(train_source)
  if config.eval_pad_to < 0:
    config.eval_pad_to = _round_up(max(eval_size)) if eval_size else 512
  elif config.eval_pad_to and eval_size and max(eval_size) > config.eval_pad_to:
    raise UserError(
        f'config.eval_pad_to={config.eval_pad_to}, but the evaluation split {eval_split!r} has '
        f'images up to {eval_size[0]}x{eval_size[1]} (HxW): set --config.eval_pad_to=-1 (padded to '
        f'the largest image, {_round_up(max(eval_size))}), 0 (native size, one image at a time: '
        f'also --config.eval_batch_size=1) or at least {max(eval_size)}')
  if config.crop_size <= 0:
    config.crop_size = _round_up(max(train_size)) if train_size else 500


def resolve_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> RunSpec:
  """Prepares the data and resolves classes, step count, class weights and the data-dependent
  fields of `config` (edited in place), checking them against the data and any checkpoint in
  workdir. Writes nothing into workdir."""
  from fcn_jax import data as data_lib
  latest = latest_checkpoint_step(workdir / 'checkpoints')
  previous = None
  if latest is not None:  # before anything is prepared (class fields left to 'auto')
    previous = ckpt_lib.read_metadata(workdir / 'checkpoints', str(latest))
    known = {k: v for k, v in metadata_from_config(config).items()
             if not (k == 'num_classes' and not v) and not (k == 'class_names' and not v)}
    workdir_lib.check_resume_compatible(previous, known, workdir=workdir, step=latest)
  train_source, eval_source = data_sources(config)
  classes, _ = data_lib.class_info(train_source)
  heads = data_lib.head_classes(train_source)
  resolve_classes(config, classes, heads)
  metadata = metadata_from_config(config, classes, heads)
  first_head = models.ARCHS[config.arch].heads[0].name
  eval_exclude = {first_head if h is None else h: e
                  for h, (_, e) in data_lib.head_classes(eval_source).items()}
  if previous is not None:
    workdir_lib.check_resume_compatible(previous, metadata, workdir=workdir, step=latest)
  eval_name, eval_split = data_lib.eval_dataset(config.dataset.name, config.dataset.eval_name,
                                                config.dataset.eval_split)
  check_against_data(config, train_source, eval_source, eval_split)
  config.num_train_steps = resolve_num_updates(config, len(train_source))
  class_weights = loss_class_weights(config, train_source)
  return RunSpec(train_source, eval_source, eval_name, eval_split, metadata, eval_exclude,
                 class_weights, latest)


def start_summary(config: ml_collections.ConfigDict, run: RunSpec, workdir: pathlib.Path) -> str:
  """What the run will do, printed before the first step."""
  from fcn_jax import data as data_lib
  d, n = config.dataset, config.model.num_classes
  names = list(config.class_names)
  where = f' at {d.root}' if d.get('root') else ''
  shown = ', '.join(names[:8]) + (', ...' if len(names) > 8 else '')
  counts = n if isinstance(n, int) else ' + '.join(map(str, n))
  images = len(run.train_source)
  epochs = config.num_train_steps * config.batch_size * config.accumulate_steps / max(images, 1)

  def size(source) -> str:
    hw = data_lib.image_sizes(source)
    return f' (up to {hw[0]}x{hw[1]})' if hw else ''
  evaluation = ('native size, one image at a time' if not config.eval_pad_to else
                f'padded to {config.eval_pad_to}, batches of {config.eval_batch_size}')
  lines = [
      f'{config.get("name", config.arch)} ({config.get("preset", "custom")} preset) on '
      f'{d.name}{where}: {counts} classes ({shown})',
      f'  train {d.train_split!r}: {plural(images, "image")}{size(run.train_source)}, crop '
      f'{config.crop_size}, batch {config.batch_size} -> {config.num_train_steps} steps '
      f'({epochs:.1f} epochs)',
      f'  eval {run.eval_name} {run.eval_split!r}: {plural(len(run.eval_source), "image")}'
      f'{size(run.eval_source)}, every {config.eval_every} steps and at the end, {evaluation}',
      f'  outputs: {workdir} (metrics.jsonl, tensorboard/, checkpoints/, results.md, figures/)']
  info = getattr(run.train_source, 'dataset_info', None)
  remapped = (getattr(info, 'metadata', None) or {}).get('mask_remap')
  if remapped:
    lines.insert(1, '  masks: ' + ', '.join(f'{a} read as class {b} ({names[b]})'
                                           for a, b in remapped) + ' (binary masks stored as 0/255)')
  return '\n'.join(lines)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: Mesh,
                        started: list) -> dict:
  from fcn_jax import report

  is_main = jax.process_index() == 0
  k = config.accumulate_steps
  run = resolve_run(config, workdir)
  latest, metadata = run.latest, run.metadata
  _log(start_summary(config, run, workdir))
  started.append(True)  # from here on a refusal is not "before the first step"
  checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', max_to_keep=config.keep_checkpoints)
  if is_main:
    _write_config(workdir, config, latest)

  model = model_from_config(config)
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  init_config = config
  if latest is not None:
    init_config = config.copy_and_resolve_references()
    init_config.init_from = ''  # the checkpoint has everything
  variables = initial_variables(model, init_config, init_rng, log=_log)
  tx = optimizer_from_config(config, model, variables['params'])
  state = create_train_state(model, tx, variables, state_rng)

  # Each process reads only its shard and feeds its slice of every global batch.
  train_iter = train_iterator(config, run.train_source,
                              batch_size=config.batch_size // jax.process_count(),
                              shard_index=jax.process_index(), shard_count=jax.process_count())
  if latest is not None:
    state = _restore(checkpointer, state, latest, train_iter, workdir)
  state = replicate(state, mesh)
  batches = DevicePrefetcher(train_iter, mesh, size=PREFETCH)

  step_fn = compile_train_step(model, tx, mesh, normalize_loss=config.loss_normalize,
                               class_weights=run.class_weights)
  writer = report.MetricWriter(workdir, enabled=is_main, resume_step=latest)
  total = config.num_train_steps
  start = int(jax.device_get(state.step)) // k
  if start > total:
    _log(f'{workdir} is already at step {start}, past config.num_train_steps={total}: nothing to '
         f'train; evaluating step {start}')
  progress = report.Progress(total, start, desc=config.arch, enabled=is_main, log=_log)
  meter = StepMeter(writer, progress, config.batch_size, workdir)

  def evaluate_now(step: int) -> dict:
    meter.flush(step)
    scores, _ = evaluate(model, state.variables(), eval_batches(config, run.eval_source),
                         mesh=mesh, exclude=run.eval_exclude)
    first_head = model.head_names[0]
    other_heads = {h: v for h, v in scores.get('heads', {}).items() if h != first_head}
    writer.write(step, 'eval', {k_: scores[k_] for k_ in SCORE_KEYS} | {
        f'{h}/{k_}': v[k_] for h, v in other_heads.items() for k_ in SCORE_KEYS})
    _log(f'step {step}: {run.eval_split}: ' + ', '.join(
        f'{k_} {100 * scores[k_]:.2f}' for k_ in SCORE_KEYS) + ''.join(
        f'; {h} pixel_acc {100 * v["pixel_acc"]:.2f}' for h, v in other_heads.items()))
    return scores

  def save(step: int, scores: dict | None) -> None:
    meter.flush(step)  # never checkpoint a state that followed a non-finite loss
    # Every process calls save (orbax synchronises them); host arrays are written by process 0.
    checkpointer.save(step, host_copy(state), metadata=metadata,
                      data_state=gather_data_state(batches.consumed_state), metrics=scores)

  last_scores = None
  try:
    with StopRequest() as stop:
      for micro in range(start * k + 1, total * k + 1):
        state, m = step_fn(state, next(batches))
        meter.add(m)
        if micro % k:
          continue  # mid-accumulation: nothing to log, evaluate or save
        step = micro // k
        progress.update(step)
        last = step == total
        if _every(config.log_every, step) or last:
          meter.flush(step)
        scores = None
        if _every(config.eval_every, step) or last:
          scores = last_scores = evaluate_now(step)
        if _every(config.checkpoint_every, step) or scores is not None or last:
          save(step, scores)
        if not last and stop.reached(step):
          save(step, None)
          raise Preempted(
              f'{stop.signal_name}: saved step {step} of {total} to {workdir / "checkpoints"}; '
              f'run the same command to resume.', stop.signal_name)
  except KeyboardInterrupt:
    # A second Ctrl-C (or one with several processes): stop now; the last checkpoint is kept.
    raise Preempted(f'interrupted; the last checkpoint in {workdir / "checkpoints"} '
                    f'(step {checkpointer.latest_step()}) is kept: run the same command to resume.',
                    'SIGINT') from None
  finally:
    progress.close()
    checkpointer.wait_until_finished()
    writer.close()

  if last_scores is None:  # resumed a finished run: evaluate the final state
    last_scores = evaluate_now(max(start, total))
  if is_main:
    final_report(config, run, model, host_copy(state.variables()), last_scores, workdir,
                 max(start, total))
  checkpointer.close()
  return last_scores


PREFETCH = 2  # batches sharded on the devices ahead of the train step


def _every(n: int, step: int) -> bool:
  return n > 0 and step % n == 0


def _restore(checkpointer, state, latest: int, train_iter, workdir: pathlib.Path):
  try:
    state, data_state, _ = checkpointer.restore(state, latest)
  except (ValueError, KeyError, TypeError) as e:
    raise workdir_lib.IncompatibleResumeError(
        f'the checkpoint {checkpointer.directory}/{latest} does not fit this config '
        f'({type(e).__name__}: {str(e).splitlines()[0][:300]}). Use a new --workdir, or '
        f'--config.init_from={checkpointer.directory} to start from its weights.') from None
  data_state = local_data_state(data_state)
  if data_state is not None:
    train_iter.set_state(data_state)
  _log(f'resumed from {workdir / "checkpoints"} at step {latest}')
  return state


class StepMeter:
  """Sums the on-device step metrics and fetches them only at log time (no sync per step)."""

  def __init__(self, writer, progress, batch_size: int, workdir: pathlib.Path):
    self.writer, self.progress, self.batch_size, self.workdir = writer, progress, batch_size, workdir
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


def final_report(config: ml_collections.ConfigDict, run: RunSpec, model, variables: dict,
                 scores: dict, workdir: pathlib.Path, step: int) -> None:
  """results.json / results.md, training curves and score maps; the last line says where."""
  from fcn_jax import report, viz
  class_names = list(config.class_names)
  report.write_results(workdir, config.get('name', config.arch), scores, class_names,
                       extra={'step': step, 'preset': config.get('preset', ''),
                              'eval_dataset': run.eval_name, 'eval_split': run.eval_split})
  viz.training_curves(report.read_metrics(workdir), workdir / 'figures' / 'training_curves.png',
                      title=config.arch)
  single = len(model.head_names) == 1 and not config.get('modalities')
  if config.num_figure_examples and not single:
    _log('score-map figures are drawn for single-headed colour nets only; skipped')
  elif config.num_figure_examples:
    examples = first_examples(config, run.eval_source, config.num_figure_examples)
    viz.score_map_figure(model, variables, examples, class_names,
                         workdir / 'figures' / 'score_maps.png', preprocessing=config.preprocessing,
                         palette=run.metadata.get('palette'))
  absent = report.absent_classes(scores, class_names)
  if absent:
    _log(report.absent_note(absent))
  _log(f'done: mean IU {100 * scores["mean_iu"]:.2f} on {run.eval_split!r} at step {step}. '
       f'Results: {workdir / "results.md"}; figures: {workdir / "figures"}/; checkpoints: '
       f'{workdir / "checkpoints"}/')


def first_examples(config: ml_collections.ConfigDict, source, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """The first `count` examples of a split as (file_name, uint8 RGB image, label) for figures."""
  from fcn_jax import data as data_lib
  out = []
  for i in range(min(count, len(source))):
    record = source[i]
    image, label = data_lib.decode_example(record)
    out.append((data_lib.file_name(record), image, label))
  return out
