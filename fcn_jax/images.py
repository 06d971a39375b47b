"""Reading users' image files for inference: as displayed (EXIF orientation applied), size-checked
before decoding, every failure an ImageError naming the file."""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image, ImageOps

from fcn_jax.errors import UserError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
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
    if max_size and max(width, height) > max_size:
      raise ImageError(f'{path}: image is {width}x{height}, larger than --max_size {max_size} '
                       f'(longest side). Downscale it, or raise --max_size (0 = no limit; memory '
                       f'grows with the pixel count)')
    if max_pixels and width * height > max_pixels:
      raise ImageError(f'{path}: image is {width}x{height} = {width * height / 1e6:.0f} MP, more '
                       f'than --max_pixels {max_pixels} ({max_pixels / 1e6:.0f} MP), a guard '
                       'against decompression bombs. Raise --max_pixels if the file is yours (0 = '
                       'no limit); large images run by tiles')
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
