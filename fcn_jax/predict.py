"""Inference from a checkpoint alone:
`python -m fcn_jax.predict --checkpoint DIR --out OUT IMAGE|DIR...`.

For every input image it writes, under OUT and mirroring the inputs' folders below their common
parent (a/img.jpg -> OUT/a/img.png):
  <stem>.png          the label map: an 8-bit palette PNG whose pixel values are the class ids,
                      shown in the classes' colours (the checkpoint's palette)
  <stem>_overlay.jpg  the image with the label map blended over it, and a legend of the classes
                      found (name, colour, share of the image) below it
  <stem>_scores.npy   with --save_scores: float32 (H, W, num_classes) scores at the input size
                      (--scores_format npz: float16 in a compressed .npz, key 'scores')
A net with several heads (SIFT Flow: semantic, geometric) writes these per head, with the head's
name after the stem: <stem>_semantic.png, <stem>_semantic_overlay.jpg, <stem>_semantic_scores.npy,
<stem>_geometric.png, ...
A net trained on TIFF bands or 16-bit PNG (`--config.preprocessing=dataset`) reads its inputs as
stored, as training did, and normalises them by the training data's statistics (recorded in the
checkpoint); its overlays show the first three bands (one band as grey), contrast-stretched.
A net with more input modalities than colour (NYUD HHA, colour + HHA, colour + depth) reads them
by the image's file name: --hha_dir DIR (HHA PNGs) and --depth_dir DIR (16-bit depth PNGs), each
holding, for IMAGE_DIR/a/img_5001.png, DIR/a/img_5001.png (any image suffix). An HHA-only net
takes the HHA images themselves as its inputs.
The checkpoint's metadata supplies the architecture, classes and preprocessing: no training config
is needed. Images of mixed sizes are batched by size bucket over all local devices (--exact: native
size, one at a time); images past 4 MP (or all, with --mode slide) run by overlapping tiles (--tile,
--stride) whose scores are averaged, so a 12000x9000 photo needs memory for its tiles, not for a
whole-image pass; --tta flip,0.75,1,1.25 averages the probabilities of scales and flips. Nothing is
overwritten unless --overwrite (--resume skips what is done), and
an input is never overwritten. Images are
read as displayed (EXIF orientation applied). An unreadable or too large image is reported and
skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Iterable, Iterator

import jax
import numpy as np
from PIL import Image

from fcn_jax import checkpoint, distributed, preprocessing, pretrained, viz
from fcn_jax import cli as cli_lib
from fcn_jax import data as data_lib
from fcn_jax import images as images_lib
from fcn_jax import progress as progress_lib
from fcn_jax import segmenter as segmenter_lib
from fcn_jax.data import identity, pipeline
from fcn_jax.errors import UserError, cli


class RecordInput:
  """One example of a TFDS split (its image bytes), named by the record's file_name."""

  def __init__(self, source, index: int, name: str):
    self.source, self.index, self.name = source, index, name

  def read(self) -> np.ndarray:
    """The image as the model takes it (TIFF / 16-bit PNG records as stored, others RGB)."""
    return data_lib.decode_input(self.source[self.index]['image'])

  def read_modalities(self, names: list[str]) -> dict[str, np.ndarray]:
    """The record's input modalities by name (NYUDv2 records hold colour, HHA and depth)."""
    try:
      inputs, _ = pipeline.decode_planes(self.source[self.index], names)
    except KeyError as e:
      raise images_lib.ImageError(f'{self}: the dataset holds no {e.args[0]!r} input, which this '
                                  f'checkpoint needs') from None
    return inputs

  def __str__(self) -> str:
    return f'{self.name} (record {self.index})'


def dataset_inputs(name: str, split: str, **kwargs) -> list[RecordInput]:
  """Every example of a dataset split (prepared through its builder if needed)."""
  # Preparation (first use) by process 0 first: processes sharing a filesystem must not race.
  source = distributed.main_process_first(lambda: data_lib.get_data_source(name, split, **kwargs),
                                          'fcn_jax.predict_data')
  return [RecordInput(source, i, data_lib.file_name(source[i])) for i in range(len(source))]


