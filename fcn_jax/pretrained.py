"""Pretrained weights by name: one call from a name to a converted checkpoint.

    Segmenter.from_pretrained('voc-fcn8s')
    python -m fcn_jax.predict --model voc-fcn8s --out out/ photos/
    python -m experiments.fcn32s ... --config.init_from=pretrained:vgg16-caffe
    python -m fcn_jax.pretrained list            # the table: name, dataset, classes, cached
    python -m fcn_jax.pretrained get voc-fcn8s   # download and convert now (before going offline)

The registry (`REGISTRY`) holds the fourteen released reference nets (fcn_jax.zoo) and the ImageNet
backbones the recipes start from, each with its file's URL, how to verify it, and how to convert
it. A file is downloaded once into the cache (`$FCN_JAX_CACHE_DIR/pretrained/files`, see
fcn_jax.paths), converted once (`.../pretrained/<name>/`, an ordinary checkpoint directory) and
reused. Downloads are resumable and atomic: bytes go to `<file>.part`, which resumes on the next
try (HTTP Range) and is renamed to the file's name only once complete and verified, so a partial
file never looks complete. A file whose checksum differs from the published one is deleted and the
call fails saying so; a file with no published checksum has its measured sha256 printed and kept
beside it (`<file>.sha256`), so it can be compared with another machine's.

Offline machines: put the file at the path the error message names (or pass `weights=FILE` /
`--weights FILE`); `FCN_JAX_WEIGHTS_MIRROR` replaces the default hosts with a URL prefix
(`https://mirror.example/fcn/`) or a local directory holding the files under their own names.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import http.client
import os
import pathlib
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Sequence

from fcn_jax import progress as progress_lib
from fcn_jax import checkpoint, convert, paths, zoo
from fcn_jax import cli as cli_lib
from fcn_jax.errors import UserError, cli

PREFIX = 'pretrained:'
MIRROR_ENV = 'FCN_JAX_WEIGHTS_MIRROR'
CHUNK = 1 << 20
RETRIES = 3                 # attempts per URL after a dropped connection (each resumes)
TIMEOUT_S = 60.0


class DownloadError(UserError):
  """A download failed (network, HTTP error, checksum); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Checksum:
  algorithm: str   # a hashlib name: 'sha256', 'sha1'
  digest: str      # hex; torchvision publishes only a prefix of the sha256 (in the file name)
  source: str      # where it was published

  def matches(self, hexdigest: str) -> bool:
    return hexdigest.lower().startswith(self.digest.lower())

  def __str__(self) -> str:
    prefix = ' (prefix)' if len(self.digest) < hashlib.new(self.algorithm).digest_size * 2 else ''
    return f'{self.algorithm} {self.digest}{prefix}, published by {self.source}'


@dataclasses.dataclass(frozen=True)
class Weights:
  """One downloadable file and what to convert it into."""
  name: str
  filename: str
  urls: tuple[str, ...]
  kind: str                        # 'fcn' (a trained FCN) or 'backbone' (ImageNet, for init_from)
  dataset: str
  classes: str
  inputs: str
  reference: str
  checksum: Checksum | None = None
  size: int | None = None          # bytes, where published
  arch: str | None = None          # None: recognised by fcn_jax.convert (the reference nets)
  preprocessing: str | None = None
  learnable_upsampling: bool = False

  def convert_options(self) -> dict:
    return {'learnable_upsampling': self.learnable_upsampling,
            'preprocessing': self.preprocessing}


_TORCHVISION = 'https://download.pytorch.org/models'
_OPENCV = 'opencv_extra testdata/dnn/download_models.py (sha1)'


def _torchvision(name: str, filename: str, arch: str, preprocessing: str, what: str) -> Weights:
  # torchvision's file names end in the first 8 hex digits of the file's sha256 (torch.hub checks
  # exactly that prefix).
  prefix = filename.rsplit('-', 1)[1].split('.')[0]
  return Weights(name, filename, (f'{_TORCHVISION}/{filename}',), 'backbone', 'ImageNet', '1000',
                 f'color ({preprocessing})', what,
                 Checksum('sha256', prefix, 'torchvision (the file name)'), arch=arch,
                 preprocessing=preprocessing, learnable_upsampling=True)


