"""Evaluate a checkpoint (trained or converted) on a split, with no training config.

  python -m experiments.evaluate --checkpoint runs/fcn8s \
      --dataset voc_segmentation/2011 --split seg11valid --manual_dir /data/voc

Writes into --out:
  results.json / results.md  the paper's four scores (Table 2 format), per-class IU, precision,
                             recall and F1 (= Dice); results.json also under mmsegmentation's names
                             (aAcc, mIoU, mAcc, mDice, mFscore, mPrecision, mRecall; fractions)
  confusion.csv              the split's confusion matrix: rows ground truth, columns prediction,
                             pixel counts, class names as header (confusion_<head>.csv: other heads)
  confusion.png              the same, normalised by rows
  per_image.csv              each image's pixel accuracy and mean IU (over the classes in its
                             ground truth or prediction), in split order
  worst.png                  the --worst images of lowest mean IU: image | ground truth |
                             prediction | errors (red wrong, grey ignored)
Default --out: a directory of its own per checkpoint, dataset, split and step, beside the
checkpoint (runs/fcn8s/eval/voc_segmentation-2011_seg11valid_step100000/; for converted weights
WEIGHTS_eval/...), so that it never replaces a training run's own results or another checkpoint's.
Existing outputs are not overwritten unless --overwrite (other files in --out are never touched).
"""

from __future__ import annotations

import csv
import math
import pathlib
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from experiments import common
from experiments.configs import common as configs
from fcn_jax import checkpoint, metrics, pretrained, report, train, viz
from fcn_jax import cli as cli_lib
from fcn_jax import data as data_lib
from fcn_jax import preprocessing as preprocessing_lib
from fcn_jax import progress as progress_lib
from fcn_jax import segmenter as segmenter_lib
from fcn_jax.data import identity, pipeline
from fcn_jax.errors import UserError, user_errors_as_exit
from fcn_jax.train.evaluation import ImageAnalysis

flags.DEFINE_string('checkpoint', None, 'A training WORKDIR (or its checkpoints/), the output '
                    'directory of fcn_jax.convert, or pretrained:NAME.', required=True)
flags.DEFINE_string('dataset', '', 'Default: the dataset the checkpoint was trained on (its '
                    'metadata), else voc_segmentation/2011. voc_segmentation/2011 | '
                    'voc_segmentation/2012 | sbd | pascal_context | sift_flow | nyud_v2, or your '
                    'own data: folder | coco | voc_like | pairs | split_folders (with --root)')
flags.DEFINE_string('root', '', 'The directory of a user dataset (default: the checkpoint\'s).')
flags.DEFINE_string('classes_file', '', 'classes.txt elsewhere than ROOT/classes.txt (default: '
                    'the checkpoint\'s).')
flags.DEFINE_float('val_fraction', None, 'folder format without splits/: the share of images in '
                   'val (default: the checkpoint\'s, else 0.1).')
flags.DEFINE_integer('ignore_label', None, 'The mask value a user dataset marks as ignored '
                     '(default: the checkpoint\'s, else 255).')
flags.DEFINE_string('image_suffix', None, 'split_folders: image files <id><suffix>.')
flags.DEFINE_string('mask_suffix', None, 'split_folders: mask files <id><suffix>.')
flags.DEFINE_string('split', '', 'Split to evaluate (default: the split the run evaluated on, '
                    'else the dataset\'s evaluation split).')
flags.DEFINE_string('data_dir', '', 'Prepared TFDS data (default: where the run prepared it, else '
                    '~/tensorflow_datasets).')
flags.DEFINE_string('manual_dir', '', 'Archives or extracted trees, if not prepared yet (default: '
                    'the checkpoint\'s).')
flags.DEFINE_bool('download', False, 'Download the official archives when not prepared.')
flags.DEFINE_integer('pad_to', 0, '0: native size (the reference protocol); S > 0: padded S x S '
                     'batches of --batch_size (S must be at least the largest image side; the '
                     'labels near the padding can differ from native size).')
