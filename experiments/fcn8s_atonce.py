"""Train and evaluate fcn8s_atonce: `python -m experiments.fcn8s_atonce --workdir DIR
[--config experiments/configs/fcn8s_atonce.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn8s_atonce')
