"""grain input pipelines: fixed-shape training batches and deterministic evaluation.

Train (`train_loader`): grain.DataLoader over the random-access TFDS source. IndexSampler gives a seeded shuffle
that differs per epoch and per-process sharding; a RandomMapTransform (per-record RNG derived by grain from the seed
and the record's position, so results do not depend on worker_count) decodes the JPEG/PNG, optionally rescales,
random-crops or pads to crop_size (image padded with 0 in preprocessed space = the mean colour, label with 255),
flips, and applies the weights' preprocessing; Batch stacks fixed shapes. The iterator's get_state()/set_state()
are grain's (a small JSON-able bytes blob) and resume exactly.

Eval (`eval_batches`): a plain deterministic generator over every example exactly once, either native size one at a
time (the reference protocol) or padded to a fixed (B, S, S) with dummy all-255 examples filling the last batch.

Throughput: `python -m fcn_jax.data.pipeline --benchmark`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator

import grain.python as grain
import numpy as np
from PIL import Image

from fcn_jax import preprocessing as preprocessing_lib
from fcn_jax.data import IGNORE_LABEL, DataError, decode_example, file_name as _file_name


def rescale(image: np.ndarray, label: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear image / nearest label resize by `scale` (PIL, uint8)."""
  h, w = label.shape
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  if (nh, nw) == (h, w):
    return image, label
  image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
  return image, label


def crop_or_pad(image: np.ndarray, label: np.ndarray, crop_size: int, rng: np.random.Generator | None,
                preprocess) -> tuple[np.ndarray, np.ndarray]:
  """Crop (random offset; centre if rng is None) or pad to (crop_size, crop_size).

  The image is preprocessed and placed on a zero canvas (0 = the mean after preprocessing); the label canvas is
  255. Where the image is smaller than crop_size it is placed at a random offset (top-left if rng is None).
  """
  h, w = label.shape
  src, dst = [], []
  for dim in (h, w):
    if dim >= crop_size:
      off = int(rng.integers(0, dim - crop_size + 1)) if rng is not None else (dim - crop_size) // 2
      src.append(slice(off, off + crop_size))
      dst.append(slice(0, crop_size))
    else:
      off = int(rng.integers(0, crop_size - dim + 1)) if rng is not None else 0
      src.append(slice(0, dim))
      dst.append(slice(off, off + dim))
  out_image = np.zeros((crop_size, crop_size, 3), np.float32)
  out_label = np.full((crop_size, crop_size), IGNORE_LABEL, np.int32)
  out_image[dst[0], dst[1]] = preprocess(image[src[0], src[1]])
  out_label[dst[0], dst[1]] = label[src[0], src[1]]
  return out_image, out_label


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside absl.app.run they are unparsed (-> defaults)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainTransform(grain.RandomMapTransform):
  """record -> {'image': float32 (crop, crop, 3), 'label': int32 (crop, crop)}. Picklable (worker processes)."""

  def __init__(self, *, crop_size: int, preprocessing: str, scale_range=None, flip: bool = True):
    self.crop_size = int(crop_size)
    self.preprocessing = preprocessing
    self._preprocess = preprocessing_lib.get(preprocessing)
    self.scale_range = tuple(scale_range) if scale_range is not None else None
    self.flip = flip

  def random_map(self, element, rng: np.random.Generator):
    image, label = decode_example(element)
    if image.shape[:2] != label.shape:
      raise ValueError(f'{_file_name(element)}: image {image.shape[:2]} and label {label.shape} differ in size')
    scale = float(rng.uniform(*self.scale_range)) if self.scale_range is not None else 1.0
    image, label = scaled_crop_or_pad(image, label, self.crop_size, scale, rng, self._preprocess)
    if self.flip and rng.random() < 0.5:
      image, label = image[:, ::-1], label[:, ::-1]
    return {'image': np.ascontiguousarray(image), 'label': np.ascontiguousarray(label)}


