"""Native-size evaluation batched by image size against one image at a time, on a VOC-sized split.

    python -m benchmarks.eval_buckets [--arch fcn8s] [--width 0.25] [--images 48] [--batch 4]

The split: random images with PASCAL VOC's common sizes in roughly VOC val's proportions (500x375
and 375x500 most of all, then 500x333, 333x500 and a tail of single sizes), PNG-encoded in memory
as dataset records. Both runs go through `fcn_jax.data.pipeline.eval_batches` and
`fcn_jax.train.evaluate` (what `experiments.evaluate` runs); the confusion matrices must be
identical. Prints seconds for each (compilation included: one program per size, plus one per
batched size) and the CPU model.
"""

from __future__ import annotations

import argparse
import io
import time

import jax
import numpy as np
from PIL import Image

from benchmarks import run
from fcn_jax import models, train
from fcn_jax.data import pipeline
from fcn_jax.train.evaluation import ImageAnalysis

# (height, width): weight in VOC2012 val, roughly (the two 500-wide shapes hold most images).
VOC_SIZES = {(375, 500): 0.40, (500, 375): 0.22, (333, 500): 0.12, (500, 333): 0.06,
             (334, 500): 0.04, (281, 500): 0.03, (366, 500): 0.03, (500, 442): 0.02,
             (400, 500): 0.04, (353, 500): 0.04}


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def voc_sized_records(count: int, num_classes: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  shapes = list(VOC_SIZES)
  weights = np.asarray(list(VOC_SIZES.values()))
  picks = rng.choice(len(shapes), size=count, p=weights / weights.sum())
  return [{'image': _png(rng.integers(0, 256, (*shapes[k], 3), np.uint8)),
           'segmentation_mask': _png(rng.integers(0, num_classes, shapes[k], np.uint8)),
           'file_name': f'{i:04d}'} for i, k in enumerate(picks)]


def timed_evaluation(model, variables, records, batch_size: int) -> tuple[float, np.ndarray]:
  analysis = ImageAnalysis(worst=0)
  t0 = time.perf_counter()
  batches = pipeline.eval_batches(records, preprocessing='caffe_bgr', batch_size=batch_size)
  train.evaluate(model, variables, batches, analysis=analysis)
  return time.perf_counter() - t0, next(iter(analysis.confusion.values()))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--arch', default='fcn8s')
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--images', type=int, default=48)
  p.add_argument('--batch', type=int, default=4)
  a = p.parse_args()
  model = models.build(a.arch, num_classes=21, width=a.width)
  variables = jax.device_get(models.init_variables(model, jax.random.key(0)))
  records = voc_sized_records(a.images, 21)
  sizes = len({np.asarray(Image.open(io.BytesIO(r['image']))).shape for r in records})
  print(f'{run.cpu_name()}, {jax.local_device_count()} local device(s), jax {jax.__version__}; '
        f'{a.arch} width {a.width:g}; {a.images} VOC-sized images in {sizes} sizes')
  one_s, one = timed_evaluation(model, variables, records, 1)
  batched_s, batched = timed_evaluation(model, variables, records, a.batch)
  assert np.array_equal(one, batched), 'the batched confusion matrix differs'
  print('| evaluation | seconds (compiles included) | images/s |\n|---|---:|---:|')
  print(f'| one at a time (`--batch_size 1`) | {one_s:.1f} | {a.images / one_s:.2f} |')
  print(f'| by size, `--batch_size {a.batch}` | {batched_s:.1f} | {a.images / batched_s:.2f} |')
  print('confusion matrices identical')


if __name__ == '__main__':
  main()
