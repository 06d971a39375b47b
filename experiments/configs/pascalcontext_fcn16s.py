"""pascalcontext_fcn16s (fcn16s on pascal_context, color input): `--config
experiments/configs/pascalcontext_fcn16s.py[:paper|heavy|demo]` (see configs/common.py RECIPES)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('pascalcontext_fcn16s', preset)
