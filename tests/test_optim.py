"""The optimiser against Caffe's SGD update written out by hand (FCN_REFERENCE section 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcn_jax import models
from fcn_jax import optim


def _params(seed=0):
  r = np.random.default_rng(seed)
  # Weights of the size trained nets have (|w| ~ 0.1): float32 resolves 1e-8 there.
  f = lambda *s: jnp.asarray(0.1 * r.normal(size=s), jnp.float32)
  return {
      'conv1_1': {'kernel': f(3, 3, 3, 4), 'bias': f(4)},
      'score_fr': {'kernel': f(1, 1, 4, 5), 'bias': f(5)},
      'upscore2': {'kernel': f(4, 4, 5, 5)},   # learnable deconvolution (no bias)
      'upscore8': {'kernel': f(16, 16, 5, 5)},  # frozen
      'inception': {'bn': {'scale': f(4), 'bias': f(4)}},
  }


FROZEN = {'conv1_1': {'kernel': False, 'bias': False}, 'score_fr': {'kernel': False, 'bias': False},
          'upscore2': {'kernel': False}, 'upscore8': {'kernel': True},
          'inception': {'bn': {'scale': False, 'bias': False}}}


def _grads(step):
  return jax.tree.map(lambda x: jnp.asarray(
      np.random.default_rng(100 + step).normal(size=x.shape), jnp.float32), _params())


def _mults(path):
  """(lr_mult, decay_mult, frozen) of a leaf, as the reference prototxt sets them."""
  keys = [p.key for p in path]
  if keys[0] == 'upscore8':
    return 0.0, 0.0, True
  if keys[-1] == 'kernel':
    return 1.0, 1.0, False
  if keys[-1] == 'bias':
    return 2.0, 0.0, False
  return 1.0, 0.0, False  # BatchNorm scale


def _hand_caffe(params, steps, lr_fn, momentum, wd):
  """v = m v + lr_t lr_mult (g + wd decay_mult w); w -= v, leaf by leaf, in float64 numpy."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  w = [np.asarray(x, np.float64).copy() for _, x in flat]
  v = [np.zeros_like(x) for x in w]
  for t in range(steps):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(_grads(t))]
    rate = lr_fn(t)
    for i, (path, _) in enumerate(flat):
      lr_mult, decay_mult, frozen = _mults(path)
      if frozen:
        continue
      local_rate = rate * lr_mult
      d = g[i] + wd * decay_mult * w[i]
      v[i] = momentum * v[i] + local_rate * d
      w[i] = w[i] - v[i]
  return jax.tree.unflatten(treedef, w)


