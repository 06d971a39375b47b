"""The from-scratch recipe: the vgg16_bn backbone (trained BatchNorm, 'same' padding), the scratch
preset, and the benchmarks that measure it on real images (benchmarks/real_data.py,
benchmarks/pixel_baseline.py). Small widths and inputs: seconds on a CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax import models
from fcn_jax.models import backbones

WIDTH = 1 / 32


def _net(arch='fcn8s_atonce', classes=3):
  return models.build(arch, num_classes=classes, width=WIDTH, backbone='vgg16_bn', dropout_rate=0.0,
                      skip_scaling=False)


def test_vgg16_bn_spec():
  spec = backbones.get_backbone('vgg16_bn')
  convs = [l for l in spec if isinstance(l, backbones.Conv)]
  assert [c.name for c in convs] == [c.name for c in backbones.get_backbone('vgg16')
                                     if isinstance(c, backbones.Conv)]
  assert all(c.trained_bn and not c.batch_norm for c in convs)
  assert convs[0].padding == 1 and convs[-2].padding == 3  # no pad of 100; fc6 7x7 'same'
  assert backbones.max_stride(spec) == 32


def test_vgg16_bn_geometry():
  geo = models.geometry(_net().arch)
  assert geo.skip_crops == (-1, -1)  # the upsampled scores are cropped to the taps
  assert geo.final_crop == 4
  assert models.geometry(_net('fcn32s').arch).final_crop == 16
  # The Caffe nets are unchanged.
  assert models.geometry('fcn8s_atonce').skip_crops == (5, 9)


@pytest.mark.parametrize('size', [(1, 1), (17, 45), (32, 64), (37, 29)])
def test_vgg16_bn_output_covers_input(size):
  model = _net()
  variables = models.init_variables(model, jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *size, 3)), jnp.float32)
  assert model.apply(variables, x).shape == (2, *size, 3)
  out, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out.shape == (2, *size, 3)


def test_batch_norm_trains_its_statistics():
  model = _net('fcn32s')
  variables = models.init_variables(model, jax.random.key(0))
  assert set(variables) == {'params', 'batch_stats'}
  assert 'bn' in variables['batch_stats']['conv1_1']
  x = 3.0 + jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  _, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
  before = variables['batch_stats']['conv1_1']['bn']['mean']
  after = updated['batch_stats']['conv1_1']['bn']['mean']
  assert not np.allclose(before, after)
  # Momentum 0.9: 10% of the batch mean enters the running average.
  pre = jax.lax.conv_general_dilated(
      x, variables['params']['conv1_1']['conv']['kernel'], (1, 1), [(1, 1), (1, 1)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(after, 0.1 * pre.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  # Evaluation uses the running averages: the batch does not change its own normalisation.
  y1 = model.apply(variables, x[:1])
  y2 = model.apply(variables, x)[:1]
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)


def test_backbone_option_is_checked():
  with pytest.raises(ValueError, match='cannot replace'):
    models.build('fcn_alexnet', backbone='vgg16_bn')
  with pytest.raises(ValueError, match='cannot replace'):
    models.build('fcn8s_atonce', backbone='googlenet')
  assert models.build('fcn8s_atonce', backbone='vgg16').arch == models.ARCHS['fcn8s_atonce']
  assert 'backbone' in models.MODEL_CONFIG_FIELDS


def test_scratch_preset(tmp_path):
  from experiments.configs import common
  from fcn_jax import config_checks, train
  assert 'scratch' in common.PRESETS
  c = common.get_config('fcn8s_atonce', 'scratch')
  assert c.model.backbone == 'vgg16_bn' and c.optim.algorithm == 'adam'
  assert c.loss_class_weights == 'median_frequency:0.5' and c.color_jitter == 0.3 and c.eval_pad_to == 0
  _tiny_folder(tmp_path)
  c.dataset.root = str(tmp_path)
  c.dataset.ignore_label = 11
  c.dataset.eval_split = 'test'
  c.model.num_classes = 11
  c.model.width = WIDTH
  config_checks.check_train_config(c)
  model = train.model_from_config(c)
  assert model.arch.backbone == 'vgg16_bn'
  from fcn_jax.errors import UserError
  with pytest.raises(UserError, match='scratch'):
    common.get_config('fcn8s', 'scratch')


def test_train_step_updates_batch_stats():
  """The library's train step moves vgg16_bn's running averages (and the parameters)."""
  from fcn_jax import optim, train
  model = _net(classes=3)
  variables = models.init_variables(model, jax.random.key(0))
  tx = optim.make_optimizer(learning_rate=1e-3, momentum=0.9, weight_decay=1e-4,
                            params=variables['params'],
                            frozen=models.frozen_mask(model, variables['params']), algorithm='adam')
  state = train.create_train_state(model, tx, variables, jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(2, 24, 24, 3)).astype(np.float32),
           'label': rng.integers(0, 3, size=(2, 24, 24)).astype(np.int32)}
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, normalize_loss=True))
  new_state, m = step(state, batch)
  assert np.isfinite(float(m['loss']))
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(new_state.batch_stats)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def _tiny_folder(root, n=6, size=(24, 32)):
  from PIL import Image
  rng = np.random.default_rng(0)
  for sub in ('images', 'masks', 'splits'):
    (root / sub).mkdir(parents=True)
  for i in range(n):
    label = np.zeros(size, np.uint8)
    label[:, size[1] // 2:] = 1
    label[:2] = 11  # void
    image = np.where(label[..., None] == 1, 200, 40) + rng.integers(0, 20, (*size, 3))
    Image.fromarray(image.astype(np.uint8)).save(root / 'images' / f'{i}.png')
    Image.fromarray(label).save(root / 'masks' / f'{i}.png')
  (root / 'splits' / 'train.txt').write_text('\n'.join(map(str, range(n - 2))) + '\n')
  (root / 'splits' / 'test.txt').write_text(f'{n - 2}\n{n - 1}\n')
  (root / 'classes.txt').write_text('dark\nbright\n')


def test_pixel_baseline(tmp_path, capsys):
  pytest.importorskip('sklearn')
  from benchmarks import pixel_baseline
  _tiny_folder(tmp_path)
  result = pixel_baseline.main(['--root', str(tmp_path), '--ignore-label', '11', '--max-iter', '5',
                                '--max-train-pixels', '500'])
  assert result['mean_iu'] > 0.9 and len(result['per_class_iu']) == 2
  assert 'mean IU' in capsys.readouterr().out


def test_real_data_views(tmp_path):
  from PIL import Image
  from benchmarks import real_data
  camvid = tmp_path / 'CamVid'
  for split in ('train', 'val', 'test'):
    (camvid / split).mkdir(parents=True)
    (camvid / f'{split}annot').mkdir()
    Image.new('RGB', (8, 6)).save(camvid / split / f'{split}_0.png')
    Image.new('L', (8, 6), 11).save(camvid / f'{split}annot' / f'{split}_0.png')
  view = real_data.camvid_view(camvid, tmp_path / 'view')
  assert (view / 'images' / 'val_0.png').is_symlink()
  assert (view / 'splits' / 'test.txt').read_text().split() == ['test_0']
  assert len((view / 'classes.txt').read_text().split()) == 11
  membrane = tmp_path / 'membrane' / 'train'
  (membrane / 'image').mkdir(parents=True)
  (membrane / 'label').mkdir()
  for i in range(30):
    Image.new('L', (4, 4), 7).save(membrane / 'image' / f'{i}.png')
    Image.fromarray(np.array([[0, 255]] * 2, np.uint8)).save(membrane / 'label' / f'{i}.png')
  view = real_data.membrane_view(tmp_path / 'membrane', tmp_path / 'mview')
  assert np.asarray(Image.open(view / 'masks' / '3.png')).tolist() == [[0, 1], [0, 1]]
  assert not any(p.name.endswith('.png') and p.stat().st_size == 0 for p in membrane.rglob('*'))
  assert (view / 'splits' / 'test.txt').read_text().split() == [str(i) for i in range(24, 30)]
