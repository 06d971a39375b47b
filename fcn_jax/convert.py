"""Imports pretrained weights: ImageNet backbones and the released FCN models, into an orbax
checkpoint.

    python -m fcn_jax.convert SRC --out DIR [--arch ARCH]
        [--format auto|pth|npz|safetensors|caffemodel] [--modality color|hha]
        [--preprocessing caffe_bgr|torchvision_rgb|inception_rgb|...] [--num_classes N] [--width W]

Without --arch, the file must be one of the fifteen reference nets (fcn_jax.zoo): it is recognised
from its layer names and blob shapes (the NYUD colour and HHA nets, which share one layout, from
the released file name or --modality), and the checkpoint records the net's classes, heads, input
modalities and each modality's preprocessing. torchvision's fcn_resnet50 / fcn_resnet101 and its
ImageNet resnet50 / resnet101 are recognised too (their blocks per layer), as arch fcn_resnet50 /
fcn_resnet101 with `torchvision_rgb` inputs, and its ImageNet vgg16_bn as fcn8s (or --arch
fcn32s / fcn16s) with the vgg16_bn backbone.

Sources (the format is detected from the file's contents, not its name):

- PyTorch state dicts: `.pth` (read with torch, when installed), `.npz` (NumPy, one array per key)
  and `.safetensors`. Layouts:
  - torchvision ImageNet classifiers: VGG16 (`features.N`, `classifier.0/3`), AlexNet (`features.N`,
    `classifier.1/4`), GoogLeNet (`conv1.conv`, `inception3a.branch2.1.bn`, ...) and ResNet-50/101
    (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...). fc6/fc7 are "transplanted"
    into convolutions (fc6 (4096, C*k*k) -> (4096, C, k, k)); the 1000-way classifier and
    GoogLeNet's auxiliary heads are dropped. VGG16-BN (`features.N` conv + `features.N+1`
    BatchNorm, `classifier.0/3`) fills the vgg16_bn backbone (conv -> BatchNorm -> ReLU, no conv
    bias): each conv bias moves into its BatchNorm's running mean, and fc6 / fc7 get the
    BatchNorm that is the identity plus the Linear's bias (the same function at inference).
  - torchvision's segmentation FCN-ResNet50/101: `backbone.` + the ResNet's keys, `classifier.0/1/4`
    (FCNHead: 3x3 conv, BatchNorm, 1x1 scores) and, when trained with it, `aux_classifier.0/1/4`
    (kept: the checkpoint's model has aux=True). BatchNorm running statistics are imported;
    `num_batches_tracked` is dropped.
  - the PyTorch port of the Caffe FCNs (and any file using Caffe's layer names):
    `conv1_1`..`conv5_3`, `fc6`, `fc7`, `score_fr`, `score_pool4`, `score_pool3`, `upscore`,
    `upscore2`, `upscore16`, `upscore_pool4`, `upscore8` (`.weight`, `.bias`).
- Caffe `.caffemodel` (NetParameter, read with protobuf, no Caffe needed; current `layer` and legacy
  V1 `layers` fields): VGG_ILSVRC_16_layers (fc6/fc7 InnerProduct) and the released
  fcn32s/fcn16s/fcn8s-heavy-pascal and fcn8s-atonce-pascal models.

Layout conversions: convolutions OIHW -> HWIO; transposed convolutions (PyTorch ConvTranspose2d and
Caffe Deconvolution both store (C_in, C_out, k, k) in scatter orientation) -> (k, k, C_in, C_out);
fully connected layers reshaped into convolutions. A backbone (classification weights) fills the
backbone only: the FCN layers keep their initialisation (zero score layers, bilinear upsampling).

The input convention belongs to the weights and is recorded in the checkpoint metadata: Caffe
weights (caffemodels and the PyTorch port of the Caffe FCNs) expect `caffe_bgr`, torchvision
VGG16 / AlexNet `torchvision_rgb`, torchvision GoogLeNet (transform_input=True) `inception_rgb`.
Override with `--preprocessing` (e.g. pytorch-fcn's `vgg16_from_caffe.pth` uses torchvision keys
but Caffe weights).

Anything that does not fit (unknown format, missing or unexpected keys, shapes, a file made for
another arch) raises `ConversionError` listing every mismatch, and nothing is written.

The file formats are read by fcn_jax.convert_formats, and mapped onto an arch's variables by
fcn_jax.convert_layouts; this module recognises reference nets, writes checkpoints and is the CLI.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from fcn_jax import checkpoint, zoo
from fcn_jax import cli as cli_lib
from fcn_jax import preprocessing as preprocessing_lib
from fcn_jax.convert_formats import FORMATS, ConversionError, detect_format, read_weights
from fcn_jax.convert_layouts import (  # noqa: F401 - re-exported: fcn_jax.convert's names
    _TV_VGG16_FEATURES, _VGG_CONVS, HEAD_PREFIXES, LAYOUTS, Layout, Target, classes_text,
    guess_archs, import_weights, is_torchvision_vgg16_bn, resnet_depth)
from fcn_jax.data.classes import VOC_CLASS_NAMES
from fcn_jax.errors import cli
from fcn_jax.models import fcn as fcn_lib

VOC_CLASSES = VOC_CLASS_NAMES

__all__ = ['ConversionError', 'FORMATS', 'VOC_CLASSES', 'convert', 'convert_to_checkpoint',
           'detect_format', 'import_weights', 'main', 'read_weights']


# --------------------------------------------------------------------------------------------------
# Whole conversions


def _recognise(state: dict, src: str, arch: str | None, modality: str | None, log):
  """(net, recognised, why, arch): the reference net the file is (`recognised`; None: none), the
  one whose metadata to write (`net`; None when --arch names another arch) and the arch."""
  net, why = None, ''
  depth, resnet_why = resnet_depth(state)
  if arch is None and resnet_why:
    # torchvision's nets are not reference nets (no zoo entry): generic metadata for the arch.
    if depth is None:
      raise ConversionError(f'{src}: {resnet_why}. Nothing fits.')
    if modality is not None:
      raise ConversionError(f'--modality is for the NYUD colour / HHA nets; {src} is a '
                            f'torchvision {depth}')
    arch = f'fcn_{depth}'
    what = 'FCN' if any(k.startswith('backbone.') for k in state) else 'ImageNet classifier'
    if log:
      log(f'recognised torchvision {what} ({resnet_why}) -> arch {arch}')
    return None, None, resnet_why, arch
  if arch is None and is_torchvision_vgg16_bn(state):
    arch = 'fcn8s'  # the paper's best single-stream net; --arch picks another VGG16 FCN
    if log:
      log(f'recognised torchvision vgg16_bn (an ImageNet classifier) -> arch {arch} with the '
          'vgg16_bn backbone (--arch fcn32s / fcn16s for another)')
    return None, None, 'torchvision vgg16_bn keys', arch
  try:
    net, why = zoo.recognise(state, src, modality)
  except zoo.RecognitionError as e:
    if arch is None:
      raise ConversionError(f'{src}: {e}. Nothing fits; pass --arch to convert it anyway.') \
          from None
    why = str(e)
  recognised = net
  if arch is None:
    arch = net.arch
  if net is not None and net.arch != arch:
    net = None  # --arch overrides: generic metadata for that arch
  elif net is not None and log:
    log(f'recognised {net.name} ({why}) -> arch {arch}')
  if modality is not None and (net is None or len(net.modalities) != 1):
    raise ConversionError(f'--modality is for the NYUD colour / HHA nets; {src} is not one of them')
  return net, recognised, why, arch


def _generic_metadata(arch: str, info: dict, prep: str, class_names: list[str] | None,
                      learnable_upsampling: bool) -> dict:
  """The metadata of weights that are not a reference net (or converted with another arch)."""
  n = info['num_classes']
  if class_names is None:
    counts = [n] if isinstance(n, int) else list(n)
    class_names = (list(VOC_CLASSES) if counts == [len(VOC_CLASSES)] else
                   [f'class_{i}' for i in range(counts[0])])
  if len(fcn_lib.ARCHS[arch].heads) == 1 and len(class_names) != n:
    raise ConversionError(f'{len(class_names)} class names for {n} classes')
  model = {'arch': arch, 'num_classes': n, 'width': info['width'],
           'learnable_upsampling': learnable_upsampling}
  if fcn_lib.ARCHS[arch].aux_tap:
    model['aux'] = bool(info.get('aux'))
  if info.get('backbone'):
    model['backbone'] = info['backbone']
  metadata = {**checkpoint.model_metadata(model), 'preprocessing': prep,
              'class_names': list(class_names)}
  channels = fcn_lib.ARCHS[arch].input_channels
  if channels != 3:
    raise ConversionError(f'{arch} takes {channels} input channels; only the reference nets '
                          '(converted without --arch) say which modalities they are')
  return metadata


def convert(src: str | os.PathLike, arch: str | None = None, *, format: str = 'auto',
            num_classes: int | None = None, width: float | None = None,
            preprocessing: str | None = None, learnable_upsampling: bool = True,
            class_names: list[str] | None = None, init_missing_heads: bool = False,
            modality: str | None = None, log=None) -> tuple[dict, dict]:
  """Reads `src` and maps it onto `arch`: (variables, checkpoint metadata). Writes nothing.

  Without `arch`, the file must be one of the fifteen reference nets (fcn_jax.zoo.recognise):
  their arch, classes, heads, modalities and preprocessing come from the recognised net.
  `log(message)` receives what was recognised and why.
  """
  src = os.fspath(src)
  state, fmt = read_weights(src, format)
  net, recognised, why, arch = _recognise(state, src, arch, modality, log)
  if net is not None and num_classes is None:
    num_classes = net.num_classes
  try:
    variables, info = import_weights(state, arch, num_classes=num_classes, width=width,
                                     init_missing_heads=init_missing_heads,
                                     learnable_upsampling=learnable_upsampling)
  except ConversionError as e:
    if recognised is not None and recognised.arch != arch:
      raise ConversionError(f'{src} is the reference net {recognised.name} ({why}), arch '
                            f'{recognised.arch}: convert it without --arch (or with --arch '
                            f'{recognised.arch}).\n{e}') from None
    raise
  prep = preprocessing or (net.modalities[0][1] if net is not None else
                           'caffe_bgr' if fmt == 'caffemodel' else info['preprocessing'])
  preprocessing_lib.get(prep)  # validates the name
  if net is not None and info['num_classes'] == net.num_classes and class_names is None:
    metadata = net.metadata(width=info['width'], learnable_upsampling=learnable_upsampling)
    metadata['preprocessing'] = prep
    metadata['modalities'][0]['preprocessing'] = prep
  else:
    metadata = _generic_metadata(arch, info, prep, class_names, learnable_upsampling)
  what = 'FCN weights' if info['kind'] == 'fcn' else 'ImageNet backbone (FCN layers initialised)'
  metadata.update({
      'source': f'{os.path.basename(src)}: {what}, {fmt} file, {info["layout"]} layout',
      'source_format': fmt,
      'source_layout': info['layout'],
      'source_kind': info['kind'],
  })
  return variables, metadata


def convert_to_checkpoint(src: str | os.PathLike, out: str | os.PathLike, arch: str | None = None,
                          *, overwrite: bool = False, **kwargs) -> dict:
  """`convert` then `checkpoint.save_inference` to `out`, atomically: written to a temporary
  directory beside `out` and renamed, so a failure leaves nothing behind. Returns the metadata."""
  out = os.path.abspath(os.path.expanduser(os.fspath(out)))
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConversionError(f'--out {out} is a file; give a directory to write the checkpoint into')
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise ConversionError(f'--out {out} exists; pass overwrite=True (--overwrite) to replace it')
    if not checkpoint.is_checkpoint_dir(out):
      raise ConversionError(f'--out {out} holds files that are not an fcn_jax checkpoint; '
                            f'--overwrite only replaces a checkpoint directory. Choose another '
                            f'--out.')
  if not os.path.isfile(os.path.expanduser(os.fspath(src))):
    raise ConversionError(f'{src}: no such file')
  variables, metadata = convert(src, arch, **kwargs)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    staged = os.path.join(tmp, 'checkpoint')
    checkpoint.save_inference(staged, variables, metadata)
    if os.path.exists(out):
      old = os.path.join(tmp, 'old')
      os.rename(out, old)
    os.rename(staged, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return metadata


@cli
def main(argv: list[str] | None = None) -> int:
  parser = cli_lib.ArgumentParser(
      prog='python -m fcn_jax.convert',
      description='Import ImageNet backbones or released FCN models into an fcn_jax checkpoint.')
  parser.add_argument('src', help='.pth / .npz / .safetensors state dict or Caffe .caffemodel')
  parser.add_argument('--arch', choices=sorted(fcn_lib.ARCHS),
                      help='default: recognised from the file (the fifteen reference nets)')
  parser.add_argument('--modality', choices=('color', 'hha'),
                      help='NYUD 40-class FCN-32s: colour or HHA input (their files share one '
                      'layout; default: from the file name)')
  parser.add_argument('--out', required=True, help='checkpoint directory to write')
  parser.add_argument('--format', default='auto', choices=('auto',) + FORMATS)
  parser.add_argument('--preprocessing', choices=sorted(preprocessing_lib.PRESETS),
                      help='input convention of the weights (default: from the file layout)')
  parser.add_argument('--num_classes', type=int, help='default: from score_fr, else 21')
  parser.add_argument('--width', type=float, help='default: inferred from the first convolution')
  parser.add_argument('--class_names', help='comma-separated (default: the 21 VOC classes)')
  parser.add_argument('--frozen_upsampling', action='store_true',
                      help='record learnable_upsampling=False (the Caffe reference training)')
  parser.add_argument('--init_missing_heads', action='store_true',
                      help='allow FCN layers missing from the file (e.g. FCN-16s from FCN-32s)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace --out if it is an existing fcn_jax checkpoint (never any other '
                      'directory)')
  args = parser.parse_args(argv)
  if args.num_classes is not None and args.num_classes < 2:
    parser.error(f'--num_classes {args.num_classes}: must be >= 2 (background and a class)')
  if args.width is not None and not args.width > 0:
    parser.error(f'--width {args.width}: must be > 0 (1.0 = the paper\'s nets)')
  try:
    metadata = convert_to_checkpoint(
        args.src, args.out, args.arch, overwrite=args.overwrite, format=args.format,
        num_classes=args.num_classes, width=args.width, preprocessing=args.preprocessing,
        learnable_upsampling=not args.frozen_upsampling,
        class_names=args.class_names.split(',') if args.class_names else None,
        init_missing_heads=args.init_missing_heads, modality=args.modality,
        log=lambda message: print(message))
  except ConversionError as e:
    print(f'error: {e}\nnothing was written.', file=sys.stderr)
    return 2
  inputs = ' + '.join(f'{m["name"]} ({m["preprocessing"]})' for m in
                      preprocessing_lib.modalities_of(metadata))
  print(f'wrote {os.path.abspath(args.out)}: {metadata["arch"]}, '
        f'{classes_text(metadata["num_classes"])}, width {metadata["width"]:g}, inputs {inputs} '
        f'({metadata["source"]})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
