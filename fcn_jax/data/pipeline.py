"""grain input pipelines: fixed-shape training batches and deterministic evaluation.

Train (`train_loader`): grain.DataLoader over the random-access TFDS source. IndexSampler gives a
seeded shuffle that differs per epoch and per-process sharding; a RandomMapTransform (per-record RNG
derived by grain from the seed and the record's position, so results do not depend on worker_count)
decodes the JPEG/PNG, optionally rescales, random-crops or pads to crop_size (image padded with 0 in
preprocessed space = the mean colour, label with 255), flips, and applies the weights'
preprocessing; Batch stacks fixed shapes. The iterator's get_state()/set_state() are grain's (a
small JSON-able bytes blob) and resume exactly.

Eval (`eval_batches`): a plain deterministic generator over every example exactly once, either
native size one at a time (the reference protocol) or padded to a fixed (B, S, S) with dummy all-255
examples filling the last batch.

Throughput: `python -m fcn_jax.data.pipeline --benchmark`.
"""

from __future__ import annotations

import io
import math
import pathlib
import tempfile
import time
from collections.abc import Iterator

import grain.python as grain
import numpy as np
from PIL import Image

from fcn_jax import cli as cli_lib
from fcn_jax import preprocessing as preprocessing_lib
from fcn_jax.data import (IGNORE_LABEL, DataError, decode_image, decode_input, decode_mask,
                          file_name as _file_name, get_data_source)
from fcn_jax.data import synthetic_voc