def _registry() -> dict[str, Weights]:
  published = {'fcn8s-heavy-pascal.caffemodel':
               Checksum('sha1', 'c449ea74dd7d83751d1357d6a8c323fcf4038962', _OPENCV)}
  entries = []
  for net in zoo.ZOO.values():
    if net.url is None:
      continue  # nyud-fcn32s-color-d: the reference released no weights
    counts = ' + '.join(str(len(names)) for _, names in net.heads)
    inputs = ' + '.join(f'{m} ({p})' for m, p in net.modalities)
    entries.append(Weights(net.name, net.file, (net.url,), 'fcn', net.dataset, counts, inputs,
                           net.reference, published.get(net.file)))
  entries += [
      Weights('vgg16-caffe', 'VGG_ILSVRC_16_layers.caffemodel',
              ('http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/'
               'VGG_ILSVRC_16_layers.caffemodel',),
              'backbone', 'ImageNet', '1000', 'color (caffe_bgr)',
              'the released FCNs start from it', arch='fcn32s', preprocessing='caffe_bgr',
              learnable_upsampling=True),
      _torchvision('vgg16-torchvision', 'vgg16-397923af.pth', 'fcn32s', 'torchvision_rgb',
                   'VGG16 IMAGENET1K_V1'),
      _torchvision('vgg16-bn-torchvision', 'vgg16_bn-6c64b313.pth', 'fcn8s', 'torchvision_rgb',
                   'VGG16-BN IMAGENET1K_V1 (the vgg16_bn backbone)'),
      _torchvision('alexnet-torchvision', 'alexnet-owt-7be5be79.pth', 'fcn_alexnet',
                   'torchvision_rgb', 'AlexNet IMAGENET1K_V1'),
      _torchvision('googlenet-torchvision', 'googlenet-1378be20.pth', 'fcn_googlenet',
                   'inception_rgb', 'GoogLeNet IMAGENET1K_V1'),
      _torchvision('resnet50-torchvision', 'resnet50-0676ba61.pth', 'fcn_resnet50',
                   'torchvision_rgb', 'ResNet-50 IMAGENET1K_V1'),
      _torchvision('resnet101-torchvision', 'resnet101-63fe2227.pth', 'fcn_resnet101',
                   'torchvision_rgb', 'ResNet-101 IMAGENET1K_V1'),
  ]
  # torchvision's FCN-ResNets, trained on COCO's images with the 20 VOC classes (+ background).
  for depth, prefix, score in (('50', '1167a1af', '60.5'), ('101', '7ecb50ca', '63.7')):
    filename = f'fcn_resnet{depth}_coco-{prefix}.pth'
    entries.append(Weights(
        f'fcn-resnet{depth}-coco', filename, (f'{_TORCHVISION}/{filename}',), 'fcn',
        'COCO (VOC classes)', '21', 'color (torchvision_rgb)',
        f'{score} mean IoU, COCO val2017 VOC subset (torchvision)',
        Checksum('sha256', prefix, 'torchvision (the file name)'), arch=f'fcn_resnet{depth}',
        preprocessing='torchvision_rgb'))
  return {w.name: w for w in entries}


REGISTRY: dict[str, Weights] = _registry()


# --------------------------------------------------------------------------------------------------
# Names


def lookup(name: str) -> Weights:
  """The registry entry `name` (a leading 'pretrained:' is accepted), or a UserError listing the
  names (and the closest one)."""
  key = name[len(PREFIX):] if name.startswith(PREFIX) else name
  if key in REGISTRY:
    return REGISTRY[key]
  close = difflib.get_close_matches(key, REGISTRY, n=1)
  hint = f' Did you mean {close[0]!r}?' if close else ''
  raise UserError(f'no pretrained weights named {key!r}.{hint} Known: {", ".join(REGISTRY)} '
                  '(python -m fcn_jax.pretrained list)')


def is_reference(value: str) -> bool:
  """True for 'pretrained:NAME' (a checkpoint given by name rather than by directory)."""
  return isinstance(value, str) and value.startswith(PREFIX)


def cache_root() -> pathlib.Path:
  return paths.cache_dir() / 'pretrained'


def file_path(weights: Weights) -> pathlib.Path:
  return cache_root() / 'files' / weights.filename


def checkpoint_path(weights: Weights) -> pathlib.Path:
  return cache_root() / weights.name


def is_cached(weights: Weights) -> bool:
  return checkpoint.is_checkpoint_dir(checkpoint_path(weights))


# --------------------------------------------------------------------------------------------------
# Downloads


def _sha(path: pathlib.Path, algorithm: str) -> str:
  digest = hashlib.new(algorithm)
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(CHUNK), b''):
      digest.update(block)
  return digest.hexdigest()


class _Dropped(Exception):
  """The connection ended before the whole file arrived (resume from the .part file)."""


