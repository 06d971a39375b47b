"""The train state and the pure steps: one SGD micro-step, one evaluation batch, and their jit over
a mesh (state replicated and donated, batch sharded on 'data')."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fcn_jax import losses
from fcn_jax import metrics as metrics_lib
from fcn_jax import models
from fcn_jax import optim, tune
from fcn_jax.models import forms as forms_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # micro-steps taken (jit calls); updates = step // accumulate_steps
  params: Any
  batch_stats: Any         # frozen BatchNorm statistics (GoogLeNet); {} otherwise
  opt_state: Any
  rng: jax.Array           # base key; dropout uses fold_in(rng, step) so resumed runs replay
                           # exactly
  # The exponential moving average of `variables()` (config.ema_decay > 0): {'params', maybe
  # 'batch_stats'}, bias-corrected (usable as weights at any step); {} when off.
  ema: Any = flax.struct.field(default_factory=dict)

  def variables(self, params=None) -> dict:
    v = {'params': self.params if params is None else params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v

  def inference_variables(self) -> dict:
    """The weights a run's results, best checkpoint and inference use: the EMA when kept."""
    return self.ema or self.variables()

def model_config(config: ml_collections.ConfigDict) -> dict:
  """The model config: config.arch and config.model as they are (the keyword arguments of
  models.build), passed to the builder and stored in every checkpoint as metadata['model']."""
  model = config.model.to_dict()
  if isinstance(model.get('num_classes'), (list, tuple)):
    model['num_classes'] = list(model['num_classes'])
  return {'arch': config.arch, **model}

def model_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  """The model of a training config, with this machine's CPU forms (fcn_jax.tune)."""
  return tune.tuned(models.build_from_config(model_config(config)))

def optimizer_from_config(config: ml_collections.ConfigDict, model: nn.Module,
                          params: Any) -> optax.GradientTransformation:
  o = config.optim
  return optim.make_optimizer(
      learning_rate=o.learning_rate, momentum=o.momentum, weight_decay=o.weight_decay,
      params=params, frozen=models.frozen_mask(model, params), bias_lr_mult=o.bias_lr_mult,
      schedule=o.schedule, total_steps=config.num_train_steps,
      poly_power=o.get('poly_power', 0.9), warmup_steps=o.get('warmup_steps', 0),
      warmup_ratio=o.get('warmup_ratio', 0.001), step_every=o.get('step_every', 0),
      step_gamma=o.get('step_gamma', 0.1), accumulate_steps=config.accumulate_steps, caffe=o.caffe,
      algorithm=o.get('algorithm', 'sgd'))

