"""pascalcontext_fcn32s (fcn32s on pascal_context, color input): `--config
experiments/configs/pascalcontext_fcn32s.py[:paper|heavy|demo]` (see configs/common.py RECIPES)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('pascalcontext_fcn32s', preset)