def _fetch_once(url: str, part: pathlib.Path, progress: bool, log) -> None:
  """Appends the rest of `url` to `part` (asking for the bytes after what `part` holds)."""
  have = part.stat().st_size if part.exists() else 0
  request = urllib.request.Request(url, headers={'User-Agent': 'fcn_jax'})
  if have:
    request.add_header('Range', f'bytes={have}-')
  try:
    response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:  # the range starts at or past the end: start again
      part.unlink()
      raise _Dropped('the partial file was not a prefix of the file; starting again') from None
    raise
  with response:
    length = response.headers.get('Content-Length')
    length = int(length) if length is not None else None
    if have and response.status != 206:  # the server ignored the Range: the whole file follows
      have = 0
    mode = 'ab' if have else 'wb'
    total = have + length if length is not None else None
    if have:
      log(f'resuming {part.name[:-len(".part")]} at {have / 2**20:.1f} MiB')
    bar = progress_lib.Counter(total, desc=part.name[:-len('.part')], initial=have, in_bytes=True,
                               enabled=progress, log=log)
    received = 0
    try:
      with open(part, mode) as f:
        while True:
          try:
            block = response.read(CHUNK)
          except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as e:
            raise _Dropped(str(e) or type(e).__name__) from None
          if not block:
            break
          f.write(block)
          received += len(block)
          bar.update(len(block))
    finally:
      bar.close()
    if length is not None and received < length:
      raise _Dropped(f'the connection closed after {received} of {length} bytes')


def _fetch_with_retries(url: str, part: pathlib.Path, progress: bool, log) -> None:
  for attempt in range(RETRIES):
    try:
      return _fetch_once(url, part, progress, log)
    except _Dropped as e:
      if attempt == RETRIES - 1:
        raise
      log(f'{url}: {e}; retrying ({attempt + 2} of {RETRIES})')


def _local_mirror(mirror: str) -> pathlib.Path | None:
  if mirror.startswith('file://'):
    return pathlib.Path(urllib.parse.urlparse(mirror).path)
  if '://' not in mirror:
    return pathlib.Path(mirror).expanduser()
  return None


def sources(weights: Weights) -> tuple[str, ...]:
  """The URLs to try, in order: FCN_JAX_WEIGHTS_MIRROR's (when set, it replaces the defaults)."""
  mirror = os.environ.get(MIRROR_ENV, '').strip()
  if not mirror:
    return weights.urls
  local = _local_mirror(mirror)
  if local is not None:
    return (str(local / weights.filename),)
  return (mirror.rstrip('/') + '/' + urllib.parse.quote(weights.filename),)


def _offline_help(weights: Weights, dest: pathlib.Path) -> str:
  return (f'On a machine without internet: copy {weights.filename} (from {weights.urls[0]}) to '
          f'{dest} (the cache is $FCN_JAX_CACHE_DIR, else ~/.cache/fcn_jax), or pass --weights '
          f'FILE (from_pretrained(..., weights=FILE)), or set {MIRROR_ENV} to a directory or URL '
          'that holds it.')


def _verify(weights: Weights, path: pathlib.Path, log) -> str:
  """Checks `path` against the published checksum; returns its sha256 (recorded when no checksum
  is published). Raises DownloadError on a mismatch."""
  sha256 = _sha(path, 'sha256')
  if weights.checksum is None:
    log(f'{weights.filename}: no published checksum; sha256 {sha256} (kept in '
        f'{path.name}.sha256 in the cache)')
    return sha256
  algorithm = weights.checksum.algorithm
  actual = sha256 if algorithm == 'sha256' else _sha(path, algorithm)
  if not weights.checksum.matches(actual):
    raise DownloadError(f'{path}: {algorithm} {actual} is not the published {weights.checksum}')
  return sha256


