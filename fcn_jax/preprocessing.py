"""Input conventions. The preprocessing belongs to the weights and travels with every checkpoint.

- `caffe_bgr`: Caffe-trained weights (VGG_ILSVRC_16_layers, the released FCNs): BGR, 0..255, minus the
  Caffe mean.
- `torchvision_rgb`: torchvision ImageNet weights: RGB / 255, minus the ImageNet mean, over its std.
- `inception_rgb`: torchvision GoogLeNet with transform_input=True: RGB / 255 mapped to [-1, 1].
"""

from __future__ import annotations

import dataclasses

import numpy as np

CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  name: str
  bgr: bool        # reverse the channels of an RGB image
  scale: float     # multiply 0..255 values by this first
  mean: tuple[float, float, float]  # in the model's channel order, after scaling
  std: tuple[float, float, float]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., H, W, 3) -> float32 model input of the same shape."""
    x = np.asarray(images, np.float32)
    if x.shape[-1] != 3:
      raise ValueError(f'expected RGB images (..., H, W, 3), got shape {x.shape}')
    if self.bgr:
      x = x[..., ::-1]
    x = x * np.float32(self.scale)
    return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

  def invert(self, inputs: np.ndarray) -> np.ndarray:
    """Model input -> uint8 RGB (for figures)."""
    x = np.asarray(inputs, np.float32) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
    x = x / np.float32(self.scale)
    if self.bgr:
      x = x[..., ::-1]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


PRESETS = {
    'caffe_bgr': Preprocessing('caffe_bgr', True, 1.0, CAFFE_BGR_MEAN, (1.0, 1.0, 1.0)),
    'torchvision_rgb': Preprocessing('torchvision_rgb', False, 1 / 255, IMAGENET_MEAN, IMAGENET_STD),
    'inception_rgb': Preprocessing('inception_rgb', False, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def get(name: str) -> Preprocessing:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f'unknown preprocessing {name!r}; choose one of {sorted(PRESETS)}') from None
