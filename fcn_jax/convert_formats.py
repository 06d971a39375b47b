"""Reading weights files for fcn_jax.convert: PyTorch state dicts (.pth, .npz, .safetensors) and
Caffe .caffemodel files, detected from their first bytes, into {key: float32 array}."""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from fcn_jax import caffe_pb
from fcn_jax.errors import UserError

FORMATS = ('pth', 'npz', 'safetensors', 'caffemodel')


class ConversionError(UserError, ValueError):
  """The source file cannot be imported into the requested model; the message lists why."""


def detect_format(path: str | os.PathLike) -> str:
  """'pth' | 'npz' | 'safetensors' | 'caffemodel', from the file's first bytes."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(16)
  # safetensors: u64 little-endian header length, then a JSON object.
  if len(head) >= 9 and head[8:9] == b'{' and 8 + int.from_bytes(head[:8], 'little') <= size:
    return 'safetensors'
  if head[:4] == b'PK\x03\x04':
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile as e:
      raise ConversionError(f'{path}: corrupt zip archive ({e})') from None
    if any(n.endswith('.npy') for n in names):
      return 'npz'
    if any(n.endswith('data.pkl') for n in names):
      return 'pth'  # torch.save's zip format
    raise ConversionError(f'{path}: a zip archive that is neither a NumPy .npz nor a torch.save '
                          'file')
  if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
    return 'pth'  # legacy (pre-1.6) torch.save: a pickle
  # A serialized NetParameter starts with one of its fields: name (1), layers (2), input (3),
  # input_dim (4), force_backward (5), state (6), debug_info (7), input_shape (8), layer (100).
  field_tags = (b'\x0a', b'\x12', b'\x1a', b'\x20', b'\x22', b'\x28', b'\x32', b'\x38', b'\x42')
  if head[:1] in field_tags or head[:2] == b'\xa2\x06':
    return 'caffemodel'
  raise ConversionError(
      f'{path}: unknown format (first bytes {head[:8]!r}); supported: PyTorch state dict (.pth), '
      'NumPy .npz, .safetensors, Caffe .caffemodel; pass --format to force one')


def _unwrap_state_dict(obj: Any, path: str) -> dict:
  if not isinstance(obj, dict):
    if hasattr(obj, 'state_dict'):
      obj = obj.state_dict()
    else:
      raise ConversionError(f'{path}: expected a state dict, got {type(obj).__name__}')
  for key in ('state_dict', 'model_state_dict', 'model'):  # training checkpoints (e.g. pytorch-fcn)
    inner = obj.get(key)
    if isinstance(inner, dict) and inner and not _looks_like_tensor(inner):
      obj = inner
      break
  return obj


def _looks_like_tensor(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    import torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.to(torch.float32)
    return value.numpy()
  return np.asarray(value)


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a 'module.' (DataParallel) prefix shared by every key."""
  for prefix in ('module.',):
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def _read_pth(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ConversionError(f'{path}: reading .pth files needs PyTorch (pip install torch); or '
                          'save the state dict as .npz or .safetensors') from None
  obj = torch.load(path, map_location='cpu', weights_only=True)
  return {k: _to_numpy(v) for k, v in _unwrap_state_dict(obj, path).items()
          if _looks_like_tensor(v)}


def _read_npz(path: str) -> dict:
  with np.load(path, allow_pickle=False) as z:
    return {k: np.asarray(z[k]) for k in z.files}


def _read_safetensors(path: str) -> dict:
  try:
    from safetensors.numpy import load_file
    return load_file(path)
  except (TypeError, ValueError) as numpy_error:  # e.g. bfloat16, which NumPy lacks
    try:
      from safetensors.torch import load_file as torch_load_file
    except ImportError:
      raise ConversionError(f'{path}: {numpy_error}') from None
    return {k: _to_numpy(v) for k, v in torch_load_file(path).items()}


def _read_caffemodel(path: str) -> dict:
  with open(path, 'rb') as f:
    data = f.read()
  try:
    _, layers = caffe_pb.read_net(data)
  except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
    raise ConversionError(f'{path}: not a Caffe NetParameter ({type(e).__name__}: {e})') from None
  if not layers:
    raise ConversionError(f'{path}: a Caffe NetParameter without any weights')
  state = {}
  for name, _, blobs in layers:
    for i, blob in enumerate(blobs):
      suffix = ('weight', 'bias')[i] if i < 2 else f'blob{i}'
      state[f'{name}.{suffix}'] = blob
  return state


_READERS = {'pth': _read_pth, 'npz': _read_npz, 'safetensors': _read_safetensors,
            'caffemodel': _read_caffemodel}


def read_weights(path: str | os.PathLike,
                 format: str = 'auto') -> tuple[dict[str, np.ndarray], str]:
  """Reads a weights file into {key: float32 array} (PyTorch-style keys) and its format.

  Caffe layers become `<layer>.weight` (first blob), `<layer>.bias` (second blob) and
  `<layer>.blob<i>` (any further blob), with the blob shapes as stored.
  """
  path = os.fspath(path)
  if format == 'auto':
    format = detect_format(path)
  if format not in FORMATS:
    raise ConversionError(f'unknown format {format!r}; choose one of {", ".join(FORMATS)} or auto')
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  try:
    state = _READERS[format](path)
  except ConversionError:
    raise
  except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear error
    raise ConversionError(f'{path}: cannot read as {format}: {type(e).__name__}: {e}') from None
  state = {k: (v.astype(np.float32, copy=False) if np.issubdtype(v.dtype, np.floating) else v)
           for k, v in _strip_prefix(dict(state)).items()}
  return state, format
