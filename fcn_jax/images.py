"""Reading users' image files: as displayed (EXIF orientation applied), size-checked before
decoding, every failure an ImageError naming the file.

Two kinds of files: 8-bit JPEG / PNG (and what else PIL reads) are photographs, decoded to uint8
RGB as always; TIFF (any band count, read with tifffile) and 16-bit PNG (1 to 4 channels) are
decoded as stored, (H, W, C) uint8 / uint16, with nothing converted or clipped (multispectral,
aerial, medical data). `decode_input` applies that rule to a file's bytes, `read_image` to a file;
`display_rgb` renders either for figures and overlays.
"""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import png
from PIL import Image, ImageOps

from fcn_jax.errors import UserError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
TIFF_MAGIC = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')  # classic and BigTIFF
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# Longest side accepted by default where images run whole (the local service): inference memory
# grows with the pixel count (a 3000x2000 photo takes about 1.7 GB even at 1/16 width).
DEFAULT_MAX_SIZE = 2048
# Pixels accepted by default where large images run by tiles (predict): a guard against
# decompression bombs, well above large photos and aerial tiles (12000x9000 is 108 MP; the RGB
# array alone of 300 MP takes 900 MB).
DEFAULT_MAX_PIXELS = 300_000_000


class ImageError(UserError):
  """An image file that cannot be used (unreadable, too large)."""


def read_rgb(path, max_size: int = DEFAULT_MAX_SIZE, max_pixels: int = 0) -> np.ndarray:
  """uint8 RGB (H, W, 3) of `path` as image viewers show it (EXIF orientation applied).

  path: a file path, or a binary file object (an upload).
  max_size: the longest side allowed; max_pixels: the most pixels allowed (both checked from the
    header, before decoding; 0 = no limit).
  """
  source = path if hasattr(path, 'read') else pathlib.Path(path)
  if hasattr(path, 'read'):
    path = 'the uploaded image'
  previous = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None  # checked below against the user's own limit, before decoding
  try:
    try:
      with Image.open(source) as probe:  # lazy: reads the header only
        width, height = probe.size
    except (OSError, ValueError, SyntaxError) as e:
      raise ImageError(f'{path}: cannot read the image ({e})') from None
    _check_limits(path, width, height, max_size, max_pixels)
    if hasattr(source, 'seek'):
      source.seek(0)
    try:
      with Image.open(source) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
    except (OSError, ValueError, SyntaxError) as e:
      raise ImageError(f'{path}: cannot decode the image ({e})') from None
  finally:
    Image.MAX_IMAGE_PIXELS = previous


def find_images(inputs: list[str | os.PathLike], glob: str | None = None) -> list[pathlib.Path]:
  """Image files among `inputs`: files as given, directories searched recursively (by suffix, or
  the files matching `glob`). Raises ImageError for a path that does not exist or a directory
  without images."""
  found: list[pathlib.Path] = []
  for item in map(pathlib.Path, inputs):
    if item.is_dir():
      files = sorted(p for p in item.rglob(glob or '*') if p.is_file() and
                     (glob or p.suffix.lower() in IMAGE_SUFFIXES))
      if not files:
        raise ImageError(f'{item}: directory holds no image files ({", ".join(IMAGE_SUFFIXES)})')
      found += files
    elif item.is_file():
      found.append(item)
    else:
      raise ImageError(f'{item}: no such file or directory')
  unique = list(dict.fromkeys(p.resolve() for p in found))
  return unique


def read_modality(path, modality: str) -> np.ndarray:
  """An extra input modality as the reference data layers read it: HHA (H, W, 3) uint8 as stored,
  depth (H, W) as stored (16-bit PNG values)."""
  try:
    with Image.open(path) as im:
      if modality == 'hha':
        return np.asarray(im.convert('RGB'))
      if modality == 'depth':
        return np.asarray(im if im.mode in ('I;16', 'I', 'F', 'L') else im.convert('I'))
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(f'{path}: cannot read the {modality} image ({e})') from None
  raise ValueError(f'unknown modality {modality!r}')


def find_companion(directory: pathlib.Path, relative: pathlib.PurePath) -> pathlib.Path | None:
  """The file for the image at `relative` in another modality's directory: the same relative
  path and stem, any image suffix (PNG first)."""
  stem = directory / relative.with_suffix('')
  for suffix in ('.png',) + IMAGE_SUFFIXES:
    for candidate in (stem.with_name(stem.name + suffix),
                      stem.with_name(stem.name + suffix.upper())):
      if candidate.is_file():
        return candidate
  return None


# --------------------------------------------------------------------------------------------------
# Images as stored: TIFF and 16-bit PNG


def stored_as_is(head: bytes) -> bool:
  """Whether a file starting with `head` (its first 32 bytes) is decoded as stored (TIFF, 16-bit
  PNG) rather than to uint8 RGB."""
  head = bytes(head[:32])
  if head[:4] in TIFF_MAGIC:
    return True
  return head[:8] == PNG_MAGIC and head[12:16] == b'IHDR' and len(head) > 24 and head[24] == 16


