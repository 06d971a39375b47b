"""Train and evaluate torchvision's FCN-ResNet101:
`python -m experiments.fcn_resnet101 --workdir DIR
[--config experiments/configs/fcn_resnet101.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn_resnet101')
