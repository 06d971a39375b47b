"""Run an artifact written by `python -m fcn_jax.export`: a .fcnx with jax and numpy alone, a .onnx
with onnxruntime and numpy alone.

    from fcn_jax import exported
    model = exported.load('fcn8s.fcnx')          # or 'fcn8s.onnx'
    labels = model.predict(image)                # uint8 RGB (H, W, 3) -> (H, W) uint8 class ids
    scores = model.scores(image)                 # float32 (H, W, num_classes)
    model.class_names, model.palette

This module imports nothing else of fcn_jax (no model code, no flax): the exported StableHLO or ONNX
graph holds the network and its weights. Copy this file beside the artifact to use it without
fcn_jax installed.
"""

from __future__ import annotations

import json
import os
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


class OnnxModel:
  """A .onnx file written by `python -m fcn_jax.export --format onnx`, run by onnxruntime: its
  metadata_props (JSON strings) give the inputs' preprocessing, the fixed size and the heads."""

  def __init__(self, path, providers: list[str] | None = None):
    import onnxruntime
    self.session = onnxruntime.InferenceSession(os.fspath(path),
                                                providers=providers or ['CPUExecutionProvider'])
    props = self.session.get_modelmeta().custom_metadata_map
    self.metadata = {key: json.loads(value) for key, value in props.items()}
    self.size = tuple(self.metadata['size'])
    self.inputs = self.metadata['inputs']
    self.heads = self.metadata['heads']
    self.class_names = list(self.metadata['class_names'])
    self.palette = self.metadata.get('palette')

  @staticmethod
  def preprocess(image: np.ndarray, p: dict) -> np.ndarray:
    x = np.asarray(image, np.float32)
    if p['channels'] == 1 and (x.ndim == 2 or x.shape[-1] != 1):
      x = x[..., None]
    if p['bgr']:
      x = x[..., ::-1]
    if p.get('log'):
      x = np.log(np.maximum(x, 1.0))
    x = x * np.float32(p['scale'])
    return (x - np.asarray(p['mean'], np.float32)) / np.asarray(p['std'], np.float32)

  def scores(self, image) -> np.ndarray | dict[str, np.ndarray]:
    """float32 (H, W, num_classes) scores of one uint8 RGB image ({modality: array} for a fusion
    net); {head: scores} for several heads."""
    parts = image if isinstance(image, dict) else {self.inputs[0]['modality']: image}
    feeds = {}
    for entry in self.inputs:
      if entry['modality'] not in parts:
        raise ValueError(f'the model needs {", ".join(e["modality"] for e in self.inputs)} '
                         f'inputs; missing {entry["modality"]}')
      x = self.preprocess(parts[entry['modality']], entry['preprocessing'])
      h, w = x.shape[:2]
      if h > self.size[0] or w > self.size[1]:
        raise ValueError(f'image {h}x{w} is larger than the exported size '
                         f'{self.size[0]}x{self.size[1]}; export with --sizes that holds it')
      batch = np.zeros((1, *self.size, x.shape[-1]), np.float32)
      batch[0, :h, :w] = x
      feeds[entry['name']] = batch
    outputs = self.session.run([head['output'] for head in self.heads], feeds)
    per_head = {head['name']: out[0, :h, :w] for head, out in zip(self.heads, outputs)}
    return per_head if len(per_head) > 1 else next(iter(per_head.values()))

  def predict(self, image) -> np.ndarray | dict[str, np.ndarray]:
    scores = self.scores(image)
    if isinstance(scores, dict):
      return {k: np.argmax(v, -1).astype(np.uint8) for k, v in scores.items()}
    return np.argmax(scores, -1).astype(np.uint8)


def load(path) -> ExportedModel | OnnxModel:
  """A .onnx file as an OnnxModel, anything else as a .fcnx ExportedModel."""
  return OnnxModel(path) if os.fspath(path).endswith('.onnx') else ExportedModel(path)


def main(argv=None) -> int:
  """`python -m fcn_jax.exported MODEL.fcnx IMAGE... --out DIR`: label PNGs (pixel = class id)."""
  import argparse
  import sys
  parser = argparse.ArgumentParser(
      prog='python -m fcn_jax.exported', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='From the command line: writes DIR/<image stem>.png (8-bit, pixel = class id) for '
      'each image; an existing file is not replaced.')
  parser.add_argument('model', help='the .fcnx or .onnx file written by python -m fcn_jax.export')
  parser.add_argument('images', nargs='+', help='image files (JPEG / PNG)')
  parser.add_argument('--out', required=True, help='output directory (created if missing)')
  args = parser.parse_args(argv)
  from PIL import Image
  model = load(args.model)
  if len(getattr(model, 'heads', ())) > 1 or len(getattr(model, 'inputs', ())) > 1:
    parser.error(f'{args.model} has several heads or inputs; the command line writes one label '
                 'map from one image: use exported.load(...).predict in Python')
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