def _tiff_array(data: bytes, name) -> np.ndarray:
  """(H, W, C) of a TIFF's first series: samples interleaved or planar; a 3-D stack of pages as
  tifffile.imread returns it, (H, W, C), or (C, H, W) when its first axis is the shortest."""
  import tifffile
  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
      series = tif.series[0]
      axes, array = series.axes, series.asarray()
  except Exception as e:  # tifffile raises many kinds
    raise ImageError(f'{name}: cannot read the TIFF ({type(e).__name__}: {e})') from None
  if axes == 'YX':
    return array[..., None]
  if axes == 'YXS':  # interleaved samples
    return array
  if axes == 'SYX':  # planar samples
    return np.moveaxis(array, 0, -1)
  if array.ndim == 3:  # a stack of pages (tifffile.imwrite of an (H, W, C) array writes H pages)
    return array if array.shape[-1] <= array.shape[0] else np.moveaxis(array, 0, -1)
  raise ImageError(f'{name}: a TIFF of axes {axes} {array.shape}; one image of (rows, columns, '
                   f'bands) is expected: save one image per file')


def _png16_array(data: bytes, name) -> np.ndarray:
  """(H, W, C) uint16 of a 16-bit PNG with 2 to 4 channels, read with pypng (PIL reads only one
  16-bit channel; with more it converts to 8 bits)."""
  try:
    width, height, rows, info = png.Reader(bytes=data).asDirect()
    array = np.vstack([np.asarray(row, np.uint16) for row in rows])
  except (png.Error, ValueError) as e:
    raise ImageError(f'{name}: a damaged PNG ({e})') from None
  return array.reshape(height, width, info['planes'])


def decode_stored(data: bytes, name='the image') -> np.ndarray:
  """A TIFF's or a 16-bit PNG's bytes -> (H, W, C) as stored (uint8 / uint16, any band count)."""
  data = bytes(data)
  if data[:4] in TIFF_MAGIC:
    return _tiff_array(data, name)
  if data[:8] == PNG_MAGIC and data[25] != 0:  # IHDR colour type: not greyscale
    return _png16_array(data, name)
  try:
    with Image.open(io.BytesIO(data)) as im:  # 16-bit greyscale: PIL keeps the 16 bits
      return np.asarray(im).astype(np.uint16)[..., None]
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(f'{name}: cannot decode the image ({e})') from None


def decode_input(data: bytes, name='the image') -> np.ndarray:
  """An image file's bytes as a model takes them: TIFF and 16-bit PNG as stored (`decode_stored`),
  every other image as uint8 RGB (H, W, 3) (greyscale, palette and RGBA converted, as always)."""
  data = bytes(data)
  if stored_as_is(data):
    return decode_stored(data, name)
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im if im.mode == 'RGB' else im.convert('RGB'))
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(f'{name}: cannot decode the image ({e})') from None


def image_size(path) -> tuple[int, int]:
  """(width, height) of an image file from its header (TIFF through tifffile)."""
  with open(path, 'rb') as f:
    head = f.read(32)
  if head[:4] in TIFF_MAGIC:
    import tifffile
    try:
      with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        return int(page.imagewidth), int(page.imagelength)
    except Exception as e:  # tifffile raises many kinds
      raise ImageError(f'{path}: cannot read the TIFF ({type(e).__name__}: {e})') from None
  previous = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None  # the caller checks the size against its own limit
  try:
    with Image.open(path) as probe:
      return probe.size
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(f'{path}: cannot read the image ({e})') from None
  finally:
    Image.MAX_IMAGE_PIXELS = previous


def read_image(path, max_size: int = DEFAULT_MAX_SIZE, max_pixels: int = 0) -> np.ndarray:
  """An image file as a model takes it (`decode_input`): TIFF and 16-bit PNG as stored, others
  as uint8 RGB as image viewers show them (`read_rgb`). Limits as read_rgb's."""
  if hasattr(path, 'read'):
    data = path.read()
    if not stored_as_is(data):
      return read_rgb(io.BytesIO(data), max_size=max_size, max_pixels=max_pixels)
    name = 'the uploaded image'
  else:
    with open(path, 'rb') as f:
      head = f.read(32)
    if not stored_as_is(head):
      return read_rgb(path, max_size=max_size, max_pixels=max_pixels)
    width, height = image_size(path)
    _check_limits(path, width, height, max_size, max_pixels)
    data, name = pathlib.Path(path).read_bytes(), path
  array = decode_stored(data, name)
  _check_limits(name, array.shape[1], array.shape[0], max_size, max_pixels)
  return array


def _check_limits(path, width: int, height: int, max_size: int, max_pixels: int) -> None:
  if max_size and max(width, height) > max_size:
    raise ImageError(f'{path}: image is {width}x{height}, larger than --max_size {max_size} '
                     f'(longest side). Downscale it, or raise --max_size (0 = no limit; memory '
                     f'grows with the pixel count)')
  if max_pixels and width * height > max_pixels:
    raise ImageError(f'{path}: image is {width}x{height} = {width * height / 1e6:.0f} MP, more '
                     f'than --max_pixels {max_pixels} ({max_pixels / 1e6:.0f} MP), a guard '
                     'against decompression bombs. Raise --max_pixels if the file is yours (0 = '
                     'no limit); large images run by tiles')


def display_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 RGB (H, W, 3) to look at: uint8 RGB as it is; other images' first three bands (one
  band as grey), each stretched from its 2nd to its 98th percentile when not 8-bit."""
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if x.dtype == np.uint8 and x.shape[-1] == 3:
    return x
  x = x[..., :3] if x.shape[-1] >= 3 else np.repeat(x[..., :1], 3, axis=-1)
  if x.dtype == np.uint8:
    return np.ascontiguousarray(x)
  x = x.astype(np.float32)
  low = np.percentile(x, 2, axis=(0, 1))
  high = np.percentile(x, 98, axis=(0, 1))
  x = (x - low) / np.maximum(high - low, 1e-6)
  return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
