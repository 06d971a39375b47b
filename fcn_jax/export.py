"""Export a checkpoint for inference outside the training code: serialized StableHLO (jax.export),
or ONNX (below).

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

ONNX (--format onnx, or an --out ending in .onnx) writes one `<out>.onnx` through jax2onnx (no
TensorFlow): a symbolic batch dimension and a fixed height and width (one --sizes entry, default
512x512; the geometry is static, as above, so pad images at the bottom and right to it), the weights
inside, float32 throughout. Inputs: `image` (B, H, W, 3) preprocessed, or one input per modality
for fusion nets (`color`, `hha`, `depth`); outputs: `scores` (B, H, W, C), or `scores_<head>` per
head. The model's metadata_props hold JSON strings: arch, num_classes, class_names, palette,
preprocessing (channel_order, scale, mean, std), inputs, heads, size. The file is checked in
onnxruntime against the JAX model before it is written. onnxruntime and numpy run it
(`fcn_jax.exported.load(FILE)` does, with the preprocessing and padding). Install the converter
apart: jax2onnx 0.17.1 declares orbax-checkpoint<0.11.37 (fcn_jax needs 0.12) but converts without
it, so it goes in without its dependencies, and what it imports beside it:
  pip install -e '.[onnx]' && pip install --no-deps jax2onnx==0.17.1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
import tempfile
import zipfile
from typing import Callable, Iterator

import numpy as np

from fcn_jax import checkpoint, preprocessing, pretrained
from fcn_jax import cli as cli_lib
from fcn_jax.errors import UserError, cli
from fcn_jax.models import forms as forms_lib
from fcn_jax.models import layers

DEFAULT_SIZES = ((512, 384), (384, 512), (512, 512))  # covers PASCAL VOC (at most 500 x 500)
DEFAULT_ONNX_SIZE = (512, 512)  # holds every PASCAL VOC image
FORMAT_VERSION = 1
FORMATS = ('fcnx', 'onnx')
# jax2onnx 0.17.1 (the newest) requires orbax-checkpoint<0.11.37, which fcn_jax's 0.12 would
# lose: install it without its dependencies, and what it imports (the `onnx` extra) beside it.
JAX2ONNX_VERSION = '0.17.1'
ONNX_INSTALL = f"pip install -e '.[onnx]' && pip install --no-deps jax2onnx=={JAX2ONNX_VERSION}"
ONNX_CHECK_RTOL = 1e-4  # the ONNX file's scores against JAX's: max |diff| / max |scores|


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
  problem = preprocessing.not_single_colour(
      f'fcn_jax.export ({checkpoint_dir})', model.head_names, preprocessing.modalities_of(meta))
  if problem:
    raise UserError(problem)
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

  def write(tmp: str) -> None:
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_DEFLATED) as z:
      z.writestr('metadata.json', json.dumps(metadata, indent=2))
      for name, blob in entries.items():
        z.writestr(name, blob)

  _write_atomically(out, write)
  return out


def _write_atomically(out: pathlib.Path, write: Callable[[str], None]) -> None:
  """`write(tmp)` into a temporary file beside `out`, renamed to `out` when complete."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{out.name}.', dir=out.parent)
  os.close(fd)
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: the artifact is meant to be shared
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def onnx_path(out) -> pathlib.Path:
  """--out for ONNX: FILE.onnx as given, FILE without a suffix gains .onnx."""
  out = pathlib.Path(out).expanduser()
  if not out.suffix:
    return out.with_name(out.name + '.onnx')
  if out.suffix != '.onnx':
    raise UserError(f'--format onnx writes a .onnx file; --out {out} ends in {out.suffix}')
  return out


