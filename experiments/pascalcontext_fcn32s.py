"""Train and evaluate pascalcontext_fcn32s (fcn32s on pascal_context):

    python -m experiments.pascalcontext_fcn32s --workdir DIR \
        [--config experiments/configs/pascalcontext_fcn32s.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('pascalcontext_fcn32s')
