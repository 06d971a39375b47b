"""Inference from a checkpoint alone: `python -m fcn_jax.predict --checkpoint DIR --out OUT IMAGE|DIR...`.

For every input image it writes, under OUT and mirroring the inputs' folders below their common
parent (a/img.jpg -> OUT/a/img.png):
  <stem>.png          the label map: an 8-bit palette PNG whose pixel values are the class ids,
                      shown in the classes' colours (the checkpoint's palette)
  <stem>_overlay.jpg  the image with the label map blended over it, and a legend of the classes
                      found (name, colour, share of the image) below it
  <stem>_scores.npy   with --save-scores: float32 (H, W, num_classes) scores at the input size
The checkpoint's metadata supplies the architecture, classes and preprocessing: no training config
is needed. Nothing is overwritten unless --overwrite, and an input is never overwritten. Images are
read as displayed (EXIF orientation applied). An unreadable or too large image is reported and
skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Iterable

import numpy as np
from PIL import Image

from fcn_jax import images as images_lib
from fcn_jax.errors import UserError, cli

OUTPUT_SUFFIXES = {'label': '.png', 'overlay': '_overlay.jpg', 'scores': '_scores.npy'}


def output_paths(inputs: list[pathlib.Path], out_dir: pathlib.Path,
                 save_scores: bool) -> list[dict[str, pathlib.Path]]:
  """Per input, its output files: OUT/<path below the inputs' common parent>/<stem><suffix>.

  Raises UserError when two inputs would write the same file (img.jpg and img.png side by side).
  """
  inputs = [p.resolve() for p in inputs]
  base = pathlib.Path(os.path.commonpath([str(p.parent) for p in inputs])) if inputs else out_dir
  kinds = [k for k in OUTPUT_SUFFIXES if k != 'scores' or save_scores]
  plan, owner = [], {}
  for path in inputs:
    stem = path.relative_to(base).with_suffix('')
    outputs = {k: out_dir / f'{stem}{OUTPUT_SUFFIXES[k]}' for k in kinds}
    for target in outputs.values():
      if target in owner:
        raise UserError(f'{owner[target]} and {path} would both write {target}: rename one of them '
                        f'or predict them in separate runs (different --out)')
      owner[target] = path
    plan.append(outputs)
  return plan


def check_outputs(inputs: list[pathlib.Path], plan: list[dict[str, pathlib.Path]],
                  overwrite: bool) -> None:
  """Refuses to write over an input (ever) or over an existing file (without --overwrite)."""
  input_set = {p.resolve() for p in inputs}
  targets = [t for outputs in plan for t in outputs.values()]
  clobbered = [t for t in targets if t.resolve() in input_set]
  if clobbered:
    raise UserError(f'--out would overwrite the input image {clobbered[0]}'
                    f'{f" (and {len(clobbered) - 1} more)" if len(clobbered) > 1 else ""}; choose '
                    f'another --out directory')
  existing = [t for t in targets if os.path.lexists(t)]
  if existing and not overwrite:
    shown = '\n  '.join(map(str, existing[:5]))
    raise UserError(f'{len(existing)} output files exist already, e.g.\n  {shown}\npass --overwrite '
                    f'to replace them, or choose another --out')


def predict_images(checkpoint_dir: str | pathlib.Path, images: Iterable[str | pathlib.Path],
                   out_dir: str | pathlib.Path, save_scores: bool = False, which: str = 'best',
                   overwrite: bool = False, max_size: int = images_lib.DEFAULT_MAX_SIZE,
                   progress: bool = False) -> tuple[list[pathlib.Path], list[str]]:
  """Runs the checkpoint on each image (files, or directories searched recursively).

  Returns (label-map paths written, one message per image that failed). Problems with the inputs
  or --out as a whole (missing files, collisions, existing outputs) raise UserError before the
  model is loaded.
  """
  out_dir = pathlib.Path(out_dir).expanduser().resolve()
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f'--out {out_dir} is a file; give a directory')
  inputs = images_lib.find_images(list(images))
  plan = output_paths(inputs, out_dir, save_scores)
  check_outputs(inputs, plan, overwrite)

  import jax
  from fcn_jax import checkpoint, preprocessing, viz
  model, variables, meta = checkpoint.load_inference(checkpoint_dir, which=which)
  prep = preprocessing.get(meta['preprocessing'])
  palette = meta.get('palette')
  class_names = meta.get('class_names') or [str(i) for i in range(meta.get('num_classes', 21))]
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))  # compiles once per image size
  written, failed = [], []
  items = zip(inputs, plan)
  if progress:
    from tqdm.auto import tqdm
    items = tqdm(items, total=len(inputs), desc='predict', unit='image')
  for path, outputs in items:
    try:
      image = images_lib.read_rgb(path, max_size=max_size)
    except images_lib.ImageError as e:
      failed.append(str(e))
      continue
    scores = np.asarray(apply(variables, prep(image)[None]))[0]
    label = np.argmax(scores, -1).astype(np.uint8)
    outputs['label'].parent.mkdir(parents=True, exist_ok=True)
    viz.label_png(label, palette).save(outputs['label'])
    Image.fromarray(viz.overlay_with_legend(image, label, class_names, palette)).save(
        outputs['overlay'], quality=92)
    if save_scores:
      np.save(outputs['scores'], scores.astype(np.float32))
    written.append(outputs['label'])
  return written, failed


@cli
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m fcn_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='a training WORKDIR (or its checkpoints/), or fcn_jax.convert output')
  parser.add_argument('--out', required=True, help='output directory (created if missing)')
  parser.add_argument('--save-scores', action='store_true', help='also write <stem>_scores.npy')
  parser.add_argument('--which', default='best',
                      help='best (highest mean IU; default), latest, or a step number')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace output files that exist (inputs are never replaced)')
  parser.add_argument('--max-size', type=int, default=images_lib.DEFAULT_MAX_SIZE,
                      help='longest image side accepted, in pixels (default %(default)s; 0 = no '
                      'limit): larger images are reported and skipped, since memory grows with the '
                      'pixel count')
  parser.add_argument('images', nargs='+', help='image files, or directories (searched recursively)')
  args = parser.parse_args(argv)
  if args.max_size < 0:
    parser.error('--max-size must be >= 0')
  paths, failed = predict_images(args.checkpoint, args.images, args.out,
                                 save_scores=args.save_scores, which=args.which,
                                 overwrite=args.overwrite, max_size=args.max_size, progress=True)
  for message in failed:
    print(f'error: {message}', file=sys.stderr)
  print(f'wrote {len(paths)} label maps to {args.out}' +
        (f'; {len(failed)} images failed (listed above)' if failed else ''))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
