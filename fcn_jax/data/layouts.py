"""Where a user dataset's images and masks are: one reader per on-disk layout, each giving
{split: [Example]} without reading any image.

Layouts (`config.dataset.name`, with `config.dataset.root=ROOT`):

- `folder`: ROOT/images/<id>.jpg|jpeg|png|tif|tiff, ROOT/masks/<id>.png, optional
  ROOT/splits/<split>.txt (one id per line). Without splits/, a deterministic `train` / `val`
  split by `val_fraction` (ids ordered by a hash of the id, so adding images keeps the others
  where they were).
- `voc_like`: ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png,
  ROOT/ImageSets/Segmentation/<split>.txt.
- `coco`: ROOT/annotations/instances_<split>.json with the images in ROOT/images/ (or at the json's
  `file_name` paths, relative to ROOT or absolute).
- `pairs`: list files of `image mask` path pairs, one pair per line, one file per split
  (ROOT/<split>.txt, or in ROOT/lists/, ROOT/list/ or ROOT/splits/), as DeepLab and SegNet ship
  them. A path is taken as given, else relative to the list's folder or ROOT, else by its trailing
  components under those (so `/SegNet/CamVid/train/a.png` finds ROOT/train/a.png).
- `split_folders`: one image folder and one mask folder per split: ROOT/<split>/ with
  ROOT/<split>annot/ (or <split>_labels, <split>_masks, ...), as CamVid ships; or mmsegmentation's
  ROOT/img_dir/<split>/ with ROOT/ann_dir/<split>/. An image `<id><image_suffix>` pairs with the
  mask `<id><mask_suffix>` (default: the same file stem, any image extension, a .png mask).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any

from fcn_jax.data.builders import DataError, MissingDataError

FORMATS = ('folder', 'coco', 'voc_like', 'pairs', 'split_folders')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.tif', '.tiff')  # TIFF: bands as stored
# Mask folder names beside an image folder <split> (CamVid: train/ + trainannot/).
MASK_DIR_SUFFIXES = ('annot', '_annot', '_annotations', 'label', '_label', 'labels', '_labels',
                     '_masks', '_mask', '_gt', '_seg')
LIST_DIRS = ('', 'lists', 'list', 'splits')
# mmsegmentation's layout: ROOT/<image dir>/<split>/ beside ROOT/<mask dir>/<split>/.
MMSEG_DIRS = (('img_dir', 'ann_dir'), ('images', 'annotations'), ('images', 'masks'))
CLASSES_TXT = 'classes.txt'


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  image: pathlib.Path
  mask: pathlib.Path | None = None              # every layout but coco
  coco: tuple | None = None                     # (json path, image record, annotations)


@dataclasses.dataclass(frozen=True)
class Options:
  """How to read a layout: the folder layout's val share, split_folders' file-name suffixes."""
  val_fraction: float = 0.1
  image_suffix: str = ''
  mask_suffix: str = ''


def _split_by_fraction(ids: list[str], val_fraction: float) -> dict[str, list[str]]:
  order = sorted(ids, key=lambda i: hashlib.md5(i.encode()).hexdigest())
  n_val = int(round(len(ids) * val_fraction))
  if val_fraction > 0 and len(ids) > 1:
    n_val = min(max(n_val, 1), len(ids) - 1)
  val = set(order[:n_val])
  return {'train': sorted(i for i in ids if i not in val), 'val': sorted(val)}


def _read_split_lists(directory: pathlib.Path) -> dict[str, list[str]]:
  splits = {}
  for path in sorted(directory.glob('*.txt')):
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
      raise DataError(f'{path}: duplicate ids {dupes[:10]}')
    splits[path.stem] = ids
  return splits


def _files_by_stem(directory: pathlib.Path, suffixes, what: str) -> dict[str, pathlib.Path]:
  out: dict[str, pathlib.Path] = {}
  for path in sorted(directory.iterdir()):
    if path.is_file() and path.suffix.lower() in suffixes:
      if path.stem in out:
        raise DataError(f'duplicate id {path.stem!r}: {out[path.stem]} and {path} are both {what}')
      out[path.stem] = path
  return out


def _has_files(directory: pathlib.Path) -> bool:
  return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in directory.iterdir())


# --------------------------------------------------------------------------------------------------
# folder, voc_like, coco


def folder_source(root: pathlib.Path, options: Options) -> dict[str, list[Example]]:
  images_dir, masks_dir = root / 'images', root / 'masks'
  for d in (images_dir, masks_dir):
    if not d.is_dir():
      raise MissingDataError(f'{d} does not exist: the folder format is '
                             f'ROOT/images/<id>.jpg|png|tif, ROOT/masks/<id>.png, '
                             f'ROOT/classes.txt[, ROOT/splits/<split>.txt]')
  images = _files_by_stem(images_dir, IMAGE_SUFFIXES, 'images')
  masks = {p.stem: p for p in sorted(masks_dir.glob('*.png'))}
  if (root / 'splits').is_dir():
    split_ids = _read_split_lists(root / 'splits')
  else:
    split_ids = _split_by_fraction(sorted(images), options.val_fraction)
  return {s: [Example(i, images.get(i, images_dir / f'{i}.jpg'),
                      masks.get(i, masks_dir / f'{i}.png'))
              for i in ids] for s, ids in split_ids.items()}


def voc_like_source(root: pathlib.Path, options: Options) -> dict[str, list[Example]]:
  del options
  lists = root / 'ImageSets' / 'Segmentation'
  for d in (root / 'JPEGImages', root / 'SegmentationClass', lists):
    if not d.is_dir():
      raise MissingDataError(f'{d} does not exist: the voc_like format is '
                             'ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png, '
                             'ROOT/ImageSets/Segmentation/<split>.txt and ROOT/classes.txt')
  images = _files_by_stem(root / 'JPEGImages', IMAGE_SUFFIXES, 'images')
  return {s: [Example(i, images.get(i, root / 'JPEGImages' / f'{i}.jpg'),
                      root / 'SegmentationClass' / f'{i}.png') for i in ids]
          for s, ids in _read_split_lists(lists).items()}


def coco_files(root: pathlib.Path) -> list[pathlib.Path]:
  files = sorted((root / 'annotations').glob('instances_*.json'))
  if not files:
    raise MissingDataError(f'no {root}/annotations/instances_<split>.json: the coco format is '
                           'ROOT/annotations/instances_<split>.json with the images in '
                           'ROOT/images/')
  return files


def load_coco_json(path: pathlib.Path) -> dict:
  import json
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: not a readable COCO json ({e})') from None
  for key in ('images', 'annotations', 'categories'):
    if key not in data:
      raise DataError(f'{path}: no "{key}" list (not a COCO instances json?)')
  return data


def coco_categories(root: pathlib.Path) -> list[dict]:
  """The categories of the first instances json (every split must list the same)."""
  return load_coco_json(coco_files(root)[0])['categories']


def coco_source(root: pathlib.Path, options: Options) -> dict[str, list[Example]]:
  del options
  splits, categories = {}, None
  for path in coco_files(root):
    split = path.stem[len('instances_'):]
    data = load_coco_json(path)
    names = [c['name'] for c in data['categories']]
    if categories is None:
      categories = names
    elif names != categories:
      raise DataError(f'{path}: categories {names[:5]}... differ from the other splits\' '
                      f'{categories[:5]}...: every json must list the same categories in one order')
    by_image: dict[Any, list] = {}
    for ann in data['annotations']:
      by_image.setdefault(ann['image_id'], []).append(ann)
    examples, seen = [], {}
    for record in data['images']:
      name = str(record['file_name'])
      candidates = [root / 'images' / name, root / 'images' / pathlib.Path(name).name, root / name,
                    pathlib.Path(name)]
      image = next((c for c in candidates if c.is_file()), candidates[0])
      image_id = pathlib.Path(name).with_suffix('').as_posix()
      if image_id in seen:
        raise DataError(f'{path}: duplicate image {name!r} (ids {seen[image_id]} and '
                        f'{record["id"]})')
      seen[image_id] = record['id']
      examples.append(Example(image_id, image, coco=(path, record, by_image.get(record['id'], []))))
    splits[split] = examples
  return splits


# --------------------------------------------------------------------------------------------------
# pairs


def _is_pairs_list(path: pathlib.Path) -> bool:
  if path.name == CLASSES_TXT or not path.is_file():
    return False
  for line in path.read_text(errors='replace').splitlines():
    if line.strip() and not line.lstrip().startswith('#'):
      parts = line.split()
      return len(parts) == 2 and all(pathlib.Path(p).suffix.lower() in IMAGE_SUFFIXES
                                     for p in parts)
  return False


def pair_lists(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """{split: list file} of a pairs dataset (cheap: reads the first line of each .txt)."""
  out: dict[str, pathlib.Path] = {}
  for sub in LIST_DIRS:
    directory = root / sub
    if directory.is_dir():
      for path in sorted(directory.glob('*.txt')):
        if path.stem not in out and _is_pairs_list(path):
          out[path.stem] = path
  return out


def resolve_listed(name: str, bases: list[pathlib.Path]) -> pathlib.Path:
  """A path from a list file: as given, else under each base, else its trailing components under
  each base (longest first). The first candidate when none exists (for the error message)."""
  path = pathlib.Path(name)
  if path.is_absolute() and path.exists():
    return path
  parts = path.parts[1:] if path.is_absolute() else path.parts
  for start in range(len(parts)):
    for base in bases:
      candidate = base.joinpath(*parts[start:])
      if candidate.is_file():
        return candidate
  return bases[0].joinpath(*parts)


def pairs_source(root: pathlib.Path, options: Options) -> dict[str, list[Example]]:
  del options
  lists = pair_lists(root)
  if not lists:
    raise MissingDataError(
        f'{root}: no list of `image mask` pairs: the pairs format is ROOT/<split>.txt (or '
        f'ROOT/lists/<split>.txt) with one `path/to/image.jpg path/to/mask.png` line per example')
  splits = {}
  for split, path in lists.items():
    bases = [path.parent, root]
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip() or line.lstrip().startswith('#'):
        continue
      parts = line.split()
      if len(parts) != 2:
        raise DataError(f'{path}:{number}: expected `image mask`, got {line.strip()!r}')
      image, mask = (resolve_listed(p, bases) for p in parts)
      examples.append(Example(image.stem, image, mask))
    splits[split] = examples
  return splits


# --------------------------------------------------------------------------------------------------
# split_folders


def split_folder_pairs(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  """{split: (image folder, mask folder)} of a split_folders dataset (lists folders only)."""
  out: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}
  for image_dir, mask_dir in MMSEG_DIRS:
    images, masks = root / image_dir, root / mask_dir
    if images.is_dir() and masks.is_dir():
      for sub in sorted(p for p in images.iterdir() if p.is_dir()):
        if (masks / sub.name).is_dir():
          out[sub.name] = (sub, masks / sub.name)
      if out:
        return out
  for directory in sorted(p for p in root.iterdir() if p.is_dir()):
    for suffix in MASK_DIR_SUFFIXES:
      masks = root / f'{directory.name}{suffix}'
      if masks.is_dir() and _has_files(directory):
        out[directory.name] = (directory, masks)
        break
  return out


def _strip(name: str, suffix: str) -> str | None:
  if suffix:
    return name[:-len(suffix)] if name.endswith(suffix) else None
  return pathlib.Path(name).stem


def split_folders_source(root: pathlib.Path, options: Options) -> dict[str, list[Example]]:
  pairs = split_folder_pairs(root)
  if not pairs:
    raise MissingDataError(
        f'{root}: no image and mask folders per split: the split_folders format is ROOT/<split>/ '
        'with ROOT/<split>annot/ (or <split>_labels, <split>_masks), or ROOT/img_dir/<split>/ '
        'with ROOT/ann_dir/<split>/')
  splits = {}
  for split, (image_dir, mask_dir) in pairs.items():
    suffixes = (options.image_suffix,) if options.image_suffix else IMAGE_SUFFIXES
    images: dict[str, pathlib.Path] = {}
    for path in sorted(image_dir.iterdir()):
      stem = _strip(path.name, options.image_suffix)
      matches = any(path.name.lower().endswith(s.lower()) for s in suffixes)
      if path.is_file() and stem is not None and matches:
        if stem in images:
          raise DataError(f'duplicate id {stem!r}: {images[stem]} and {path} are both images')
        images[stem] = path
    mask_suffix = options.mask_suffix or '.png'
    splits[split] = [Example(i, p, mask_dir / f'{i}{mask_suffix}') for i, p in images.items()]
  return splits


SOURCES = {'folder': folder_source, 'voc_like': voc_like_source, 'coco': coco_source,
           'pairs': pairs_source, 'split_folders': split_folders_source}


def source_splits(fmt: str, root: pathlib.Path,
                  options: Options = Options()) -> dict[str, list[Example]]:
  """{split: [Example]} of a user dataset (lists files; reads no image)."""
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise MissingDataError(f'dataset root {root} does not exist (config.dataset.root / --root)')
  if fmt not in SOURCES:
    raise DataError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
  return SOURCES[fmt](root, options)


def split_names(fmt: str, root: str | pathlib.Path) -> list[str]:
  """The split names a source will have (cheap: lists files, reads no image)."""
  root = pathlib.Path(root).expanduser()
  if fmt == 'folder':
    splits = root / 'splits'
    return sorted(p.stem for p in splits.glob('*.txt')) if splits.is_dir() else ['train', 'val']
  if fmt == 'voc_like':
    return sorted(p.stem for p in (root / 'ImageSets' / 'Segmentation').glob('*.txt'))
  if fmt == 'pairs':
    return sorted(pair_lists(root))
  if fmt == 'split_folders':
    return sorted(split_folder_pairs(root))
  return sorted(p.stem[len('instances_'):] for p in (root / 'annotations').glob('instances_*.json'))


def detect(root: pathlib.Path) -> str | None:
  """The layout of a dataset directory, from the folders and lists present (None: unknown)."""
  if (root / 'annotations').is_dir() and list((root / 'annotations').glob('instances_*.json')):
    return 'coco'
  if (root / 'JPEGImages').is_dir():
    return 'voc_like'
  if (root / 'images').is_dir() and _has_files(root / 'images'):
    return 'folder'
  if split_folder_pairs(root):
    return 'split_folders'
  if pair_lists(root):
    return 'pairs'
  return None
