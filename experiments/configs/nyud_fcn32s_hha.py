"""nyud_fcn32s_hha (fcn32s on nyud_v2, hha input): `--config
experiments/configs/nyud_fcn32s_hha.py[:paper|heavy|demo]` (see configs/common.py RECIPES)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('nyud_fcn32s_hha', preset)
