"""fcn_alexnet_caffe config (the CaffeNet layout of the released voc-fcn-alexnet): `--config
experiments/configs/fcn_alexnet_caffe.py[:paper|heavy|demo]` (see configs/common.py)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('fcn_alexnet_caffe', preset)
