"""Train and evaluate fcn32s: `python -m experiments.fcn32s --workdir DIR
[--config experiments/configs/fcn32s.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn32s')
