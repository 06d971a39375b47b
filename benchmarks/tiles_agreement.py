"""How far sliding-window inference departs from whole-image inference on real photographs.

    python -m benchmarks.tiles_agreement --checkpoint RUN --split test --upscale 1,2 \
        --tile 256 --stride 192 --images 60

For each image of the split (the checkpoint's own dataset, as `experiments.evaluate` finds it),
optionally upscaled (bilinear) to look like a larger photo, it runs the Segmenter whole and by
tiles, and prints the share of pixels whose labels agree, both runs' mean IU against the ground
truth (nearest-upscaled) and the seconds each took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from fcn_jax import checkpoint, metrics, tune
from fcn_jax import data as data_lib
from fcn_jax.data import identity
from fcn_jax.segmenter import Segmenter


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--checkpoint', required=True)
  p.add_argument('--split', default='')
  p.add_argument('--upscale', default='1,2', help='comma-separated factors')
  p.add_argument('--tile', type=int, default=256)
  p.add_argument('--stride', type=int, default=192)
  p.add_argument('--images', type=int, default=60, help='first N images of the split')
  a = p.parse_args()
  directory = checkpoint.resolve_directory(a.checkpoint)
  model, variables, meta = checkpoint.load_inference(directory)
  spec = identity.resolve(meta, '', a.split)
  source = data_lib.get_data_source(spec.name, spec.split, **spec.source_kwargs())
  n = model.num_classes[0]
  whole = Segmenter(model, variables, meta, batch_size=1, mode='whole')
  tiled = Segmenter(model, variables, meta, batch_size=4, mode='slide', tile=a.tile,
                    tile_stride=a.stride)
  print(f'{spec.describe()}: {min(a.images, len(source))} images, tile {a.tile} stride '
        f'{a.stride}; CPU: {tune.cpu_model()}')
  for factor in (float(f) for f in a.upscale.split(',')):
    agree = total = 0
    conf = {k: np.zeros((n, n), np.int64) for k in ('whole', 'tiles')}
    seconds = {'whole': 0.0, 'tiles': 0.0}
    for i in range(min(a.images, len(source))):
      image, label = data_lib.decode_example(source[i])
      if factor != 1:
        size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
      out = {}
      for name, seg in (('whole', whole), ('tiles', tiled)):
        t0 = time.perf_counter()
        out[name] = seg(image, exact=True)
        seconds[name] += time.perf_counter() - t0
        conf[name] += np.asarray(metrics.confusion_matrix(label, out[name], n), np.int64)
      agree += int((out['whole'] == out['tiles']).sum())
      total += out['whole'].size
    h, w = image.shape[:2]
    ious = {k: 100 * metrics.segmentation_scores(c)['mean_iu'] for k, c in conf.items()}
    print(f'x{factor:g} ({w}x{h}): labels agree on {100 * agree / total:.2f}% of pixels; mean IU '
          f'whole {ious["whole"]:.2f}, tiles {ious["tiles"]:.2f}; seconds whole '
          f'{seconds["whole"]:.0f}, tiles {seconds["tiles"]:.0f}')


if __name__ == '__main__':
  main()
