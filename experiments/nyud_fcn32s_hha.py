"""Train and evaluate nyud_fcn32s_hha (fcn32s on nyud_v2):

    python -m experiments.nyud_fcn32s_hha --workdir DIR \
        [--config experiments/configs/nyud_fcn32s_hha.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('nyud_fcn32s_hha')