def _run(tx, params, steps, grads_fn=_grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    updates, state = update(grads_fn(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _close(a, b, atol=1e-7):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('momentum', [0.9, 0.99])
def test_caffe_update_matches_hand_formula(momentum):
  params = _params()
  lr, wd = 1e-2, 5e-4
  tx = optim.make_optimizer(learning_rate=lr, momentum=momentum, weight_decay=wd, params=params,
                            frozen=FROZEN)
  got, _ = _run(tx, params, 6)
  _close(got, _hand_caffe(params, 6, lambda t: lr, momentum, wd))
  # Frozen leaves are bit-for-bit unchanged; trained ones moved.
  np.testing.assert_array_equal(got['upscore8']['kernel'], params['upscore8']['kernel'])
  assert not np.allclose(got['conv1_1']['bias'], params['conv1_1']['bias'])


def test_bias_gets_double_rate_and_no_decay():
  params = _params()
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_optimizer(learning_rate=0.1, momentum=0.9, weight_decay=0.5, params=params,
                            frozen=FROZEN)
  updates, _ = tx.update(zero, tx.init(params), params)
  # With zero gradient only the decay moves anything: kernels by -lr*wd*w, biases and BN not at all.
  np.testing.assert_allclose(updates['conv1_1']['kernel'], -0.1 * 0.5 * params['conv1_1']['kernel'],
                             rtol=1e-6)
  for leaf in (updates['conv1_1']['bias'], updates['inception']['bn']['scale'],
               updates['inception']['bn']['bias'], updates['upscore8']['kernel']):
    np.testing.assert_array_equal(leaf, 0)
  ones = jax.tree.map(jnp.ones_like, params)
  tx = optim.make_optimizer(learning_rate=0.1, momentum=0.9, weight_decay=0.0, params=params,
                            frozen=FROZEN)
  updates, _ = tx.update(ones, tx.init(params), params)
  np.testing.assert_allclose(updates['conv1_1']['bias'], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates['conv1_1']['kernel'], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates['inception']['bn']['bias'], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates['inception']['bn']['scale'], -0.1, rtol=1e-6)


def test_frozen_leaves_unchanged_even_with_nan_gradients():
  params = _params()
  tx = optim.make_optimizer(learning_rate=1e-3, momentum=0.99, weight_decay=5e-4, params=params,
                            frozen=FROZEN)
  def grads(t):
    g = _grads(t)
    g['upscore8']['kernel'] = jnp.full_like(g['upscore8']['kernel'], jnp.nan)
    return g
  got, state = _run(tx, params, 3, grads)
  np.testing.assert_array_equal(got['upscore8']['kernel'], params['upscore8']['kernel'])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))


def test_poly_schedule_and_lr_inside_momentum():
  params = _params()
  lr, m, wd, total, power = 0.05, 0.9, 5e-4, 5, 0.9
  lr_fn = lambda t: lr * (1 - t / total) ** power
  tx = optim.make_optimizer(learning_rate=lr, momentum=m, weight_decay=wd, params=params,
                            frozen=FROZEN, schedule='poly', total_steps=total, poly_power=power)
  got, _ = _run(tx, params, 4)
  _close(got, _hand_caffe(params, 4, lr_fn, m, wd))
  sched = optim.make_schedule(lr, 'poly', total, power)
  np.testing.assert_allclose([sched(t) for t in range(7)],
                             [lr_fn(t) for t in range(5)] + [0.0, 0.0], rtol=1e-6)
  # optax-style (lr scales after the momentum) differs once the rate changes...
  tx_optax = optim.make_optimizer(learning_rate=lr, momentum=m, weight_decay=wd, params=params,
                                  frozen=FROZEN, schedule='poly', total_steps=total, caffe=False)
  other, _ = _run(tx_optax, params, 4)
  assert not np.allclose(other['conv1_1']['kernel'], got['conv1_1']['kernel'], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(other['upscore8']['kernel'], params['upscore8']['kernel'])
  with pytest.raises(ValueError, match='total_steps'):
    optim.make_optimizer(learning_rate=lr, momentum=m, weight_decay=wd, params=params,
                         frozen=FROZEN, schedule='poly')


def test_optax_style_equals_caffe_with_fixed_rate():
  params = _params()
  kw = dict(learning_rate=1e-2, momentum=0.9, weight_decay=5e-4, params=params, frozen=FROZEN)
  a, _ = _run(optim.make_optimizer(**kw), params, 5)
  b, _ = _run(optim.make_optimizer(**kw, caffe=False), params, 5)
  _close(a, b, atol=1e-6)


def test_multisteps_accumulation_equals_step_on_mean_gradient():
  params = _params()
  k, lr, m, wd = 3, 1e-2, 0.9, 5e-4
  kw = dict(learning_rate=lr, momentum=m, weight_decay=wd, params=params, frozen=FROZEN)
  acc_tx = optim.make_optimizer(**kw, accumulate_steps=k)
  plain_tx = optim.make_optimizer(**kw)
  # Two full updates of k micro-steps each against two plain steps on the averaged gradients.
  got, state = _run(acc_tx, params, 2 * k)
  mean_grad = lambda s: jax.tree.map(lambda *g: sum(g) / k, *[_grads(s * k + i) for i in range(k)])
  want, _ = _run(plain_tx, params, 2, mean_grad)
  _close(got, want, atol=1e-6)
  assert int(state.gradient_step) == 2 and int(state.mini_step) == 0
  # In between updates the parameters do not move.
  mid, _ = _run(acc_tx, params, k - 1)
  _close(mid, params, atol=0)


def test_real_model_groups_and_frozen_mask():
  model = models.build('fcn8s', width=1 / 16, learnable_upsampling=False)
  params = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))['params']
  groups = optim.param_groups(params, models.frozen_mask(model, params))
  assert groups['conv1_1'] == {'kernel': 'kernel', 'bias': 'bias'}
  assert groups['fc6'] == {'kernel': 'kernel', 'bias': 'bias'}
  for name in ('upscore2', 'upscore_pool4', 'upscore8'):
    assert groups[name] == {'kernel': 'frozen'}
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
  tx = optim.make_optimizer(learning_rate=1e-3, momentum=0.9, weight_decay=5e-4, params=params,
                            frozen=models.frozen_mask(model, params))
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert float(jnp.abs(updates['upscore8']['kernel']).max()) == 0.0
  assert float(jnp.abs(updates['fc6']['kernel']).min()) > 0.0


@pytest.mark.parametrize('schedule', ['fixed', 'poly', 'cosine', 'step'])
@pytest.mark.parametrize('warmup', [0, 4])
def test_schedules_follow_their_formulas_with_and_without_warmup(schedule, warmup):
  import math
  lr, total, power, every, gamma, ratio = 0.1, 20, 0.9, 5, 0.5, 0.01
  main_steps = total - warmup

  def main(t):  # the textbook formulas, from the schedule's own step 0
    if schedule == 'fixed':
      return lr
    if schedule == 'poly':
      return lr * (1 - min(t, main_steps) / main_steps) ** power
    if schedule == 'cosine':
      return lr * 0.5 * (1 + math.cos(math.pi * min(t, main_steps) / main_steps))
    return lr * gamma ** (t // every)

  def expected(t):
    if t < warmup:  # linear from lr * ratio to the schedule's start
      return main(0) * (ratio + (1 - ratio) * t / warmup)
    return main(t - warmup)

  sched = optim.make_schedule(lr, schedule, total, power, warmup_steps=warmup, warmup_ratio=ratio,
                              step_every=every, step_gamma=gamma)
  got = [float(sched(t)) for t in range(total + 3)]
  np.testing.assert_allclose(got, [expected(t) for t in range(total + 3)], rtol=1e-5, atol=1e-9)
  if warmup:
    assert got[0] == pytest.approx(lr * ratio, rel=1e-5) and got[warmup] == pytest.approx(lr)


def test_step_schedule_needs_its_interval():
  with pytest.raises(ValueError, match='step_every'):
    optim.make_schedule(0.1, 'step', 10)
  with pytest.raises(ValueError, match='choose one of fixed, poly, cosine, step'):
    optim.make_schedule(0.1, 'exp', 10)


def test_schedule_fields_are_checked_with_the_config():
  from experiments import common
  from fcn_jax import config_checks
  from fcn_jax.errors import UserError
  c = common.load_config('fcn8s', 'demo')
  c.optim.schedule, c.optim.warmup_steps = 'step', c.num_train_steps
  with pytest.raises(UserError) as e:
    config_checks.check_train_config(c)
  assert 'config.optim.step_every=0' in str(e.value) and 'config.optim.warmup_steps' in str(e.value)
  c.optim.schedule, c.optim.warmup_steps = 'cosine', 10
  config_checks.check_train_config(c)