def create_train_state(model: nn.Module, tx: optax.GradientTransformation, variables: dict,
                       rng: jax.Array, *, ema: bool = False) -> TrainState:
  """The state at step 0; `ema` also keeps a moving average of the variables (a copy: the state
  is donated, and one buffer cannot be donated twice)."""
  params = variables['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                     rng=rng)
  if ema:
    state = state.replace(ema=jax.tree.map(jnp.copy, state.variables()))
  return state

def ema_step_size(decay: float, count: jax.Array) -> jax.Array:
  """The weight of the newest variables in the EMA after `count` updates: (1 - d) / (1 - d^count).

  This keeps optax.ema(decay, debias=True)'s bias-corrected average itself (1 at the first update:
  the average is then the weights, never pulled towards the initialisation or zero), so that the
  state holds one copy of the weights, the one evaluation and inference read."""
  count = jnp.maximum(count, 1).astype(jnp.float32)
  return (1.0 - decay) / (1.0 - jnp.power(jnp.float32(decay), count))

def update_ema(ema: dict, variables: dict, decay: float, count: jax.Array) -> dict:
  """ema + w (variables - ema), w = ema_step_size(decay, count): optax.ema's bias-corrected
  average, in a form that leaves a leaf that does not change (frozen layers, GoogLeNet's fixed
  BatchNorm statistics) exactly as it is."""
  w = ema_step_size(decay, count)
  new = optax.tree.add_scale(ema, w, optax.tree.sub(variables, ema))
  return jax.tree.map(lambda n, e: n.astype(e.dtype), new, ema)

def label_key(model: nn.Module, head: str) -> str:
  """The batch key of a head's labels: 'label' for a single-headed net, else 'label_<head>'
  (SIFT Flow: label_semantic, label_geometric)."""
  return 'label' if len(model.head_names) == 1 else f'label_{head}'

def per_head(model: nn.Module, outputs) -> dict[str, jax.Array]:
  """The model's scores by head name (a single-headed net returns one array)."""
  return outputs if isinstance(outputs, dict) else {model.head_names[0]: outputs}

def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, normalize_loss: bool,
               class_weights: tuple[float, ...] | None = None,
               loss: str | tuple[losses.LossTerm, ...] = 'ce', ema_decay: float = 0.0,
               accumulate_steps: int = 1, aux_weight: float = 0.5) -> tuple[TrainState, dict]:
  """One pure SGD micro-step. batch: image (N, H, W, C) float32 (the modalities concatenated),
  label (N, H, W) int32 (several heads: label_<head> each). The loss sums the heads' losses (the
  reference SIFT Flow nets: semantic + geometric), each the weighted sum of `loss`'s terms
  (config.loss, fcn_jax.losses; 'ce' is the reference's cross-entropy); the class weights apply to
  the first head. The pixel accuracy is the first head's. A state with an EMA (`ema_decay`) updates
  it at each optimiser update (every `accumulate_steps` micro-steps, when the parameters change).
  A net with torchvision's auxiliary head (build(aux=True)) adds `aux_weight` times its loss on the
  first head's labels (torchvision's reference trains with 0.5)."""
  terms = losses.parse_loss_spec(loss) if isinstance(loss, str) else loss
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  first = model.head_names[0]
  # BatchNorm statistics: vgg16_bn's are trained (updated from each batch); GoogLeNet's frozen
  # ones come back unchanged.
  mutable = ['batch_stats'] if state.batch_stats else False

  def loss_fn(params):
    out = model.apply(state.variables(params), batch['image'], train=True,
                      rngs={'dropout': dropout_rng}, mutable=mutable)
    outputs, new_vars = out if mutable else (out, {})
    logits = per_head(model, outputs)
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    total = sum(losses.segmentation_loss(logits[h], batch[label_key(model, h)], terms,
                                         normalize=normalize_loss,
                                         class_weights=weights if h == first else None)
                for h in model.head_names)
    if models.AUX_OUTPUT in logits:
      total = total + aux_weight * losses.segmentation_loss(
          logits[models.AUX_OUTPUT], batch[label_key(model, first)], terms,
          normalize=normalize_loss, class_weights=weights)
    return total, (logits[first], new_vars.get('batch_stats', state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=batch_stats)
  if state.ema:
    updates, done = jnp.divmod(new_state.step, accumulate_steps)
    ema = update_ema(state.ema, new_state.variables(), ema_decay, updates)
    if accumulate_steps > 1:  # mid-accumulation the parameters have not moved
      ema = optax.tree.where(done == 0, ema, state.ema)
    new_state = new_state.replace(ema=ema)
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
                       class_weights: tuple[float, ...] | None = None,
                       loss: str = 'ce', ema_decay: float = 0.0,
                       accumulate_steps: int = 1, aux_weight: float = 0.5) -> Callable:
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  fn = functools.partial(train_step, model=model, tx=tx, normalize_loss=normalize_loss,
                         class_weights=class_weights, loss=losses.parse_loss_spec(loss),
                         ema_decay=ema_decay, accumulate_steps=accumulate_steps,
                         aux_weight=aux_weight)
  return forms_lib.jit(fn, forms=model.forms, in_shardings=(replicated, data),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))

def compile_eval_step(model, mesh: Mesh, *, batch_sharded: bool) -> Callable:
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data')) if batch_sharded else replicated
  fn = functools.partial(eval_step, model=model)
  return forms_lib.jit(fn, forms=model.forms, in_shardings=(replicated, data, replicated),
                       out_shardings=(replicated, data), donate_argnums=(2,))
