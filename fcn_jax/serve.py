"""A local segmentation service:
`python -m fcn_jax.serve --checkpoint DIR [--host 127.0.0.1 --port 8000]`.

HTTP JSON API (one model, loaded once; requests run one at a time):
  GET  /            a page: drop an image, see the overlay with a class legend and an opacity slider
  GET  /model       {"arch", "num_classes", "class_names", "palette", "max_bytes", "max_size"}
  POST /predict     body: the image file's bytes (JPEG, PNG, ...); ?scores=1 adds the scores
                    -> {"width", "height", "label_png" (base64 palette PNG, pixel = class id),
                        "fractions" {class: share of the pixels}, "classes_present",
                        "scores" (with ?scores=1: base64 float16 .npy, (H, W, C))}
Errors are JSON {"error": ...}: 400 unreadable image or empty body, 404 unknown path, 405 wrong
method, 413 body over --max_bytes or image over --max_size pixels on its longest side.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import sys
import threading
import urllib.parse

import numpy as np

from fcn_jax import cli as cli_lib
from fcn_jax import images as images_lib
from fcn_jax import pretrained, viz
from fcn_jax.errors import UserError, cli
from fcn_jax.segmenter import Segmenter

DEFAULT_MAX_BYTES = 20 * 2**20

PAGE = r'''<!doctype html>
<html><head><meta charset="utf-8"><title>fcn_jax</title>
<style>
 body { font-family: sans-serif; margin: 2em; }
 #drop { border: 2px dashed #888; padding: 2em; text-align: center; width: 28em; }
 #drop.over { background: #eef; }
 #view { position: relative; display: inline-block; margin-top: 1em; }
 #view img { display: block; max-width: 640px; }
 #mask { position: absolute; left: 0; top: 0; width: 100%; height: 100%;
         image-rendering: pixelated; }
 .swatch { display: inline-block; width: 1em; height: 1em; margin-right: .4em;
           vertical-align: middle; border: 1px solid #000; }
 #error { color: #b00; }
</style></head>
<body>
<h1>fcn_jax <span id="arch"></span></h1>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<p>Opacity <input type="range" id="opacity" min="0" max="100" value="60">
<span id="opacity_value">60%</span></p>
<p id="error"></p>
<div id="view"><img id="photo"><img id="mask"></div>
<ul id="legend"></ul>
<script>
let model = null;
fetch('/model').then(r => r.json()).then(m => { model = m;
  document.getElementById('arch').textContent = `(${m.arch}, ${m.num_classes} classes)`; });
const opacity = document.getElementById('opacity');
opacity.oninput = () => { document.getElementById('mask').style.opacity = opacity.value / 100;
  document.getElementById('opacity_value').textContent = opacity.value + '%'; };
opacity.oninput();
async function send(file) {
  document.getElementById('error').textContent = '';
  document.getElementById('photo').src = URL.createObjectURL(file);
  const response = await fetch('/predict', {method: 'POST', body: file});
  const result = await response.json();
  if (!response.ok) { document.getElementById('error').textContent = result.error; return; }
  document.getElementById('mask').src = 'data:image/png;base64,' + result.label_png;
  const legend = document.getElementById('legend');
  legend.innerHTML = '';
  for (const [name, share] of Object.entries(result.fractions)) {
    if (share <= 0) continue;
    const c = model.palette ? model.palette[model.class_names.indexOf(name)] : [128, 128, 128];
    const item = document.createElement('li');
    item.className = 'legend-entry';
    item.innerHTML = `<span class="swatch" style="background: rgb(${c.join(',')})"></span>` +
                     `${name} ${(100 * share).toFixed(1)}%`;
    legend.appendChild(item);
  }
  document.body.dataset.done = '1';
}
document.getElementById('file').onchange = e => send(e.target.files[0]);
const drop = document.getElementById('drop');
drop.ondragover = e => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = e => {
  e.preventDefault(); drop.classList.remove('over'); send(e.dataTransfer.files[0]);
};
const wanted = new URLSearchParams(location.search).get('image');  // ?image=URL: load it at once
if (wanted) fetch(wanted).then(r => r.blob()).then(send);
</script>
</body></html>
'''


class HttpError(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class Service:
  """The model behind the API: decoding, limits, prediction, JSON."""

  def __init__(self, segmenter, *, max_bytes: int = DEFAULT_MAX_BYTES,
               max_size: int = images_lib.DEFAULT_MAX_SIZE):
    self.segmenter, self.max_bytes, self.max_size = segmenter, max_bytes, max_size
    self._lock = threading.Lock()

  def model_info(self) -> dict:
    m = self.segmenter.metadata
    return {'arch': m['arch'], 'num_classes': m['num_classes'],
            'class_names': self.segmenter.class_names, 'palette': self.segmenter.palette,
            'max_bytes': self.max_bytes, 'max_size': self.max_size}

  def decode(self, body: bytes) -> np.ndarray:
    if not body:
      raise HttpError(400, 'empty body: POST the image file\'s bytes')
    if len(body) > self.max_bytes:
      raise HttpError(413, f'image of {len(body)} bytes is over the limit of {self.max_bytes}')
    try:
      return images_lib.read_rgb(io.BytesIO(body), max_size=self.max_size)
    except images_lib.ImageError as e:
      status = 413 if 'larger than' in str(e) else 400
      raise HttpError(status, str(e).replace('--max_size', 'the service\'s --max_size')) from None

  def predict(self, body: bytes, scores: bool = False) -> dict:
    image = self.decode(body)
    with self._lock:
      result = self.segmenter([image], scores=True)
    label, raw = result['labels'][0], result['scores'][0]
    buf = io.BytesIO()
    viz.label_png(label, self.segmenter.palette).save(buf, format='PNG')
    counts = np.bincount(label.ravel(), minlength=len(self.segmenter.class_names))
    names = self.segmenter.class_names
    out = {'width': int(label.shape[1]), 'height': int(label.shape[0]),
           'label_png': base64.b64encode(buf.getvalue()).decode('ascii'),
           'fractions': {names[i]: float(c) / label.size for i, c in enumerate(counts)},
           'classes_present': [names[i] for i in np.flatnonzero(counts)]}
    if scores:
      npy = io.BytesIO()
      np.save(npy, raw.astype(np.float16))
      out['scores'] = base64.b64encode(npy.getvalue()).decode('ascii')
    return out


def make_handler(service: Service):

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = 'fcn_jax'

    def _send(self, status: int, body: bytes, content_type: str) -> None:
      self.send_response(status)
      self.send_header('Content-Type', content_type)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
      self._send(status, json.dumps(obj).encode(), 'application/json')

    def do_GET(self) -> None:
      path = urllib.parse.urlparse(self.path).path
      if path in ('/', '/index.html'):
        self._send(200, PAGE.encode(), 'text/html; charset=utf-8')
      elif path == '/model':
        self._json(200, service.model_info())
      elif path == '/predict':
        self._json(405, {'error': 'POST the image to /predict'})
      else:
        self._json(404, {'error': f'no {path}; see GET / , GET /model, POST /predict'})

    def do_POST(self) -> None:
      url = urllib.parse.urlparse(self.path)
      if url.path != '/predict':
        self._json(404 if url.path not in ('/', '/model') else 405,
                   {'error': f'POST /predict (not {url.path})'})
        return
      try:
        length = int(self.headers.get('Content-Length') or 0)
      except ValueError:
        length = -1
      if length < 0:
        self._json(400, {'error': 'bad Content-Length'})
        return
      if length > service.max_bytes:
        self._json(413, {'error': f'image of {length} bytes is over the limit of '
                                  f'{service.max_bytes}'})
        return
      body = self.rfile.read(length)
      query = urllib.parse.parse_qs(url.query)
      try:
        result = service.predict(body, scores=query.get('scores', ['0'])[0] in ('1', 'true'))
      except HttpError as e:
        self._json(e.status, {'error': str(e)})
        return
      self._json(200, result)

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr
      sys.stderr.write(f'{self.address_string()} {format % args}\n')

  return Handler


def make_server(service: Service, host: str = '127.0.0.1',
                port: int = 8000) -> http.server.ThreadingHTTPServer:
  return http.server.ThreadingHTTPServer((host, port), make_handler(service))


@cli
def main(argv: list[str] | None = None) -> int:
  p = cli_lib.ArgumentParser(prog='python -m fcn_jax.serve', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='a training WORKDIR, a converted checkpoint, or pretrained:NAME')
  p.add_argument('--host', default='127.0.0.1', help='address to listen on (default %(default)s)')
  p.add_argument('--port', type=int, default=8000, help='port (default %(default)s; 0: any free)')
  p.add_argument('--which', default='best', help='best, latest or a step')
  p.add_argument('--max_bytes', type=int, default=DEFAULT_MAX_BYTES, help='largest upload in bytes')
  p.add_argument('--max_size', type=int, default=images_lib.DEFAULT_MAX_SIZE,
                 help='largest image side in pixels (default %(default)s)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), help='compute dtype')
  a = p.parse_args(argv)
  a.checkpoint = pretrained.resolve(a.checkpoint)
  segmenter = Segmenter.load(a.checkpoint, which=a.which, batch_size=1, dtype=a.dtype)
  segmenter.require_single_colour_net('fcn_jax.serve')
  service = Service(segmenter, max_bytes=a.max_bytes, max_size=a.max_size)
  try:
    server = make_server(service, a.host, a.port)
  except OSError as e:
    raise UserError(f'cannot listen on {a.host}:{a.port}: {e.strerror}; pass another '
                    '--port') from None
  print(f'serving {a.checkpoint} on http://{server.server_address[0]}:{server.server_address[1]}/',
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == '__main__':
  sys.exit(main())
