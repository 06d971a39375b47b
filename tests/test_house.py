"""The house: the public API at the top level, configs read from their files, CPU tuning outside
the models (building a model never measures)."""

from __future__ import annotations

import pathlib

import pytest

import fcn_jax
from experiments import common
from experiments.configs import common as configs


def test_public_api_at_the_top_level():
  from fcn_jax import Segmenter, build, load
  from fcn_jax.checkpoint import load_inference
  from fcn_jax.segmenter import Segmenter as segmenter_class
  assert Segmenter is segmenter_class and load is load_inference
  assert build('fcn32s', 3, width=0.0625).num_classes == (3,)
  assert set(fcn_jax.__all__) >= {'Segmenter', 'build', 'load'}
  with pytest.raises(AttributeError, match='no attribute'):
    fcn_jax.not_a_thing  # noqa: B018


def test_load_config_reads_the_config_file(tmp_path, monkeypatch):
  (tmp_path / 'mine.py').write_text(
      'from experiments.configs import common\n\n\n'
      'def get_config(preset="paper"):\n'
      '  c = common.get_config("fcn32s", preset)\n'
      '  c.batch_size = 3\n'
      '  return c\n')
  monkeypatch.setattr(common, 'CONFIG_DIR', tmp_path)
  config = common.load_config('mine', 'demo')
  assert config.batch_size == 3 and config.preset == 'demo' and config.model.width == 0.0625


@pytest.mark.parametrize('name', sorted(set(configs.PAPER_LR) | set(configs.RECIPES) | set(configs.RESNETS)))
def test_every_config_file_is_its_get_config(name):
  for preset in configs.PRESETS:
    try:
      want = configs.get_config(name, preset)
    except Exception as e:  # a preset an arch does not offer refuses the same way from its file
      with pytest.raises(type(e)):
        common.load_config(name, preset)
      continue
    assert common.load_config(name, preset).to_dict() == want.to_dict()


def test_building_a_model_never_measures(monkeypatch):
  from fcn_jax import models, tune
  from fcn_jax.models import forms as forms_lib
  monkeypatch.setattr(tune, 'measure', lambda *a: pytest.fail('build() must not measure'))
  monkeypatch.setattr(tune, '_resolved', {})
  monkeypatch.delenv(forms_lib.ENV_VAR, raising=False)
  monkeypatch.setenv('FCN_JAX_CACHE_DIR', '/nonexistent-cache-dir')
  model = models.build('fcn8s', 21, width=0.0625)
  assert model.forms == forms_lib.active()
  assert pathlib.Path(tune.__file__).parent.name == 'fcn_jax'  # tuning lives outside models/
