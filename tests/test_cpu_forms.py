"""Which CPU forms run: FCN_JAX_CPU_FORMS, the per-machine cache and its measurement, and the
compiler options a form sets (fcn_jax.models.forms, fcn_jax.tune)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn_jax.models import forms as forms_lib
from fcn_jax import tune


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """No override, an empty cache directory, nothing resolved yet in this process."""
  monkeypatch.delenv(forms_lib.ENV_VAR, raising=False)
  monkeypatch.setenv('FCN_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  monkeypatch.setattr(tune, '_resolved', {})
  return tmp_path / 'cache' / 'cpu_forms.json'


def test_spec_parsing():
  assert forms_lib.from_spec('default') == forms_lib.TUNED_ON_AMD
  assert forms_lib.from_spec('off') == forms_lib.PLAIN_XLA
  forms = forms_lib.from_spec('conv_library=eigen, shifted_dw=0')
  assert forms == dataclasses.replace(forms_lib.TUNED_ON_AMD, conv_library='eigen', shifted_dw=False)
  assert forms_lib.from_spec(forms.describe()) == forms  # what the benchmark prints reads back
  assert forms_lib.from_spec('shifted_dw_min_pixels=3136').shifted_dw_min_pixels == 3136
  for bad, why in [('fast', 'measure, default, off'), ('shifted_dw=yes', 'takes 0 or 1'),
                   ('shifted_dw_min_pixels=many', 'whole number'),
                   ('conv_library=onednn', 'conv_library must be one of'),
                   ('pool=1', 'measure, default, off')]:
    with pytest.raises(ValueError, match=why):
      forms_lib.from_spec(bad)


def test_environment_variable_overrides(fresh, monkeypatch):
  monkeypatch.setenv(forms_lib.ENV_VAR, 'off')
  monkeypatch.setattr(tune, 'measure', lambda b: pytest.fail('must not measure'))
  assert tune.for_this_machine() == forms_lib.PLAIN_XLA
  assert not fresh.exists()


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU forms are measured on CPU')
def test_measured_once_then_cached_per_machine(fresh, monkeypatch, capsys):
  forms = tune.for_this_machine()  # the real probes: well under a minute
  assert isinstance(forms, forms_lib.Forms)
  assert 'choosing the CPU forms' in capsys.readouterr().err
  entry = json.loads(fresh.read_text())[f'{tune.machine_key()} | vgg16']
  assert forms_lib.Forms(**entry['forms']) == forms
  timings = entry['timings_ms']
  assert {'conv_ynnpack', 'conv_eigen', 'dw_xla_184', 'dw_shifted_184', 'dw_input_xla',
          'dw_input_shifted', 'wide_xla', 'wide_im2col', 'pool_xla', 'pool_ours'} <= set(timings)
  assert all(t > 0 for t in timings.values())
  # The choice follows the timings.
  assert forms.conv_library == min(forms_lib.CONV_LIBRARIES, key=lambda l: timings[f'conv_{l}'])
  assert forms.shifted_dw == (timings['dw_shifted_184'] < timings['dw_xla_184'])
  if forms.shifted_dw:  # from the smallest probe map on which (and on all larger ones) it won
    side = int(forms.shifted_dw_min_pixels ** 0.5)
    larger = [s for s, _, _ in forms_lib.DW_PROBES if s >= side]
    assert all(timings[f'dw_shifted_{s}'] < timings[f'dw_xla_{s}'] for s in larger)
  assert forms.shifted_dw_input == (timings['dw_input_shifted'] < timings['dw_input_xla'])
  # A new process (nothing resolved) reads the cache instead of measuring.
  monkeypatch.setattr(tune, '_resolved', {})
  monkeypatch.setattr(tune, 'measure', lambda b: pytest.fail('must read the cache'))
  assert tune.for_this_machine() == forms
  assert 'choosing' not in capsys.readouterr().err
  # Another CPU model or jax version is another key: measured again, both kept.
  here = f'{tune.machine_key()} | vgg16'
  monkeypatch.setattr(tune, '_resolved', {})
  monkeypatch.setattr(tune, 'machine_key', lambda: 'Some Other CPU | 2 cores | jax 0.0')
  chosen = forms_lib.Forms(conv_library='eigen', shifted_dw=False)
  monkeypatch.setattr(tune, 'measure', lambda b: (chosen, {'conv_eigen': 1.0}))
  assert tune.for_this_machine() == chosen
  assert set(json.loads(fresh.read_text())) == {here, 'Some Other CPU | 2 cores | jax 0.0 | vgg16'}
  # Each backbone has its own choice (GoogLeNet's small convolutions may prefer another library).
  seen = []
  monkeypatch.setattr(tune, 'measure', lambda b: seen.append(b) or (forms_lib.PLAIN_XLA, {}))
  assert tune.for_this_machine('googlenet') == forms_lib.PLAIN_XLA and seen == ['googlenet']
  assert tune.for_this_machine() == chosen  # vgg16's, already resolved


def test_damaged_cache_is_measured_again(fresh, monkeypatch):
  fresh.parent.mkdir(parents=True)
  fresh.write_text('{not json')
  chosen = forms_lib.Forms(im2col=False)
  monkeypatch.setattr(tune, 'measure', lambda b: (chosen, {}))
  assert tune.for_this_machine() == chosen
  key = f'{tune.machine_key()} | vgg16'
  assert json.loads(fresh.read_text())[key]['forms']['im2col'] is False
  # An entry from another version of the module (unknown fields) is measured again too.
  data = json.loads(fresh.read_text())
  data[key]['forms']['tiles'] = 3
  fresh.write_text(json.dumps(data))
  monkeypatch.setattr(tune, '_resolved', {})
  monkeypatch.setattr(tune, 'measure', lambda b: (forms_lib.PLAIN_XLA, {}))
  assert tune.for_this_machine() == forms_lib.PLAIN_XLA


def test_measure_forces_a_new_measurement(fresh, monkeypatch):
  fresh.parent.mkdir(parents=True)
  fresh.write_text(json.dumps({f'{tune.machine_key()} | vgg16': {'forms': dataclasses.asdict(
      forms_lib.PLAIN_XLA)}}))
  monkeypatch.setenv(forms_lib.ENV_VAR, 'measure')
  calls = []
  monkeypatch.setattr(tune, 'measure',
                      lambda b: calls.append(1) or (forms_lib.TUNED_ON_AMD, {}))
  assert tune.for_this_machine() == forms_lib.TUNED_ON_AMD
  assert tune.for_this_machine() == forms_lib.TUNED_ON_AMD
  assert calls == [1]  # once per process


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU compiler option')
def test_conv_library_is_a_compiler_option_of_the_program():
  # YNNPACK (XLA's default) takes the convolution (with the ReLU and sum after it) into a library
  # fusion; 'eigen' keeps it out.
  x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
  conv = lambda x, w: jnp.sum(jax.nn.relu(jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))), axis=(1, 2))
  texts = {}
  for library in forms_lib.CONV_LIBRARIES:
    with forms_lib.use(forms_lib.Forms(conv_library=library)):
      texts[library] = forms_lib.jit(conv).lower(x, w).compile().as_text()
  assert 'ynn' in texts['ynnpack'].lower()
  assert 'ynn' not in texts['eigen'].lower()
  with forms_lib.use(forms_lib.Forms(conv_library='eigen')):
    y = forms_lib.jit(conv)(x, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(conv(x, w)), rtol=1e-6)


def test_several_processes_take_the_default_set(fresh, monkeypatch):
  # A multi-host job must trace one program everywhere: no per-host measurement.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(tune, 'measure', lambda b: pytest.fail('must not measure'))
  assert tune.for_this_machine() == forms_lib.TUNED_ON_AMD
  monkeypatch.setattr(tune, '_resolved', {})
  monkeypatch.setenv(forms_lib.ENV_VAR, 'conv_library=eigen')
  assert tune.for_this_machine().conv_library == 'eigen'