def rescale(image: np.ndarray, label: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear image / nearest label resize by `scale` (PIL, uint8)."""
  h, w = label.shape
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  if (nh, nw) == (h, w):
    return image, label
  image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
  return image, label


# Photometric factors (brightness, contrast, saturation) of color_jitter, and the grey of each RGB
# channel (ITU-R 601 luma, as PIL's ImageEnhance and torchvision's ColorJitter use).
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def jitter_factors(strength: float, rng: np.random.Generator) -> np.ndarray:
  """(brightness, contrast, saturation), each uniform in [1 - strength, 1 + strength]."""
  return rng.uniform(1.0 - strength, 1.0 + strength, size=3).astype(np.float32)


def color_jitter(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """0..255 (H, W, 3) RGB or (H, W) grey -> float32 0..255: brightness (scale), contrast (blend
  with the mean grey), saturation (blend with each pixel's grey; RGB only), in that order, as
  torchvision's ColorJitter without hue. Factors (1, 1, 1) give the image back."""
  brightness, contrast, saturation = (float(f) for f in factors)
  x = np.clip(np.asarray(image, np.float32) * brightness, 0.0, 255.0)
  rgb = x.ndim == 3 and x.shape[-1] == 3
  mean = np.float32((x @ _LUMA if rgb else x).mean())
  x = np.clip((x - mean) * contrast + mean, 0.0, 255.0)  # clipped after each stage, as torchvision
  if rgb:
    grey = (x @ _LUMA)[..., None]
    x = np.clip((x - grey) * saturation + grey, 0.0, 255.0)
  return x


def crop_or_pad(image: np.ndarray, label: np.ndarray, crop_size: int,
                rng: np.random.Generator | None, preprocess) -> tuple[np.ndarray, np.ndarray]:
  """Crop (random offset; centre if rng is None) or pad to (crop_size, crop_size).

  The image is preprocessed and placed on a zero canvas (0 = the mean after preprocessing); the
  label canvas is 255. Where the image is smaller than crop_size it is placed at a random offset
  (top-left if rng is None).
  """
  (out_image,), (out_label,) = crop_or_pad_planes([(image, preprocess)], [label], crop_size, rng)
  return out_image, out_label


def _windows(sizes, crop_size: int, rng: np.random.Generator | None) -> tuple[list, list]:
  """Per dimension: the source window (start, stop) and the destination slice of the canvas."""
  src, dst = [], []
  for dim in sizes:
    if dim >= crop_size:
      off = int(rng.integers(0, dim - crop_size + 1)) if rng is not None else (dim - crop_size) // 2
      src.append((off, off + crop_size))
      dst.append(slice(0, crop_size))
    else:
      off = int(rng.integers(0, crop_size - dim + 1)) if rng is not None else 0
      src.append((0, dim))
      dst.append(slice(off, off + dim))
  return src, dst


def _canvases(inputs, labels, crop_size: int, dst: list) -> tuple[list, list]:
  """Preprocessed inputs on zero canvases, labels on 255 canvases, at `dst`."""
  out_inputs = []
  for array, preprocess in inputs:
    x = preprocess(array)
    canvas = np.zeros((crop_size, crop_size, x.shape[-1]), np.float32)
    canvas[dst[0], dst[1]] = x
    out_inputs.append(canvas)
  out_labels = []
  for label in labels:
    canvas = np.full((crop_size, crop_size), IGNORE_LABEL, np.int32)
    canvas[dst[0], dst[1]] = label
    out_labels.append(canvas)
  return out_inputs, out_labels


def crop_or_pad_planes(inputs: list, labels: list, crop_size: int,
                       rng: np.random.Generator | None) -> tuple[list, list]:
  """crop_or_pad for several aligned planes: every (input, preprocess) and label map gets the same
  window (one draw of the offsets), so the modalities and the heads' labels stay registered."""
  src, dst = _windows(labels[0].shape, crop_size, rng)
  (y0, y1), (x0, x1) = src
  return _canvases([(a[y0:y1, x0:x1], p) for a, p in inputs], [l[y0:y1, x0:x1] for l in labels],
                   crop_size, dst)


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside absl.app.run they are unparsed (->
  defaults)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Where a record keeps each input modality and each head's labels (the colour image and the single
# head's mask as in the VOC builders; the NYUD / SIFT Flow builders add the others).
MODALITY_FEATURES = {'color': 'image', 'hha': 'hha', 'depth': 'depth'}


def label_feature(head: str | None) -> str:
  return 'segmentation_mask' if head is None else f'segmentation_mask_{head}'


def batch_label_key(head: str | None) -> str:
  """The batch key of a head's labels (as fcn_jax.train.label_key)."""
  return 'label' if head is None else f'label_{head}'


def decode_planes(record, modalities: list[str], heads: list[str] | None = None):
  """A record's input modalities ({name: array}) and label maps ({head or None: uint8 (H, W)})."""
  inputs = {}
  for name in modalities:
    data = record[MODALITY_FEATURES[name]]
    if name == 'depth':
      inputs[name] = data if isinstance(data, np.ndarray) and data.dtype != object else np.asarray(
          Image.open(io.BytesIO(bytes(data))))
    elif name == 'color':  # the image: TIFF / 16-bit PNG bands as stored, photographs as RGB
      inputs[name] = decode_input(data)
    else:
      inputs[name] = decode_image(data)
  labels = {h: decode_mask(record[label_feature(h)]) for h in (heads or [None])}
  return inputs, labels


class TrainTransform(grain.RandomMapTransform):
  """record -> {'image': float32 (crop, crop, C), 'label': int32 (crop, crop)}. Picklable (worker
  processes).

  `modalities` [(name, preprocessing)] (default: the colour image with `preprocessing`) are each
  preprocessed and concatenated into 'image'; several `heads` give 'label_<head>' each. One random
  scale, crop window and flip apply to every modality and label map. `color_jitter` > 0 jitters the
  colour image's brightness, contrast and saturation (each by a factor in [1 - s, 1 + s]) in the
  crop before its preprocessing; other modalities are left as they are.
  """

  def __init__(self, *, crop_size: int, preprocessing: str, scale_range=None, flip: bool = True,
               modalities: list[tuple[str, str]] | None = None, heads: list[str] | None = None,
               color_jitter: float = 0.0):
    self.crop_size = int(crop_size)
    self.preprocessing = preprocessing
    self.modalities = list(modalities or [('color', preprocessing)])
    self._preprocess = [preprocessing_lib.get(p) for _, p in self.modalities]
    self.heads = list(heads) if heads and len(heads) > 1 else None
    self.scale_range = tuple(scale_range) if scale_range is not None else None
    self.flip = flip
    self.color_jitter = float(color_jitter)

  def random_map(self, element, rng: np.random.Generator):
    inputs, labels = decode_planes(element, [m for m, _ in self.modalities], self.heads)
    size = next(iter(labels.values())).shape
    for name, array in list(inputs.items()) + [(f'label {h}', l) for h, l in labels.items()]:
      if array.shape[:2] != size:
        raise ValueError(f'{_file_name(element)}: {name} {array.shape[:2]} and the label {size} '
                         f'differ in size')
    # Drawn first, and only when on: runs without jitter keep their random streams.
    factors = jitter_factors(self.color_jitter, rng) if self.color_jitter else None
    if factors is not None and 'color' in inputs and inputs['color'].dtype != np.uint8:
      raise DataError(f'{_file_name(element)}: color_jitter works on 8-bit photographs, not '
                      f'{inputs["color"].dtype} bands; set config.color_jitter=0')
    scale = float(rng.uniform(*self.scale_range)) if self.scale_range is not None else 1.0
    planes = [(inputs[m], p if m != 'color' or factors is None else _jittered(p, factors))
              for (m, _), p in zip(self.modalities, self._preprocess)]
    out_inputs, out_labels = scaled_crop_or_pad_planes(planes, list(labels.values()),
                                                       self.crop_size, scale, rng)
    if self.flip and rng.random() < 0.5:
      out_inputs = [x[:, ::-1] for x in out_inputs]
      out_labels = [l[:, ::-1] for l in out_labels]
    image = out_inputs[0] if len(out_inputs) == 1 else np.concatenate(out_inputs, axis=-1)
    out = {'image': np.ascontiguousarray(image)}
    for head, label in zip(labels, out_labels):
      out[batch_label_key(head)] = np.ascontiguousarray(label)
    return out


def _jittered(preprocess, factors: np.ndarray):
  """preprocess after color_jitter: applied to the crop only (the window the net sees)."""
  return lambda window: preprocess(color_jitter(window, factors))


def scaled_crop_or_pad(image: np.ndarray, label: np.ndarray, crop_size: int, scale: float,
                       rng: np.random.Generator, preprocess) -> tuple[np.ndarray, np.ndarray]:
  """Equivalent to rescale() then crop_or_pad() (up to resampling rounding), but only the cropped
  window is resampled (PIL resize with a source box), so scales > 1 cost no more than the crop
  itself."""
  (out_image,), (out_label,) = scaled_crop_or_pad_planes([(image, preprocess)], [label], crop_size,
                                                         scale, rng)
  return out_image, out_label


def _resize(array: np.ndarray, size, box, resample) -> np.ndarray:
  """PIL resize of a window; 8-bit greyscale or RGB as they are, other arrays (16-bit depth,
  TIFF bands) channel by channel as float32 (PIL would premultiply a 4th 8-bit band as alpha)."""
  if array.dtype == np.uint8 and (array.ndim == 2 or array.shape[-1] == 3):
    return np.asarray(Image.fromarray(array).resize(size, resample, box=box))
  if array.ndim == 3:
    return np.stack([_resize(array[..., c], size, box, resample)
                     for c in range(array.shape[-1])], axis=-1)
  as_float = Image.fromarray(np.asarray(array, np.float32), mode='F')
  return np.asarray(as_float.resize(size, resample, box=box))


def scaled_crop_or_pad_planes(inputs: list, labels: list, crop_size: int, scale: float,
                              rng: np.random.Generator) -> tuple[list, list]:
  """scaled_crop_or_pad for several aligned planes (the same scale and window for all): inputs
  resampled bilinearly, labels by nearest neighbour."""
  if scale == 1.0:
    return crop_or_pad_planes(inputs, labels, crop_size, rng)
  h, w = labels[0].shape
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  win, dst = _windows((nh, nw), crop_size, rng)
  sy, sx = nh / h, nw / w
  (y0, y1), (x0, x1) = win
  box = (x0 / sx, y0 / sy, x1 / sx, y1 / sy)
  size = (x1 - x0, y1 - y0)
  return _canvases([(_resize(a, size, box, Image.BILINEAR), p) for a, p in inputs],
                   [_resize(l, size, box, Image.NEAREST) for l in labels], crop_size, dst)


def train_loader(source, *, batch_size: int, crop_size: int, preprocessing: str, seed: int,
                 scale_range: tuple[float, float] | None = None, flip: bool = True,
                 worker_count: int = 0,
                 shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                 modalities: list[tuple[str, str]] | None = None,
                 heads: list[str] | None = None,
                 color_jitter: float = 0.0) -> grain.DataLoader:
  """Training batches {'image': float32 (B, crop, crop, 3), 'label': int32 (B, crop, crop),
  255 = ignore}.

  batch_size is per process; shard_index / shard_count split the examples between processes (each
  process sees a disjoint, equally sized part; the remainder is dropped). Every epoch is reshuffled
  from `seed`; the last partial batch of the (finite) stream is dropped so shapes stay fixed.
  num_epochs=None repeats forever. iter(loader) gives a grain iterator with get_state() /
  set_state() for checkpointing.
  `modalities` and `heads`: see TrainTransform (several inputs concatenated into 'image', several
  heads' labels as 'label_<head>'), `color_jitter` (photometric jitter of the colour image).
  """
  preprocessing_lib.get(preprocessing)  # fail fast on a bad name
  if batch_size < 1 or crop_size < 1:
    raise ValueError(f'batch_size and crop_size must be positive, got {batch_size}, {crop_size}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} outside [0, {shard_count})')
  if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
    raise ValueError(f'bad scale_range {scale_range}')
  if not 0 <= color_jitter < 1:
    raise ValueError(f'color_jitter must be in [0, 1), got {color_jitter}')
  if worker_count:
    _ensure_absl_flags_parsed()
  shard = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True,
                               num_epochs=num_epochs, seed=seed)
  ops = [TrainTransform(crop_size=crop_size, preprocessing=preprocessing, scale_range=scale_range,
                        flip=flip, modalities=modalities, heads=heads, color_jitter=color_jitter),
         grain.Batch(batch_size=batch_size, drop_remainder=True)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=worker_count, worker_buffer_size=2,
                          read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))


