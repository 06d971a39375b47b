"""Look at a dataset of your own before training on it: `python -m fcn_jax.data.inspect ROOT`.

Detects the layout (folder, coco, voc_like, pairs or split_folders; see fcn_jax.data.layouts),
checks every example as preparation would (counting every problem, with the fix for mask values
outside classes.txt), and prints the images per split, their sizes, their channels and type with
each split's per-channel mean and std, and the classes with their pixel frequencies; then draws
a few examples (image | mask in the class colours) with the class legend.
Exit status 1 when a problem is found (each is listed with its file).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys

import numpy as np
from PIL import Image

from fcn_jax import cli as cli_lib
from fcn_jax import images as images_lib
from fcn_jax import viz
from fcn_jax.data import custom, layouts
from fcn_jax.errors import UserError, cli


def detect_format(root: pathlib.Path) -> str:
  fmt = layouts.detect(root)
  if fmt is None:
    raise UserError(f'{root}: no images/ (folder), JPEGImages/ (voc_like), annotations/ (coco), '
                    f'<split>/ + <split>annot/ or img_dir/ + ann_dir/ (split_folders), or '
                    f'<split>.txt lists of `image mask` pairs (pairs); see python -m '
                    f'fcn_jax.data.inspect --help')
  return fmt


def summary(fmt: str, root: pathlib.Path, val_fraction: float = 0.1, ignore_label: int = 255,
            **options) -> tuple[str, dict]:
  """(printable report, {'classes', 'rows', 'counts'}) of a dataset; raises DataError on problems.
  `options`: classes_file, image_suffix, mask_suffix."""
  classes_file = options.pop('classes_file', '')
  classes = custom.class_info(fmt, root, ignore_label, classes_file)
  splits = custom.source_splits(fmt, root, val_fraction, **options)
  binary = custom.binary_remap(classes, splits)
  rows, counts, sizes, inputs = custom.validate(fmt, root, binary, splits)
  images = sum(len(r) for r in rows.values())
  lines = [f'{fmt} dataset at {root}: {cli_lib.plural(images, "image")}, '
           f'{classes.num_classes} classes']
  if binary is not classes:
    lines.append(f'  masks hold only 0 and 255 with 2 classes: 255 is read as class 1 '
                 f'({classes.names[1]!r}), not ignored (binary masks stored as 0/255)')
  for split, items in rows.items():
    n, max_h, max_w, min_h, min_w = sizes[split]
    lines.append(f'  {split}: {cli_lib.plural(n, "image")}, height {min_h}..{max_h}, '
                 f'width {min_w}..{max_w}')
  lines += input_lines(inputs)
  total = np.sum([counts[s] for s in counts], axis=0)
  lines.append('  class                 id   pixels (all splits)   share   ' +
               '   '.join(f'{s:>8}' for s in counts))
  for i, name in enumerate(classes.names):
    share = total[i] / max(total.sum(), 1)
    per_split = '   '.join(f'{counts[s][i]:>8}' for s in counts)
    warn = '  <- no pixels' if total[i] == 0 else ''
    lines.append(f'  {name[:20]:<20} {i:>3}   {int(total[i]):>19}   {100 * share:5.1f}%   '
                 f'{per_split}{warn}')
  return '\n'.join(lines), {'classes': classes, 'rows': rows, 'counts': counts}


def input_lines(inputs: dict) -> list[str]:
  """What the images hold: their channels and type, and each split's per-channel mean and std
  (what `--config.preprocessing=dataset` normalises with)."""
  form = inputs.get('image_format') or {}
  if not form:
    return []
  kind = ('read as stored (TIFF / 16-bit PNG)' if form['stored'] else
          'photographs, read as RGB')
  lines = [f'  images: {form["channels"]} channel(s), {form["dtype"]}, {kind}']
  for split, stats in (inputs.get('channel_stats') or {}).items():
    if stats:
      pairs = ', '.join(f'{m:.6g} / {s:.6g}' for m, s in zip(stats['mean'], stats['std']))
      lines.append(f'  {split}: per-channel mean / std {pairs}')
  return lines


def examples_figure(data: dict, path: pathlib.Path, count: int = 4) -> pathlib.Path:
  """Image | mask (class colours, ignore in the VOC void colour) rows with the class legend."""
  classes = data['classes']
  items = [item for rows in data['rows'].values() for item in rows][:count]
  rows = []
  for example, mask_png in items:
    image = images_lib.display_rgb(images_lib.decode_input(example.image.read_bytes(),
                                                           example.image))
    with Image.open(io.BytesIO(mask_png)) as m:
      label = np.asarray(m)
    rows.append({'image': image, 'mask': label})
  return viz.comparison_rows(rows, ['image', 'mask'], path, class_names=classes.names,
                             palette=classes.palette)


@cli
def main(argv: list[str] | None = None) -> int:
  parser = cli_lib.ArgumentParser(prog='python -m fcn_jax.data.inspect', description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('root', help='the dataset directory')
  parser.add_argument('--format', choices=('auto',) + layouts.FORMATS, default='auto',
                      help='the layout (default: detected from the directories present)')
  parser.add_argument('--val_fraction', type=float, default=0.1,
                      help='folder format without splits/: the share of images in val')
  parser.add_argument('--ignore_label', type=int, default=255,
                      help='the mask value that marks ignored pixels in index masks (or a line '
                      '`ignore V` in classes.txt)')
  parser.add_argument('--classes_file', default='',
                      help='classes.txt elsewhere than ROOT/classes.txt')
  parser.add_argument('--image_suffix', default='', help='split_folders: image files <id><suffix>')
  parser.add_argument('--mask_suffix', default='', help='split_folders: mask files <id><suffix>')
  parser.add_argument('--examples', type=int, default=4, help='examples to draw (0: none)')
  parser.add_argument('--out', help='the figure to write (default: ./<root name>_examples.png; '
                      'an existing file is not replaced)')
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root).expanduser()
  if not root.is_dir():
    raise UserError(f'{root}: no such directory')
  fmt = detect_format(root) if args.format == 'auto' else args.format
  try:
    report, data = summary(fmt, root, args.val_fraction, args.ignore_label,
                           classes_file=args.classes_file, image_suffix=args.image_suffix,
                           mask_suffix=args.mask_suffix)
  except custom.DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(report)
  if args.examples > 0:
    out = pathlib.Path(args.out or f'{root.resolve().name}_examples.png')
    if out.exists():
      raise UserError(f'{out} exists; pass another --out')
    print(f'examples: {examples_figure(data, out, args.examples)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