OUTPUT_SUFFIXES = {'label': '.png', 'overlay': '_overlay.jpg', 'scores': '_scores.npy'}


def input_base(inputs: list) -> pathlib.Path | None:
  """The common parent of the input files (outputs and companion modalities mirror below it)."""
  files = [p.resolve() for p in inputs if not isinstance(p, RecordInput)]
  return pathlib.Path(os.path.commonpath([str(p.parent) for p in files])) if files else None


def output_paths(inputs: list[pathlib.Path], out_dir: pathlib.Path, save_scores: bool,
                 scores_format: str = 'npy',
                 heads: list[str] | None = None) -> list[dict[str, pathlib.Path]]:
  """Per input, its output files: OUT/<path below the inputs' common parent>/<stem><suffix>
  (keys label, overlay, scores; with several `heads`: label/<head>, overlay/<head>, ...).

  Raises UserError when two inputs would write the same file (img.jpg and img.png side by side).
  """
  base = input_base(inputs) or out_dir
  suffixes = dict(OUTPUT_SUFFIXES, scores=f'_scores.{scores_format}')
  kinds = [k for k in suffixes if k != 'scores' or save_scores]
  plan, owner = [], {}
  for path in inputs:
    if isinstance(path, RecordInput):
      stem = pathlib.PurePosixPath(path.name).with_suffix('')
    else:
      path = path.resolve()
      stem = path.relative_to(base).with_suffix('')
    if heads and len(heads) > 1:
      outputs = {f'{k}/{h}': out_dir / f'{stem}_{h}{suffixes[k]}' for h in heads for k in kinds}
    else:
      outputs = {k: out_dir / f'{stem}{suffixes[k]}' for k in kinds}
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
  input_set = {p.resolve() for p in inputs if not isinstance(p, RecordInput)}
  targets = [t for outputs in plan for t in outputs.values()]
  clobbered = [t for t in targets if t.resolve() in input_set]
  if clobbered:
    raise UserError(f'--out would overwrite the input image {clobbered[0]}'
                    f'{f" (and {len(clobbered) - 1} more)" if len(clobbered) > 1 else ""}; choose '
                    f'another --out directory')
  existing = [t for t in targets if os.path.lexists(t)]
  if existing and not overwrite:
    shown = '\n  '.join(map(str, existing[:5]))
    raise UserError(f'{len(existing)} output files exist already, e.g.\n  {shown}\npass '
                    f'--overwrite to replace them, or choose another --out')


def companion_dirs(modalities: list[str], hha_dir: str | None, depth_dir: str | None,
                   records: bool) -> dict[str, pathlib.Path]:
  """The directories of the modalities besides the images themselves ({'hha': DIR, ...}).

  The first modality is read from the inputs (an HHA-only net's inputs are HHA images); every
  further one needs its --<modality>-dir.
  """
  given = {'hha': hha_dir, 'depth': depth_dir}
  needed = [] if records else modalities[1:]  # dataset records hold their modalities
  for name, directory in given.items():
    if directory and name not in needed:
      raise UserError(f'--{name}_dir: this checkpoint takes {" + ".join(modalities)} inputs, not '
                      f'{name}; leave --{name}_dir out')
  dirs = {}
  for name in needed:
    if name not in given:
      raise UserError(f'this checkpoint needs {name} inputs, which fcn_jax.predict cannot read')
    if not given[name]:
      raise UserError(f'this checkpoint takes {" + ".join(modalities)} inputs: pass --{name}_dir '
                      f'DIR with a {name} image per input image (same file name)')
    directory = pathlib.Path(given[name]).expanduser()
    if not directory.is_dir():
      raise UserError(f'--{name}_dir {directory}: no such directory')
    dirs[name] = directory
  return dirs