def eval_batches(source, *, preprocessing: str, batch_size: int = 1, pad_to: int | None = None,
                 shard_index: int = 0, shard_count: int = 1,
                 modalities: list[tuple[str, str]] | None = None,
                 heads: list[str] | None = None) -> Iterator[dict]:
  """Deterministic evaluation batches; each example exactly once (over all shards), in source order.

  pad_to=None, batch_size=1: native size, {'image': (1, H, W, C), 'label': (1, H, W)}.
  pad_to=None, batch_size=B > 1: native size batched by size (`_size_batches`): images of the same
  (H, W) go B at a time, the rest one at a time; nothing is padded, so the scores are the
  one-at-a-time protocol's; grouped by size, not in source order.
  pad_to=S: {'image': (B, S, S, C), 'label': (B, S, S)}: top-left aligned, image padded with 0 (the
  mean after preprocessing), label with 255; the last batch is filled with all-255 dummy examples
  (file_name '') and every
  shard yields the same number of batches (what multi-host evaluation needs). Labels are int32.
  `modalities` / `heads` as in train_loader ('image' concatenates the modalities; 'label_<head>').
  """
  modalities = list(modalities or [('color', preprocessing)])
  preprocess = [(m, preprocessing_lib.get(p)) for m, p in modalities]
  heads = list(heads) if heads and len(heads) > 1 else None
  if batch_size < 1:
    raise ValueError(f'batch_size {batch_size}: must be >= 1')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} outside [0, {shard_count})')
  return _eval_iter(source, preprocess, heads, batch_size, pad_to, shard_index, shard_count)


