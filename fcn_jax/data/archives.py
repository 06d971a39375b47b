"""The source archives of the builders: where the manual directory and TFDS's download folders
are, MD5-checked downloads and TF-free extraction (tar, tgz, zip), and the errors the builders
raise (re-exported by fcn_jax.data.builders)."""

from __future__ import annotations

import hashlib
import os
import tarfile

from etils import epath

from fcn_jax import progress as progress_lib
from fcn_jax.errors import UserError


class DataError(UserError, ValueError):
  """Bad or missing input data found while preparing a dataset."""


class MissingDataError(DataError, FileNotFoundError):
  """The source data is not where the instructions say it should be."""


def md5sum(path, chunk: int = 1 << 22) -> str:
  h = hashlib.md5()
  with epath.Path(path).open('rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def manual_dir(dl_manager) -> epath.Path | None:
  """The manual dir if the user provided a non-empty one, else None (without TFDS's
  AssertionError)."""
  path = getattr(dl_manager, '_manual_dir', None)
  if path is None:
    return None
  path = epath.Path(path)
  if path.exists() and any(path.iterdir()):
    return path
  return None


def download_dirs(dl_manager) -> tuple[epath.Path, epath.Path]:
  """(download_dir, extract_dir) of the TFDS download manager (default
  <data_dir>/downloads[/extracted])."""
  download_dir = epath.Path(getattr(dl_manager, '_download_dir'))
  extract_dir = epath.Path(getattr(dl_manager, '_extract_dir', download_dir / 'extracted'))
  return download_dir, extract_dir


def extract_archive(archive: epath.Path, extract_dir: epath.Path) -> epath.Path:
  """Extracts a .tar / .tgz / .zip once into extract_dir/<archive name> (TF-free; TFDS's
  extractor needs TensorFlow).

  Extraction goes to a temporary sibling that is renamed into place at the end, so an interrupted
  extraction is redone rather than trusted.
  """
  import shutil
  import tempfile
  dest = epath.Path(extract_dir) / archive.name
  if dest.exists():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(tempfile.mkdtemp(prefix=f'.{archive.name}.', dir=os.fspath(dest.parent)))
  import zipfile
  try:
    if zipfile.is_zipfile(os.fspath(archive)):  # SIFT Flow's SiftFlowDataset.zip
      with zipfile.ZipFile(os.fspath(archive)) as z:
        for member in progress_lib.track(z.infolist(), desc=f'extracting {archive.name}',
                                         unit='files'):
          z.extract(member, os.fspath(tmp))
    else:
      with tarfile.open(os.fspath(archive), 'r:*') as tar:
        kwargs = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
        for member in progress_lib.track(tar, desc=f'extracting {archive.name}', unit='files'):
          tar.extract(member, os.fspath(tmp), **kwargs)
    os.replace(os.fspath(tmp), os.fspath(dest))
  except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
    shutil.rmtree(os.fspath(tmp), ignore_errors=True)
    raise DataError(f'cannot extract {archive}: {e}') from e
  except BaseException:
    shutil.rmtree(os.fspath(tmp), ignore_errors=True)
    raise
  return dest


def download_file(url: str, dest: epath.Path, md5: str | None) -> epath.Path:
  """Downloads url to dest (via a .part file) unless dest exists with the right MD5; checks the
  MD5."""
  import urllib.request
  dest = epath.Path(dest)
  if dest.exists() and (md5 is None or md5sum(dest) == md5):
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.parent / (dest.name + '.part')
  try:
    with urllib.request.urlopen(url) as response, part.open('wb') as f:
      total = int(response.headers.get('Content-Length') or 0) or None
      bar = progress_lib.Counter(total, desc=f'downloading {dest.name}', in_bytes=True)
      try:
        while block := response.read(1 << 20):
          f.write(block)
          bar.update(len(block))
      finally:
        bar.close()
  except OSError as e:
    raise MissingDataError(f'cannot download {url}: {e}. Download it by hand into the manual '
                           'directory (see the instructions) and pass manual_dir.') from e
  got = md5sum(part)
  if md5 is not None and got != md5:
    part.unlink()
    raise DataError(f'{url} downloaded with MD5 {got}, expected {md5}; try again')
  os.replace(os.fspath(part), os.fspath(dest))
  return dest


def download_checked(dl_manager, archive: dict) -> epath.Path:
  """Downloads an official archive, checks its MD5, extracts it, returns the extraction root."""
  download_dir, extract_dir = download_dirs(dl_manager)
  path = download_file(archive['url'], download_dir / archive['filename'], archive['md5'])
  return extract_archive(path, extract_dir)


def extract_manual(dl_manager, archive: epath.Path) -> epath.Path:
  return extract_archive(archive, download_dirs(dl_manager)[1])