def scaled_crop_or_pad(image: np.ndarray, label: np.ndarray, crop_size: int, scale: float,
                       rng: np.random.Generator, preprocess) -> tuple[np.ndarray, np.ndarray]:
  """Equivalent to rescale() then crop_or_pad() (up to resampling rounding), but only the cropped window is resampled (PIL resize with a
  source box), so scales > 1 cost no more than the crop itself."""
  if scale == 1.0:
    return crop_or_pad(image, label, crop_size, rng, preprocess)
  h, w = label.shape
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  win, dst = [], []
  for n in (nh, nw):
    if n >= crop_size:
      off = int(rng.integers(0, n - crop_size + 1))
      win.append((off, off + crop_size))
      dst.append(slice(0, crop_size))
    else:
      off = int(rng.integers(0, crop_size - n + 1))
      win.append((0, n))
      dst.append(slice(off, off + n))
  sy, sx = nh / h, nw / w
  (y0, y1), (x0, x1) = win
  box = (x0 / sx, y0 / sy, x1 / sx, y1 / sy)
  size = (x1 - x0, y1 - y0)
  image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, box=box))
  label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST, box=box))
  out_image = np.zeros((crop_size, crop_size, 3), np.float32)
  out_label = np.full((crop_size, crop_size), IGNORE_LABEL, np.int32)
  out_image[dst[0], dst[1]] = preprocess(image)
  out_label[dst[0], dst[1]] = label
  return out_image, out_label


def train_loader(source, *, batch_size: int, crop_size: int, preprocessing: str, seed: int,
                 scale_range: tuple[float, float] | None = None, flip: bool = True, worker_count: int = 0,
                 shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None) -> grain.DataLoader:
  """Training batches {'image': float32 (B, crop, crop, 3), 'label': int32 (B, crop, crop), 255 = ignore}.

  batch_size is per process; shard_index / shard_count split the examples between processes (each process sees a
  disjoint, equally sized part; the remainder is dropped). Every epoch is reshuffled from `seed`; the last partial
  batch of the (finite) stream is dropped so shapes stay fixed. num_epochs=None repeats forever.
  iter(loader) gives a grain iterator with get_state() / set_state() for checkpointing.
  """
  preprocessing_lib.get(preprocessing)  # fail fast on a bad name
  if batch_size < 1 or crop_size < 1:
    raise ValueError(f'batch_size and crop_size must be positive, got {batch_size}, {crop_size}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} outside [0, {shard_count})')
  if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
    raise ValueError(f'bad scale_range {scale_range}')
  if worker_count:
    _ensure_absl_flags_parsed()
  shard = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True,
                               num_epochs=num_epochs, seed=seed)
  ops = [TrainTransform(crop_size=crop_size, preprocessing=preprocessing, scale_range=scale_range, flip=flip),
         grain.Batch(batch_size=batch_size, drop_remainder=True)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=worker_count,
                          worker_buffer_size=2,
                          read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))


def eval_batches(source, *, preprocessing: str, batch_size: int = 1, pad_to: int | None = None,
                 shard_index: int = 0, shard_count: int = 1) -> Iterator[dict]:
  """Deterministic evaluation batches; each example exactly once (over all shards), in source order.

  pad_to=None (requires batch_size=1): native size, {'image': (1, H, W, 3), 'label': (1, H, W)}.
  pad_to=S: {'image': (B, S, S, 3), 'label': (B, S, S)}: top-left aligned, image padded with 0 (the mean after
  preprocessing), label with 255; the last batch is filled with all-255 dummy examples (file_name '') and every
  shard yields the same number of batches (what multi-host evaluation needs). Labels are int32.
  """
  preprocess = preprocessing_lib.get(preprocessing)
  if pad_to is None and batch_size != 1:
    raise ValueError('batch_size > 1 needs pad_to (VOC images differ in size)')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} outside [0, {shard_count})')
  return _eval_iter(source, preprocess, batch_size, pad_to, shard_index, shard_count)


