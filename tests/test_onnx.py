"""Export to ONNX (jax2onnx) run in onnxruntime in a fresh process against the Segmenter, for every
single-stream arch plus a two-headed and a fusion net; the StableHLO .fcnx export against the
Segmenter under each CPU form (the weights are constants in it)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from benchmarks import onnx_parity
from fcn_jax import export, exported, preprocessing
from fcn_jax.errors import UserError
from fcn_jax.models import forms as forms_lib
from fcn_jax.models import layers
from fcn_jax.segmenter import Segmenter

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
SIZE = (67, 83)  # odd: every ceil-mode pooling pads


def _have(*names: str) -> bool:
  try:
    return all(importlib.util.find_spec(n) is not None for n in names)
  except (ImportError, ValueError):  # a module set to None in sys.modules
    return False


needs_onnx = pytest.mark.skipif(
    not _have('jax2onnx', 'onnx', 'onnxruntime'),
    reason=f'jax2onnx / onnx / onnxruntime are not installed ({export.ONNX_INSTALL})')


def _checkpoint(tmp_path, arch: str, **meta) -> pathlib.Path:
  """A width-1/16 checkpoint with random weights."""
  return pathlib.Path(onnx_parity.random_checkpoint(tmp_path, arch, 1 / 16, **meta))


# Runs the file with numpy and onnxruntime alone: the inputs preprocessed from its metadata_props,
# a batch of two (the symbolic batch), the scores saved per output.
RUN_ONNX = textwrap.dedent('''
    import json, sys
    import numpy as np
    import onnxruntime as ort
    model, inputs, out = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
    session = ort.InferenceSession(model, providers=['CPUExecutionProvider'])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    feeds = {}
    for entry in meta['inputs']:
      p = entry['preprocessing']
      x = inputs[entry['modality']].astype(np.float32)
      x = x[..., ::-1] if p['channel_order'] == 'bgr' else x
      feeds[entry['name']] = ((x * np.float32(p['scale']) - np.asarray(p['mean'], np.float32))
                              / np.asarray(p['std'], np.float32))
    results = session.run([h['output'] for h in meta['heads']], feeds)
    np.savez(out, **{h['name']: r for h, r in zip(meta['heads'], results)})
    print(json.dumps({'jax_loaded': 'jax' in sys.modules, 'batch': session.get_inputs()[0].shape[0],
                      'meta': sorted(meta)}))
''')


def _run_onnx(path: pathlib.Path, images: dict[str, np.ndarray], tmp_path) -> tuple[dict, dict]:
  np.savez(tmp_path / 'inputs.npz', **images)
  proc = subprocess.run([sys.executable, '-c', RUN_ONNX, str(path), str(tmp_path / 'inputs.npz'),
                         str(tmp_path / 'scores.npz')], env=ENV, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  with np.load(tmp_path / 'scores.npz') as f:
    return {k: f[k] for k in f.files}, report


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


def _images(modalities: list[str]) -> dict[str, np.ndarray]:
  """Two different uint8 images per modality, (2, H, W, 3)."""
  rng = np.random.default_rng(3)
  return {m: rng.integers(0, 256, (2, *SIZE, 3), np.uint8) for m in modalities}


def _check_against_segmenter(ckpt, onnx_file, tmp_path, modalities, heads) -> list[float]:
  images = _images(modalities)
  got, report = _run_onnx(onnx_file, images, tmp_path)
  assert not report['jax_loaded'] and report['batch'] == 'B'
  assert {'arch', 'class_names', 'palette', 'preprocessing', 'num_classes', 'inputs',
          'heads'} <= set(report['meta'])
  seg = Segmenter.load(ckpt)
  errors = []
  for i in range(2):
    item = ({m: images[m][i] for m in modalities} if len(modalities) > 1
            else images[modalities[0]][i])
    want = seg.scores([item], exact=True)[0]
    want = want if isinstance(want, dict) else {heads[0]: want}
    assert sorted(want) == sorted(heads)
    for head in heads:
      assert got[head][i].shape == want[head].shape
      errors.append(_relative_error(got[head][i], want[head]))
  print(f'{onnx_file.stem}: relative error {max(errors):.2e}')
  return errors


ARCHS = ['fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce', 'fcn_alexnet', 'fcn_alexnet_caffe',
         'fcn_googlenet', 'fcn_resnet50']


@needs_onnx
@pytest.mark.parametrize('arch', ARCHS)
def test_onnx_matches_segmenter(arch, tmp_path):
  ckpt = _checkpoint(tmp_path, arch)
  out = export.export_onnx(ckpt, tmp_path / arch, size=SIZE, check=False)
  assert out.name == f'{arch}.onnx'
  errors = _check_against_segmenter(ckpt, out, tmp_path, ['color'], ['labels'])
  assert max(errors) < 1e-4, errors


@needs_onnx
def test_onnx_two_heads_has_an_output_per_head(tmp_path):
  heads = [{'name': 'semantic', 'class_names': [f's{i}' for i in range(33)]},
           {'name': 'geometric', 'class_names': ['sky', 'horizontal', 'vertical']}]
  ckpt = _checkpoint(tmp_path, 'fcn8s_two_heads', heads=heads)
  out = export.export_onnx(ckpt, tmp_path / 'two.onnx', size=SIZE, check=False)
  errors = _check_against_segmenter(ckpt, out, tmp_path, ['color'], ['semantic', 'geometric'])
  assert max(errors) < 1e-4, errors
  model = exported.load(out)
  assert [h['output'] for h in model.heads] == ['scores_semantic', 'scores_geometric']
  assert model.heads[1]['class_names'] == ['sky', 'horizontal', 'vertical']
  labels = model.predict(np.zeros((40, 50, 3), np.uint8))
  assert labels['geometric'].shape == (40, 50) and labels['semantic'].dtype == np.uint8


@needs_onnx
def test_onnx_late_fusion_has_an_input_per_modality(tmp_path):
  modalities = [{'name': 'color', 'preprocessing': 'nyud_bgr'},
                {'name': 'hha', 'preprocessing': 'nyud_hha'}]
  ckpt = _checkpoint(tmp_path, 'fcn32s_late_fusion', modalities=modalities,
                     preprocessing='nyud_bgr')
  out = export.export_onnx(ckpt, tmp_path / 'fusion.onnx', size=SIZE)  # with the built-in check
  errors = _check_against_segmenter(ckpt, out, tmp_path, ['color', 'hha'], ['labels'])
  assert max(errors) < 1e-4, errors
  model = exported.load(out)
  assert [e['name'] for e in model.inputs] == ['color', 'hha']
  assert model.inputs[1]['preprocessing']['channel_order'] == 'rgb'
  image = np.zeros((40, 50, 3), np.uint8)
  assert model.scores({'color': image, 'hha': image}).shape == (40, 50, 40)
  with pytest.raises(ValueError, match='missing hha'):
    model.scores({'color': image})


@needs_onnx
def test_onnx_cli_writes_checks_and_refuses_clearly(tmp_path):
  ckpt = _checkpoint(tmp_path, 'fcn_alexnet')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'fcn_jax.export', '--checkpoint',
                                      str(ckpt), *args], env=ENV, capture_output=True, text=True,
                                     timeout=600)
  proc = run('--out', str(tmp_path / 'alex.onnx'), '--sizes', '64x96')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'wrote' in proc.stdout and 'Traceback' not in proc.stderr
  assert 'Skipping' not in proc.stderr  # the converter's plugin-loader noise is quieted
  model = exported.load(tmp_path / 'alex.onnx')
  assert model.size == (64, 96) and model.metadata['arch'] == 'fcn_alexnet'
  assert model.metadata['preprocessing']['mean'] == list(preprocessing.CAFFE_BGR_MEAN)
  assert model.predict(np.zeros((50, 70, 3), np.uint8)).shape == (50, 70)
  with pytest.raises(ValueError, match='larger than the exported size'):
    model.scores(np.zeros((65, 20, 3), np.uint8))
  for args, message in [(('--out', str(tmp_path / 'alex.onnx')), 'exists'),
                        (('--out', str(tmp_path / 'b.onnx'), '--sizes', '64x64,96x96'),
                         'one input size'),
                        (('--out', str(tmp_path / 'b.fcnx'), '--format', 'onnx'), 'ends in .fcnx')]:
    proc = run(*args)
    assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr


@needs_onnx
def test_onnx_check_refuses_a_file_that_disagrees(tmp_path, monkeypatch):
  ckpt = _checkpoint(tmp_path, 'fcn32s')
  monkeypatch.setattr(export, 'ONNX_CHECK_RTOL', 0.0)  # nothing agrees to within 0
  with pytest.raises(UserError, match='does not reproduce the model'):
    export.export_onnx(ckpt, tmp_path / 'm.onnx', size=(32, 32))
  assert not (tmp_path / 'm.onnx').exists() and not list(tmp_path.glob('.m.onnx*'))


def test_onnx_without_the_converter_names_the_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # import jax2onnx -> ImportError
  with pytest.raises(UserError, match=r'pip install --no-deps jax2onnx==0\.17\.1'):
    export.export_onnx(tmp_path / 'absent', tmp_path / 'm.onnx')


@pytest.mark.parametrize('pool, window, stride, padding', [
    (layers.max_pool_ceil, 2, 2, 0),    # VGG16
    (layers.max_pool_ceil, 3, 2, 0),    # AlexNet, GoogLeNet
    (layers.max_pool_ceil, 3, 1, 1),    # GoogLeNet's inception branch
    (layers.max_pool_floor, 3, 2, 1)])  # ResNet's stem
def test_valid_pooling_is_every_forms_pooling_exactly(pool, window, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 13, 10, 3))
  x = x.at[0, 12, 9].set(-1e30)  # a ceil-mode remainder that only -inf padding leaves alone
  with layers.valid_pooling():
    got = np.asarray(jax.jit(lambda x: pool(x, window, stride, padding))(x))
  for forms in (forms_lib.TUNED_ON_AMD, forms_lib.PLAIN_XLA, forms_lib.ACCELERATOR):
    want = np.asarray(jax.jit(lambda x: pool(x, window, stride, padding, forms=forms))(x))
    np.testing.assert_array_equal(got, want)


# The .fcnx modules hold the weights as constants. A jit with the weights captured as constants
# once gave NaN on an AMD EPYC under XLA's default convolution path with the forms off (eager and
# Eigen were right): each form exports and runs here in its own process, and the artifact is run
# both as a loader compiles it (XLA's defaults) and under Eigen.
RUN_FCNX = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from fcn_jax import export, exported, segmenter
    from fcn_jax.models import forms
    ckpt, out, image = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
    export.export_checkpoint(ckpt, out, sizes=(image.shape[:2],), max_batch=2)
    seg = segmenter.Segmenter.load(ckpt)
    want = seg.scores(image, exact=True)
    model = exported.load(out)
    default = model.scores(image)
    module = model._modules[image.shape[:2]]
    eigen = jax.jit(module.call, compiler_options=forms.Forms('eigen').compiler_options())
    eigen = np.asarray(eigen(model.preprocess(image)[None]))[0]
    rel = lambda a: float(np.abs(a - want).max() / np.abs(want).max())
    print(json.dumps({'forms': seg.model.forms.describe(), 'nan': [bool(np.isnan(a).any())
                      for a in (want, default, eigen)], 'default': rel(default),
                      'eigen': rel(eigen)}))
''')


@pytest.fixture(scope='module')
def fcn8s_checkpoint(tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp('fcnx'), 'fcn8s')


@pytest.mark.parametrize('forms', ['off', 'default', 'conv_library=eigen'])
def test_fcnx_export_matches_segmenter_under_each_cpu_form(forms, fcn8s_checkpoint, tmp_path):
  ckpt = fcn8s_checkpoint
  np.save(tmp_path / 'image.npy', _images(['color'])['color'][0])
  proc = subprocess.run([sys.executable, '-c', RUN_FCNX, str(ckpt), str(tmp_path / 'm.fcnx'),
                         str(tmp_path / 'image.npy')], env={**ENV, 'FCN_JAX_CPU_FORMS': forms},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  print(forms, report)
  assert report['nan'] == [False, False, False]
  assert report['default'] < 1e-5 and report['eigen'] < 1e-5
