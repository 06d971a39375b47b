"""fcn_googlenet config: `--config experiments/configs/fcn_googlenet.py[:paper|heavy|demo]`
(see configs/common.py)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('fcn_googlenet', preset)