def _eval_example(record, preprocess, heads) -> tuple[np.ndarray, dict]:
  inputs, labels = decode_planes(record, [m for m, _ in preprocess], heads)
  parts = [p(inputs[m]) for m, p in preprocess]
  return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)), labels


def _header_size(record) -> tuple[int, int] | None:
  """(H, W) from the image file's header, without decoding it; None where the header does not say
  (the grouping is only a hint: batches are checked on the decoded images)."""
  try:
    with Image.open(io.BytesIO(bytes(record[MODALITY_FEATURES['color']]))) as im:
      return im.height, im.width
  except Exception:  # noqa: BLE001 - any unreadable header: decoded with the rest
    return None


def _native_batch(examples: list) -> dict:
  return {'image': np.stack([image for _, image, _ in examples]),
          'file_name': [_file_name(record) for record, _, _ in examples],
          **{batch_label_key(h): np.stack([labels[h] for _, _, labels in examples]).astype(np.int32)
             for h in examples[0][2]}}


def _size_batches(source, indices: list[int], preprocess, heads, batch_size: int) -> Iterator[dict]:
  """Native-size batches: indices grouped by their image's size (from the file headers), batches of
  `batch_size` decoded images of one shape, every other image alone (batch 1: compiled once per
  size, as one at a time). batch_size=1: one image at a time in source order."""
  groups: dict = {}
  for i in indices:
    groups.setdefault(_header_size(source[i]) if batch_size > 1 else None, []).append(i)
  for members in groups.values():
    for start in range(0, len(members), batch_size):
      by_shape: dict = {}
      for i in members[start:start + batch_size]:
        record = source[i]
        image, labels = _eval_example(record, preprocess, heads)
        by_shape.setdefault(image.shape, []).append((record, image, labels))
      for examples in by_shape.values():
        if len(examples) == batch_size:
          yield _native_batch(examples)
        else:
          for example in examples:
            yield _native_batch([example])


