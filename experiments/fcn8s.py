"""Train and evaluate fcn8s: `python -m experiments.fcn8s --workdir DIR
[--config experiments/configs/fcn8s.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn8s')