# Decoded images held at once: one large photo alone, small ones up to `chunk` together.
CHUNK_PIXELS = 64_000_000


def _decoded(inputs: list[pathlib.Path], max_size: int, workers: int,
             companions: dict[str, pathlib.Path] | None = None,
             modalities: list[str] | None = None, max_pixels: int = 0,
             stored: bool = False) -> Iterator[dict]:
  """Decoded images in input order, read ahead by grain (threads; `workers` > 0: processes).

  Each item holds 'image' (the first modality: RGB; with `stored`, TIFF and 16-bit PNG as stored)
  and the `companions` modalities by name.
  """
  read = images_lib.read_image if stored else images_lib.read_rgb
  import grain.python as grain
  companions = companions or {}
  base = input_base(inputs)

  def decode(index: int) -> dict:
    item = inputs[index]
    try:
      if isinstance(item, RecordInput):
        if not modalities or modalities == ['color']:
          return {'index': index, 'image': item.read()}
        planes = item.read_modalities(modalities)
        return {'index': index, 'image': planes[modalities[0]],
                **{name: planes[name] for name in modalities[1:]}}
      decoded = {'index': index, 'image': read(item, max_size=max_size, max_pixels=max_pixels)}
      for name, directory in companions.items():
        relative = item.resolve().relative_to(base)
        found = images_lib.find_companion(directory, relative)
        if found is None:
          raise images_lib.ImageError(f'{item}: no {name} image for it in {directory} (looked for '
                                      f'{directory / relative.with_suffix(".png")})')
        decoded[name] = images_lib.read_modality(found, name)
        if decoded[name].shape[:2] != decoded['image'].shape[:2]:
          raise images_lib.ImageError(f'{found}: {name} is {decoded[name].shape[1]}x'
                                      f'{decoded[name].shape[0]}, the image {item} '
                                      f'{decoded["image"].shape[1]}x{decoded["image"].shape[0]}')
      return decoded
    except (images_lib.ImageError, OSError, ValueError) as e:
      message = str(e) if isinstance(e, images_lib.ImageError) else f'{item}: {e}'
      return {'index': index, 'error': message}

  dataset = grain.MapDataset.source(list(range(len(inputs)))).map(decode)
  iterator = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
      flags.FLAGS(['fcn_jax.predict'], known_only=True)
    iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(iterator)


def _find_inputs(images: Iterable[str | pathlib.Path], records: list[RecordInput] | None,
                 glob: str | None) -> list:
  """The image files (directories searched recursively), then the dataset records."""
  inputs = images_lib.find_images(list(images), glob=glob) if images else []
  inputs = inputs + list(records or [])
  if not inputs:
    raise UserError('no inputs: give image files or directories, or --dataset and --split')
  return inputs


def _todo(inputs: list, plan: list[dict], resume: bool) -> tuple[list, list[dict]]:
  """This process's share of (inputs, plan); with `resume`, without those whose outputs all
  exist."""
  if jax.process_count() > 1:  # each process predicts its shard; outputs never collide
    shard = slice(jax.process_index(), None, jax.process_count())
    inputs, plan = inputs[shard], plan[shard]
  if resume:
    todo = [i for i, outputs in enumerate(plan) if not all(t.exists() for t in outputs.values())]
    inputs, plan = [inputs[i] for i in todo], [plan[i] for i in todo]
  return inputs, plan


def _batches(items: Iterable[dict], chunk: int, failed: list[str], bar,
             chunk_pixels: int = CHUNK_PIXELS) -> Iterator[list[dict]]:
  """The decoded items in lists of up to `chunk` images and about `chunk_pixels` pixels (one
  large photo goes alone); the messages of those that failed go to `failed` (and count on the
  progress `bar`)."""
  pending: list[dict] = []
  pixels = 0
  for item in items:
    if 'error' in item:
      failed.append(item['error'])
      if bar is not None:
        bar.update(1)
      continue
    pending.append(item)
    pixels += item['image'].shape[0] * item['image'].shape[1]
    if len(pending) >= chunk or pixels >= chunk_pixels:
      yield pending
      pending, pixels = [], 0
  if pending:
    yield pending


