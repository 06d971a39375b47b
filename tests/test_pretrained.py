"""Pretrained weights by name (fcn_jax.pretrained): files served by a local HTTP server on
127.0.0.1 (right and wrong checksums, dropped connections, a 404, no server at all), each case
ending as documented with nothing half-written left where the final file would be."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import pathlib
import threading

import jax
import numpy as np
import pytest

from fcn_jax import caffe_pb, checkpoint, config_checks, predict, pretrained, train
from fcn_jax.errors import UserError
from fcn_jax.segmenter import Segmenter
from tests import caffe_reference

WIDTH = 1 / 16


@pytest.fixture(scope='module')
def caffemodels(tmp_path_factory) -> dict[str, bytes]:
  """Reduced-width random-weight voc-fcn8s / voc-fcn32s files in the real .caffemodel format."""
  out = {}
  for name in ('voc-fcn8s', 'voc-fcn32s'):
    layers, _ = caffe_reference.build(name, WIDTH, seed=0)
    path = tmp_path_factory.mktemp(name) / caffe_reference.NETS[name][1]
    caffe_pb.write_net(path, name, caffe_reference.caffemodel_layers(layers))
    out[name] = path.read_bytes()
  return out


class _Server:
  """Serves `files` by name under modes: /ok/ (HTTP Range honoured), /drop-once/ (the first
  response stops half way), /drop/ (every response stops half way), anything else 404."""

  def __init__(self, files: dict[str, bytes]):
    self.files, self.requests, self.dropped = files, [], set()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_GET(self):
        mode, _, name = self.path.strip('/').partition('/')
        server.requests.append((self.path, self.headers.get('Range')))
        data = server.files.get(name)
        if data is None or mode not in ('ok', 'drop-once', 'drop'):
          self.send_error(404)
          return
        start = 0
        if self.headers.get('Range'):
          start = int(self.headers['Range'].split('=')[1].split('-')[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
          self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        drop = mode == 'drop' or (mode == 'drop-once' and name not in server.dropped)
        if drop:
          server.dropped.add(name)
          body = body[:len(body) // 2]
        self.wfile.write(body)
        self.close_connection = True

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(caffemodels):
  s = _Server({caffe_reference.NETS[n][1]: data for n, data in caffemodels.items()})
  yield s
  s.close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> pathlib.Path:
  monkeypatch.setenv('FCN_JAX_CACHE_DIR', str(tmp_path / 'cache'))
  monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)
  return tmp_path / 'cache' / 'pretrained'


def _serve(monkeypatch, name: str, url: str, data: bytes | None, checksum: str | None = 'right'):
  """Points the registry entry `name` at `url`, with the right, a wrong, or no checksum."""
  digest = {'right': hashlib.sha256(data or b'').hexdigest(), 'wrong': '0' * 64, None: None}
  entry = dataclasses.replace(
      pretrained.REGISTRY[name], urls=(url,),
      checksum=pretrained.Checksum('sha256', digest[checksum], 'the test') if checksum else None)
  monkeypatch.setitem(pretrained.REGISTRY, name, entry)
  return entry


def _leftovers(cache: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(cache)) for p in cache.rglob('*')) if cache.exists() else []


def test_right_checksum_downloads_converts_once_and_predicts(server, caffemodels, cache, tmp_path,
                                                            monkeypatch, capsys):
  data = caffemodels['voc-fcn8s']
  entry = _serve(monkeypatch, 'voc-fcn8s', f'{server.url}/ok/{caffe_reference.NETS["voc-fcn8s"][1]}',
                 data)
  seg = Segmenter.from_pretrained('voc-fcn8s')
  assert seg.metadata['zoo_name'] == 'voc-fcn8s' and len(seg.class_names) == 21
  assert pretrained.file_path(entry).read_bytes() == data
  assert not list(cache.rglob('*.part'))
  image = np.random.default_rng(0).integers(0, 256, (37, 45, 3), np.uint8)
  assert seg(image).shape == (37, 45)
  requests = len(server.requests)
  # Cached: the next call (library and CLI) converts nothing and downloads nothing.
  out = tmp_path / 'out'
  (tmp_path / 'in').mkdir()
  from PIL import Image
  Image.fromarray(image).save(tmp_path / 'in' / 'a.png')
  assert predict.main(['--model', 'voc-fcn8s', '--out', str(out), str(tmp_path / 'in')]) == 0
  assert (out / 'a.png').is_file() and len(server.requests) == requests
  assert pretrained.main(['list']) == 0
  listed = capsys.readouterr().out
  row = next(line for line in listed.splitlines() if line.startswith('| voc-fcn8s |'))
  assert row.endswith('| converted |') and 'sha256' in row


def test_wrong_checksum_deletes_the_download_and_keeps_nothing(server, caffemodels, cache,
                                                               monkeypatch):
  name = caffe_reference.NETS['voc-fcn8s'][1]
  _serve(monkeypatch, 'voc-fcn8s', f'{server.url}/ok/{name}', caffemodels['voc-fcn8s'], 'wrong')
  with pytest.raises(pretrained.DownloadError, match='is not the published sha256 0000') as e:
    pretrained.get('voc-fcn8s', progress=False)
  assert 'deleted' in str(e.value) and '--weights FILE' in str(e.value)
  assert _leftovers(cache) == ['files']


def test_a_dropped_connection_resumes_where_it_stopped(server, caffemodels, cache, monkeypatch):
  name = caffe_reference.NETS['voc-fcn8s'][1]
  data = caffemodels['voc-fcn8s']
  entry = _serve(monkeypatch, 'voc-fcn8s', f'{server.url}/drop-once/{name}', data)
  messages = []
  path = pretrained.get('voc-fcn8s', progress=False, log=messages.append)
  assert checkpoint.read_metadata(path)['zoo_name'] == 'voc-fcn8s'
  assert pretrained.file_path(entry).read_bytes() == data
  ranges = [r for _, r in server.requests]
  assert ranges == [None, f'bytes={len(data) // 2}-'], ranges  # the second asks only for the rest
  assert any('retrying' in m for m in messages) and any('resuming' in m for m in messages)


def test_a_connection_that_keeps_dropping_fails_keeps_the_part_and_resumes_later(
    server, caffemodels, cache, monkeypatch):
  name = caffe_reference.NETS['voc-fcn8s'][1]
  data = caffemodels['voc-fcn8s']
  entry = _serve(monkeypatch, 'voc-fcn8s', f'{server.url}/drop/{name}', data)
  with pytest.raises(pretrained.DownloadError, match='3 tries') as e:
    pretrained.get('voc-fcn8s', progress=False)
  part = pretrained.file_path(entry).with_name(name + '.part')
  assert 'next call resumes' in str(e.value) and str(part) in str(e.value)
  assert part.is_file() and 0 < part.stat().st_size < len(data)
  assert not pretrained.file_path(entry).exists() and not pretrained.is_cached(entry)
  # The server recovers: the next call asks only for the missing bytes.
  have = part.stat().st_size
  _serve(monkeypatch, 'voc-fcn8s', f'{server.url}/ok/{name}', data)
  pretrained.get('voc-fcn8s', progress=False)
  assert server.requests[-1][1] == f'bytes={have}-'
  assert pretrained.file_path(entry).read_bytes() == data and not part.exists()


def test_a_404_says_what_to_do_offline_and_leaves_nothing(server, caffemodels, cache, monkeypatch,
                                                          capsys):
  _serve(monkeypatch, 'voc-fcn8s', f'{server.url}/gone/fcn8s-heavy-pascal.caffemodel',
         caffemodels['voc-fcn8s'])
  with pytest.raises(SystemExit) as exit_:
    predict.main(['--model', 'voc-fcn8s', '--out', str(cache.parent / 'o'), 'x.png'])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert 'HTTP 404' in err and 'Traceback' not in err
  assert str(cache / 'files' / 'fcn8s-heavy-pascal.caffemodel') in err and '--weights' in err
  assert _leftovers(cache) == ['files']


def test_offline_then_weights_file_verifies_and_converts(caffemodels, cache, tmp_path, monkeypatch,
                                                         capsys):
  # Nothing listens on this port: the machine is "offline".
  _serve(monkeypatch, 'voc-fcn32s', 'http://127.0.0.1:9/fcn32s-heavy-pascal.caffemodel', None,
         checksum=None)
  with pytest.raises(pretrained.DownloadError, match='without internet'):
    pretrained.get('voc-fcn32s', progress=False)
  local = tmp_path / 'fcn32s-heavy-pascal.caffemodel'
  local.write_bytes(caffemodels['voc-fcn32s'])
  # Another net's file under this name: refused, nothing kept.
  wrong = tmp_path / 'other.caffemodel'
  wrong.write_bytes(caffemodels['voc-fcn8s'])
  with pytest.raises(UserError, match='is voc-fcn8s, not voc-fcn32s'):
    pretrained.get('voc-fcn32s', weights=wrong, progress=False)
  assert not pretrained.is_cached(pretrained.REGISTRY['voc-fcn32s'])
  path = pretrained.get('voc-fcn32s', weights=local, progress=False)
  assert checkpoint.read_metadata(path)['zoo_name'] == 'voc-fcn32s'
  assert local.read_bytes() == caffemodels['voc-fcn32s']  # the user's file is left as it was
  # A wrong checksum on a user's file is refused, and the file is not deleted.
  _serve(monkeypatch, 'voc-fcn8s', 'http://127.0.0.1:9/x', caffemodels['voc-fcn8s'], 'wrong')
  with pytest.raises(pretrained.DownloadError, match='not the file of voc-fcn8s'):
    pretrained.get('voc-fcn8s', weights=wrong, progress=False)
  assert wrong.is_file()


def test_a_mirror_replaces_the_default_hosts(server, caffemodels, cache, tmp_path, monkeypatch):
  name = caffe_reference.NETS['voc-fcn8s'][1]
  entry = _serve(monkeypatch, 'voc-fcn8s', 'http://127.0.0.1:9/unreachable', caffemodels['voc-fcn8s'])
  monkeypatch.setenv(pretrained.MIRROR_ENV, f'{server.url}/ok/')
  assert pretrained.sources(entry) == (f'{server.url}/ok/{name}',)
  pretrained.download(entry, progress=False)
  assert pretrained.file_path(entry).read_bytes() == caffemodels['voc-fcn8s']
  pretrained.file_path(entry).unlink()
  mirror = tmp_path / 'mirror'
  mirror.mkdir()
  (mirror / name).write_bytes(caffemodels['voc-fcn8s'])
  monkeypatch.setenv(pretrained.MIRROR_ENV, str(mirror))
  requests = len(server.requests)
  pretrained.download(entry, progress=False)
  assert pretrained.file_path(entry).read_bytes() == caffemodels['voc-fcn8s']
  assert len(server.requests) == requests and (mirror / name).is_file()


def test_init_from_pretrained_name(server, caffemodels, cache, monkeypatch):
  from experiments import common
  c = common.load_config('fcn16s', 'demo')
  c.init_from = 'pretrained:voc-fcn33s'
  with pytest.raises(UserError, match="Did you mean 'voc-fcn32s'"):
    config_checks.check_train_config(c)
  name = caffe_reference.NETS['voc-fcn32s'][1]
  _serve(monkeypatch, 'voc-fcn32s', f'{server.url}/ok/{name}', caffemodels['voc-fcn32s'])
  c.init_from, c.preprocessing = 'pretrained:voc-fcn32s', 'caffe_bgr'
  c.model.num_classes, c.model.width = 21, WIDTH
  messages = []
  out = train.initial_variables(train.model_from_config(c), c, jax.random.key(0),
                                log=messages.append)
  _, source, _ = checkpoint.load_inference(pretrained.checkpoint_path(pretrained.REGISTRY['voc-fcn32s']))
  np.testing.assert_array_equal(out['params']['conv1_1']['kernel'],
                                source['params']['conv1_1']['kernel'])
  np.testing.assert_array_equal(out['params']['score_fr']['kernel'],
                                source['params']['score_fr']['kernel'])
  assert any('kept at init: ' in m and 'score_pool4' in m for m in messages), messages


def test_torchvision_fcn_resnet_by_name_from_a_local_file(tmp_path, monkeypatch):
  """The registry's torchvision FCN-ResNet entry converts a file with the real key names (reduced
  width here) and checks torchvision's sha256 prefix: a file that does not match is refused."""
  from tests import test_resnet
  path = test_resnet.save_pth(test_resnet.state_of(test_resnet.random_fcn('resnet50')),
                              tmp_path / 'fcn_resnet50_coco-1167a1af.pth')
  with pytest.raises(pretrained.DownloadError, match='not the file of fcn-resnet50-coco'):
    pretrained.get('fcn-resnet50-coco', weights=path, progress=False)
  digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:8]
  entry = dataclasses.replace(pretrained.REGISTRY['fcn-resnet50-coco'],
                              checksum=pretrained.Checksum('sha256', digest, 'the test'))
  monkeypatch.setitem(pretrained.REGISTRY, 'fcn-resnet50-coco', entry)
  seg = Segmenter.from_pretrained('fcn-resnet50-coco', weights=path, progress=False)
  assert seg.metadata['arch'] == 'fcn_resnet50' and seg.metadata['preprocessing'] == 'torchvision_rgb'
  assert seg(np.zeros((33, 47, 3), np.uint8)).shape == (33, 47)
