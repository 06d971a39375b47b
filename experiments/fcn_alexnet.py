"""Train and evaluate fcn_alexnet: `python -m experiments.fcn_alexnet --workdir DIR
[--config experiments/configs/fcn_alexnet.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn_alexnet')