def _save_scores(path: pathlib.Path, scores: np.ndarray, scores_format: str) -> None:
  if scores_format == 'npz':
    np.savez_compressed(path, scores=scores.astype(np.float16))
  else:
    np.save(path, scores.astype(np.float32))


def _write_outputs(seg: segmenter_lib.Segmenter, image: np.ndarray, label, scores,
                   outputs: dict[str, pathlib.Path], scores_format: str) -> list[pathlib.Path]:
  """Writes one image's label maps, overlays (and scores, unless None), per head; returns the
  label maps written."""
  written = []
  by_head = label if isinstance(label, dict) else {None: label}
  for head, head_label in by_head.items():
    key = (lambda kind: kind) if head is None else (lambda kind: f'{kind}/{head}')
    outputs[key('label')].parent.mkdir(parents=True, exist_ok=True)
    names, palette = seg.class_names_of(head), seg.palette_of(head)
    viz.label_png(head_label, palette).save(outputs[key('label')])
    Image.fromarray(viz.overlay_with_legend(images_lib.display_rgb(image), head_label, names,
                                            palette)).save(outputs[key('overlay')], quality=92)
    if scores is not None:
      _save_scores(outputs[key('scores')], scores if head is None else scores[head], scores_format)
    written.append(outputs[key('label')])
  return written


def predict_images(checkpoint_dir: str | pathlib.Path, images: Iterable[str | pathlib.Path],
                   out_dir: str | pathlib.Path, save_scores: bool = False, which: str = 'best',
                   overwrite: bool = False, max_size: int = 0,
                   max_pixels: int = images_lib.DEFAULT_MAX_PIXELS, mode: str = 'auto',
                   tile: int = segmenter_lib.DEFAULT_TILE,
                   tile_stride: int = segmenter_lib.DEFAULT_TILE_STRIDE, tta: str | None = None,
                   progress: bool = False, *, resume: bool = False, exact: bool = False,
                   batch_size: int = 8, chunk: int = 64, dtype: str | None = None,
                   scores_format: str = 'npy', workers: int = 0,
                   glob: str | None = None, records: list[RecordInput] | None = None,
                   hha_dir: str | None = None,
                   depth_dir: str | None = None) -> tuple[list[pathlib.Path], list[str]]:
  """Runs the checkpoint on each image (files, or directories searched recursively).

  Images are batched by size bucket (fcn_jax.segmenter; `exact` keeps native-size inference);
  large ones run by tiles (`mode`, `tile`, `tile_stride`); `tta` as the Segmenter's.
  `resume` skips inputs whose outputs all exist. Returns (label-map paths written, one message per
  image that failed). Problems with the inputs or --out as a whole (missing files, collisions,
  existing outputs) raise UserError before the model is loaded.
  """
  out_dir = pathlib.Path(out_dir).expanduser().resolve()
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f'--out {out_dir} is a file; give a directory')
  if scores_format not in ('npy', 'npz'):
    raise UserError(f'scores format {scores_format!r}: npy or npz')
  inputs = _find_inputs(images, records, glob)
  metadata = checkpoint.read_metadata(checkpoint_dir, which)
  heads = list(metadata.get('head_names') or [])
  modalities = [m['name'] for m in preprocessing.modalities_of(metadata)]
  if records and len(inputs) > len(records) and len(modalities) > 1:
    raise UserError(f'a {" + ".join(modalities)} net reads image files with --hha_dir / '
                    f'--depth_dir or a --dataset, not both in one run')
  companions = companion_dirs(modalities, hha_dir, depth_dir, bool(records))
  plan = output_paths(inputs, out_dir, save_scores, scores_format, heads=heads)
  inputs, plan = _todo(inputs, plan, resume)
  check_outputs(inputs, plan, overwrite or resume)

  seg = segmenter_lib.Segmenter.load(checkpoint_dir, which=which, batch_size=batch_size,
                                     dtype=dtype, mode=mode, tile=tile, tile_stride=tile_stride,
                                     tta=tta)
  written, failed = [], []
  bar = progress_lib.Counter(len(inputs), desc='predict', unit='images') if progress else None
  stored = seg.image_preprocessing.stored
  items = (_decoded(inputs, max_size, workers, companions, modalities, max_pixels, stored)
           if inputs else ())
  for pending in _batches(items, chunk, failed, bar):
    # The inputs are the first modality (an HHA-only net reads HHA images), the others companions.
    results = seg([{modalities[0]: p['image'], **{name: p[name] for name in modalities[1:]}}
                   for p in pending], scores=save_scores, exact=exact)
    labels = results['labels'] if save_scores else results
    for k, (item, label) in enumerate(zip(pending, labels)):
      scores = results['scores'][k] if save_scores else None
      written += _write_outputs(seg, item['image'], label, scores, plan[item['index']],
                                scores_format)
    if bar is not None:
      bar.update(len(pending))
  if bar is not None:
    bar.close()
  return written, failed


