"""Shared plumbing for histoseg's command-line entry points."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from histoseg.errors import ConfigError, HistosegError


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are a :class:`ConfigError`.

    Through :func:`run_main` a bad option is then one line on stderr (exit 2) naming the
    option, not argparse's whole usage block; ``--help`` is unchanged. Every command gets
    ``--verbose`` (see :mod:`histoseg.startup`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # read before TensorFlow is imported, by histoseg.startup; here for --help and parsing
        self.add_argument(
            "--verbose",
            action="store_true",
            help="show the frameworks' start-up and log lines (TensorFlow, absl)",
        )

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command unwinds as it does on Ctrl-C."""


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` turning a HistosegError into one line on stderr and its exit code.

    Every CLI module ends with ``raise SystemExit(run_main(main))`` so that a user error
    never shows a traceback, while a bug (any other exception) still does. SIGTERM ends the
    command as Ctrl-C does (exit 143 instead of 130): the signal is passed on to the
    command's own child processes, and the command unwinds, so a worker it waits for is
    ended (``subprocess.run`` kills it), temporary files are removed and results files stay
    as they were (see :func:`_sigterm_unwinds`).
    """
    try:
        with _sigterm_unwinds():
            return main(argv)
    except HistosegError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): nothing left to say, and no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


@contextlib.contextmanager
def _sigterm_unwinds():
    """While inside, SIGTERM passes itself on to this process's children and raises
    :class:`Terminated` in the main thread; the previous handler is back afterwards.

    Python's default for SIGTERM is to die at once, which leaves the worker processes a
    sweep waits for running (orphaned) and skips every ``finally``. The handler sends
    SIGTERM to the direct children (Linux: from /proc; a child that is itself a histoseg
    command does the same for its own), then unwinds. It is one-shot: a second SIGTERM gets
    the default action, so a command stuck in native code can still be ended at once.
    Outside the main thread (or where signals cannot be set) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for pid in child_pids():
            with contextlib.suppress(OSError):
                # a child in a session of its own is ended by whoever started it so
                # (bench.isolated ends its worker's whole group): one SIGTERM, not two
                if os.getsid(pid) == os.getsid(0):
                    os.kill(pid, signal.SIGTERM)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not settable here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def child_pids(pid: int | None = None) -> list[int]:
    """The process ids of ``pid``'s (default: this process's) direct children; [] where
    /proc does not say (not Linux)."""
    pid = os.getpid() if pid is None else pid
    found = []
    try:
        # every thread's children: a worker started from a thread is listed under it
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(child) for child in f.read().split()]
        except (OSError, ValueError):
            continue
    return sorted(set(found))


def printable(text: str | os.PathLike) -> str:
    """``text`` (or a path) safe to print on any stream: undecodable bytes become ``\\xff``.

    POSIX filenames may hold any bytes but NUL and ``/``; Python carries the ones that are
    not UTF-8 as lone surrogates, which ``print`` refuses to encode.
    """
    text = os.fspath(text) if isinstance(text, os.PathLike) else text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from a filename's bytes
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command a sweep was started with, as a user would type it (for ``extra["command"]``).

    Args:
        module: the ``-m`` module, e.g. ``"bench.accuracy"``.
        argv: the arguments given to ``main``; ``None`` means ``sys.argv[1:]``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(shlex.quote(part) for part in ["python", "-m", module, *args])


# --- outputs -------------------------------------------------------------------------------
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (through links, ``..`` and hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    force: bool = False,
    option: str = "--out",
) -> None:
    """Refuse, before any work, an output that would destroy an input or cannot be written.

    An output that is the same file as one of ``inputs`` (option name -> path, outputs
    named earlier included) is refused even with ``force``; an existing file
    needs ``force``; a folder is never replaced by a file; the nearest existing folder
    must accept a new file (checked by creating and removing one, as permissions alone
    miss read-only mounts and immutable folders, and root passes every ``access`` check).

    Raises:
        ConfigError: naming the option, the path and what to do instead.
    """
    shown = printable(path)
    for name, source in (inputs or {}).items():
        if source is not None and same_file(path, source):
            raise ConfigError(f"{option} {shown} is the {name} file; give another path")
    if os.path.isdir(path):
        raise ConfigError(f"{option} {shown} is a directory; give a file path")
    if os.path.lexists(path) and not force:
        raise ConfigError(f"{option} {shown} exists; pass --force to overwrite")
    _check_writable_from(os.path.dirname(os.path.abspath(path)), f"{option} {shown}")


def check_output_folder(path: str | os.PathLike, *, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written.

    The folder need not exist: the nearest existing one of it and its parents must be a
    folder that accepts a new file (probed, as in :func:`check_output`). Nothing is left
    behind, so a refused command does not leave an empty folder either.

    Raises:
        ConfigError: naming the option, the path and why.
    """
    shown = printable(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {shown} is a file; give a folder")
    _check_writable_from(os.path.abspath(path), f"{option} {shown}")


def _check_writable_from(folder: str, where: str) -> None:
    """The nearest existing one of ``folder`` and its parents accepts a new file."""
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{where}: {printable(folder)} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".histoseg-probe-", dir=folder)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot write in {printable(folder)} ({exc.strerror})"
        ) from None
    os.close(fd)
    os.unlink(probe)


# --- numeric options ---------------------------------------------------------------------
# argparse ``type=`` callables that refuse, at parse time, what no command can use: NaN,
# infinities and values out of range. Through ArgumentParser.error the refusal is one line
# naming the option, the value and the allowed range.


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_number(lo)}, {_number(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_number(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_number(hi)}"
    return "finite"


def finite_float(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], float]:
    """An argparse type: a finite float in [lo, hi] (an end excluded with ``lo_open`` /
    ``hi_open``).

    Example:
        >>> finite_float(0, 1)("0.5")
        0.5
        >>> finite_float(0, 1)("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be a finite number in [0, 1], got 'nan'
    """
    allowed = f"must be a finite number {_range_text(lo, hi, lo_open, hi_open)}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
        return value

    return parse


def int_in_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [lo, hi] (no upper bound when ``hi`` is None).

    Example:
        >>> int_in_range(32, 4096)("256")
        256
    """
    allowed = f"must be a whole number {_range_text(lo, hi, False)}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
        return value

    return parse


positive_int = int_in_range(1)
"""An argparse type: a whole number >= 1 (counts, steps, batch sizes)."""

non_negative_int = int_in_range(0)
"""An argparse type: a whole number >= 0 (levels, seeds)."""
