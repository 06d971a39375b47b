"""fcn_resnet50 config: `--config experiments/configs/fcn_resnet50.py[:paper|demo]`
(paper: torchvision's reference recipe from its ImageNet ResNet-50; see configs/common.py)."""

from experiments.configs import common


def get_config(preset: str = 'paper'):
  return common.get_config('fcn_resnet50', preset)
