"""The ONNX export against the JAX model, per arch: relative error and seconds per image.

    python -m benchmarks.onnx_parity [--archs fcn8s,fcn_resnet50] [--width 1] [--size 256x320] \
        [--images 2]

For each arch: random weights (every layer non-zero, BatchNorm statistics away from (0, 1)) saved
as a checkpoint, exported with `python -m fcn_jax.export --format onnx`'s code (jax2onnx), run in
onnxruntime on random images and compared with the Segmenter's scores (max |diff| / max |scores|),
with both runs' seconds per image. Prints a Markdown table (and the CPU model) for RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from benchmarks import run
from fcn_jax import checkpoint, export, exported, models
from fcn_jax.segmenter import Segmenter

ARCHS = ('fcn32s', 'fcn16s', 'fcn8s', 'fcn8s_atonce', 'fcn_alexnet', 'fcn_alexnet_caffe',
         'fcn_googlenet', 'fcn_resnet50', 'fcn_resnet101')


def random_variables(model, seed: int = 0) -> dict:
  """Random variables of `model`'s shapes, so that every layer shows (the score layers start at
  zero): He-scaled kernels, small biases, BatchNorm statistics near (0, 1). Drawn with numpy from
  the shapes alone (initialising GoogLeNet compiles a generator per parameter: minutes here)."""
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim > 1:
      values = rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))
    elif name.endswith("['var']"):
      values = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['scale']"):
      values = 1 + 0.1 * rng.normal(size=leaf.shape)
    else:
      values = 0.1 * rng.normal(size=leaf.shape)
    return values.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_checkpoint(directory, arch: str, width: float, **meta) -> str:
  """A checkpoint of `arch` at `width` with random_variables, Caffe BGR inputs."""
  model = models.build(arch, width=width)
  counts = list(model.num_classes)
  metadata = {**checkpoint.model_metadata({'arch': arch, 'width': width,
                                           'num_classes': counts if len(counts) > 1 else counts[0]}),
              'preprocessing': 'caffe_bgr', **meta}
  path = f'{directory}/ckpt_{arch}'
  checkpoint.save_inference(path, random_variables(model), metadata)
  return path


def measure(arch: str, width: float, size: tuple[int, int], images: int, workdir: str) -> dict:
  ckpt = random_checkpoint(workdir, arch, width)
  t0 = time.perf_counter()
  out = export.export_onnx(ckpt, f'{workdir}/{arch}.onnx', size=size, check=False)
  export_s = time.perf_counter() - t0
  onnx_model, seg = exported.load(out), Segmenter.load(ckpt)
  rng = np.random.default_rng(1)
  batch = rng.integers(0, 256, (images, *size, 3), np.uint8)
  seg.scores([batch[0]], exact=True)  # compiles
  onnx_model.scores(batch[0])
  errors, jax_s, onnx_s = [], 0.0, 0.0
  for image in batch:
    t0 = time.perf_counter()
    want = seg.scores([image], exact=True)[0]
    t1 = time.perf_counter()
    got = onnx_model.scores(image)
    t2 = time.perf_counter()
    jax_s, onnx_s = jax_s + t1 - t0, onnx_s + t2 - t1
    errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
  return {'arch': arch, 'error': max(errors), 'export_s': export_s, 'jax_s': jax_s / images,
          'onnx_s': onnx_s / images, 'mib': out.stat().st_size / 2**20}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--archs', default=','.join(ARCHS))
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--size', default='256x320', help='HxW of the export and of the images')
  p.add_argument('--images', type=int, default=2)
  a = p.parse_args()
  size = export.parse_sizes(a.size)[0]
  print(f'CPU: {run.cpu_name()}, jax {jax.__version__}, width '
        f'{a.width:g}, {size[0]}x{size[1]}, {a.images} random images')
  print('| arch | max rel. error | export s | JAX s/image | onnxruntime s/image | file MiB |')
  print('|---|---|---|---|---|---|')
  for arch in a.archs.split(','):
    with tempfile.TemporaryDirectory() as workdir:
      r = measure(arch, a.width, size, a.images, workdir)
    print(f'| {arch} | {r["error"]:.1e} | {r["export_s"]:.0f} | {r["jax_s"]:.2f} | '
          f'{r["onnx_s"]:.2f} | {r["mib"]:.0f} |', flush=True)


if __name__ == '__main__':
  main()
