"""Synthetic datasets in official on-disk formats, for tests and the CPU demo, and the command that
writes them (`python -m fcn_jax.data.synthetic --out DIR [--format ...]`).

The writers live by format, and every name is importable from here:
- fcn_jax.data.synthetic_voc: PASCAL VOC / SBD trees and archives (the builders' manual directory)
  from deterministic scenes where resolution matters;
- fcn_jax.data.synthetic_custom: the your-own-data layouts (`folder`, `coco`) from colour-shape
  scenes;
- fcn_jax.data.synthetic_reference: the paper's other datasets (SIFT Flow, NYUDv2,
  PASCAL-Context) in their official layouts.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from fcn_jax import cli as cli_lib
from fcn_jax.data.synthetic_custom import (COLOUR_CLASSES, IGNORE_COLOUR,  # noqa: F401
                                           render_colour_scene, write_classes_txt,
                                           write_coco_dataset, write_folder_dataset)
from fcn_jax.data.synthetic_reference import (write_nyud_tree,  # noqa: F401
                                              write_pascal_context_tree, write_sift_flow_tree)
from fcn_jax.data.synthetic_voc import (NUM_CLASSES, SBD_ARCHIVE_NAME, SHAPES,  # noqa: F401
                                        TEXTURES, VOC_ARCHIVE_NAMES, class_style, image_id,
                                        move_new_files, pack_sbd_archive, pack_voc_archive,
                                        render_scene, save_jpeg, write_manual_dir, write_sbd_tree,
                                        write_voc_tree, write_voc_tree_atomically)

FORMATS = ('voc', 'folder', 'coco', 'sift_flow', 'nyud', 'pascal_context')


def _parser() -> argparse.ArgumentParser:
  p = cli_lib.ArgumentParser(
      prog='python -m fcn_jax.data.synthetic',
      description='Write a synthetic dataset: by default a manual directory in the official PASCAL '
      'VOC 2012 / 2011 and SBD formats (VOCdevkit/ and benchmark_RELEASE/ trees, or the official '
      'archive names), for the builders\' manual_dir; with --format folder|coco a small dataset in '
      'the your-own-data layouts (fcn_jax.data.custom). Never replaces an existing file: if any of '
      'the files to write exists in --out, nothing is written.')
  p.add_argument('--format', choices=FORMATS, default='voc',
                 help='voc: the PASCAL VOC / SBD manual directory (default); folder or coco: a '
                 'small dataset of your-own-data kind (colour shapes; see fcn_jax.data.custom); '
                 'sift_flow, nyud, pascal_context: a manual directory in that dataset\'s official '
                 'layout (--num_train / --num_val images; nyud also --num_val as its test split)')
  p.add_argument('--out', required=True, help='directory to write into (created if missing)')
  p.add_argument('--num_train', type=int, default=40, help='folder / coco: training images')
  p.add_argument('--num_val', type=int, default=10, help='folder / coco: validation images')
  p.add_argument('--classes', type=int, default=4,
                 help='folder / coco: classes including background (2..8; default %(default)s)')
  p.add_argument('--mask', choices=('colour', 'index'), default='colour',
                 help='folder: colour masks (classes.txt with colours) or index PNGs')
  p.add_argument('--voc_train', type=int, default=200,
                 help='VOC segmentation train images (per year)')
  p.add_argument('--voc_val', type=int, default=100,
                 help='VOC segmentation val images (per year)')
  p.add_argument('--sbd_train', type=int, default=400, help='SBD train images')
  p.add_argument('--sbd_val', type=int, default=100, help='SBD val images')
  p.add_argument('--seed', type=int, default=0, help='scene generator seed')
  p.add_argument('--min_size', type=int, default=64, help='smallest image side, pixels')
  p.add_argument('--max_size', type=int, default=96, help='largest image side, pixels')
  p.add_argument('--archived', action='store_true',
                 help='write the official archive files (VOCtrainval_*.tar, benchmark.tgz) instead '
                 'of trees')
  return p


def _writer(a: argparse.Namespace):
  """write(directory) for a --format other than voc."""
  kw = dict(num_train=a.num_train, num_val=a.num_val, num_classes=a.classes, seed=a.seed)
  if a.format == 'folder':
    return lambda d: write_folder_dataset(d, mask=a.mask, **kw)
  if a.format == 'coco':
    return lambda d: write_coco_dataset(d, **kw)
  if a.format == 'sift_flow':
    return lambda d: write_sift_flow_tree(d, num_trainval=a.num_train, num_test=a.num_val,
                                          seed=a.seed)
  if a.format == 'nyud':
    return lambda d: write_nyud_tree(d, num_train=a.num_train, num_val=a.num_val,
                                     num_test=a.num_val, seed=a.seed)
  return lambda d: write_pascal_context_tree(d, num_train=a.num_train, num_val=a.num_val,
                                             seed=a.seed)


def main(argv=None) -> int:
  p = _parser()
  a = p.parse_args(argv)
  for name in ('voc_train', 'voc_val', 'sbd_train', 'sbd_val'):
    if getattr(a, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be >= 1')
  if not 1 <= a.min_size <= a.max_size:
    p.error('need 1 <= --min_size <= --max_size')
  try:
    if a.format == 'voc':
      out = write_manual_dir(a.out, voc_train=a.voc_train, voc_val=a.voc_val,
                             sbd_train=a.sbd_train, sbd_val=a.sbd_val, seed=a.seed,
                             min_size=a.min_size, max_size=a.max_size, archived=a.archived)
    else:
      if not 2 <= a.classes <= len(COLOUR_CLASSES):
        p.error(f'--classes must be in 2..{len(COLOUR_CLASSES)}')
      move_new_files(pathlib.Path(a.out), _writer(a))
      out = pathlib.Path(a.out)
  except FileExistsError as e:
    print(f'error: --out {a.out}: {e}', file=sys.stderr)
    return 2
  print(os.fspath(out))
  return 0


if __name__ == '__main__':
  sys.exit(main())
