"""Train and evaluate nyud_fcn16s_color_hha (fcn16s_late_fusion on nyud_v2):

    python -m experiments.nyud_fcn16s_color_hha --workdir DIR \
        [--config experiments/configs/nyud_fcn16s_color_hha.py:PRESET]
"""

from experiments import common

if __name__ == '__main__':
  common.main('nyud_fcn16s_color_hha')
