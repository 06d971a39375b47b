"""Train and evaluate siftflow_fcn8s: `python -m experiments.siftflow_fcn8s --workdir DIR [--config
experiments/configs/siftflow_fcn8s.py:PRESET]` (fcn8s_two_heads on sift_flow)."""

from experiments import common

if __name__ == '__main__':
  common.main('siftflow_fcn8s')