def _import_onnx_tools():
  """(jax2onnx.to_onnx, onnxruntime), or a UserError naming the install command: none of
  them is a dependency of fcn_jax."""
  try:
    import jax2onnx
    import onnx  # noqa: F401 (jax2onnx needs it: missing, it fails here with the message)
    import onnxruntime
  except ImportError as e:
    raise UserError(f'--format onnx needs jax2onnx, onnx and onnxruntime ({e.name} is not '
                    f'installed): {ONNX_INSTALL}') from None
  version = getattr(jax2onnx, '__version__', None)
  if version is None:
    from importlib import metadata
    version = metadata.version('jax2onnx')
  if version != JAX2ONNX_VERSION:
    logging.getLogger(__name__).warning(
        'jax2onnx %s: this export was written for %s (the file is still checked against JAX '
        'before it is written)', version, JAX2ONNX_VERSION)
  return jax2onnx.to_onnx, onnxruntime


@contextlib.contextmanager
def _converter_workarounds() -> Iterator[None]:
  """jax2onnx 0.17.1 as fcn_jax needs it, for the length of one conversion.

  - Its optimiser's `remove_redundant_transpose_pairs` pass drops the NCHW->NHWC transpose of one
    operand of an Add chain (ResNet's residual sums: onnxruntime then refuses the graph as
    incompatible dimensions; GoogLeNet's shapes are annotated in the wrong layout): left out. The
    graph keeps some transpose pairs (fcn8s at width 1/4, 256x256: 0.21 s a run in onnxruntime
    either way).
  - Its plugin loader logs a traceback for each plugin of a library this install lacks
    (equinox, dm_pix; FCNs use neither): quieted.
  """
  from jax2onnx.converter import ir_optimizations
  passes = getattr(ir_optimizations, '_OPTIMIZER_PASSES', None)
  if passes is not None:
    ir_optimizations._OPTIMIZER_PASSES = tuple(
        p for p in passes if getattr(p, 'name', '') != 'remove_redundant_transpose_pairs')
  loggers = [logging.getLogger(n) for n in ('jax2onnx.plugins.plugin_system', 'onnx_ir.serde')]
  levels = [log.level for log in loggers]
  for log in loggers:
    log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    if passes is not None:
      ir_optimizations._OPTIMIZER_PASSES = passes
    for log, level in zip(loggers, levels):
      log.setLevel(level)


@contextlib.contextmanager
def _lax_level(originals: dict[tuple[object, str], Callable]) -> Iterator[None]:
  """Inside jax2onnx's trace: jnp.power and jax.image.resize as jax defines them. jax2onnx 0.17.1
  replaces both by primitives whose shape rules take no symbolic batch (LRN: '_DimExpr object
  cannot be interpreted as an integer'; torchvision heads' resize: int() of the batch); jax's own
  lower to lax.pow and to a resize jax2onnx converts with a symbolic batch."""
  replaced = {key: getattr(*key) for key in originals}
  for (module, name), fn in originals.items():
    setattr(module, name, fn)
  try:
    yield
  finally:
    for (module, name), fn in replaced.items():
      setattr(module, name, fn)


def _preprocessing_entry(name: str) -> dict:
  p = preprocessing.get(name)
  order = ('bgr' if p.bgr else 'rgb') if p.channels == 3 else None  # of the RGB-decoded image
  return {'name': name, 'channel_order': order, 'bgr': p.bgr,
          'scale': p.scale, 'mean': list(p.mean), 'std': list(p.std), 'log': p.log,
          'channels': p.channels}


