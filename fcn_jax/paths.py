"""Where fcn_jax keeps what is not a user's output: one documented cache directory.

`cache_dir()` is $FCN_JAX_CACHE_DIR, else $XDG_CACHE_HOME/fcn_jax, else ~/.cache/fcn_jax. It
holds the XLA compilation cache (xla/, or jax's own $JAX_COMPILATION_CACHE_DIR when that is set:
`xla_cache_dir()`) and the demo's synthetic dataset with its prepared TFDS
files (synthetic/); everything there can be deleted at any time and is rebuilt on demand.
"""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
  if os.environ.get('FCN_JAX_CACHE_DIR'):
    return pathlib.Path(os.environ['FCN_JAX_CACHE_DIR']).expanduser()
  base = os.environ.get('XDG_CACHE_HOME') or '~/.cache'
  return pathlib.Path(base).expanduser() / 'fcn_jax'


def xla_cache_dir() -> pathlib.Path:
  """The persistent XLA compilation cache: jax's own $JAX_COMPILATION_CACHE_DIR when set (one cache
  for every jax program of the user's), else cache_dir()/xla."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return pathlib.Path(os.environ['JAX_COMPILATION_CACHE_DIR']).expanduser()
  return cache_dir() / 'xla'
