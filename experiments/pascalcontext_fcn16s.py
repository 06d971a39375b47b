"""Train and evaluate pascalcontext_fcn16s (fcn16s on pascal_context):

    python -m experiments.pascalcontext_fcn16s --workdir DIR \
        [--config experiments/configs/pascalcontext_fcn16s.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('pascalcontext_fcn16s')
