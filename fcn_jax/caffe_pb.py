"""The subset of Caffe's caffe.proto needed to read and write `.caffemodel` weights, without Caffe.

The descriptor is built in Python (no protoc, no generated code) in a private descriptor pool, so it
never clashes with a real `caffe_pb2` imported by the same process. Field numbers are those of
BVLC/caffe src/caffe/proto/caffe.proto:

    message BlobShape { repeated int64 dim = 1 [packed = true]; }
    message BlobProto {
      optional int32 num = 1; optional int32 channels = 2; optional int32 height = 3;
      optional int32 width = 4;                                 // legacy 4-D shape
      repeated float data = 5 [packed = true]; repeated float diff = 6 [packed = true];
      optional BlobShape shape = 7;
      repeated double double_data = 8 [packed = true];
      repeated double double_diff = 9 [packed = true];
    }
    message LayerParameter {                                    // NetParameter.layer = 100
      optional string name = 1; optional string type = 2;
      repeated string bottom = 3; repeated string top = 4; repeated BlobProto blobs = 7;
    }
    message V1LayerParameter {                                  // NetParameter.layers = 2 (legacy)
      repeated string bottom = 2; repeated string top = 3; optional string name = 4;
      optional LayerType type = 5;                              // enum, read here as int32
      repeated BlobProto blobs = 6;
    }
    message NetParameter { optional string name = 1; repeated V1LayerParameter layers = 2;
                           repeated LayerParameter layer = 100; }

Two schemas are built from this: `faithful` declares the blob payloads as packed repeated floats,
exactly as caffe.proto does (used to write files); `fast` declares the same field numbers as `bytes`
(a packed repeated float IS a length-delimited run of little-endian float32 on the wire), so a
500 MB VGG16 model is read with `np.frombuffer` instead of 138 million Python floats.
"""

from __future__ import annotations

import functools

import numpy as np
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory

# V1LayerParameter.LayerType values that carry weights.
V1_LAYER_TYPES = {0: 'None', 4: 'Convolution', 5: 'Data', 6: 'Dropout', 14: 'InnerProduct',
                  17: 'Pooling', 18: 'ReLU', 21: 'SoftmaxWithLoss', 39: 'Deconvolution'}
V1_LAYER_TYPE_IDS = {name: number for number, name in V1_LAYER_TYPES.items()}

_F = descriptor_pb2.FieldDescriptorProto


def _field(msg, name, number, ftype, label=_F.LABEL_OPTIONAL, type_name=None, packed=False):
  f = msg.field.add(name=name, number=number, type=ftype, label=label)
  if type_name:
    f.type_name = type_name
  if packed:
    f.options.packed = True
  return f


def _file_proto(fast: bool) -> descriptor_pb2.FileDescriptorProto:
  fp = descriptor_pb2.FileDescriptorProto(
      name=f'fcn_jax_caffe_subset_{"fast" if fast else "faithful"}.proto', package='caffe',
      syntax='proto2')
  rep = _F.LABEL_REPEATED

  shape = fp.message_type.add(name='BlobShape')
  _field(shape, 'dim', 1, _F.TYPE_INT64, rep, packed=True)

  blob = fp.message_type.add(name='BlobProto')
  for number, name in enumerate(('num', 'channels', 'height', 'width'), 1):
    _field(blob, name, number, _F.TYPE_INT32)
  for name, number, ftype in (('data', 5, _F.TYPE_FLOAT), ('diff', 6, _F.TYPE_FLOAT),
                              ('double_data', 8, _F.TYPE_DOUBLE),
                              ('double_diff', 9, _F.TYPE_DOUBLE)):
    if fast:
      _field(blob, name, number, _F.TYPE_BYTES)
    else:
      _field(blob, name, number, ftype, rep, packed=True)
  _field(blob, 'shape', 7, _F.TYPE_MESSAGE, type_name='.caffe.BlobShape')

  layer = fp.message_type.add(name='LayerParameter')
  _field(layer, 'name', 1, _F.TYPE_STRING)
  _field(layer, 'type', 2, _F.TYPE_STRING)
  _field(layer, 'bottom', 3, _F.TYPE_STRING, rep)
  _field(layer, 'top', 4, _F.TYPE_STRING, rep)
  _field(layer, 'blobs', 7, _F.TYPE_MESSAGE, rep, type_name='.caffe.BlobProto')

  v1 = fp.message_type.add(name='V1LayerParameter')
  _field(v1, 'bottom', 2, _F.TYPE_STRING, rep)
  _field(v1, 'top', 3, _F.TYPE_STRING, rep)
  _field(v1, 'name', 4, _F.TYPE_STRING)
  _field(v1, 'type', 5, _F.TYPE_INT32)  # an enum in caffe.proto; same varint on the wire
  _field(v1, 'blobs', 6, _F.TYPE_MESSAGE, rep, type_name='.caffe.BlobProto')

  net = fp.message_type.add(name='NetParameter')
  _field(net, 'name', 1, _F.TYPE_STRING)
  _field(net, 'layers', 2, _F.TYPE_MESSAGE, rep, type_name='.caffe.V1LayerParameter')
  _field(net, 'layer', 100, _F.TYPE_MESSAGE, rep, type_name='.caffe.LayerParameter')
  return fp


