"""Train and evaluate nyud_fcn32s_color_d (fcn32s_early_fusion on nyud_v2):

    python -m experiments.nyud_fcn32s_color_d --workdir DIR \
        [--config experiments/configs/nyud_fcn32s_color_d.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('nyud_fcn32s_color_d')
