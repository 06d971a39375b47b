"""Train and evaluate pascalcontext_fcn8s: `python -m experiments.pascalcontext_fcn8s --workdir DIR [--config
experiments/configs/pascalcontext_fcn8s.py:PRESET]` (fcn8s on pascal_context)."""

from experiments import common

if __name__ == '__main__':
  common.main('pascalcontext_fcn8s')
