"""Train and evaluate siftflow_fcn16s (fcn16s_two_heads on sift_flow):

    python -m experiments.siftflow_fcn16s --workdir DIR \
        [--config experiments/configs/siftflow_fcn16s.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('siftflow_fcn16s')