def onnx_metadata(model, meta: dict, size: tuple[int, int], input_names: list[str],
                  output_names: list[str]) -> dict:
  """What the ONNX file's metadata_props say (each value a JSON string), the .fcnx metadata's
  names where they mean the same."""
  modalities = preprocessing.modalities_of(meta)
  heads = []
  listed = {h.get('name'): h for h in meta.get('heads') or ()}
  for i, (head, output) in enumerate(zip(model.head_names, output_names)):
    entry = listed.get(head) or ({} if listed else meta)
    n = model.num_classes[i]
    heads.append({'name': head, 'output': output, 'num_classes': n,
                  'class_names': list(entry.get('class_names') or [str(c) for c in range(n)]),
                  'palette': entry.get('palette')})
  inputs = [{'name': name, 'modality': m['name'],
             'preprocessing': _preprocessing_entry(m['preprocessing'])}
            for name, m in zip(input_names, modalities)]
  return {
      'format_version': FORMAT_VERSION, 'arch': meta['arch'],
      'num_classes': heads[0]['num_classes'], 'class_names': heads[0]['class_names'],
      'palette': heads[0]['palette'], 'preprocessing': inputs[0]['preprocessing'],
      'inputs': inputs, 'heads': heads, 'size': list(size), 'batch': 'symbolic',
      'input': 'float32 (B, H, W, channels) per input, preprocessed, padded bottom/right with 0 '
               'to size',
      'output': 'float32 (B, H, W, num_classes) scores per head; crop to the image, argmax for '
                'labels',
  }


def export_onnx(checkpoint_dir, out, *, size: tuple[int, int] = DEFAULT_ONNX_SIZE,
                which: str = 'best', overwrite: bool = False, check: bool = True
                ) -> pathlib.Path:
  """Writes `<out>.onnx` (see the module docstring), after checking it in onnxruntime against the
  JAX model on a random batch of two (`check`): relative error below ONNX_CHECK_RTOL."""
  to_onnx, ort = _import_onnx_tools()
  import jax
  import jax.image
  import jax.numpy as jnp
  from jax import export as jax_export
  out = onnx_path(out).resolve()
  if out.is_dir():
    raise UserError(f'--out {out} is a directory; give a file name (e.g. model.onnx)')
  if out.exists() and not overwrite:
    raise UserError(f'--out {out} exists; pass --overwrite to replace it')
  model, variables, meta = checkpoint.load_inference(checkpoint_dir, which=which)
  h, w = size
  modalities = preprocessing.modalities_of(meta)
  widths = [preprocessing.get(m['preprocessing']).channels for m in modalities]
  input_names = ['image'] if len(modalities) == 1 else [m['name'] for m in modalities]
  heads = list(model.head_names)
  output_names = ['scores'] if len(heads) == 1 else [f'scores_{head}' for head in heads]
  # float32 and the plain convolutions (ONNX Conv), pooling as jax2onnx converts it
  # (layers.valid_pooling): the same numbers as the model's own CPU forms.
  plain = model.clone(dtype=jnp.float32, forms=forms_lib.PLAIN_XLA)
  reference = model.clone(dtype=jnp.float32)
  variables = jax.tree.map(jnp.asarray, variables)

  def per_head(result) -> tuple:
    return tuple(result[k] for k in heads) if isinstance(result, dict) else (result,)

  originals = {(jnp, 'power'): jnp.power, (jax.image, 'resize'): jax.image.resize}

  def scores(*inputs):
    with _lax_level(originals), layers.valid_pooling():
      x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
      return per_head(plain.apply(variables, x, train=False))

  batch = jax_export.symbolic_shape('B')[0]
  specs = [jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32) for c in widths]
  with _converter_workarounds():
    proto = to_onnx(scores, specs, model_name=meta['arch'], input_names=input_names,
                    output_names=output_names)
  # The converter's shape annotations of intermediate values are optional (onnxruntime infers
  # them); dropped, so that none can disagree with the graph.
  del proto.graph.value_info[:]
  for key, value in onnx_metadata(model, meta, size, input_names, output_names).items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)
  if proto.ByteSize() >= 2**31:
    raise UserError(f'{meta["arch"]} makes a {proto.ByteSize() / 2**30:.1f} GiB ONNX model: over '
                    "protobuf's 2 GiB limit for one file; use the .fcnx export instead")
  blob = proto.SerializeToString()
  if check:
    _check_onnx(blob, ort, reference, variables, modalities, input_names, (h, w), per_head)

  def write(tmp: str) -> None:
    with open(tmp, 'wb') as f:
      f.write(blob)

  _write_atomically(out, write)
  return out


