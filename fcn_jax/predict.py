"""Inference from a checkpoint alone: `python -m fcn_jax.predict --checkpoint DIR --out OUT IMAGE...`.

Writes <stem>.png (VOC palette label map, class id = pixel value), <stem>_overlay.jpg and, with
--save-scores, <stem>_scores.npy (float32 H x W x C scores at the input size). The checkpoint's
metadata supplies the architecture, classes and preprocessing: no training config is needed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image


def predict_images(checkpoint_dir: str | pathlib.Path, images: list[str | pathlib.Path],
                   out_dir: str | pathlib.Path, save_scores: bool = False, which: str = 'best') -> list[pathlib.Path]:
  """Runs the checkpoint on each image file; returns the label-map paths written."""
  import jax
  from fcn_jax import checkpoint, preprocessing, viz
  model, variables, meta = checkpoint.load_inference(checkpoint_dir, which=which)
  prep = preprocessing.get(meta['preprocessing'])
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))  # compiles once per image size
  written = []
  for path in map(pathlib.Path, images):
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert('RGB'))
    except (OSError, ValueError) as e:
      raise SystemExit(f'cannot read image {path}: {e}') from None
    scores = np.asarray(apply(variables, prep(image)[None]))[0]
    label = np.argmax(scores, -1).astype(np.uint8)
    viz.label_png(label).save(out_dir / f'{path.stem}.png')
    Image.fromarray(viz.overlay(image, label)).save(out_dir / f'{path.stem}_overlay.jpg', quality=92)
    if save_scores:
      np.save(out_dir / f'{path.stem}_scores.npy', scores.astype(np.float32))
    written.append(out_dir / f'{path.stem}.png')
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m fcn_jax.predict', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='checkpoint directory (training run or fcn_jax.convert)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--save-scores', action='store_true', help='also write <stem>_scores.npy')
  parser.add_argument('--which', choices=('best', 'latest'), default='best')
  parser.add_argument('images', nargs='+', help='image files (JPEG, PNG, ...)')
  args = parser.parse_args(argv)
  from tqdm.auto import tqdm
  paths = predict_images(args.checkpoint, tqdm(args.images, desc='predict', unit='image',
                                               disable=len(args.images) < 2),
                         args.out, save_scores=args.save_scores, which=args.which)
  print(f'wrote {len(paths)} label maps to {args.out}')


if __name__ == '__main__':
  main(sys.argv[1:])
