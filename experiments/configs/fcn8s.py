"""fcn8s config: `--config experiments/configs/fcn8s.py[:paper|heavy|demo]`
(see configs/common.py)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('fcn8s', preset)