flags.DEFINE_integer('batch_size', 1, 'Images per batch. At native size (--pad_to 0): images of '
                     'one size go --batch_size at a time over all local devices (a multiple of the '
                     'device count shards them), the others alone; nothing is padded, the scores '
                     'are the one-at-a-time protocol\'s.')
flags.DEFINE_string('which', 'best', 'Which checkpoint of a training run: best, latest or a step.')
flags.DEFINE_string('out', '', 'Output directory (default: see above).')
flags.DEFINE_bool('overwrite', False, 'Replace the outputs (results.json, results.md, '
                  'confusion.csv / .png, per_image.csv, worst.png) that exist in --out.')
flags.DEFINE_integer('worst', 8, 'Images in worst.png: those of lowest mean IU (0: no gallery).')
flags.DEFINE_string('tta', '', 'Test-time augmentation, e.g. flip,0.75,1,1.25: the probabilities '
                    'of each scale and flip averaged (fcn_jax.segmenter; one image at a time).')
flags.DEFINE_enum('mode', 'whole', segmenter_lib.MODES, 'whole (the reference protocol), slide '
                  '(overlapping --tile windows every --stride pixels, scores averaged) or auto '
                  '(slide past 4 MP).')
flags.DEFINE_integer('tile', segmenter_lib.DEFAULT_TILE, 'Tile side for --mode slide / auto.')
flags.DEFINE_integer('stride', segmenter_lib.DEFAULT_TILE_STRIDE, 'Pixels between tiles.')
flags.DEFINE_string('compilation_cache_dir', configs.COMPILATION_CACHE_DIR,
                    'Persistent XLA compilation cache (\'\': none of ours): each native image size '
                    'compiles once, and later evaluations reuse the compiled programs.')


def default_out(checkpoint_dir: str, dataset: str, split: str, step: int) -> pathlib.Path:
  """<run>/eval/<dataset>_<split>_step<N> for a training run's checkpoints/, else
  <weights>_eval/<dataset>_<split>_step<N> beside a converted checkpoint directory."""
  directory = pathlib.Path(checkpoint_dir)
  base = (directory.parent / 'eval' if directory.name == 'checkpoints'
          else directory.parent / f'{directory.name}_eval')
  return base / f'{dataset.replace("/", "-")}_{split}_step{step}'


# What evaluate writes into --out (confusion_<head>.csv / .png besides, for a net's other heads).
OUTPUTS = ('results.json', 'results.md', 'confusion.csv', 'confusion.png', 'per_image.csv',
           'worst.png')


def outputs(head_names: Sequence[str] = ()) -> list[str]:
  """The file names evaluate writes, for a net with these heads (the first one's are OUTPUTS)."""
  return list(OUTPUTS) + [f'confusion_{h}.{ext}' for h in list(head_names)[1:]
                          for ext in ('csv', 'png')]


def check_outputs(out: pathlib.Path, head_names: Sequence[str], overwrite: bool) -> None:
  """Stops before any work if an output is there and --overwrite was not given."""
  existing = [out / name for name in outputs(head_names) if (out / name).exists()]
  if existing and not overwrite:
    raise UserError(f'{existing[0]} exists; pass --overwrite to replace it, or choose another '
                    f'--out')


def check_flags(f, spec) -> None:
  if getattr(f, 'worst', 8) < 0:
    raise UserError(f'--worst {f.worst}: must be >= 0 (0 = no gallery)')
  if f.batch_size < 1:
    raise UserError(f'--batch_size {f.batch_size}: must be >= 1')
  if f.pad_to < 0:
    raise UserError(f'--pad_to {f.pad_to}: must be >= 0 (0 = native size)')
  if f.batch_size > 1 and (getattr(f, 'tta', '') or getattr(f, 'mode', 'whole') != 'whole'):
    raise UserError(f'--batch_size {f.batch_size}: --tta and --mode slide run one image at a time; '
                    'leave --batch_size at 1')
  if f.which not in ('best', 'latest') and not f.which.isdigit():
    raise UserError(f'--which {f.which!r}: best, latest or a step number')
  data_lib.check_split(spec.name, spec.split, **spec.options)
  if f.out and pathlib.Path(f.out).expanduser().is_file():
    raise UserError(f'--out {f.out} is a file; give a directory')


