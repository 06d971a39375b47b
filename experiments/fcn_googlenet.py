"""Train and evaluate fcn_googlenet: `python -m experiments.fcn_googlenet --workdir DIR
[--config experiments/configs/fcn_googlenet.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn_googlenet')
