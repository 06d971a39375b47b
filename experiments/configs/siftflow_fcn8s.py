"""siftflow_fcn8s (fcn8s_two_heads on sift_flow, color input): `--config
experiments/configs/siftflow_fcn8s.py[:paper|heavy|demo]` (see configs/common.py RECIPES)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('siftflow_fcn8s', preset)
