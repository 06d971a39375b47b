"""Resume is exact with each learning-rate schedule and the moving average on: a run that stops at
a checkpoint (SIGKILL leaves the last one) and restarts from it takes the same updates as one that
never stopped. The schedules read the optimiser's update count, which must come back from the
checkpoint with everything else (tests/test_train.py kills a real run mid-training)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax import checkpoint, optim, train

TOTAL, KILLED_AT = 12, 5
META = {'arch': 'fcn32s', 'num_classes': 3, 'width': 1 / 16, 'class_names': ['a', 'b', 'c']}


class TinySegmenter(nn.Module):
  """conv -> BatchNorm (trained statistics, averaged by the EMA too) -> relu -> 1x1 scores."""
  head_names = ('score',)
  num_classes = (3,)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Conv(3, (1, 1))(x)


def _batches():
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(2, 12, 12, 3)).astype(np.float32),
           'label': rng.integers(0, 3, size=(2, 12, 12)).astype(np.int32)} for _ in range(TOTAL)]


def _setup(schedule: dict, algorithm: str, accumulate: int):
  model = TinySegmenter()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)))
  frozen = jax.tree.map(lambda _: False, variables['params'])
  tx = optim.make_optimizer(learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                            params=variables['params'], frozen=frozen, algorithm=algorithm,
                            total_steps=TOTAL // accumulate, accumulate_steps=accumulate,
                            **schedule)
  state = train.create_train_state(model, tx, variables, jax.random.key(1), ema=True)
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, normalize_loss=True,
                                               ema_decay=0.8, accumulate_steps=accumulate))
  return state, step


def _leaves(state):
  out = []
  for x in jax.tree.leaves(state):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out.append(np.asarray(x))
  return out


SCHEDULES = {
    'fixed': dict(schedule='fixed'),
    'poly': dict(schedule='poly', poly_power=0.9),
    'poly+warmup': dict(schedule='poly', warmup_steps=3, warmup_ratio=0.1),
    'cosine': dict(schedule='cosine'),
    'step': dict(schedule='step', step_every=2, step_gamma=0.5),
    'cosine+warmup': dict(schedule='cosine', warmup_steps=2),
}


# Every schedule with Caffe's SGD; Adam and gradient accumulation with a warmed-up schedule each.
CASES = [(name, 'sgd', 1) for name in SCHEDULES] + [('poly+warmup', 'adam', 1),
                                                    ('cosine+warmup', 'sgd', 2)]


def test_resume_from_a_checkpoint_is_exact_with_every_schedule_and_ema(tmp_path):
  batches = _batches()
  for name, algorithm, accumulate in CASES:
    schedule = SCHEDULES[name]
    state, step = _setup(schedule, algorithm, accumulate)
    uninterrupted = state
    for batch in batches:
      uninterrupted, _ = step(uninterrupted, batch)

    # The killed run: checkpointed at KILLED_AT; the restart restores into a new initial state.
    state, _ = _setup(schedule, algorithm, accumulate)
    for batch in batches[:KILLED_AT]:
      state, _ = step(state, batch)
    with checkpoint.Checkpointer(tmp_path / f'{name}_{algorithm}_{accumulate}') as ckpt:
      ckpt.save(KILLED_AT, state, metadata=META)
      fresh, _ = _setup(schedule, algorithm, accumulate)
      resumed, _, _ = ckpt.restore(fresh, step=KILLED_AT)
    assert int(resumed.step) == KILLED_AT
    for batch in batches[KILLED_AT:]:
      resumed, _ = step(resumed, batch)
    got, want = _leaves(resumed), _leaves(uninterrupted)
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b, err_msg=f'{name}, {algorithm}, accumulate {accumulate}')
    # The schedule moved the rate over the run (else the test could not see a lost count).
    lr = optim.make_schedule(0.05, total_steps=TOTAL // accumulate, **schedule)
    rates = {float(lr(i)) for i in range(TOTAL // accumulate)}
    assert len(rates) > 1 or name == 'fixed', name


def test_a_lost_update_count_would_be_seen(tmp_path):
  """The comparison above can fail: resuming with the count reset to 0 (what a schedule would see
  if the optimiser state were not restored) gives other weights."""
  batches = _batches()
  schedule = SCHEDULES['poly+warmup']
  state, step = _setup(schedule, 'sgd', 1)
  uninterrupted = state
  for batch in batches:
    uninterrupted, _ = step(uninterrupted, batch)
  state, _ = _setup(schedule, 'sgd', 1)
  for batch in batches[:KILLED_AT]:
    state, _ = step(state, batch)
  fresh, step = _setup(schedule, 'sgd', 1)
  wrong = state.replace(opt_state=fresh.opt_state)  # weights kept, schedule position lost
  for batch in batches[KILLED_AT:]:
    wrong, _ = step(wrong, batch)
  assert any(not np.array_equal(a, b)
             for a, b in zip(_leaves(wrong.params), _leaves(uninterrupted.params)))
