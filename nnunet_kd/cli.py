"""The exit convention every command of the package shares.

Bad input: ``error: <message>`` on stderr and exit status 1. Usage errors: argparse's message and
exit status 2. Success: 0.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn, Optional, Sequence, Tuple, Type

from nnunet_kd.nifti import NiftiError

#: Exceptions that mean bad input for every command (each command adds its own error types).
BAD_INPUT_ERRORS: Tuple[Type[BaseException], ...] = (NiftiError, FileNotFoundError, NotADirectoryError)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 1."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def command(*error_types: Type[BaseException]) -> Callable:
    """Decorate a command's ``main(argv) -> int``: the given exception types (and BAD_INPUT_ERRORS) become
    ``error: ...`` and exit 1; the return value (default 0) is the exit status."""
    handled = tuple(error_types) + BAD_INPUT_ERRORS

    def decorate(main: Callable[[Optional[Sequence[str]]], Optional[int]]):
        @functools.wraps(main)
        def wrapper(argv: Optional[Sequence[str]] = None) -> int:
            try:
                status = main(argv)
            except handled as e:
                fail(str(e))
            return 0 if status is None else int(status)

        return wrapper

    return decorate
