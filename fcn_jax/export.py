"""Export a checkpoint for inference outside the training code: serialized StableHLO (jax.export).

  python -m fcn_jax.export --checkpoint runs/fcn8s --out fcn8s.fcnx \\
      [--sizes 512x384,384x512,512x512]

The artifact is a zip: `metadata.json` (arch, classes, class names, palette, preprocessing as data:
channel order, scale, mean, std; the sizes) and one `model_<H>x<W>.stablehlo` per size, each a
jax.export module with the weights inside, a symbolic batch dimension (1..--max_batch), input
(B, H, W, 3) float32 preprocessed images and output (B, H, W, C) float32 scores. Sizes are fixed:
the FCN geometry (ceil pooling, crops derived from the input size) is computed in Python from static
shapes, so images are padded at the bottom and right to the smallest listed size that holds them
(`fcn_jax.exported` does it), as `fcn_jax.segmenter` does. Platforms: CPU, and CUDA where this jax
can lower to it.

Loading needs only jax and numpy: `fcn_jax.exported.load(FILE)` (it imports no model code).
ONNX: no well-kept converter takes jax.export / StableHLO to ONNX today (jax2tf + tf2onnx needs
TensorFlow, which this project does not install); not provided.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import zipfile


from fcn_jax import checkpoint, preprocessing, pretrained
from fcn_jax import cli as cli_lib
from fcn_jax.errors import UserError, cli

DEFAULT_SIZES = ((512, 384), (384, 512), (512, 512))  # covers PASCAL VOC (at most 500 x 500)
FORMAT_VERSION = 1


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
  sizes = []
  for part in text.split(','):
    try:
      h, w = (int(v) for v in part.lower().split('x'))
    except ValueError:
      raise UserError(f'--sizes {text!r}: HxW[,HxW...], e.g. 512x384,384x512') from None
    if h < 1 or w < 1:
      raise UserError(f'--sizes: {part} is not a size')
    sizes.append((h, w))
  return tuple(sizes)


def export_checkpoint(checkpoint_dir, out, *, sizes=DEFAULT_SIZES, which: str = 'best',
                      platforms: tuple[str, ...] | None = None, overwrite: bool = False,
                      max_batch: int = 8) -> pathlib.Path:
  """Writes the artifact (atomically: a temporary file renamed when complete)."""
  import jax
  import jax.numpy as jnp
  from jax import export as jax_export
  out = pathlib.Path(out).expanduser().resolve()
  if out.is_dir():
    raise UserError(f'--out {out} is a directory; give a file name (e.g. model.fcnx)')
  if out.exists() and not overwrite:
    raise UserError(f'--out {out} exists; pass --overwrite to replace it')
  model, variables, meta = checkpoint.load_inference(checkpoint_dir, which=which)
  modalities = [m['name'] for m in preprocessing.modalities_of(meta)]
  if len(model.head_names) > 1 or modalities != ['color']:
    raise UserError(f'fcn_jax.export handles single-headed colour nets for now; {checkpoint_dir} '
                    f'has heads {", ".join(model.head_names)} and inputs {" + ".join(modalities)}. '
                    'Use python -m fcn_jax.predict (or fcn_jax.segmenter.Segmenter) instead')
  p = preprocessing.get(meta['preprocessing'])
  prep = {'bgr': p.bgr, 'scale': p.scale, 'mean': list(p.mean), 'std': list(p.std)}
  if platforms is None:
    platforms = ('cpu', 'cuda')
  variables = jax.tree.map(jnp.asarray, variables)

  def scores(images):
    return model.apply(variables, images, train=False)

  entries = {}
  for h, w in sizes:
    # The CPU convolution forms choose a path from the array size: a bounded batch keeps that
    # choice decidable for every batch the module accepts.
    shape = jax_export.symbolic_shape(f'b, {h}, {w}, 3', constraints=[f'b <= {max_batch}'])
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    try:
      exported = jax_export.export(jax.jit(scores), platforms=platforms)(spec)
    except Exception as e:  # a platform this jax cannot lower to: CPU only
      if platforms == ('cpu',):
        raise
      exported = jax_export.export(jax.jit(scores), platforms=('cpu',))(spec)
      del e
    entries[f'model_{h}x{w}.stablehlo'] = bytes(exported.serialize())
    used_platforms = list(exported.platforms)
  metadata = {
      'format_version': FORMAT_VERSION, 'arch': meta['arch'], 'num_classes': meta['num_classes'],
      'class_names': list(meta.get('class_names') or [str(i) for i in range(meta['num_classes'])]),
      'palette': meta.get('palette'), 'preprocessing': {'name': meta['preprocessing'], **prep},
      'sizes': [list(s) for s in sizes], 'platforms': used_platforms, 'max_batch': max_batch,
      'input': 'float32 (B, H, W, 3) preprocessed, padded bottom/right with 0 to a listed size',
      'output': 'float32 (B, H, W, num_classes) scores; crop to the image, argmax for labels',
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{out.name}.', dir=out.parent)
  os.close(fd)
  try:
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_DEFLATED) as z:
      z.writestr('metadata.json', json.dumps(metadata, indent=2))
      for name, blob in entries.items():
        z.writestr(name, blob)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: the artifact is meant to be shared
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


@cli
def main(argv: list[str] | None = None) -> int:
  p = cli_lib.ArgumentParser(prog='python -m fcn_jax.export', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='a training WORKDIR, a converted checkpoint, or pretrained:NAME')
  p.add_argument('--out', required=True, help='the artifact file to write (e.g. fcn8s.fcnx)')
  p.add_argument('--sizes', default=','.join(f'{h}x{w}' for h, w in DEFAULT_SIZES),
                 help='padded input sizes HxW, comma-separated (default %(default)s)')
  p.add_argument('--which', default='best', help='best, latest or a step')
  p.add_argument('--max_batch', type=int, default=8, help='largest batch the modules accept')
  p.add_argument('--overwrite', action='store_true', help='replace --out if it exists')
  a = p.parse_args(argv)
  a.checkpoint = pretrained.resolve(a.checkpoint)
  out = export_checkpoint(a.checkpoint, a.out, sizes=parse_sizes(a.sizes), which=a.which,
                          overwrite=a.overwrite, max_batch=a.max_batch)
  print(f'wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
