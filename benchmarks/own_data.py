"""The from-scratch learning bar on your-own-data: the demo preset on a colour-shapes folder dataset.

  python -m benchmarks.own_data --workdir /tmp/own_data [--archs fcn8s_atonce fcn32s]

Writes a `folder` dataset (400 training and 100 validation images of 96x128, 1-3 objects each, every
class in its own colour with noise over a noisy background, 2 px ignore borders; 8 classes: a task a
per-pixel colour classifier solves), trains each arch with the demo preset from scratch through the
experiments command line, and prints mean IU and the time per run with the CPU model. Exit status 1
when FCN-8s at-once stays under the bar (60 mean IU). Not part of the test suite (minutes per arch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from benchmarks.run import cpu_name
from fcn_jax import cli as cli_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
BAR = 0.60


def main(argv: list[str] | None = None) -> int:
  p = cli_lib.ArgumentParser(prog='python -m benchmarks.own_data', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='where the dataset and the runs go')
  p.add_argument('--archs', nargs='+', default=['fcn8s_atonce', 'fcn32s'],
                 help='archs to train (single-stage ones: fcn32s, fcn8s_atonce, ...)')
  p.add_argument('--steps', type=int, default=0, help='training steps (0 = the demo preset)')
  p.add_argument('--classes', type=int, default=8, help='classes including background (2..8)')
  a = p.parse_args(argv)
  from fcn_jax.data import synthetic
  work = pathlib.Path(a.workdir).expanduser().resolve()
  data = work / 'colour_shapes'
  if not (data / 'classes.txt').exists():
    synthetic.write_folder_dataset(data, num_train=400, num_val=100, num_classes=a.classes, seed=0)
  rows = []
  for arch in a.archs:
    run_dir = work / arch
    cmd = [sys.executable, '-m', f'experiments.{arch}', f'--workdir={run_dir}',
           f'--config={REPO}/experiments/configs/{arch}.py:demo', '--config.dataset.name=folder',
           f'--config.dataset.root={data}', '--config.eval_pad_to=128']
    if a.steps:
      cmd.append(f'--config.num_train_steps={a.steps}')
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
      print(proc.stderr[-3000:], file=sys.stderr)
      return 2
    r = json.loads((run_dir / 'results.json').read_text())
    rows.append((arch, r, seconds))
  print(f'CPU: {cpu_name()}; dataset {data} ({a.classes} classes, 400 train / 100 val, 96x128)')
  print('| net (demo preset, from scratch) | steps | pixel acc. | mean IU | time |')
  print('|---|---:|---:|---:|---:|')
  for arch, r, seconds in rows:
    print(f'| {arch} | {r["step"]} | {100 * r["pixel_acc"]:.1f} | {100 * r["mean_iu"]:.1f} | '
          f'{seconds:.0f} s |')
  atonce = [r for arch, r, _ in rows if arch == 'fcn8s_atonce']
  if atonce and atonce[0]['mean_iu'] < BAR:
    print(f'FCN-8s at-once under the bar: {100 * atonce[0]["mean_iu"]:.1f} < {100 * BAR:.0f} mean IU')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