def download(weights: Weights, *, progress: bool = True, log=print) -> pathlib.Path:
  """The verified file of `weights` in the cache, downloaded if it is not there yet."""
  dest = file_path(weights)
  if dest.exists():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + '.part')
  problems = []
  for url in sources(weights):
    if '://' not in url:  # a local mirror directory
      if not os.path.isfile(url):
        problems.append(f'{url}: no such file')
        continue
      shutil.copyfile(url, part)
      break
    log(f'downloading {weights.name}: {url}')
    try:
      _fetch_with_retries(url, part, progress, log)
      break
    except _Dropped as e:
      problems.append(f'{url}: {e} ({RETRIES} tries)')
    except urllib.error.HTTPError as e:
      problems.append(f'{url}: HTTP {e.code} {e.reason}')
    except (urllib.error.URLError, OSError) as e:
      problems.append(f'{url}: {getattr(e, "reason", e)}')
  else:
    kept = (f' The {part.stat().st_size} bytes received are kept in {part} and the next call '
            'resumes from them.' if part.exists() and part.stat().st_size else '')
    if part.exists() and not part.stat().st_size:
      part.unlink()
    raise DownloadError(f'could not download {weights.name} ({weights.filename}):\n  ' +
                        '\n  '.join(problems) + f'\n{_offline_help(weights, dest)}{kept}')
  try:
    sha256 = _verify(weights, part, log)
  except DownloadError as e:
    part.unlink()
    raise DownloadError(f'{e}. The download was deleted. The host may serve another file than the '
                        f'one published; fetch it yourself and pass --weights FILE, or set '
                        f'{MIRROR_ENV}.') from None
  if weights.checksum is None:
    dest.with_name(dest.name + '.sha256').write_text(f'{sha256}  {weights.filename}\n')
  os.replace(part, dest)
  return dest


# --------------------------------------------------------------------------------------------------
# Conversion


def get(name: str, *, weights: str | os.PathLike | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> pathlib.Path:
  """The converted checkpoint of `name`: downloaded and converted on first use, then reused.

  `weights`: a local copy of the file (verified like a download; nothing is downloaded), for
  machines without internet.
  """
  entry = lookup(name)
  out = checkpoint_path(entry)
  if is_cached(entry):
    return out
  if weights is not None:
    src = pathlib.Path(weights).expanduser()
    if not src.is_file():
      raise UserError(f'--weights {src}: no such file (the {entry.name} file is '
                      f'{entry.filename}, from {entry.urls[0]})')
    try:
      _verify(entry, src, log)
    except DownloadError as e:
      raise DownloadError(f'{e}: not the file of {entry.name}') from None
  else:
    src = download(entry, progress=progress, log=log)
  log(f'converting {src.name} -> {out}')
  try:
    metadata = convert.convert_to_checkpoint(src, out, entry.arch, overwrite=out.exists(),
                                             log=log, **entry.convert_options())
  except convert.ConversionError as e:
    raise UserError(f'{src} could not be converted as {entry.name}: {e}') from None
  if entry.name in zoo.ZOO and metadata.get('zoo_name') != entry.name:
    shutil.rmtree(out, ignore_errors=True)
    raise UserError(f'{src} is {metadata.get("zoo_name") or "not a reference net"}, not '
                    f'{entry.name}; nothing was kept')
  return out


def resolve(value: str | os.PathLike, **kwargs) -> str:
  """A checkpoint argument: 'pretrained:NAME' becomes its converted checkpoint (downloaded and
  converted if needed); anything else is returned as it is."""
  value = os.fspath(value)
  return str(get(value, **kwargs)) if is_reference(value) else value


# --------------------------------------------------------------------------------------------------
# CLI


def table(entries: Sequence[Weights] | None = None) -> str:
  """The registry as a markdown table, with what is in this machine's cache."""
  rows = ['| name | kind | dataset | classes | inputs | reference | size | checksum | cached |',
          '|---|---|---|---|---|---|---|---|---|']
  for w in entries or REGISTRY.values():
    check = f'{w.checksum.algorithm} {w.checksum.digest[:12]}' if w.checksum else 'none published'
    cached = 'converted' if is_cached(w) else 'file' if file_path(w).exists() else '-'
    size = w.size or (file_path(w).stat().st_size if file_path(w).exists() else None)
    size = f'{size / 2**20:.0f} MiB' if size else 'unknown'
    rows.append(f'| {w.name} | {w.kind} | {w.dataset} | {w.classes} | {w.inputs} | '
                f'{w.reference} | {size} | {check} | {cached} |')
  return '\n'.join(rows)


@cli
def main(argv: list[str] | None = None) -> int:
  parser = cli_lib.ArgumentParser(prog='python -m fcn_jax.pretrained',
                                  description='Pretrained weights by name.')
  commands = parser.add_subparsers(dest='command', required=True)
  commands.add_parser('list', help='the registry, and what is cached here')
  fetch = commands.add_parser('get', help='download (or take --weights) and convert now')
  fetch.add_argument('name')
  fetch.add_argument('--weights', help='a local copy of the file (no download)')
  args = parser.parse_args(argv)
  if args.command == 'list':
    print(table())
    print(f'\ncache: {cache_root()}')
    return 0
  print(f'{args.name}: {get(args.name, weights=args.weights)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
