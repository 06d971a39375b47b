"""Inference at scale: the bucketed Segmenter against native-size inference, batched prediction with
--resume, and the jax.export artifact reloaded in a process that imports no model code."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from fcn_jax import predict, train
from fcn_jax.data import synthetic
from fcn_jax.segmenter import Segmenter

REPO = pathlib.Path(__file__).resolve().parents[1]
# One xdist worker runs this module (make test uses --dist loadgroup): the trained model is built once.
pytestmark = pytest.mark.xdist_group('trained_model')
VOC_SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (480, 360), (366, 500),
             (500, 442)]


@pytest.fixture(scope='session')  # session: not rebuilt when xdist interleaves modules
def trained(tmp_path_factory) -> pathlib.Path:
  """FCN-8s at-once trained from scratch (the demo preset) for 300 steps on colour shapes."""
  base = tmp_path_factory.mktemp('trained')
  root = synthetic.write_folder_dataset(base / 'shapes', num_train=64, num_val=8, num_classes=4)
  from experiments import common
  c = common.load_config('fcn8s_atonce', 'demo')
  c.dataset.name, c.dataset.root, c.dataset.data_dir = 'folder', str(root), str(base / 'tfds')
  c.num_train_steps, c.eval_every, c.checkpoint_every = 300, 300, 300
  c.eval_pad_to, c.num_figure_examples, c.compilation_cache_dir = 128, 0, ''
  scores = train.train_and_evaluate(c, base / 'run')
  assert scores['mean_iu'] > 0.3, scores  # it learned something: predictions have structure
  return base / 'run'


def mosaic(seed: int, height: int, width: int) -> np.ndarray:
  """A VOC-sized image tiled with 96x128 scenes: objects at the scale the model was trained on."""
  rows = [np.concatenate([synthetic.render_colour_scene(seed, 100 * r + c, 4, 96, 128)[0]
                          for c in range(-(-width // 128))], 1) for r in range(-(-height // 96))]
  return np.ascontiguousarray(np.concatenate(rows, 0)[:height, :width])


def test_bucketed_labels_agree_with_native_size_on_voc_sized_inputs(trained):
  seg = Segmenter.load(trained, batch_size=4)
  images = [mosaic(5 + i, h, w) for i, (h, w) in enumerate(VOC_SIZES)]
  bucketed = seg(images)
  buckets = set(seg.compiled_shapes)
  native = seg(images, exact=True)
  agree = sum(int((a == b).sum()) for a, b in zip(bucketed, native)) / sum(a.size for a in native)
  print(f'bucketed vs native labels: {100 * agree:.3f}% of pixels agree')
  assert agree >= 0.995, agree
  # The model draws objects, and the buckets draw the same ones: the agreement is not all
  # background.
  foreground = sum(int((x > 0).sum()) for x in native)
  same = sum(int(((a == b) & (b > 0)).sum()) for a, b in zip(bucketed, native))
  share = foreground / sum(x.size for x in native)
  print(f'foreground predicted on {foreground} pixels ({100 * share:.1f}%), '
        f'{100 * same / max(foreground, 1):.2f}% of them alike in the buckets')
  assert foreground > 5000 and same / foreground >= 0.95, (foreground, same)  # 96.8% measured
  assert all(a.shape == im.shape[:2] and a.dtype == np.uint8 for a, im in zip(bucketed, images))
  # One compile per bucket (sides rounded up to 64): 8 sizes, 4 buckets.
  assert buckets == {(4, 512, 384, 3), (4, 384, 512, 3), (4, 512, 512, 3), (4, 512, 448, 3)}, buckets
  out = seg(images[:2], scores=True, probabilities=True)
  np.testing.assert_array_equal(out['labels'][0], np.argmax(out['scores'][0], -1))
  np.testing.assert_allclose(out['probabilities'][1].sum(-1), 1.0, rtol=1e-5)


def test_bfloat16_and_several_devices(trained, tmp_path):
  seg = Segmenter.load(trained, dtype='bfloat16', batch_size=2)
  image = synthetic.render_colour_scene(5, 0, 4, 96, 128)[0]
  f32 = Segmenter.load(trained)([image])[0]
  assert (seg([image])[0] == f32).mean() > 0.98
  script = textwrap.dedent(f'''
      import jax, numpy as np
      from fcn_jax.segmenter import Segmenter
      from fcn_jax.data import synthetic
      assert jax.local_device_count() == 4
      seg = Segmenter.load({str(trained)!r}, batch_size=3)
      assert seg.batch_size == 4
      images = [synthetic.render_colour_scene(5, i, 4, 96, 128)[0] for i in range(6)]
      labels = seg(images)
      one = Segmenter.load({str(trained)!r}, batch_size=4, devices=jax.local_devices()[:1])(images)
      assert all((a == b).all() for a, b in zip(labels, one))
      print('OK')
  ''')
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]


def test_predict_batches_resumes_and_writes_npz(trained, tmp_path):
  images = tmp_path / 'photos'
  for i, (h, w) in enumerate([(96, 128), (128, 96), (100, 120)]):
    (images / f'sub{i % 2}').mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic.render_colour_scene(6, i, 4, h, w)[0]).save(images / f'sub{i % 2}' / f'p{i}.jpg')
  out = tmp_path / 'out'
  written, failed = predict.predict_images(trained, [images], out, save_scores=True,
                                           scores_format='npz', glob='*.jpg', workers=1)
  assert not failed and len(written) == 3
  data = np.load(out / 'sub0' / 'p0_scores.npz')['scores']
  assert data.dtype == np.float16 and data.shape == (96, 128, 4)
  with Image.open(out / 'sub0' / 'p0.png') as im:  # float16 scores: ties may round either way
    assert (np.asarray(im) == np.argmax(data.astype(np.float32), -1)).mean() > 0.999
  (out / 'sub1' / 'p1.png').unlink()  # as if interrupted before this one
  stamp = (out / 'sub0' / 'p0.png').stat().st_mtime_ns
  written, failed = predict.predict_images(trained, [images], out, save_scores=True,
                                           scores_format='npz', resume=True)
  assert [p.name for p in written] == ['p1.png'] and (out / 'sub1' / 'p1.png').exists()
  assert (out / 'sub0' / 'p0.png').stat().st_mtime_ns == stamp


def test_export_reloads_without_model_code(trained, tmp_path):
  artifact = tmp_path / 'model.fcnx'
  proc = subprocess.run([sys.executable, '-m', 'fcn_jax.export', '--checkpoint', str(trained),
                         '--out', str(artifact), '--sizes', '128x128,96x128'],
                        env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  image = synthetic.render_colour_scene(7, 0, 4, 90, 120)[0]
  np.save(tmp_path / 'image.npy', image)
  want = Segmenter.load(trained, bucket_step=32).scores([image])[0]  # 90x120 -> padded to 96x128
  script = textwrap.dedent(f'''
      import sys, numpy as np
      from fcn_jax import exported
      model = exported.load({str(artifact)!r})
      scores = model.scores(np.load({str(tmp_path / 'image.npy')!r}))
      np.save({str(tmp_path / 'got.npy')!r}, scores)
      loaded = sorted(m for m in sys.modules if m.startswith(('fcn_jax', 'flax')))
      print(loaded, model.class_names, model.metadata['platforms'])
  ''')
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "['fcn_jax', 'fcn_jax.exported']" in proc.stdout  # no model code, no flax
  assert "'square'" in proc.stdout
  np.testing.assert_allclose(np.load(tmp_path / 'got.npy'), want, rtol=1e-5, atol=1e-5)
  # Existing files are not replaced; a size that holds nothing is refused clearly.
  proc = subprocess.run([sys.executable, '-m', 'fcn_jax.export', '--checkpoint', str(trained),
                         '--out', str(artifact)], capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 2 and 'exists' in proc.stderr and 'Traceback' not in proc.stderr


# --------------------------------------------------------------------------------------------------
# The local service


@pytest.fixture(scope='session')  # session: not rebuilt when xdist interleaves modules
def server(trained):
  import threading
  from fcn_jax import serve
  seg = Segmenter.load(trained, batch_size=1)
  httpd = serve.make_server(serve.Service(seg, max_bytes=200_000, max_size=256), '127.0.0.1', 0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}', seg
  httpd.shutdown()
  httpd.server_close()


def _request(url: str, data: bytes | None = None, method: str | None = None):
  import urllib.error
  import urllib.request
  request = urllib.request.Request(url, data=data, method=method)
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _png_bytes(image: np.ndarray, fmt: str = 'PNG') -> bytes:
  import io
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt)
  return buf.getvalue()


def test_service_api_over_http(server):
  import base64
  import io
  url, seg = server
  status, body = _request(url + '/model')
  info = json.loads(body)
  assert status == 200 and info['class_names'] == ['background', 'square', 'triangle', 'disc']
  assert info['palette'][1] == list(synthetic.COLOUR_CLASSES[1][1])
  image = synthetic.render_colour_scene(8, 0, 4, 96, 128)[0]
  status, body = _request(url + '/predict?scores=1', _png_bytes(image), 'POST')
  assert status == 200, body
  result = json.loads(body)
  with Image.open(io.BytesIO(base64.b64decode(result['label_png']))) as im:
    label = np.asarray(im)
    assert im.mode == 'P' and im.size == (128, 96)
  np.testing.assert_array_equal(label, seg([image])[0])
  assert sum(result['fractions'].values()) == pytest.approx(1.0)
  assert result['fractions']['background'] == pytest.approx((label == 0).mean())
  scores = np.load(io.BytesIO(base64.b64decode(result['scores'])))
  assert scores.shape == (96, 128, 4) and scores.dtype == np.float16
  # Bad uploads: clear 4xx errors as JSON.
  for data, want, text in ((b'', 400, 'empty body'), (b'not an image', 400, 'cannot read'),
                           (b'x' * 200_001, 413, 'over the limit'),
                           (_png_bytes(np.zeros((300, 20, 3), np.uint8)), 413, 'larger than')):
    status, body = _request(url + '/predict', data, 'POST')
    assert status == want and text in json.loads(body)['error'], (status, body)
  assert _request(url + '/nothing')[0] == 404
  assert _request(url + '/predict')[0] == 405
  status, body = _request(url + '/')
  assert status == 200 and b'opacity' in body and b'/predict' in body


def test_service_page_in_headless_chromium(server, tmp_path):
  """Drives the page: it loads an image (?image=, the drop handler's code path), shows the overlay
  and the legend. Needs Debian's chromium; without it the test says so and is skipped."""
  import shutil
  browser = shutil.which('chromium') or shutil.which('chromium-browser')
  if browser is None:
    pytest.skip('chromium is not installed here (apt-get install chromium): the page was not driven')
  url, _ = server
  image = synthetic.render_colour_scene(8, 1, 4, 96, 128)[0]
  # The page fetches ?image=URL from the same origin: a data URL keeps the test self-contained.
  import base64
  data_url = 'data:image/png;base64,' + base64.b64encode(_png_bytes(image)).decode()
  import urllib.parse
  page = f'{url}/?image={urllib.parse.quote(data_url)}'
  proc = subprocess.run(
      [browser, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
       '--disable-component-update', '--disable-sync', '--no-first-run',
       f'--user-data-dir={tmp_path / "profile"}', '--virtual-time-budget=20000', '--dump-dom', page],
      capture_output=True, text=True, timeout=180)
  dom = proc.stdout
  assert 'data-done="1"' in dom, (proc.stderr[-2000:], dom[-2000:])
  assert 'legend-entry' in dom and 'background' in dom and 'data:image/png;base64,' in dom


def test_predict_a_dataset_split_in_two_processes(trained, tmp_path):
  """--dataset/--split as input, sharded over two processes (jax.distributed on localhost)."""
  import socket
  root = synthetic.write_folder_dataset(tmp_path / 'ds', num_train=2, num_val=5, num_classes=4)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'fcn_jax.predict', '--checkpoint', str(trained), '--out', str(out),
         '--dataset', 'folder', '--split', 'val', '--root', str(root),
         '--data-dir', str(tmp_path / 'tfds'), f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2']
  # Not prepared yet: process 0 prepares it while process 1 waits, then both read it.
  procs = [subprocess.Popen(cmd + [f'--process_id={k}'], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for k in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert sorted(p.name for p in out.glob('*.png')) == [f'scene_{i:05d}.png' for i in range(2, 7)]
  assert 'wrote 3 label maps' in logs[0] and 'wrote 2 label maps' in logs[1], logs
