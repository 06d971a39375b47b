"""What every command line shares: one flag spelling (underscores, as the config fields and absl
flags are spelt) with the dashed spelling accepted too, and plain counts in messages."""

from __future__ import annotations

import argparse
from typing import Iterable, Sequence


def normalize_flags(argv: Sequence[str], known: Iterable[str]) -> list[str]:
  """`--max-size 5` / `--max-size=5` -> `--max_size ...` for the flags in `known` (names without
  dashes); anything else (values, positional arguments, --config.FIELD) is left as it is."""
  names = set(known)
  out = []
  for i, arg in enumerate(argv):
    if arg == '--':  # everything after is positional
      return out + list(argv[i:])
    if arg.startswith('--') and '-' in arg[2:].split('=', 1)[0]:
      name, sep, value = arg[2:].partition('=')
      fixed = name.replace('-', '_')
      bare = fixed[2:] if fixed.startswith('no') and fixed[2:] in names else fixed
      if bare in names or fixed in names:
        arg = f'--{fixed}{sep}{value}'
    out.append(arg)
  return out


class ArgumentParser(argparse.ArgumentParser):
  """argparse with flags defined in underscores that also accept dashes (--batch-size)."""

  def parse_known_args(self, args=None, namespace=None):
    import sys
    argv = sys.argv[1:] if args is None else list(args)
    known = [s[2:] for action in self._actions for s in action.option_strings if s.startswith('--')]
    return super().parse_known_args(normalize_flags(argv, known), namespace)


def absl_flags_parser(flag_values):
  """An absl `flags_parser` for app.run that accepts dashed spellings of the defined flags."""
  def parse(argv: list[str]) -> list[str]:
    from absl import flags
    try:
      return flag_values(argv[:1] + normalize_flags(argv[1:], flag_values))
    except flags.Error as e:
      import sys
      print(f'error: {e}\nPass --help to see the flags.', file=sys.stderr)
      raise SystemExit(2) from None
  return parse


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
  """'1 image', '2 images'."""
  return f'{count} {noun if count == 1 else (plural_form or noun + "s")}'