def main(argv) -> None:
  del argv
  with user_errors_as_exit():
    evaluate(flags.FLAGS)


def evaluate(f) -> None:
  common.quiet_logs()
  if f.which not in ('best', 'latest') and not f.which.isdigit():
    raise UserError(f'--which {f.which!r}: best, latest or a step number')
  directory = checkpoint.resolve_directory(pretrained.resolve(f.checkpoint))
  root, step = checkpoint.resolve_step(directory, f.which)
  stored = checkpoint.read_metadata(root, str(step))
  spec = identity.resolve(stored, f.dataset, f.split,
                          **{k: getattr(f, k, None) for k in identity.OVERRIDABLE})
  check_flags(f, spec)  # before the model is loaded or data prepared
  dataset, split = spec.name, spec.split
  print(f'evaluating step {step} of {root} on {spec.describe()}')
  out = (pathlib.Path(f.out).expanduser().resolve() if f.out
         else default_out(root, dataset, split, step))
  check_outputs(out, stored.get('head_names') or (), f.overwrite)
  common.enable_compilation_cache(f.compilation_cache_dir)
  model, variables, meta = checkpoint.load_inference(root, which=str(step))
  check_outputs(out, model.head_names, f.overwrite)  # metadata without head names
  try:
    source = data_lib.get_data_source(dataset, split, download=f.download, **spec.source_kwargs())
  except data_lib.MissingDataError as e:
    raise UserError(f'{e}\n\nGive --manual_dir DIR (the archives or trees above) or --download, or '
                    f'--data_dir where the data is prepared.') from None
  # Every head of the net must be a head of the dataset, with as many classes.
  dataset_heads = data_lib.head_classes(source)
  net_heads = list(model.head_names)
  if len(net_heads) == 1 and len(dataset_heads) == 1:
    dataset_heads = {net_heads[0]: next(iter(dataset_heads.values()))}
  for head, count in zip(net_heads, model.num_classes):
    if head not in dataset_heads:
      raise UserError(f'the checkpoint predicts {", ".join(net_heads)}; the dataset {dataset} '
                      f'labels {", ".join(map(str, dataset_heads))}: evaluate it on the data it '
                      f'was trained for')
    n = dataset_heads[head][0].num_classes
    if n != count:
      raise UserError(f'the checkpoint predicts {count} classes ({head}), the dataset {dataset} '
                      f'has {n}: evaluate it on the data it was trained for')
  modalities = [(m['name'], m['preprocessing']) for m in preprocessing_lib.modalities_of(meta)]
  batches = pipeline.eval_batches(source, preprocessing=meta['preprocessing'],
                                  batch_size=f.batch_size, pad_to=f.pad_to or None,
                                  modalities=modalities, heads=net_heads)
  exclude = {h: dataset_heads[h][1] for h in net_heads}
  analysis = ImageAnalysis(worst=getattr(f, 'worst', 8))
  if getattr(f, 'tta', '') or getattr(f, 'mode', 'whole') != 'whole':
    seg = segmenter_lib.Segmenter(model, variables, meta, batch_size=1, mode=f.mode, tile=f.tile,
                                  tile_stride=f.stride, tta=f.tta or None)
    seg.require_single_colour_net('--tta / --mode slide')
    scores = segmenter_evaluate(seg, source, exclude[net_heads[0]], analysis)
  else:
    scores, _ = train.evaluate(model, variables, batches, progress=True, exclude=exclude,
                               analysis=analysis)
  class_names = meta.get('class_names') or [str(i) for i in range(model.num_classes[0])]
  name = meta.get('zoo_name') or meta.get('experiment') or meta['arch']
  first = net_heads[0]
  detailed = metrics.class_scores(analysis.confusion[first], exclude[first])
  report.write_results(out, name, scores, class_names,
                       extra={'checkpoint': str(root), 'step': step, 'dataset': dataset,
                              'split': split, 'images': len(source),
                              **class_records(detailed, class_names),
                              'worst_images': worst_records(analysis)})
  written = write_analysis(out, analysis, source, model, class_names,
                           {h: dataset_heads[h][0] for h in net_heads}, meta.get('palette'))
  with (out / 'results.md').open('a') as md:
    md.write(f'\n{class_table(detailed, class_names)}\n\nAlso here: {", ".join(written)}.\n')
  print(report.table_markdown([(name, scores)] + report.paper_rows(name)))
  for head, head_scores in list((scores.get('heads') or {}).items())[1:]:
    print(f'{head} head: pixel acc. {100 * head_scores["pixel_acc"]:.1f}')
  absent = report.absent_classes(scores, class_names)
  if absent:
    print(report.absent_note(absent))
  print(f'{split}: mean IU {100 * scores["mean_iu"]:.2f} over {len(source)} '
        f'image{"" if len(source) == 1 else "s"}')
  print(f'wrote {", ".join(["results.json", "results.md"] + written)} into {out}')


