"""nyud_fcn32s_color_d (fcn32s_early_fusion on nyud_v2, color + depth input): `--config
experiments/configs/nyud_fcn32s_color_d.py[:paper|heavy|demo]` (see configs/common.py RECIPES)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('nyud_fcn32s_color_d', preset)