def _eval_iter(source, preprocess, heads, batch_size, pad_to, shard_index, shard_count):
  n = len(source)
  indices = list(range(shard_index, n, shard_count))
  if pad_to is None:
    yield from _size_batches(source, indices, preprocess, heads, batch_size)
    return
  per_shard = math.ceil(n / shard_count)
  num_batches = math.ceil(per_shard / batch_size)
  channels = sum(p.channels for _, p in preprocess)
  for b in range(num_batches):
    images = np.zeros((batch_size, pad_to, pad_to, channels), np.float32)
    labels = {batch_label_key(h): np.full((batch_size, pad_to, pad_to), IGNORE_LABEL, np.int32)
              for h in (heads or [None])}
    names = [''] * batch_size
    for j, i in enumerate(indices[b * batch_size:(b + 1) * batch_size]):
      record = source[i]
      image, example_labels = _eval_example(record, preprocess, heads)
      h, w = image.shape[:2]
      if h > pad_to or w > pad_to:
        raise DataError(f'{_file_name(record)} is {h}x{w}, larger than pad_to={pad_to}: set pad_to '
                        f'(evaluate --pad_to, config.eval_pad_to) to at least {max(h, w)}, or 0 '
                        'for native-size evaluation')
      images[j, :h, :w] = image
      for head, label in example_labels.items():
        labels[batch_label_key(head)][j, :h, :w] = label
      names[j] = _file_name(record)
    yield {'image': images, **labels, 'file_name': names}


# --------------------------------------------------------------------------------------------------
# Throughput benchmark: 500x375 JPEG -> random scale -> crop, images/s per worker process.
# --------------------------------------------------------------------------------------------------

