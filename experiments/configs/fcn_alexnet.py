"""fcn_alexnet config: `--config experiments/configs/fcn_alexnet.py[:paper|heavy|demo]`
(see configs/common.py)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('fcn_alexnet', preset)
