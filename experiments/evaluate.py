"""Evaluate a checkpoint (trained or converted) on a split, with no training config.

  python -m experiments.evaluate --checkpoint runs/fcn8s \
      --dataset voc_segmentation/2011 --split seg11valid --manual_dir /data/voc

Writes results.json / results.md (paper Table 2 format) into --out. Default: a directory of its own
per checkpoint, dataset, split and step, beside the checkpoint (runs/fcn8s/eval/
voc_segmentation-2011_seg11valid_step100000/; for converted weights WEIGHTS_eval/...), so that it
never replaces a training run's own results or another checkpoint's. Existing results are not
overwritten unless --overwrite.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from experiments import common
from experiments.configs import common as configs
from fcn_jax import checkpoint, report, train
from fcn_jax import cli as cli_lib
from fcn_jax import data as data_lib
from fcn_jax import preprocessing as preprocessing_lib
from fcn_jax.data import identity, pipeline
from fcn_jax.errors import UserError, user_errors_as_exit

flags.DEFINE_string('checkpoint', None, 'A training WORKDIR (or its checkpoints/), or the output '
                    'directory of fcn_jax.convert.', required=True)
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
flags.DEFINE_integer('pad_to', 0, '0: native size one image at a time (the reference protocol); '
                     'S > 0: padded S x S batches of --batch_size (faster; S must be at least the '
                     'largest image side).')
flags.DEFINE_integer('batch_size', 1, 'Images per batch (> 1 needs --pad_to).')
flags.DEFINE_string('which', 'best', 'Which checkpoint of a training run: best, latest or a step.')
flags.DEFINE_string('out', '', 'Output directory (default: see above).')
flags.DEFINE_bool('overwrite', False, 'Replace results.json / results.md that exist in --out.')
flags.DEFINE_string('compilation_cache_dir', configs.COMPILATION_CACHE_DIR,
                    'Persistent XLA compilation cache (\'\' = off): each native image size '
                    'compiles once, and later evaluations reuse the compiled programs.')


def default_out(checkpoint_dir: str, dataset: str, split: str, step: int) -> pathlib.Path:
  """<run>/eval/<dataset>_<split>_step<N> for a training run's checkpoints/, else
  <weights>_eval/<dataset>_<split>_step<N> beside a converted checkpoint directory."""
  directory = pathlib.Path(checkpoint_dir)
  base = (directory.parent / 'eval' if directory.name == 'checkpoints'
          else directory.parent / f'{directory.name}_eval')
  return base / f'{dataset.replace("/", "-")}_{split}_step{step}'


def check_flags(f, spec) -> None:
  if f.batch_size < 1:
    raise UserError(f'--batch_size {f.batch_size}: must be >= 1')
  if f.pad_to < 0:
    raise UserError(f'--pad_to {f.pad_to}: must be >= 0 (0 = native size)')
  if f.batch_size > 1 and not f.pad_to:
    raise UserError(f'--batch_size {f.batch_size} needs --pad_to S (images differ in size; batches '
                    f'are padded to S x S)')
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
  directory = checkpoint.resolve_directory(f.checkpoint)
  root, step = checkpoint.resolve_step(directory, f.which)
  spec = identity.resolve(checkpoint.read_metadata(root, str(step)), f.dataset, f.split,
                          **{k: getattr(f, k, None) for k in identity.OVERRIDABLE})
  check_flags(f, spec)  # before the model is loaded or data prepared
  dataset, split = spec.name, spec.split
  print(f'evaluating step {step} of {root} on {spec.describe()}')
  out = (pathlib.Path(f.out).expanduser().resolve() if f.out
         else default_out(root, dataset, split, step))
  existing = [out / name for name in ('results.json', 'results.md') if (out / name).exists()]
  if existing and not f.overwrite:
    raise UserError(f'{existing[0]} exists; pass --overwrite to replace it, or choose another '
                    f'--out')
  common.enable_compilation_cache(f.compilation_cache_dir)
  model, variables, meta = checkpoint.load_inference(root, which=str(step))
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
  scores, _ = train.evaluate(model, variables, batches, progress=True,
                             exclude={h: dataset_heads[h][1] for h in net_heads})
  class_names = meta.get('class_names') or [str(i) for i in range(model.num_classes[0])]
  name = meta.get('zoo_name') or meta.get('experiment') or meta['arch']
  report.write_results(out, name, scores, class_names,
                       extra={'checkpoint': str(root), 'step': step, 'dataset': dataset,
                              'split': split, 'images': len(source)})
  print(report.table_markdown([(name, scores)] + report.paper_rows(name)))
  for head, head_scores in list((scores.get('heads') or {}).items())[1:]:
    print(f'{head} head: pixel acc. {100 * head_scores["pixel_acc"]:.1f}')
  absent = report.absent_classes(scores, class_names)
  if absent:
    print(report.absent_note(absent))
  print(f'{split}: mean IU {100 * scores["mean_iu"]:.2f} over {len(source)} '
        f'image{"" if len(source) == 1 else "s"}')
  print(f'wrote {out / "results.json"} and {out / "results.md"}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli_lib.absl_flags_parser(flags.FLAGS))