def _check_onnx(blob: bytes, ort, model, variables, modalities: list[dict],
                input_names: list[str], size: tuple[int, int], per_head) -> float:
  """The ONNX file's scores against the JAX model's on two random images: a converter that
  miscompiles (or cannot take a symbolic batch) fails here, before anything is written."""
  rng = np.random.default_rng(0)
  parts = [preprocessing.get(m['preprocessing'])(
      rng.integers(0, 256, (2, *size, preprocessing.get(m['preprocessing']).channels), np.uint8))
      for m in modalities]
  apply = forms_lib.jit(lambda x: model.apply(variables, x, train=False), forms=model.forms)
  want = [np.asarray(s) for s in per_head(apply(np.concatenate(parts, axis=-1)))]
  session = ort.InferenceSession(blob, providers=['CPUExecutionProvider'])
  got = session.run(None, dict(zip(input_names, parts)))
  error = max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)) for g, w in zip(got, want))
  if not error < ONNX_CHECK_RTOL:
    raise UserError(f'the ONNX file does not reproduce the model: relative error {error:.2e} '
                    f'(> {ONNX_CHECK_RTOL:g}) against JAX on two random images; not written. '
                    'Use the .fcnx export (--format fcnx) instead')
  logging.getLogger(__name__).info('ONNX check: relative error %.2e against JAX', error)
  return error


@cli
def main(argv: list[str] | None = None) -> int:
  p = cli_lib.ArgumentParser(prog='python -m fcn_jax.export', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='a training WORKDIR, a converted checkpoint, or pretrained:NAME')
  p.add_argument('--out', required=True,
                 help='the artifact file to write (e.g. fcn8s.fcnx; fcn8s.onnx for ONNX)')
  p.add_argument('--format', choices=FORMATS, default=None,
                 help='fcnx: serialized StableHLO modules in a zip (the default); onnx: one ONNX '
                 'file with a symbolic batch and a fixed height and width (needs jax2onnx: '
                 f'{ONNX_INSTALL}). Default: onnx when --out ends in .onnx, else fcnx')
  p.add_argument('--sizes', default=None,
                 help='padded input sizes HxW, comma-separated (default '
                 f'{",".join(f"{h}x{w}" for h, w in DEFAULT_SIZES)}); ONNX takes one size, '
                 f'default {DEFAULT_ONNX_SIZE[0]}x{DEFAULT_ONNX_SIZE[1]}')
  p.add_argument('--which', default='best', help='best, latest or a step')
  p.add_argument('--max_batch', type=int, default=8,
                 help='largest batch the fcnx modules accept (ONNX: any batch)')
  p.add_argument('--no_check', action='store_true',
                 help='ONNX: skip the check in onnxruntime against the JAX model')
  p.add_argument('--overwrite', action='store_true', help='replace --out if it exists')
  a = p.parse_args(argv)
  fmt = a.format or ('onnx' if a.out.endswith('.onnx') else 'fcnx')
  a.checkpoint = pretrained.resolve(a.checkpoint)
  if fmt == 'onnx':
    sizes = parse_sizes(a.sizes) if a.sizes else (DEFAULT_ONNX_SIZE,)
    if len(sizes) != 1:
      raise UserError(f'--sizes {a.sizes}: an ONNX file has one input size (its height and width '
                      'are fixed); export one file per size')
    out = export_onnx(a.checkpoint, a.out, size=sizes[0], which=a.which, overwrite=a.overwrite,
                      check=not a.no_check)
  else:
    sizes = parse_sizes(a.sizes) if a.sizes else DEFAULT_SIZES
    out = export_checkpoint(a.checkpoint, a.out, sizes=sizes, which=a.which,
                            overwrite=a.overwrite, max_batch=a.max_batch)
  print(f'wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
