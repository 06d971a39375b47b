"""SGD as the FCN reference trains: Caffe's momentum update, per-layer lr / decay multipliers.

Caffe (sgd_solver.cpp), per parameter blob, with local_rate = lr_t * lr_mult and
local_decay = weight_decay * decay_mult:

    v = momentum * v + local_rate * (g + local_decay * w)
    w = w - v

The learning rate sits inside the momentum buffer. With a fixed learning rate this is the same as
optax.sgd (trace, then scale by -lr); with a changing one (poly) it is not: a step taken at a high
rate keeps its size in v after the rate decays. `caffe=True` implements Caffe's form exactly.

Parameter groups (decided by the leaf name, FCN_REFERENCE section 4):
  - 'kernel' leaves: lr_mult 1, decay_mult 1 (weight decay on kernels only);
  - 'bias' leaves: lr_mult `bias_lr_mult` (2), decay_mult `bias_decay_mult` (0). This includes
    BatchNorm offsets ('bias' of an nn.BatchNorm), which get no decay either way;
  - any other leaf (BatchNorm 'scale'): lr_mult 1, decay_mult 0;
  - frozen leaves (models.frozen_mask: the final deconvolution, and the intermediate ones when
    upsampling is not learnable): exactly zero update, no decay, no optimiser state.

Iteration counting: the schedule advances once per parameter update. With `accumulate_steps` k > 1
the optimiser is wrapped in optax.MultiSteps, which averages the gradients of k micro-steps (Caffe
iter_size) and updates on every k-th call; the others return zero updates.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ['SCHEDULES', 'CaffeSGDState', 'caffe_sgd', 'make_optimizer', 'make_schedule',
           'param_groups']

Schedule = Callable[[jax.Array], jax.Array]

KERNEL, BIAS, OTHER, FROZEN = 'kernel', 'bias', 'other', 'frozen'


SCHEDULES = ('fixed', 'poly', 'cosine', 'step')


def _main_schedule(learning_rate: float, schedule: str, steps: int | None, poly_power: float,
                   step_every: int, step_gamma: float) -> Schedule:
  if schedule == 'fixed':
    return lambda count: jnp.asarray(learning_rate, jnp.float32)
  if schedule in ('poly', 'cosine') and (not steps or steps <= 0):
    raise ValueError(f'schedule={schedule!r} needs total_steps > 0 (after warm-up), got {steps}')
  if schedule == 'poly':
    def poly(count):
      frac = jnp.clip(jnp.asarray(count, jnp.float32) / jnp.float32(steps), 0.0, 1.0)
      return jnp.float32(learning_rate) * (1.0 - frac) ** jnp.float32(poly_power)
    return poly
  if schedule == 'cosine':
    return optax.cosine_decay_schedule(learning_rate, steps)
  if schedule == 'step':
    if step_every < 1:
      raise ValueError(f"schedule='step' needs step_every >= 1, got {step_every}")
    return optax.exponential_decay(learning_rate, step_every, step_gamma, staircase=True)
  raise ValueError(f'unknown schedule {schedule!r}; choose one of {", ".join(SCHEDULES)}')


def make_schedule(learning_rate: float, schedule: str = 'fixed', total_steps: int | None = None,
                  poly_power: float = 0.9, *, warmup_steps: int = 0, warmup_ratio: float = 0.001,
                  step_every: int = 0, step_gamma: float = 0.1) -> Schedule:
  """Learning rate as a function of the update count (0-based).

  'fixed': learning_rate. 'poly' (Caffe's lr_policy): learning_rate * (1 - t / T) ** poly_power,
  clamped at 0 past T. 'cosine': learning_rate * (1 + cos(pi t / T)) / 2 (optax). 'step' (Caffe's
  step policy): learning_rate * step_gamma ** floor(t / step_every). T is total_steps less the
  warm-up: with warmup_steps > 0 the rate first rises linearly from learning_rate * warmup_ratio to
  the schedule's start over warmup_steps updates, then the schedule runs from its own step 0
  (optax.join_schedules). Without warm-up, 'fixed' and 'poly' are exactly the Caffe reference's.
  """
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')
  steps = None if total_steps is None else total_steps - warmup_steps
  main = _main_schedule(learning_rate, schedule, steps, poly_power, step_every, step_gamma)
  if not warmup_steps:
    return main
  start = float(main(0))
  warmup = optax.linear_schedule(start * warmup_ratio, start, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


class CaffeSGDState(NamedTuple):
  count: jax.Array  # updates applied so far (int32)
  velocity: Any     # v, like the parameters


def caffe_sgd(learning_rate: float | Schedule, momentum: float, *, lr_mult: float = 1.0,
              weight_decay: float = 0.0, decay_mult: float = 0.0) -> optax.GradientTransformation:
  """Caffe's SGD for one parameter group: v = m v + lr_t lr_mult (g + wd decay_mult w);
  update -v."""
  schedule = learning_rate if callable(learning_rate) else make_schedule(learning_rate)
  local_decay = float(weight_decay) * float(decay_mult)

  def init_fn(params):
    return CaffeSGDState(count=jnp.zeros([], jnp.int32),
                         velocity=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    if local_decay and params is None:
      raise ValueError('caffe_sgd with weight decay needs params')
    local_rate = schedule(state.count) * jnp.float32(lr_mult)

    def leaf(g, v, w=None):
      d = g if not local_decay else g + jnp.asarray(local_decay, g.dtype) * w
      return momentum * v + local_rate.astype(g.dtype) * d

    if local_decay:
      velocity = jax.tree.map(leaf, updates, state.velocity, params)
    else:
      velocity = jax.tree.map(leaf, updates, state.velocity)
    new_updates = jax.tree.map(jnp.negative, velocity)
    count = optax.safe_int32_increment(state.count)
    return new_updates, CaffeSGDState(count=count, velocity=velocity)

  return optax.GradientTransformation(init_fn, update_fn)


def _l2_scaled(direction: optax.GradientTransformation, schedule: Schedule, *, lr_mult: float,
               weight_decay: float, decay_mult: float) -> optax.GradientTransformation:
  """g += wd decay_mult w (plain L2 added to the gradient, not decoupled decay), then `direction`,
  then scale by -lr_t lr_mult (the rate applies after the momentum, like optax.sgd)."""
  parts = ([optax.add_decayed_weights(weight_decay * decay_mult)] if weight_decay * decay_mult
           else [])
  parts += [direction, optax.scale_by_learning_rate(lambda count: schedule(count) * lr_mult)]
  return optax.chain(*parts)


def _optax_sgd(schedule: Schedule, momentum: float, **kwargs) -> optax.GradientTransformation:
  """optax-style SGD: v = m v + g; update = -lr_t lr_mult v."""
  return _l2_scaled(optax.trace(decay=momentum), schedule, **kwargs)


def _adam(schedule: Schedule, momentum: float, **kwargs) -> optax.GradientTransformation:
  """Adam (b1 = momentum); for training from scratch in the CPU demo, where SGD without ImageNet
  weights needs far more steps than a demo can spend."""
  return _l2_scaled(optax.scale_by_adam(b1=momentum), schedule, **kwargs)


def _leaf_name(path) -> str:
  last = path[-1] if path else None
  for attr in ('key', 'name', 'idx'):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def param_groups(params: Any, frozen: Any | None = None) -> Any:
  """A pytree like `params` with 'kernel' | 'bias' | 'other' | 'frozen' on every leaf."""
  if frozen is None:
    frozen = jax.tree.map(lambda _: False, params)

  def label(path, _, is_frozen):
    if bool(is_frozen):
      return FROZEN
    name = _leaf_name(path)
    return name if name in (KERNEL, BIAS) else OTHER
  return jax.tree_util.tree_map_with_path(label, params, frozen)


def make_optimizer(*, learning_rate: float, momentum: float, weight_decay: float, params: Any,
                   frozen: Any, bias_lr_mult: float = 2.0, bias_decay_mult: float = 0.0,
                   schedule: str = 'fixed', total_steps: int | None = None,
                   poly_power: float = 0.9, warmup_steps: int = 0, warmup_ratio: float = 0.001,
                   step_every: int = 0, step_gamma: float = 0.1, accumulate_steps: int = 1,
                   caffe: bool = True, algorithm: str = 'sgd') -> optax.GradientTransformation:
  """The FCN optimiser (see the module docstring).

  Args:
    learning_rate: base rate (Caffe base_lr).
    momentum: 0.9 (paper) or 0.99 (Caffe "heavy").
    weight_decay: 5e-4, on kernels only.
    params: the parameter pytree (its leaf names decide the groups).
    frozen: pytree of bools like params (models.frozen_mask); True leaves never change.
    bias_lr_mult / bias_decay_mult: Caffe's multipliers for 'bias' leaves (2 / 0).
    schedule: 'fixed', 'poly', 'cosine' or 'step' (total_steps, warmup_steps and step_every are
      counted in parameter updates; see make_schedule).
    accumulate_steps: k > 1 averages k micro-step gradients per update (optax.MultiSteps).
    caffe: True: Caffe's update (lr inside the momentum). False: optax.sgd-style (trace, then
      scale by -lr) with the L2 term added to the gradient; identical for a fixed rate.
    algorithm: 'sgd' (the paper and the Caffe reference) or 'adam' (b1 = momentum; the CPU demo,
      which trains from scratch).

  Returns:
    An optax.GradientTransformation; `update` needs `params` (weight decay).
  """
  if accumulate_steps < 1:
    raise ValueError(f'accumulate_steps must be >= 1, got {accumulate_steps}')
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f'momentum must be in [0, 1), got {momentum}')
  lr = make_schedule(learning_rate, schedule, total_steps, poly_power, warmup_steps=warmup_steps,
                     warmup_ratio=warmup_ratio, step_every=step_every, step_gamma=step_gamma)
  if algorithm not in ('sgd', 'adam'):
    raise ValueError(f"algorithm must be 'sgd' or 'adam', got {algorithm!r}")
  group = _adam if algorithm == 'adam' else caffe_sgd if caffe else _optax_sgd
  mults = {KERNEL: (1.0, 1.0), BIAS: (bias_lr_mult, bias_decay_mult), OTHER: (1.0, 0.0)}
  transforms = {name: group(lr, momentum, lr_mult=lr_mult, weight_decay=weight_decay,
                            decay_mult=decay_mult)
                for name, (lr_mult, decay_mult) in mults.items()}
  transforms[FROZEN] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, param_groups(params, frozen))
  if accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps, use_grad_mean=True)
    tx = tx.gradient_transformation()
  return tx