@functools.lru_cache(maxsize=None)
def message_classes(fast: bool = False) -> dict[str, type]:
  """{'NetParameter', 'LayerParameter', 'V1LayerParameter', 'BlobProto', 'BlobShape'} classes."""
  pool = descriptor_pool.DescriptorPool()
  pool.Add(_file_proto(fast))
  names = ('NetParameter', 'LayerParameter', 'V1LayerParameter', 'BlobProto', 'BlobShape')
  return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'caffe.{n}'))
          for n in names}


def blob_shape(blob) -> tuple[int, ...]:
  """The blob's shape: BlobShape when present, else the legacy (num, channels, height, width)."""
  if blob.HasField('shape'):
    return tuple(int(d) for d in blob.shape.dim)
  return tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))


def blob_array(blob) -> np.ndarray:
  """A `fast`-schema BlobProto as a float32 array of its declared shape."""
  if blob.data:
    values = np.frombuffer(blob.data, dtype='<f4')
  elif blob.double_data:
    values = np.frombuffer(blob.double_data, dtype='<f8')
  else:
    values = np.zeros((0,), np.float32)
  shape = blob_shape(blob)
  if int(np.prod(shape)) != values.size:
    raise ValueError(f'blob declares shape {shape} ({int(np.prod(shape))} values) but holds '
                     f'{values.size} values (unpacked or split encodings are not supported)')
  return values.astype(np.float32, copy=False).reshape(shape)


def read_net(data: bytes) -> tuple[str, list[tuple[str, str, list[np.ndarray]]]]:
  """Parses a serialized NetParameter: (net name, [(layer name, layer type, [blob arrays])]).

  Both the current `layer` field and the legacy V1 `layers` field are read (only layers that hold
  blobs are returned).
  """
  net = message_classes(fast=True)['NetParameter']()
  net.ParseFromString(data)
  layers = []
  for layer in net.layer:
    if layer.blobs:
      layers.append((layer.name, layer.type, [blob_array(b) for b in layer.blobs]))
  for layer in net.layers:
    if layer.blobs:
      kind = V1_LAYER_TYPES.get(layer.type, f'V1 type {layer.type}')
      layers.append((layer.name, kind, [blob_array(b) for b in layer.blobs]))
  return net.name, layers


def write_net(path, name: str, layers, *, legacy: bool = False,
              legacy_blob_shape: bool = None) -> None:
  """Writes a caffemodel with the faithful schema (tests and tools).

  Args:
    layers: [(layer name, layer type, [numpy blobs])]; type is a string such as 'Convolution'.
    legacy: write V1 `layers` (enum types) instead of `layer`.
    legacy_blob_shape: store blob shapes as (num, channels, height, width), padded on the left with
      ones as old Caffe did (default: the same as `legacy`).
  """
  classes = message_classes(fast=False)
  if legacy_blob_shape is None:
    legacy_blob_shape = legacy
  net = classes['NetParameter'](name=name)
  for layer_name, layer_type, blobs in layers:
    if legacy:
      layer = net.layers.add(name=layer_name, type=V1_LAYER_TYPE_IDS[layer_type])
    else:
      layer = net.layer.add(name=layer_name, type=layer_type)
    for array in blobs:
      array = np.asarray(array, np.float32)
      blob = layer.blobs.add()
      if legacy_blob_shape:
        if array.ndim > 4:
          raise ValueError(f'legacy blobs are at most 4-D, got {array.shape}')
        dims = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = dims
      else:
        blob.shape.dim.extend(array.shape)
      blob.data.extend(array.ravel().tolist())
  with open(path, 'wb') as f:
    f.write(net.SerializeToString())
