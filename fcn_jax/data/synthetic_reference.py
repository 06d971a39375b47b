"""Synthetic data for the paper's other datasets, in their official on-disk formats (tests and
demos): SIFT Flow, NYUDv2 (the reference's nyud.tar.gz) and PASCAL-Context."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image
from scipy import ndimage

from fcn_jax.data.classes import PASCAL_CONTEXT_CLASS_NAMES
from fcn_jax.data.reference import PASCAL_CONTEXT_LABELS_TXT_NAMES
from fcn_jax.data.synthetic_custom import render_colour_scene
from fcn_jax.data.synthetic_voc import save_jpeg

_SIFT_FLOW_SUBDIR = 'spatial_envelope_256x256_static_8outdoorcategories'
# render_colour_scene classes -> SIFT Flow semantic ids (1-based: sky, building, tree, person, car)
# and geometric ids (1 sky, 2 horizontal, 3 vertical).
_SIFT_SEMANTIC = (28, 6, 32, 18, 8)
_SIFT_GEOMETRIC = (1, 2, 3, 3, 2)


def _save_jpeg_in(path: pathlib.Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  save_jpeg(path, image)


def _savemat(path: pathlib.Path, **arrays) -> None:
  import scipy.io
  path.parent.mkdir(parents=True, exist_ok=True)
  scipy.io.savemat(path, arrays)


def _write_list(path: pathlib.Path, ids) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(f'{i}\n' for i in ids))


def write_sift_flow_tree(root, *, num_trainval: int, num_test: int, seed: int = 0,
                         size: int = 64) -> dict[str, list[str]]:
  """The SiftFlowDataset.zip layout: Images/<sub>/<id>.jpg, SemanticLabels/<sub>/<id>.mat and
  GeoLabels/<sub>/<id>.mat (key S; semantic 0 void, 1..33; geometric -1 void, 1..3), plus
  trainval.txt / test.txt lists (which replace the reference lists for this tree)."""
  root = pathlib.Path(root)
  splits = {'trainval': [f'coast_syn{i}' for i in range(num_trainval)],
            'test': [f'street_syn{i}' for i in range(num_test)]}
  for index, image_id in enumerate(splits['trainval'] + splits['test']):
    image, ids, _ = render_colour_scene(seed, index, len(_SIFT_SEMANTIC), size, size)
    void = ids == 255
    semantic = np.where(void, 0, np.asarray(_SIFT_SEMANTIC)[np.minimum(ids, 4)]).astype(np.uint8)
    geometric = np.where(void, -1, np.asarray(_SIFT_GEOMETRIC)[np.minimum(ids, 4)]).astype(np.int16)
    _save_jpeg_in(root / 'Images' / _SIFT_FLOW_SUBDIR / f'{image_id}.jpg', image)
    _savemat(root / 'SemanticLabels' / _SIFT_FLOW_SUBDIR / f'{image_id}.mat', S=semantic)
    _savemat(root / 'GeoLabels' / _SIFT_FLOW_SUBDIR / f'{image_id}.mat', S=geometric)
  for split, ids in splits.items():
    _write_list(root / f'{split}.txt', ids)
  return splits


def write_nyud_tree(root, *, num_train: int, num_val: int, num_test: int, seed: int = 0,
                    height: int = 48, width: int = 64) -> dict[str, list[str]]:
  """The reference's nyud.tar.gz layout: data/{images,depth,hha}/img_<id>.png (colour, 16-bit
  depth, HHA) and segmentation/img_<id>.mat (key segmentation, 0 void, 1..40), ids from 5001,
  plus train.txt / val.txt / test.txt (which replace the reference lists for this tree). Depth and
  HHA carry the class too (depth 1000 + 700 * class, HHA a second colouring)."""
  root = pathlib.Path(root)
  counts = {'train': num_train, 'val': num_val, 'test': num_test}
  splits, next_id = {}, 5001
  for split, count in counts.items():
    splits[split] = [str(next_id + i) for i in range(count)]
    next_id += count
  for index, image_id in enumerate(i for ids in splits.values() for i in ids):
    image, ids, _ = render_colour_scene(seed, index, 5, height, width)
    classes = np.minimum(ids, 4).astype(np.int64)
    rng = np.random.default_rng([seed, index, 11])
    depth = (1000 + 700 * classes + rng.integers(0, 50, classes.shape)).astype(np.uint16)
    hha = np.stack([(classes * 60) % 256, 255 - classes * 50, np.full_like(classes, 128)],
                   -1).astype(np.uint8)
    label = np.where(ids == 255, 0, classes + 1).astype(np.uint8)  # wall, floor, cabinet, ...
    name = f'img_{image_id}.png'
    for sub, array in (('images', image), ('hha', hha), ('depth', depth)):
      (root / 'data' / sub).mkdir(parents=True, exist_ok=True)
      Image.fromarray(array).save(root / 'data' / sub / name)
    _savemat(root / 'segmentation' / f'img_{image_id}.mat', segmentation=label)
  for split, ids in splits.items():
    _write_list(root / f'{split}.txt', ids)
  return splits


# PASCAL-Context labels.txt: 459 labels, 1-based; the 59 kept ones spelled as labels.txt spells
# them.
def _context_labels() -> list[str]:
  kept = [PASCAL_CONTEXT_LABELS_TXT_NAMES.get(n, n) for n in PASCAL_CONTEXT_CLASS_NAMES[1:]]
  others = [f'unused{i}' for i in range(459 - len(kept))]
  return sorted(kept + others)  # alphabetical, as labels.txt (accordion, aeroplane, ...)


# render_colour_scene classes -> labels.txt names: background stuff, then objects (three of them
# spelled differently from the 59-class names: table, bedclothes, cloth).
_CONTEXT_OBJECTS = ('unused7', 'table', 'bedclothes', 'cloth', 'person')


def write_pascal_context_tree(root, *, num_train: int, num_val: int, seed: int = 0,
                              height: int = 48, width: int = 64) -> dict[str, list[str]]:
  """VOCdevkit/VOC2010/{JPEGImages, ImageSets/Main/train.txt, val.txt}, PASCAL-Context's
  trainval/<id>.mat (key LabelMap: ids into labels.txt) and labels.txt ("id: name")."""
  root = pathlib.Path(root)
  voc = root / 'VOCdevkit' / 'VOC2010'
  labels = _context_labels()
  root.mkdir(parents=True, exist_ok=True)
  (root / 'labels.txt').write_text(''.join(f'{i}: {n}\n' for i, n in enumerate(labels, 1)))
  number = {n: i for i, n in enumerate(labels, 1)}
  splits = {'train': [f'2008_{i:06d}' for i in range(num_train)],
            'val': [f'2009_{i:06d}' for i in range(num_val)]}
  for index, image_id in enumerate(splits['train'] + splits['val']):
    image, ids, _ = render_colour_scene(seed, index, len(_CONTEXT_OBJECTS), height, width)
    # PASCAL-Context labels every pixel (no void): the borders take the object's label.
    filled = np.where(ids == 255, ndimage.grey_dilation(np.where(ids == 255, 0, ids), size=5), ids)
    label_map = np.asarray([number[n] for n in _CONTEXT_OBJECTS], np.uint16)[np.minimum(filled, 4)]
    _save_jpeg_in(voc / 'JPEGImages' / f'{image_id}.jpg', image)
    _savemat(root / 'trainval' / f'{image_id}.mat', LabelMap=label_map)
  for split, ids in splits.items():
    _write_list(voc / 'ImageSets' / 'Main' / f'{split}.txt', ids)
  return splits
