"""nyud_fcn32s_color (fcn32s on nyud_v2, color input): `--config
experiments/configs/nyud_fcn32s_color.py[:paper|heavy|demo]` (see configs/common.py RECIPES)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('nyud_fcn32s_color', preset)
