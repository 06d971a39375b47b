"""The notebooks run end to end (TINY parameters, CPU) and are stored without outputs."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

# The dev extra installs these (setup.cfg); a missing one is a broken install, not a skip.
import ipykernel  # noqa: F401  (the kernel the notebooks run on)
import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / 'notebooks'
TRAIN = NOTEBOOKS / 'train_fcn8s_colab_tpu.ipynb'
INFERENCE = NOTEBOOKS / 'inference.ipynb'


def _parameters_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, 'exactly one cell tagged "parameters"'
  return tagged[0]


def execute(path: pathlib.Path, monkeypatch, **parameters):
  """Runs the notebook with `parameters` injected after its parameters cell (as papermill does)."""
  nb = nbformat.read(path, as_version=4)
  source = '# Parameters injected by the tests\n' + '\n'.join(f'{k} = {v!r}' for k, v in parameters.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(_parameters_index(nb) + 1, cell)
  # The kernel inherits this environment: CPU only, and the repository importable.
  # XLA's backend optimisation off: compiling, not running, is what the tiny models cost.
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOKS)}})
  client.execute()
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get('outputs', []):
      out.append(o.get('text', ''))
      out.extend(str(v) for k, v in o.get('data', {}).items() if k.startswith('text/'))
  return '\n'.join(out)


@pytest.mark.parametrize('path', [TRAIN, INFERENCE], ids=lambda p: p.stem)
def test_stored_without_outputs_and_full_size_by_default(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, f'{path.name}: outputs not stripped'
  params = nb.cells[_parameters_index(nb)].source
  assert 'TINY = False' in params
  assert 'IN_COLAB' in ''.join(c.source for c in nb.cells)  # installs only in Colab


def test_training_notebook_runs_tiny(tmp_path, monkeypatch):
  nb = execute(TRAIN, monkeypatch, TINY=True, WORKDIR=str(tmp_path / 'runs'),
               EXPORT_DIR=str(tmp_path / 'export'))
  text = _text(nb)
  assert '| FCN-8s |' in text and 'mean IU' in text
  for arch in ('fcn32s', 'fcn16s', 'fcn8s'):
    assert json.loads((tmp_path / 'runs' / arch / 'results.json').read_text())['name'] == arch
  assert (tmp_path / 'runs' / 'figures' / 'comparison.png').exists()
  assert any('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', []))
  from fcn_jax import checkpoint
  meta = checkpoint.read_metadata(tmp_path / 'export')
  assert meta['arch'] == 'fcn8s' and meta['width'] == pytest.approx(1 / 16)
  assert (tmp_path / 'export.zip').exists()


def test_inference_notebook_runs_tiny(tmp_path, monkeypatch):
  nb = execute(INFERENCE, monkeypatch, TINY=True, WORKDIR=str(tmp_path / 'work'))
  text = _text(nb)
  assert 'converted:' in text and 'npz file, caffe layout' in text
  assert '| fcn8s |' in text
  predictions = tmp_path / 'work' / 'predictions'
  assert len(list(predictions.glob('*_overlay.jpg'))) == 2
  assert sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', [])) >= 3
