"""Train and evaluate pascalcontext_fcn8s (fcn8s on pascal_context):

    python -m experiments.pascalcontext_fcn8s --workdir DIR \
        [--config experiments/configs/pascalcontext_fcn8s.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('pascalcontext_fcn8s')
