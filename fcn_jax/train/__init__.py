"""Training and evaluation: pure jit-compiled steps over a device mesh, and the loop around them.

Data flows one way: TFDS source -> grain loader (per-process shard) -> global sharded batch ->
`train_step` (state replicated, batch sharded on 'data', state donated) -> on-device metrics ->
orbax checkpoint / metrics.jsonl / TensorBoard / figures (process 0 only).

  setup.py       what a run resolves before its first step (classes, steps, checks against data)
  inputs.py      its data sources, training iterator and evaluation batches
  step.py        TrainState, train_step, eval_step and their jit over the mesh
  transfer.py    initialisation from another checkpoint (the layers that fit)
  evaluation.py  whole-split evaluation (one confusion matrix per head)
  monitor.py     the score that picks "best" and the one early stopping watches
  loop.py        train_and_evaluate: the loop and its periodic actions
  artifacts.py   results, curves and figures of a finished run
"""

from fcn_jax.parallel import host_copy, make_mesh, replicate, shard_batch
from fcn_jax.train.evaluation import SCORE_KEYS, evaluate, first_examples
from fcn_jax.train.inputs import data_sources, eval_batches, input_layout, train_iterator
from fcn_jax.train.loop import NonFiniteLossError, StopRequest, train_and_evaluate
from fcn_jax.train.setup import (dataset_identity, loss_class_weights, metadata_from_config,
                                 resolve_classes, resolve_num_updates, resolve_run)
from fcn_jax.train.step import (TrainState, compile_eval_step, compile_train_step,
                                create_train_state, eval_step, label_key, model_config,
                                model_from_config, optimizer_from_config, per_head, train_step)
from fcn_jax.train.transfer import initial_variables, transfer_params

__all__ = [
    'NonFiniteLossError', 'SCORE_KEYS', 'StopRequest', 'TrainState', 'compile_eval_step',
    'compile_train_step', 'create_train_state', 'data_sources', 'dataset_identity', 'eval_batches',
    'eval_step', 'evaluate', 'first_examples', 'host_copy', 'initial_variables', 'input_layout',
    'label_key', 'loss_class_weights', 'make_mesh', 'metadata_from_config', 'model_config',
    'model_from_config', 'optimizer_from_config', 'per_head', 'replicate', 'resolve_classes',
    'resolve_num_updates', 'resolve_run', 'shard_batch', 'train_and_evaluate', 'train_iterator',
    'train_step', 'transfer_params',
]
