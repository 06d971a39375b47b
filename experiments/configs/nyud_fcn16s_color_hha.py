"""nyud_fcn16s_color_hha (fcn16s_late_fusion on nyud_v2, color + hha input): `--config
experiments/configs/nyud_fcn16s_color_hha.py[:paper|heavy|demo]` (see configs/common.py RECIPES)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('nyud_fcn16s_color_hha', preset)
