"""What a finished run leaves: results.json / results.md, training curves, score maps, and the last
line saying where they are."""

from __future__ import annotations

import pathlib

import ml_collections

from fcn_jax import preprocessing, report, viz
from fcn_jax.distributed import log
from fcn_jax.train.evaluation import first_examples
from fcn_jax.train.setup import RunSpec


def final_report(config: ml_collections.ConfigDict, run: RunSpec, model, variables: dict,
                 scores: dict, workdir: pathlib.Path, step: int,
                 extra: dict | None = None) -> None:
  """results.json / results.md, training curves and score maps; the last line says where.
  `variables` and `scores` are those of the weights inference uses (the moving average with
  config.ema_decay > 0); `extra` (Trainer.summary) says which, and why the run stopped."""
  class_names = list(config.class_names)
  extra = dict(extra or {})
  report.write_results(workdir, config.get('name', config.arch), scores, class_names,
                       extra={'step': step, 'preset': config.get('preset', ''),
                              'eval_dataset': run.eval_name, 'eval_split': run.eval_split,
                              **extra},
                       notes=report.run_notes(extra))
  viz.training_curves(report.read_metrics(workdir), workdir / 'figures' / 'training_curves.png',
                      title=config.arch)
  single = (len(model.head_names) == 1 and not config.get('modalities')
            and not preprocessing.get(config.preprocessing).stored)  # TIFF bands: no RGB figure
  if config.num_figure_examples and not single:
    log('score-map figures are drawn for single-headed colour nets only; skipped')
  elif config.num_figure_examples:
    examples = first_examples(config, run.eval_source, config.num_figure_examples)
    viz.score_map_figure(model, variables, examples, class_names,
                         workdir / 'figures' / 'score_maps.png', preprocessing=config.preprocessing,
                         palette=run.metadata.get('palette'))
  absent = report.absent_classes(scores, class_names)
  if absent:
    log(report.absent_note(absent))
  weights = ' (EMA weights)' if extra.get('weights') == 'ema' else ''
  log(f'done: mean IU {100 * scores["mean_iu"]:.2f}{weights} on {run.eval_split!r} at step {step}. '
       f'Results: {workdir / "results.md"}; figures: {workdir / "figures"}/; checkpoints: '
       f'{workdir / "checkpoints"}/')
