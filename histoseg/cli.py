"""Shared plumbing for histoseg's command-line entry points."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from histoseg.errors import ConfigError, HistosegError


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are a :class:`ConfigError`.

    Through :func:`run_main` a bad option is then one line on stderr (exit 2) naming the
    option, not argparse's whole usage block; ``--help`` is unchanged.
    """

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` turning a HistosegError into one line on stderr and its exit code.

    Every CLI module ends with ``raise SystemExit(run_main(main))`` so that a user error
    never shows a traceback, while a bug (any other exception) still does.
    """
    try:
        return main(argv)
    except HistosegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