def segmenter_evaluate(seg: segmenter_lib.Segmenter, source, exclude: tuple[int, ...],
                       analysis: ImageAnalysis) -> dict:
  """The split's scores through the Segmenter (tiles, TTA), one image at a time at its native
  size: the same confusion-matrix protocol as train.evaluate (void pixels never count)."""
  num_classes = seg.model.num_classes[0]
  total = np.zeros((num_classes, num_classes), np.int64)
  for i in progress_lib.track(range(len(source)), desc='eval', unit='images'):
    image, label = data_lib.decode_example(source[i])
    prediction = seg(image, exact=True)
    total += np.asarray(metrics.confusion_matrix(label, prediction, num_classes), np.int64)
    analysis.add(label[None], prediction[None], [data_lib.file_name(source[i])], num_classes,
                 exclude)
  analysis.check(total)
  analysis.confusion = {seg.head_names[0]: total}
  return metrics.segmentation_scores(total, exclude)


def _json_value(v: Any) -> Any:
  """nan (an undefined score) as null, as report.write_results writes it: JSON has no NaN."""
  return None if isinstance(v, float) and not math.isfinite(v) else v


def class_records(detailed: dict, class_names: Sequence[str]) -> dict:
  """results.json's additions: per-class precision, recall, F1 and Dice by class name, their
  means, and mmsegmentation's names for the scores."""
  record: dict[str, Any] = {}
  for key in ('precision', 'recall', 'f1', 'dice'):
    record[f'mean_{key}'] = _json_value(detailed[f'mean_{key}'])
  for key in ('precision', 'recall', 'f1', 'dice'):
    record[f'per_class_{key}'] = {str(c): _json_value(v) for c, v in
                                  zip(class_names, detailed[f'per_class_{key}'])}
  record['per_class_gt_pixels'] = dict(zip(map(str, class_names), detailed['per_class_gt_pixels']))
  record['mmseg_note'] = (f'{" ".join(metrics.MMSEG_NAMES)}: these scores under '
                         f'mmsegmentation\'s names, as fractions (it prints percent)')
  record.update({alias: _json_value(detailed[alias]) for alias in metrics.MMSEG_NAMES})
  return record


def worst_records(analysis: ImageAnalysis) -> list[dict]:
  """results.json's list of the images in worst.png, in its order (lowest mean IU first)."""
  return [{'image': r['file_name'], 'index': r['index'], 'mean_iu': _json_value(r['mean_iu']),
           'pixel_acc': _json_value(r['pixel_acc'])} for r in analysis.worst_images]


