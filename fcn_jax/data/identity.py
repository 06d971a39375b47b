"""One dataset identity everywhere: a run records its data (name, root, how masks are read,
where it is prepared, its splits) in every checkpoint as metadata['data'], and evaluation and
prediction read the same data from there unless told otherwise."""

from __future__ import annotations

import dataclasses
from typing import Any

from fcn_jax.data import eval_dataset, source_options

# What a command can override (flags of experiments.evaluate and fcn_jax.predict).
OVERRIDABLE = ('root', 'classes_file', 'val_fraction', 'ignore_label', 'image_suffix',
               'mask_suffix', 'data_dir', 'manual_dir')
DEFAULT_DATA_DIR = '~/tensorflow_datasets'


@dataclasses.dataclass(frozen=True)
class DataSpec:
  name: str
  split: str
  data_dir: str
  manual_dir: str | None
  options: dict            # get_data_source's root, val_fraction, ignore_label, ...
  from_checkpoint: bool    # the run's own data, read from its metadata

  def source_kwargs(self) -> dict[str, Any]:
    return {'data_dir': self.data_dir, 'manual_dir': self.manual_dir, **self.options}

  def describe(self) -> str:
    where = f' at {self.options["root"]}' if self.options.get('root') else ''
    told = " (the run's own data, from the checkpoint)" if self.from_checkpoint else ''
    return f'{self.name}{where}, split {self.split!r}{told}'


def resolve(metadata: dict, name: str = '', split: str = '',
            fallback: str = 'voc_segmentation/2011', **given) -> DataSpec:
  """The dataset a checkpoint is evaluated or run on: `name` / `split` / `given` where set (not
  None or ''), the rest from metadata['data'] when it is the dataset the run was trained on, else
  the defaults (`fallback` when no dataset is named or recorded)."""
  known = metadata.get('data') or {}
  name = name or known.get('name') or metadata.get('dataset') or fallback
  same = bool(known) and name == known.get('name')
  base = dict(known) if same else {}
  base.update({k: v for k, v in given.items() if k in OVERRIDABLE and v not in (None, '')})
  if same and not split:
    split = known.get('eval_split') or ''
  split = split or eval_dataset(name)[1]
  return DataSpec(name=name, split=split, data_dir=base.get('data_dir') or DEFAULT_DATA_DIR,
                  manual_dir=base.get('manual_dir') or None, options=source_options(base),
                  from_checkpoint=same)
