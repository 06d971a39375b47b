"""Initialisation from another checkpoint: staged training (FCN-16s from FCN-32s) and converted
backbones; the layers that fit are copied."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcn_jax import checkpoint as ckpt_lib
from fcn_jax import models, pretrained
from fcn_jax.errors import UserError


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
  _, source, meta = ckpt_lib.load_inference(pretrained.resolve(config.init_from, log=log))
  if meta.get('preprocessing') and meta['preprocessing'] != config.preprocessing:
    raise UserError(
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
    variables['batch_stats'], _, _ = transfer_params(variables['batch_stats'],
                                                     source['batch_stats'])
  return variables
