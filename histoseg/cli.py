"""Shared plumbing for histoseg's command-line entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from histoseg.errors import HistosegError


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
