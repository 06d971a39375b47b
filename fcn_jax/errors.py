"""User-facing errors: a mistake in a path, an option or a file, which the command-line tools print
as one message (what is wrong, where, what to do) instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


class UserError(Exception):
  """A mistake the user can fix (a missing file, a bad option value, an incompatible workdir)."""


class Preempted(Exception):
  """Training stopped on SIGTERM / SIGINT after saving a checkpoint; the same command resumes."""

  def __init__(self, message: str, signal_name: str):
    super().__init__(message)
    self.signal_name = signal_name


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = {'SIGINT': 130, 'SIGTERM': 143}  # 128 + the signal number, as shells report it


def exit_code(error: BaseException) -> int:
  if isinstance(error, Preempted):
    return EXIT_INTERRUPTED.get(error.signal_name, 1)
  return EXIT_USER_ERROR


@contextlib.contextmanager
def user_errors_as_exit() -> Iterator[None]:
  """Inside a CLI's main: UserError / Preempted -> the message on stderr and an exit status."""
  try:
    yield
  except (UserError, Preempted) as e:
    print(f'{"error: " if isinstance(e, UserError) else ""}{e}', file=sys.stderr)
    raise SystemExit(exit_code(e)) from None


def cli(main: Callable[..., int | None]) -> Callable[..., int | None]:
  """Decorator form of `user_errors_as_exit` for argparse mains."""
  def wrapped(*args, **kwargs):
    with user_errors_as_exit():
      return main(*args, **kwargs)
  wrapped.__doc__, wrapped.__name__ = main.__doc__, main.__name__
  return wrapped
