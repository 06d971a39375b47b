"""fcn_jax: Fully Convolutional Networks for Semantic Segmentation in JAX/Flax.

The public API at the top level (each loaded on first use, so `import fcn_jax` stays cheap):

    from fcn_jax import Segmenter, build, load
    segmenter = Segmenter.load('runs/fcn8s')           # a ready model from a checkpoint
    model = build('fcn8s', num_classes=21)             # the flax module (models.build)
    model, variables, metadata = load('runs/fcn8s')    # checkpoint.load_inference
"""

import importlib

__version__ = '0.1.0'

# name -> (module, attribute)
_PUBLIC = {
    'Segmenter': ('fcn_jax.segmenter', 'Segmenter'),
    'build': ('fcn_jax.models', 'build'),
    'describe': ('fcn_jax.models', 'describe'),
    'init_variables': ('fcn_jax.models', 'init_variables'),
    'load': ('fcn_jax.checkpoint', 'load_inference'),
    'train_and_evaluate': ('fcn_jax.train', 'train_and_evaluate'),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name in _PUBLIC:
    module, attribute = _PUBLIC[name]
    return getattr(importlib.import_module(module), attribute)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
