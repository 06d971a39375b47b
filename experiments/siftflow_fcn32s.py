"""Train and evaluate siftflow_fcn32s (fcn32s_two_heads on sift_flow):

    python -m experiments.siftflow_fcn32s --workdir DIR \
        [--config experiments/configs/siftflow_fcn32s.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('siftflow_fcn32s')