def class_table(detailed: dict, class_names: Sequence[str]) -> str:
  """results.md's per-class table: IU beside precision, recall (= accuracy) and F1 (= Dice)."""
  def cell(v: float) -> str:
    return 'n/a' if v is None or not math.isfinite(v) else f'{100 * v:.1f}'

  lines = ['| class | IU | precision | recall | F1 / Dice | ground-truth pixels |',
           '|---|---:|---:|---:|---:|---:|']
  for i, c in enumerate(class_names):
    lines.append(f'| {c} | ' + ' | '.join(cell(detailed[f'per_class_{k}'][i])
                                         for k in ('iu', 'precision', 'recall', 'f1'))
                 + f' | {detailed["per_class_gt_pixels"][i]} |')
  lines.append('| mean | ' + ' | '.join(cell(detailed[k]) for k in (
      'mean_iu', 'mean_precision', 'mean_recall', 'mean_f1')) + ' | |')
  return ('Per class (percent; recall is the per-class accuracy; F1 and Dice are one number):\n\n'
          + '\n'.join(lines) + '\n\nUnder mmsegmentation\'s names: ' + ', '.join(
              f'{alias} {cell(detailed[alias])}' for alias in metrics.MMSEG_NAMES) + '.')


def write_confusion_csv(path: pathlib.Path, confusion: np.ndarray,
                        class_names: Sequence[str]) -> None:
  """Rows ground truth, columns prediction, pixel counts; the class names head rows and columns."""
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['ground truth \\ prediction', *class_names])
    for c, row in zip(class_names, np.asarray(confusion)):
      writer.writerow([c, *(int(v) for v in row)])


def write_image_csv(path: pathlib.Path, images: Sequence[dict]) -> None:
  """One row per image in split order: index, image (file name), pixel_acc, mean_iu (blank where
  no pixel counts), pixels and correct (counted and right pixels), classes (in the mean)."""
  columns = ('index', 'image', 'pixel_acc', 'mean_iu', 'pixels', 'correct', 'classes')
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for r in images:
      scores = ['' if not math.isfinite(r[k]) else repr(r[k]) for k in ('pixel_acc', 'mean_iu')]
      writer.writerow([r['index'], r['file_name'], *scores, r['pixels'], r['correct'],
                       r['classes']])


def gallery_rows(analysis: ImageAnalysis, source) -> list[dict]:
  """The worst images with their RGB image from the source (the record at the image's index,
  when its file name agrees), the label and prediction cut to the image's size (no padding)."""
  rows = []
  for r in analysis.worst_images:
    row = dict(r)
    row['image'] = None
    if r['index'] < len(source):
      record = source[r['index']]
      if not r['file_name'] or data_lib.file_name(record) == r['file_name']:
        image = data_lib.decode_image(record['image'])
        h, w = image.shape[:2]
        if h <= r['label'].shape[0] and w <= r['label'].shape[1]:
          row.update(image=image, label=r['label'][:h, :w], prediction=r['prediction'][:h, :w])
    rows.append(row)
  return rows


def write_analysis(out: pathlib.Path, analysis: ImageAnalysis, source, model,
                   class_names: Sequence[str], head_classes: dict, palette) -> list[str]:
  """confusion.csv / .png (and confusion_<head>.* for other heads), per_image.csv, worst.png;
  returns the names written."""
  written = []
  for i, head in enumerate(model.head_names):
    names, stem, title = class_names, 'confusion', ''
    if i:
      names, stem = list(head_classes[head].names), f'confusion_{head}'
      title = f'{head} head: confusion matrix (rows normalised)'
    write_confusion_csv(out / f'{stem}.csv', analysis.confusion[head], names)
    viz.confusion_figure(analysis.confusion[head], names, out / f'{stem}.png', title=title)
    written += [f'{stem}.csv', f'{stem}.png']
  write_image_csv(out / 'per_image.csv', analysis.images)
  written.append('per_image.csv')
  if analysis.worst_images:
    if palette is None:
      palette = getattr(head_classes[model.head_names[0]], 'palette', None)
    viz.worst_gallery(gallery_rows(analysis, source), out / 'worst.png', model.num_classes[0],
                      class_names, palette)
    written.append('worst.png')
  elif (out / 'worst.png').exists():  # an earlier evaluation's, under --overwrite: not this one's
    (out / 'worst.png').unlink()
  return written


if __name__ == '__main__':
  app.run(main, flags_parser=cli_lib.absl_flags_parser(flags.FLAGS))