def _eval_iter(source, preprocess, batch_size, pad_to, shard_index, shard_count):
  n = len(source)
  indices = list(range(shard_index, n, shard_count))
  if pad_to is None:
    for i in indices:
      record = source[i]
      image, label = decode_example(record)
      yield {'image': preprocess(image)[None], 'label': label.astype(np.int32)[None],
             'file_name': [_file_name(record)]}
    return
  per_shard = math.ceil(n / shard_count)
  num_batches = math.ceil(per_shard / batch_size)
  for b in range(num_batches):
    images = np.zeros((batch_size, pad_to, pad_to, 3), np.float32)
    labels = np.full((batch_size, pad_to, pad_to), IGNORE_LABEL, np.int32)
    names = [''] * batch_size
    for j, i in enumerate(indices[b * batch_size:(b + 1) * batch_size]):
      record = source[i]
      image, label = decode_example(record)
      h, w = label.shape
      if h > pad_to or w > pad_to:
        raise DataError(f'{_file_name(record)} is {h}x{w}, larger than pad_to={pad_to}: set pad_to '
                        f'(evaluate --pad_to, config.eval_pad_to) to at least {max(h, w)}, or 0 for '
                        f'native-size evaluation')
      images[j, :h, :w] = preprocess(image)
      labels[j, :h, :w] = label
      names[j] = _file_name(record)
    yield {'image': images, 'label': labels, 'file_name': names}


# ----------------------------------------------------------------------------------------------------------------
# Throughput benchmark: 500x375 JPEG -> random scale -> crop, images/s per worker process.
# ----------------------------------------------------------------------------------------------------------------

def benchmark(num_images: int = 64, crop_size: int = 320, batch_size: int = 8, seconds: float = 10.0,
              worker_counts=(0, 1, 2), workdir: str | None = None) -> dict:
  import pathlib
  import tempfile

  from fcn_jax.data import get_data_source
  from fcn_jax.data import synthetic

  tmp = tempfile.TemporaryDirectory() if workdir is None else None
  root = pathlib.Path(workdir or tmp.name)
  manual = root / 'manual'
  if not (root / 'data').exists():
    devkit = synthetic.write_voc_tree(manual, num_train=num_images, num_val=1, seed=0, min_size=375, max_size=375)
    # Make every image exactly 500x375 (W x H), like a typical VOC image.
    for path in (devkit / 'VOC2012' / 'JPEGImages').glob('*.jpg'):
      Image.open(path).resize((500, 375), Image.BILINEAR).save(path, quality=95)
    for path in (devkit / 'VOC2012' / 'SegmentationClass').glob('*.png'):
      Image.open(path).resize((500, 375), Image.NEAREST).save(path)
  source = get_data_source('voc_segmentation/2012', 'train', data_dir=str(root / 'data'), manual_dir=str(manual))
  results = {}
  for workers in worker_counts:
    loader = train_loader(source, batch_size=batch_size, crop_size=crop_size, preprocessing='caffe_bgr', seed=0,
                          scale_range=(0.5, 2.0), worker_count=workers)
    it = iter(loader)
    next(it)  # warm-up (worker start-up)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      batch = next(it)
      count += batch['image'].shape[0]
    rate = count / (time.perf_counter() - start)
    results[workers] = rate
    print(f'worker_count={workers}: {rate:.1f} images/s total'
          + (f', {rate / workers:.1f} images/s per worker process' if workers else ' (decoding in the main process)'),
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
  print(f'single process, transform only: {rate:.1f} images/s wall, {cpu_rate:.1f} images per CPU-second '
        f'(500x375 JPEG -> scale [0.5, 2] -> {crop_size} crop -> flip -> caffe_bgr; the CPU figure is what one '
        'worker process reaches on an otherwise idle core)', flush=True)
  if tmp is not None:
    tmp.cleanup()
  return results


def main(argv=None):
  p = argparse.ArgumentParser(
      prog='python -m fcn_jax.data.pipeline',
      description='Throughput of the training input pipeline (decode, scale, crop, flip, '
      'preprocess, batch) on synthetic 500x375 JPEGs, in the main process and with grain workers; '
      'writes nothing.')
  p.add_argument('--benchmark', action='store_true', required=True,
                 help='run the benchmark (the only mode; required so that a bare call explains itself)')
  p.add_argument('--crop-size', type=int, default=320, help='training crop, pixels (default %(default)s)')
  p.add_argument('--batch-size', type=int, default=8, help='images per batch (default %(default)s)')
  p.add_argument('--seconds', type=float, default=10.0,
                 help='time per measured configuration (default %(default)s)')
  p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2],
                 help='grain worker counts to measure (0 = main process; default %(default)s)')
  a = p.parse_args(argv)
  benchmark(crop_size=a.crop_size, batch_size=a.batch_size, seconds=a.seconds, worker_counts=a.workers)


if __name__ == '__main__':
  main()