def benchmark(num_images: int = 64, crop_size: int = 320, batch_size: int = 8,
              seconds: float = 10.0, worker_counts=(0, 1, 2),
              workdir: str | None = None) -> dict:
  tmp = tempfile.TemporaryDirectory() if workdir is None else None
  root = pathlib.Path(workdir or tmp.name)
  manual = root / 'manual'
  if not (root / 'data').exists():
    devkit = synthetic_voc.write_voc_tree(manual, num_train=num_images, num_val=1, seed=0,
                                          min_size=375, max_size=375)
    # Make every image exactly 500x375 (W x H), like a typical VOC image.
    for path in (devkit / 'VOC2012' / 'JPEGImages').glob('*.jpg'):
      Image.open(path).resize((500, 375), Image.BILINEAR).save(path, quality=95)
    for path in (devkit / 'VOC2012' / 'SegmentationClass').glob('*.png'):
      Image.open(path).resize((500, 375), Image.NEAREST).save(path)
  source = get_data_source('voc_segmentation/2012', 'train', data_dir=str(root / 'data'),
                           manual_dir=str(manual))
  results = {}
  for workers in worker_counts:
    loader = train_loader(source, batch_size=batch_size, crop_size=crop_size,
                          preprocessing='caffe_bgr', seed=0, scale_range=(0.5, 2.0),
                          worker_count=workers)
    it = iter(loader)
    next(it)  # warm-up (worker start-up)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      batch = next(it)
      count += batch['image'].shape[0]
    rate = count / (time.perf_counter() - start)
    results[workers] = rate
    print(f'worker_count={workers}: {rate:.1f} images/s total'
          + (f', {rate / workers:.1f} images/s per worker process' if workers else ' (decoding in '
                                                                                   'the main '
                                                                                   'process)'),
          flush=True)
    del it
  # Pure per-example cost in this process (no grain machinery): the "per worker" figure.
  transform = TrainTransform(crop_size=crop_size, preprocessing='caffe_bgr', scale_range=(0.5, 2.0))
  rng = np.random.default_rng(0)
  count, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    transform.random_map(source[count % len(source)], rng)
    count += 1
  rate = count / (time.perf_counter() - start)
  cpu_rate = count / max(time.process_time() - cpu_start, 1e-9)
  results['single_process_transform'] = rate
  results['per_cpu_second'] = cpu_rate
  print(f'single process, transform only: {rate:.1f} images/s wall, {cpu_rate:.1f} images per '
        f'CPU-second (500x375 JPEG -> scale [0.5, 2] -> {crop_size} crop -> flip -> caffe_bgr; the '
        'CPU figure is what one worker process reaches on an otherwise idle core)', flush=True)
  if tmp is not None:
    tmp.cleanup()
  return results


def main(argv=None):
  p = cli_lib.ArgumentParser(
      prog='python -m fcn_jax.data.pipeline',
      description='Throughput of the training input pipeline (decode, scale, crop, flip, '
      'preprocess, batch) on synthetic 500x375 JPEGs, in the main process and with grain workers; '
      'writes nothing.')
  p.add_argument('--benchmark', action='store_true', required=True,
                 help='run the benchmark (the only mode; required so that a bare call explains '
                      'itself)')
  p.add_argument('--crop_size', type=int, default=320, help='training crop, pixels (default '
                                                            '%(default)s)')
  p.add_argument('--batch_size', type=int, default=8, help='images per batch (default %(default)s)')
  p.add_argument('--seconds', type=float, default=10.0,
                 help='time per measured configuration (default %(default)s)')
  p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2],
                 help='grain worker counts to measure (0 = main process; default %(default)s)')
  a = p.parse_args(argv)
  benchmark(crop_size=a.crop_size, batch_size=a.batch_size, seconds=a.seconds,
            worker_counts=a.workers)


if __name__ == '__main__':
  main()
