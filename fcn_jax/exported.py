"""Run an artifact written by `python -m fcn_jax.export` with jax and numpy alone.

    from fcn_jax import exported
    model = exported.load('fcn8s.fcnx')
    labels = model.predict(image)                # uint8 RGB (H, W, 3) -> (H, W) uint8 class ids
    scores = model.scores(image)                 # float32 (H, W, num_classes)
    model.class_names, model.palette

This module imports nothing else of fcn_jax (no model code, no flax): the exported StableHLO holds
the network and its weights. Copy this file beside the artifact to use it without fcn_jax installed.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np


class ExportedModel:

  def __init__(self, path):
    from jax import export as jax_export
    with zipfile.ZipFile(path) as z:
      self.metadata = json.loads(z.read('metadata.json'))
      self._modules = {
          tuple(size): jax_export.deserialize(
              bytearray(z.read(f'model_{size[0]}x{size[1]}.stablehlo')))
          for size in self.metadata['sizes']}
    self.class_names = list(self.metadata['class_names'])
    self.palette = self.metadata.get('palette')

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    p = self.metadata['preprocessing']
    x = np.asarray(image, np.float32)
    if p['bgr']:
      x = x[..., ::-1]
    x = x * np.float32(p['scale'])
    return (x - np.asarray(p['mean'], np.float32)) / np.asarray(p['std'], np.float32)

  def size_for(self, height: int, width: int) -> tuple[int, int]:
    fits = [s for s in self._modules if s[0] >= height and s[1] >= width]
    if not fits:
      raise ValueError(f'image {height}x{width} is larger than every exported size '
                       f'{sorted(self._modules)}; export with --sizes that hold it')
    return min(fits, key=lambda s: s[0] * s[1])

  def scores(self, image: np.ndarray) -> np.ndarray:
    """float32 (H, W, num_classes) scores of one uint8 RGB image."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    bh, bw = self.size_for(h, w)
    batch = np.zeros((1, bh, bw, 3), np.float32)
    batch[0, :h, :w] = self.preprocess(image)
    return np.asarray(self._modules[(bh, bw)].call(batch))[0, :h, :w]

  def predict(self, image: np.ndarray) -> np.ndarray:
    return np.argmax(self.scores(image), -1).astype(np.uint8)


def load(path) -> ExportedModel:
  return ExportedModel(path)


def main(argv=None) -> int:
  """`python -m fcn_jax.exported MODEL.fcnx IMAGE... --out DIR`: label PNGs (pixel = class id)."""
  import argparse
  import os
  import sys
  parser = argparse.ArgumentParser(
      prog='python -m fcn_jax.exported', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='From the command line: writes DIR/<image stem>.png (8-bit, pixel = class id) for '
      'each image; an existing file is not replaced.')
  parser.add_argument('model', help='the .fcnx file written by python -m fcn_jax.export')
  parser.add_argument('images', nargs='+', help='image files (JPEG / PNG)')
  parser.add_argument('--out', required=True, help='output directory (created if missing)')
  args = parser.parse_args(argv)
  from PIL import Image
  model = load(args.model)
  os.makedirs(args.out, exist_ok=True)
  failed = 0
  for name in args.images:
    target = os.path.join(args.out, os.path.splitext(os.path.basename(name))[0] + '.png')
    if os.path.exists(target):
      print(f'error: {target} exists; not replaced', file=sys.stderr)
      failed += 1
      continue
    try:
      with Image.open(name) as im:
        image = np.asarray(im.convert('RGB'))
      Image.fromarray(model.predict(image)).save(target)
    except (OSError, ValueError) as e:
      print(f'error: {name}: {e}', file=sys.stderr)
      failed += 1
      continue
    print(target)
  return 1 if failed else 0


if __name__ == '__main__':
  raise SystemExit(main())
