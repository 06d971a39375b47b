"""Initialisation from another checkpoint: staged training (FCN-16s from FCN-32s) and converted
backbones; the layers that fit are copied. A first convolution over another channel count (RGB
weights for 4-band TIFF inputs) is adapted by timm's and segmentation_models_pytorch's rule
(`adapt_first_conv`)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcn_jax import checkpoint as ckpt_lib
from fcn_jax import models, preprocessing, pretrained
from fcn_jax.models import backbones
from fcn_jax.errors import UserError


def adapt_first_conv(kernel: np.ndarray, channels: int) -> np.ndarray:
  """A first convolution's (kh, kw, S, F) kernel for `channels` inputs, as timm's
  adapt_input_conv and segmentation_models_pytorch's patch_first_conv make it: one channel takes
  the sum over the S source channels; C channels repeat them, new[..., c, :] =
  old[..., c % S, :] * S / C, so that inputs of the same scale give activations of the same
  scale."""
  kernel = np.asarray(kernel)
  source = kernel.shape[-2]
  if channels == 1:
    return kernel.sum(axis=-2, keepdims=True)
  return kernel[..., np.arange(channels) % source, :] * (source / channels)


def _first_convs(model: nn.Module) -> dict[str, int]:
  """{parameter name of each input stream's first convolution: its input channels}."""
  first = backbones.get_backbone(model.arch.backbone)[0].name
  return {s.name_of(first): s.channels for s in model.arch.streams}


def _shapes(tree) -> list[tuple[int, ...]]:
  return [np.shape(a) for a in jax.tree.leaves(tree)]


def transfer_params(target: dict, source: dict, adapt: dict[str, int] | None = None
                    ) -> tuple[dict, list[str], list[str]]:
  """Copies every top-level layer of `source` whose shapes match into `target`.

  Returns (params, copied layer names, layers kept at their initialisation). FCN-16s from FCN-32s
  copies the backbone and score_fr; score_pool4 stays zero and upscore2/upscore16 bilinear.
  `adapt` {layer: input channels}: those layers (first convolutions) also copy from a source with
  another input channel count, their kernel adapted by adapt_first_conv (named 'layer (S -> C
  channels)' in the copied list).
  """
  out, copied, kept = dict(target), [], []
  for name, sub in target.items():
    src = source.get(name)
    if src is None or jax.tree.structure(src) != jax.tree.structure(sub):
      kept.append(name)
    elif _shapes(src) == _shapes(sub):
      out[name] = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), src, sub)
      copied.append(name)
    elif name in (adapt or {}) and _input_axis_differs(src, sub):
      channels = adapt[name]
      out[name] = jax.tree.map(
          lambda a, b: jnp.asarray(adapt_first_conv(a, channels) if np.shape(a) != np.shape(b)
                                   else a, b.dtype), src, sub)
      source_channels = next(np.shape(a)[2] for a, b in zip(jax.tree.leaves(src),
                                                             jax.tree.leaves(sub))
                             if np.shape(a) != np.shape(b))
      copied.append(f'{name} ({source_channels} -> {channels} channels)')
    else:
      kept.append(name)
  return out, copied, kept


def _input_axis_differs(source, target) -> bool:
  """Whether two layers differ only in one 4-D kernel's input channels (a first convolution,
  with or without its BatchNorm)."""
  differ = [(np.shape(a), np.shape(b)) for a, b in zip(jax.tree.leaves(source),
                                                        jax.tree.leaves(target))
            if np.shape(a) != np.shape(b)]
  return len(differ) == 1 and all(len(s) == 4 for s in differ[0]) and (
      differ[0][0][:2] + differ[0][0][3:] == differ[0][1][:2] + differ[0][1][3:])

def _check_backbone(config: ml_collections.ConfigDict, meta: dict) -> None:
  """A VGG16 and a VGG16-BN share layer names but not their structure: copying across them would
  fill only the score layers, without a word; refused with the setting that fits."""
  source = (meta.get('model') or {}).get('backbone') or ''
  this = config.model.get('backbone', '') or ''
  if 'vgg16_bn' in (source, this) and source != this:
    fix = (f'--config.model.backbone={source}' if source
           else "--config.model.backbone='' (the arch's plain VGG16)")
    raise UserError(f'{config.init_from} has the {source or "plain VGG16"} backbone, this run '
                    f'{this or "the plain VGG16"}: its layers would not fit; set {fix}')


def initial_variables(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array,
                      log: Callable[[str], None] = print) -> dict:
  variables = models.init_variables(model, rng)  # jitted and cached per model there
  variables = jax.tree.map(np.asarray, variables)
  if not config.init_from:
    return variables
  _, source, meta = ckpt_lib.load_inference(pretrained.resolve(config.init_from, log=log))
  _check_backbone(config, meta)
  statistics = preprocessing.is_statistics(config.preprocessing)
  if meta.get('preprocessing') and meta['preprocessing'] != config.preprocessing:
    if not statistics:
      raise UserError(
          f'{config.init_from} expects {meta["preprocessing"]!r} inputs but config.preprocessing '
          f'is {config.preprocessing!r}; set --config.preprocessing={meta["preprocessing"]}')
    log(f'{config.init_from} was trained on {meta["preprocessing"]!r} inputs; this run normalises '
        f'by its data\'s own statistics (TIFF bands or 16-bit data: the weights\' features are a '
        'start, fine-tuning adapts them)')
  adapt = _first_convs(model)
  params, copied, kept = transfer_params(variables['params'], source['params'], adapt)
  adapted = [c for c in copied if c not in variables['params']]
  if adapted:
    log(f'first convolution adapted to the input channels: {", ".join(adapted)}; new kernel[..., '
        'c, :] = old[..., c % S, :] * S / C (S source, C new channels; one channel: the sum over '
        'the source channels), the rule of timm and segmentation_models_pytorch')
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
