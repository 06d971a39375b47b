"""Train and evaluate fcn_alexnet_caffe: `python -m experiments.fcn_alexnet_caffe --workdir DIR
[--config experiments/configs/fcn_alexnet_caffe.py:PRESET]`."""

from experiments import common

if __name__ == '__main__':
  common.main('fcn_alexnet_caffe')