def _parser() -> argparse.ArgumentParser:
  parser = cli_lib.ArgumentParser(prog='python -m fcn_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint',
                      help='a training WORKDIR (or its checkpoints/), fcn_jax.convert output, or '
                      'pretrained:NAME')
  source.add_argument('--model', help='pretrained weights by name (python -m fcn_jax.pretrained '
                      'list): downloaded, verified and converted into the cache on first use')
  parser.add_argument('--weights', help='with --model: a local copy of its file (no download)')
  parser.add_argument('--out', required=True, help='output directory (created if missing)')
  parser.add_argument('--save_scores', action='store_true', help='also write <stem>_scores.npy')
  parser.add_argument('--which', default='best',
                      help='best (highest mean IU; default), latest, or a step number')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace output files that exist (inputs are never replaced)')
  parser.add_argument('--max_pixels', type=int, default=images_lib.DEFAULT_MAX_PIXELS,
                      help='most pixels per image accepted (default %(default)s; 0 = no limit), '
                      'checked before decoding: larger images are reported and skipped')
  parser.add_argument('--max_size', type=int, default=0,
                      help='longest image side accepted, in pixels (default 0 = no limit)')
  parser.add_argument('--mode', choices=segmenter_lib.MODES, default='auto',
                      help='whole images, or slide: overlapping tiles with their scores averaged '
                      f'(auto, the default: tiles past {segmenter_lib.WHOLE_MAX_PIXELS} pixels)')
  parser.add_argument('--tile', type=int, default=segmenter_lib.DEFAULT_TILE,
                      help='tile side in pixels (default %(default)s)')
  parser.add_argument('--stride', type=int, default=segmenter_lib.DEFAULT_TILE_STRIDE,
                      help='pixels between tiles (default %(default)s; <= --tile)')
  parser.add_argument('--tta', default='',
                      help='test-time augmentation, e.g. flip,0.75,1,1.25: the probabilities of '
                      'each scale and flip averaged (default: none)')
  parser.add_argument('--resume', action='store_true',
                      help='skip the images whose outputs all exist (after an interrupted run)')
  parser.add_argument('--exact', action='store_true',
                      help='native-size inference, one image at a time (one compile per size); '
                      'default: batches padded to size buckets (multiples of 64 px)')
  parser.add_argument('--batch_size', type=int, default=8, help='images per batch (default 8)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), help='compute dtype (default: '
                      'the checkpoint\'s, float32)')
  parser.add_argument('--scores_format', choices=('npy', 'npz'), default='npy',
                      help='--save_scores as float32 .npy, or float16 compressed .npz')
  parser.add_argument('--hha_dir', help='HHA images for a net with HHA inputs besides colour '
                      '(NYUD late fusion), by the image\'s file name')
  parser.add_argument('--depth_dir', help='depth PNGs for a colour + depth net (NYUD early '
                      'fusion), by the image\'s file name')
  parser.add_argument('--glob', help='inside directories, only the files matching this pattern '
                      '(e.g. "*.jpg"; default: every image)')
  parser.add_argument('--workers', type=int, default=0,
                      help='image-decoding worker processes (0: threads of this process)')
  parser.add_argument('--dataset', help='predict a dataset split instead of files: '
                      'voc_segmentation/2012, sbd, folder, coco, voc_like, pairs, split_folders, '
                      '... (default with --split: the dataset the checkpoint was trained on)')
  parser.add_argument('--split',
                      help='the split of --dataset (default: the run\'s evaluation split)')
  parser.add_argument('--data_dir', help='prepared TFDS data (default: where the run prepared it, '
                      'else ~/tensorflow_datasets)')
  parser.add_argument('--manual_dir', help='VOC / SBD archives or trees, if not prepared yet')
  parser.add_argument('--root', default='', help='the directory of a user dataset (default: the '
                      'checkpoint\'s)')
  parser.add_argument('--coordinator_address', help='several processes (one per host): host:port '
                      'of process 0; each process predicts its shard of the inputs')
  parser.add_argument('--num_processes', type=int, help='number of processes')
  parser.add_argument('--process_id', type=int, help='this process\'s id')
  parser.add_argument('--distributed', choices=('auto', 'on', 'off'), default='auto',
                      help='as in training (fcn_jax.distributed)')
  parser.add_argument('images', nargs='*',
                      help='image files, or directories (searched recursively)')
  return parser


def _dataset_records(args: argparse.Namespace) -> list[RecordInput]:
  """The records of --dataset / --split (default: the checkpoint's dataset and evaluation
  split)."""
  directory = checkpoint.resolve_directory(args.checkpoint)
  spec = identity.resolve(checkpoint.read_metadata(directory, args.which), args.dataset or '',
                          args.split or '', root=args.root, data_dir=args.data_dir,
                          manual_dir=args.manual_dir)
  print(f'predicting {spec.describe()}')
  return dataset_inputs(spec.name, spec.split, **spec.source_kwargs())


@cli
def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if not args.images and not args.dataset and not args.split:
    parser.error('give image files or directories, or --dataset / --split')
  if args.images and (args.dataset or args.split):
    parser.error('give image files or directories, or --dataset / --split, not both')
  if args.weights and not args.model:
    parser.error('--weights goes with --model NAME (the file of that pretrained net)')
  if args.model:
    args.checkpoint = str(pretrained.get(args.model, weights=args.weights))
  else:
    args.checkpoint = pretrained.resolve(args.checkpoint)
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, None,
                         mode=args.distributed)
  records = _dataset_records(args) if args.dataset or args.split else None
  if args.max_size < 0 or args.max_pixels < 0:
    parser.error('--max_size and --max_pixels must be >= 0')
  if args.batch_size < 1 or args.workers < 0:
    parser.error('--batch_size must be >= 1 and --workers >= 0')
  paths, failed = predict_images(args.checkpoint, args.images, args.out,
                                 save_scores=args.save_scores, which=args.which,
                                 overwrite=args.overwrite, max_size=args.max_size,
                                 max_pixels=args.max_pixels, mode=args.mode, tile=args.tile,
                                 tile_stride=args.stride, tta=args.tta or None, progress=True,
                                 resume=args.resume, exact=args.exact, batch_size=args.batch_size,
                                 dtype=args.dtype, scores_format=args.scores_format,
                                 workers=args.workers, glob=args.glob, records=records,
                                 hha_dir=args.hha_dir, depth_dir=args.depth_dir)
  for message in failed:
    print(f'error: {message}', file=sys.stderr)
  print(f'wrote {cli_lib.plural(len(paths), "label map")} to {args.out}' +
        (f'; {cli_lib.plural(len(failed), "image")} failed (listed above)' if failed else ''))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
