"""Train and evaluate siftflow_fcn8s (fcn8s_two_heads on sift_flow):

    python -m experiments.siftflow_fcn8s --workdir DIR \
        [--config experiments/configs/siftflow_fcn8s.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('siftflow_fcn8s')
