"""Train and evaluate torchvision's FCN-ResNet50: `python -m experiments.fcn_resnet50 --workdir DIR
[--config experiments/configs/fcn_resnet50.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn_resnet50')
