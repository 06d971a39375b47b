"""The README's main job: FCN-32s -> FCN-16s -> FCN-8s on a synthetic VOC-format set, on a CPU.

`python -m experiments.demo --workdir runs/demo` writes the synthetic VOCdevkit tree, prepares it
through the same TFDS builder as PASCAL VOC, trains the three stages at reduced width (each from the
previous one), and prints the paper's Table 2 for them. Figures: runs/demo/figures/. The synthetic
set and its prepared TFDS files live in the cache (fcn_jax.paths: ~/.cache/fcn_jax/synthetic/).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import app, flags

from experiments import common
from experiments.configs import common as configs
from fcn_jax import checkpoint, report, train, viz
from fcn_jax import cli as cli_lib
from fcn_jax.data.classes import VOC_CLASS_NAMES
from fcn_jax.errors import user_errors_as_exit

ARCHS = ('fcn32s', 'fcn16s', 'fcn8s')
NAMES = {'fcn32s': 'FCN-32s', 'fcn16s': 'FCN-16s', 'fcn8s': 'FCN-8s',
         'fcn8s_atonce': 'FCN-8s at-once, from scratch'}

flags.DEFINE_string('workdir', 'runs/demo', 'Output directory.')
flags.DEFINE_integer('steps', 0, 'Override the training steps of every stage (0 = the preset).')
flags.DEFINE_bool('atonce', True, 'Also train FCN-8s at-once in one stage from scratch (the demo '
                  'preset\'s from-scratch recipe: no skip scaling), for as many steps as FCN-32s.')
flags.DEFINE_bool('control', False, 'Also continue FCN-32s for as many steps as FCN-8s had in all '
                  '(32s + 16s + 8s stages), to separate the skips\' gain from the extra training.')


def comparison(workdir: pathlib.Path, num_rows: int = 4) -> pathlib.Path:
  """Fig. 2 style rows (image | FCN-32s | FCN-16s | FCN-8s | ground truth) on validation images,
  from the final state of each net (the one the printed table scores)."""
  config = common.load_config('fcn8s', 'demo')
  common.prepare_demo_data(config)
  _, source = train.data_sources(config)
  examples = train.first_examples(config, source, num_rows)
  rows = [{'image': image, 'ground truth': label} for _, image, label in examples]
  for arch in ARCHS:
    model, variables, meta = checkpoint.load_inference(workdir / arch / 'checkpoints',
                                                       which='latest')
    for row, (_, image, _) in zip(rows, examples):
      scores = viz.predict_scores(model, variables, image, meta['preprocessing'])
      row[NAMES[arch]] = np.argmax(scores, -1)
  columns = ['image'] + [NAMES[a] for a in ARCHS] + ['ground truth']
  return viz.comparison_rows(rows, columns, workdir / 'figures' / 'comparison.png')


def control(workdir: pathlib.Path) -> dict:
  """FCN-32s resumed from its final checkpoint (a copy) and trained for the steps that FCN-16s and
  FCN-8s added, so that it has seen as many batches as FCN-8s."""
  import shutil
  total = 0
  for arch in ARCHS:
    total += json.loads((workdir / arch / 'config.json').read_text())['num_train_steps']
  target = workdir / 'fcn32s_same_steps'
  if not target.exists():
    shutil.copytree(workdir / 'fcn32s', target)
  config = common.load_config('fcn32s', 'demo')
  config.num_train_steps = total
  return common.run(config, target)


def main(argv) -> None:
  del argv
  with user_errors_as_exit():
    _main()


def _main() -> None:
  common.quiet_logs()
  common.enable_compilation_cache(configs.COMPILATION_CACHE_DIR)
  workdir = pathlib.Path(flags.FLAGS.workdir).expanduser().resolve()
  start = time.perf_counter()
  results = {}
  for arch in ARCHS:
    config = common.load_config(arch, 'demo')
    config.train_predecessor = True
    if flags.FLAGS.steps:
      config.num_train_steps = flags.FLAGS.steps
    t0 = time.perf_counter()
    results[arch] = common.run(config, workdir / arch)
    print(f'{NAMES[arch]} trained and evaluated in {time.perf_counter() - t0:.0f} s')
  rows = [(NAMES[a], results[a]) for a in ARCHS]
  if flags.FLAGS.atonce:
    config = common.load_config('fcn8s_atonce', 'demo')
    if flags.FLAGS.steps:
      config.num_train_steps = flags.FLAGS.steps
    t0 = time.perf_counter()
    rows.append((NAMES['fcn8s_atonce'], common.run(config, workdir / 'fcn8s_atonce')))
    print(f'{NAMES["fcn8s_atonce"]} trained and evaluated in {time.perf_counter() - t0:.0f} s')
  if flags.FLAGS.control:
    rows.append(('FCN-32s, same steps', control(workdir)))
  figure = comparison(workdir)
  table = report.table_markdown(rows, VOC_CLASS_NAMES)
  (workdir / 'results.md').write_text(
      '# Demo: synthetic VOC-format validation set (reduced width, CPU)\n\n' + table + '\n')
  print('\n' + table.split('\n\n')[0])
  print(f'\nTotal {time.perf_counter() - start:.0f} s. Tables: {workdir / "results.md"}; figures: '
        f'{figure}, {workdir}/<net>/figures/')


if __name__ == '__main__':
  app.run(main, flags_parser=cli_lib.absl_flags_parser(flags.FLAGS))
