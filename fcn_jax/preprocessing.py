"""Input conventions. The preprocessing belongs to the weights and travels with every checkpoint.

- `caffe_bgr`: Caffe-trained weights (VGG_ILSVRC_16_layers, the released FCNs): BGR, 0..255, minus
  the Caffe mean.
- `torchvision_rgb`: torchvision ImageNet weights: RGB / 255, minus the ImageNet mean, over its std.
- `inception_rgb`: torchvision GoogLeNet with transform_input=True: RGB / 255 mapped to [-1, 1].
- The reference nets of the other datasets (their data layers, ZOO.md sec. 4): `pascal_context_bgr`,
  `sift_flow_bgr`, `nyud_bgr` (BGR minus each dataset's mean), `nyud_hha` (the HHA PNG's channels
  as stored, minus the HHA mean) and `nyud_log_depth` (log of the depth PNG minus 7.844, 1 channel).

- `dataset`: the training data's own per-channel statistics, for inputs that are not photographs
  (multispectral TIFF, 16-bit PNG). Computed while the dataset is prepared (every split, float64)
  and resolved when a run starts into a name that carries them,
  `dataset:uint16:mean=M1,M2,...:std=S1,S2,...` (`data_statistics`): inputs as stored, minus the
  mean, over the std. That name is what the checkpoint records, so predict, the Segmenter and
  evaluation normalise exactly as training did, with nothing else to carry.

A net with several input modalities (NYUD: colour and HHA, colour and depth) lists them in its
checkpoint metadata, `modalities`: [{'name', 'preprocessing'}, ...]; its input is each modality
preprocessed by its own preset and concatenated on the channel axis in that order (`prepare`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  name: str
  bgr: bool        # reverse the channels of an RGB image
  scale: float     # multiply 0..255 values by this first
  mean: tuple[float, ...]  # in the model's channel order, after scaling
  std: tuple[float, ...]
  log: bool = False  # natural log first (depth); values below 1 count as 1 (no -inf)
  # Inputs as stored (TIFF bands, 16-bit PNG: any channel count) rather than uint8 RGB; `dtype`
  # is the stored type the statistics were computed on ('' = any).
  stored: bool = False
  dtype: str = ''

  @property
  def channels(self) -> int:
    return len(self.mean)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """(..., H, W, C) images (uint8 RGB; one-channel inputs may be (..., H, W)) -> float32 model
    input (..., H, W, C)."""
    x = np.asarray(images, np.float32)
    if self.channels == 1 and (x.ndim == 2 or x.shape[-1] != 1):
      x = x[..., None]
    if x.shape[-1] != self.channels:
      what = ('RGB images (..., H, W, 3)' if self.channels == 3
              else f'{self.channels}-channel inputs')
      raise ValueError(f'expected {what} for {self.name}, got shape {x.shape}')
    if self.bgr:
      x = x[..., ::-1]
    if self.log:
      x = np.log(np.maximum(x, 1.0))
    x = x * np.float32(self.scale)
    return ((x - np.asarray(self.mean, np.float32))
            / np.asarray(self.std, np.float32)).astype(np.float32)

  def invert(self, inputs: np.ndarray) -> np.ndarray:
    """Model input -> uint8 RGB (for figures)."""
    if self.channels != 3 or self.log or self.stored:
      raise ValueError(f'{self.name} inputs are not images; nothing to invert')
    x = (np.asarray(inputs, np.float32) * np.asarray(self.std, np.float32)
         + np.asarray(self.mean, np.float32))
    x = x / np.float32(self.scale)
    if self.bgr:
      x = x[..., ::-1]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


PRESETS = {
    'caffe_bgr': Preprocessing('caffe_bgr', True, 1.0, CAFFE_BGR_MEAN, (1.0, 1.0, 1.0)),
    'torchvision_rgb': Preprocessing('torchvision_rgb', False, 1 / 255, IMAGENET_MEAN,
                                     IMAGENET_STD),
    'inception_rgb': Preprocessing('inception_rgb', False, 1 / 255, (0.5, 0.5, 0.5),
                                   (0.5, 0.5, 0.5)),
    'pascal_context_bgr': Preprocessing('pascal_context_bgr', True, 1.0,
                                        (104.007, 116.669, 122.679), (1.0, 1.0, 1.0)),
    'sift_flow_bgr': Preprocessing('sift_flow_bgr', True, 1.0, (114.578, 115.294, 108.353),
                                   (1.0, 1.0, 1.0)),
    'nyud_bgr': Preprocessing('nyud_bgr', True, 1.0, (116.190, 97.203, 92.318), (1.0, 1.0, 1.0)),
    'nyud_hha': Preprocessing('nyud_hha', False, 1.0, (132.431, 94.076, 118.477), (1.0, 1.0, 1.0)),
    'nyud_log_depth': Preprocessing('nyud_log_depth', False, 1.0, (7.844,), (1.0,), log=True),
}

# What each modality is read from (fcn_jax.predict's --hha_dir / --depth_dir), for messages.
MODALITY_SOURCES = {'color': 'the image', 'hha': 'an HHA PNG (--hha_dir)',
                    'depth': 'a depth PNG (--depth_dir)'}


# config.preprocessing for the data's own statistics; resolved into data_statistics(...) by a run.
DATASET = 'dataset'
_STATISTICS = DATASET + ':'


def data_statistics(mean, std, dtype: str) -> str:
  """The preprocessing name that carries per-channel statistics of inputs stored as `dtype`:
  (x - mean) / std, channel by channel, on the values as stored."""
  numbers = lambda values: ','.join(f'{float(v):.9g}' for v in values)
  return f'{_STATISTICS}{dtype}:mean={numbers(mean)}:std={numbers(std)}'


def is_statistics(name: str) -> bool:
  """Whether `name` is a data_statistics(...) name (resolved, not the bare 'dataset')."""
  return isinstance(name, str) and name.startswith(_STATISTICS)


def _from_statistics(name: str) -> Preprocessing:
  try:
    _, dtype, mean, std = name.split(':')
    if not (mean.startswith('mean=') and std.startswith('std=')):
      raise ValueError
    means = tuple(float(v) for v in mean[len('mean='):].split(','))
    stds = tuple(float(v) for v in std[len('std='):].split(','))
  except ValueError:
    raise ValueError(f'preprocessing {name!r}: expected {_STATISTICS}DTYPE:mean=M1,M2,...:'
                     'std=S1,S2,...') from None
  if len(means) != len(stds) or not all(v > 0 for v in stds):
    raise ValueError(f'preprocessing {name!r}: one mean and one std > 0 per channel')
  return Preprocessing(name, False, 1.0, means, stds, stored=True, dtype=dtype)


def get(name: str) -> Preprocessing:
  """A preset by name, or the Preprocessing a data_statistics(...) name describes."""
  if is_statistics(name):
    return _from_statistics(name)
  if name == DATASET:
    raise ValueError(f"preprocessing {DATASET!r} stands for the training data's statistics: a "
                     'run resolves it when it starts (a checkpoint records the statistics)')
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f'unknown preprocessing {name!r}; choose one of {sorted(PRESETS)}, or '
                     f'{DATASET!r} (the training data\'s per-channel statistics)') from None


def modalities_of(metadata: dict) -> list[dict]:
  """The input modalities of a checkpoint, in channel order: [{'name', 'preprocessing'}, ...]
  (a single colour input with metadata['preprocessing'] when none are listed)."""
  listed = metadata.get('modalities')
  if listed:
    return [{'name': m['name'], 'preprocessing': m['preprocessing']} for m in listed]
  return [{'name': 'color', 'preprocessing': metadata['preprocessing']}]


def not_single_colour(what: str, head_names, modalities: list[dict]) -> str | None:
  """Why `what` (a tool that takes one RGB photograph: export, serve) cannot run a net with these
  heads and modalities (modalities_of), or None: several heads, inputs besides colour, or images
  read as stored (TIFF bands, 16-bit PNG)."""
  first = get(modalities[0]['preprocessing'])
  names = [m['name'] for m in modalities]
  if len(head_names) == 1 and names == ['color'] and not first.stored:
    return None
  inputs = f'{first.channels}-band images as stored' if first.stored else ' + '.join(names)
  return (f'{what} handles single-headed colour nets for now; this checkpoint has heads '
          f'{", ".join(head_names)} and inputs {inputs}. Use python -m fcn_jax.predict (or '
          'fcn_jax.segmenter.Segmenter) instead')


def prepare(inputs: dict[str, np.ndarray] | np.ndarray, modalities: list[dict]) -> np.ndarray:
  """One example's (or batch's) model input: each modality preprocessed, then concatenated.

  `inputs`: {modality name: array}, or a colour image alone for a colour-only net.
  """
  if not isinstance(inputs, dict):
    inputs = {'color': inputs}
  names = [m['name'] for m in modalities]
  missing = [n for n in names if n not in inputs]
  if missing:
    raise ValueError(f'the model needs {", ".join(names)} inputs; missing: '
                     + ', '.join(f'{n} ({MODALITY_SOURCES.get(n, n)})' for n in missing))
  parts = [get(m['preprocessing'])(inputs[m['name']]) for m in modalities]
  sizes = {p.shape[:-1] for p in parts}
  if len(sizes) > 1:
    raise ValueError('the modalities differ in size: ' + ', '.join(
        f'{n} {p.shape[:-1]}' for n, p in zip(names, parts)))
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
