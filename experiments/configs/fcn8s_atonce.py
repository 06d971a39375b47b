"""fcn8s_atonce config: `--config experiments/configs/fcn8s_atonce.py[:paper|heavy|demo]`
(see configs/common.py)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('fcn8s_atonce', preset)
