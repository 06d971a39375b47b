"""Folder prediction throughput: size-bucketed batches vs the one-image-at-a-time native-size loop.

  python -m benchmarks.predict_throughput [--images 200] [--width 0.0625] [--arch fcn8s]

Writes a folder of JPEGs with VOC-like mixed sizes (the long side 500 px, the short side 281-500
px, both orientations: as many distinct sizes as PASCAL VOC has), then runs `fcn_jax.predict`'s
function over it twice with the same random-weight checkpoint: `exact=True` (native size, one image
at a time, one compile per distinct size: what predict did before batching) and the default
bucketed batches. Prints images/s, compiles, the speed-up and the CPU model. The persistent XLA
compilation cache is off, so both pay their compiles.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
from fcn_jax import cli as cli_lib


def write_folder(root: pathlib.Path, count: int, seed: int = 0) -> list[tuple[int, int]]:
  from PIL import Image
  rng = np.random.default_rng(seed)
  sizes = []
  for i in range(count):
    short = int(rng.integers(281, 501))
    h, w = (500, short) if rng.random() < 0.3 else (short, 500)
    pixels = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
    image.save(root / f'img_{i:04d}.jpg', quality=90)
    sizes.append((h, w))
  return sizes


def main(argv: list[str] | None = None) -> int:
  p = cli_lib.ArgumentParser(prog='python -m benchmarks.predict_throughput', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--images', type=int, default=200)
  p.add_argument('--width', type=float, default=1 / 16)
  p.add_argument('--arch', default='fcn8s')
  p.add_argument('--batch_size', type=int, default=8)
  a = p.parse_args(argv)
  import jax
  from benchmarks.run import cpu_name
  from fcn_jax import checkpoint, models, predict
  from fcn_jax.segmenter import Segmenter
  work = pathlib.Path(tempfile.mkdtemp(prefix='fcn_predict_bench.'))
  (work / 'images').mkdir()
  sizes = write_folder(work / 'images', a.images)
  model = models.build(a.arch, width=a.width)
  variables = jax.device_get(models.init_variables(model, jax.random.key(0)))
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map_with_path(  # non-zero score layers: real argmax work
      lambda path, x: rng.normal(0, 0.05, x.shape).astype(np.float32) if 'score' in str(path) else x,
      variables)
  checkpoint.save_inference(work / 'ckpt', variables, {'arch': a.arch, 'width': a.width,
                                                        'num_classes': 21,
                                                        'preprocessing': 'torchvision_rgb'})
  rows = {}
  for name, exact in (('one at a time, native size', True), ('bucketed batches', False)):
    compiled: set = set()
    original = Segmenter.scores

    def counting(self, images, exact=False, _original=original):
      out = _original(self, images, exact=exact)
      compiled.update(self.compiled_shapes)
      return out
    Segmenter.scores = counting
    t0 = time.perf_counter()
    written, failed = predict.predict_images(work / 'ckpt', [work / 'images'], work / name.split()[0],
                                             exact=exact, batch_size=a.batch_size)
    seconds = time.perf_counter() - t0
    Segmenter.scores = original
    assert not failed and len(written) == a.images, failed
    rows[name] = (seconds, len(compiled))
  print(f'CPU: {cpu_name()}; jax {jax.__version__}; {a.arch} width {a.width:g}; {a.images} JPEGs, '
        f'{len(set(sizes))} distinct sizes; batch {a.batch_size}')
  print('| prediction | seconds | images/s | compiled shapes |')
  print('|---|---:|---:|---:|')
  for name, (seconds, compiles) in rows.items():
    print(f'| {name} | {seconds:.1f} | {a.images / seconds:.2f} | {compiles} |')
  base, new = rows['one at a time, native size'][0], rows['bucketed batches'][0]
  print(f'speed-up: {base / new:.2f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
