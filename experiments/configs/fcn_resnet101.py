"""fcn_resnet101 config: `--config experiments/configs/fcn_resnet101.py[:paper|demo]`
(paper: torchvision's reference recipe from its ImageNet ResNet-101; see configs/common.py)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('fcn_resnet101', preset)
