"""Train and evaluate fcn16s: `python -m experiments.fcn16s --workdir DIR
[--config experiments/configs/fcn16s.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn16s')
