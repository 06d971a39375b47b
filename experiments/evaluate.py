"""Evaluate a checkpoint (trained or converted) on a split, with no training config.

  python -m experiments.evaluate --checkpoint runs/fcn8s/checkpoints \
      --dataset voc_segmentation/2011 --split seg11valid --manual_dir /data/voc

Writes results.json / results.md (paper Table 2 format) into --out (default: beside the checkpoint).
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from experiments.configs import common as configs

flags.DEFINE_string('checkpoint', None, 'Checkpoint directory (training or fcn_jax.convert output).',
                    required=True)
flags.DEFINE_string('dataset', 'voc_segmentation/2011', 'voc_segmentation/2011 | voc_segmentation/2012 | sbd')
flags.DEFINE_string('split', 'seg11valid', 'Split to evaluate.')
flags.DEFINE_string('data_dir', '~/tensorflow_datasets', 'Prepared TFDS data.')
flags.DEFINE_string('manual_dir', '', 'Archives or extracted trees, if not prepared yet.')
flags.DEFINE_bool('download', False, 'Download the official archives when not prepared.')
flags.DEFINE_integer('pad_to', 0, '0: native size one image at a time (the reference protocol); '
                     'S > 0: padded S x S batches of --batch_size (faster).')
flags.DEFINE_integer('batch_size', 1, 'Images per batch with --pad_to.')
flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'Which checkpoint of a training run.')
flags.DEFINE_string('out', '', 'Output directory (default: the checkpoint directory\'s parent).')
flags.DEFINE_string('compilation_cache_dir', configs.COMPILATION_CACHE_DIR,
                    'Persistent XLA compilation cache (\'\' = off): each native image size compiles '
                    'once, and later evaluations reuse the compiled programs.')


def main(argv) -> None:
  del argv
  from experiments import common
  common.quiet_logs()
  common.enable_compilation_cache(flags.FLAGS.compilation_cache_dir)
  from fcn_jax import checkpoint, data as data_lib, report, train
  from fcn_jax.data import pipeline
  FLAGS = flags.FLAGS
  model, variables, meta = checkpoint.load_inference(FLAGS.checkpoint, which=FLAGS.which)
  try:
    source = data_lib.get_data_source(FLAGS.dataset, FLAGS.split, data_dir=FLAGS.data_dir,
                                      manual_dir=FLAGS.manual_dir or None, download=FLAGS.download)
  except data_lib.MissingDataError as e:
    raise SystemExit(str(e)) from None
  batches = pipeline.eval_batches(source, preprocessing=meta['preprocessing'],
                                  batch_size=FLAGS.batch_size, pad_to=FLAGS.pad_to or None)
  scores, _ = train.evaluate(model, variables, batches, num_classes=meta['num_classes'], progress=True)
  out = pathlib.Path(FLAGS.out or pathlib.Path(FLAGS.checkpoint).expanduser().resolve().parent)
  class_names = meta.get('class_names') or [str(i) for i in range(meta['num_classes'])]
  report.write_results(out, meta['arch'], scores, class_names,
                       extra={'checkpoint': str(FLAGS.checkpoint), 'dataset': FLAGS.dataset,
                              'split': FLAGS.split, 'images': len(source)})
  print(report.table_markdown([(meta['arch'], scores)]))
  print(f'wrote {out / "results.json"} and {out / "results.md"}')


if __name__ == '__main__':
  app.run(main)
