"""Quiet start-up: TensorFlow's import-time log lines are kept off the user's terminal.

While ``tensorflow`` is imported, its C++ side logs through absl before anything has set up
absl's logging ("All log messages before absl::InitializeLog() is called are written to
STDERR", "oneDNN custom operations are on ..."), and ``TF_CPP_MIN_LOG_LEVEL`` does not
reach those lines. So the first import of ``tensorflow`` runs with file descriptor 2 pointed
at a temporary file; afterwards every captured line is written back to stderr except those
start-up lines, and all of them when the import fails.

``--verbose`` on any histoseg command (or ``HISTOSEG_VERBOSE=1``) leaves the import and
TensorFlow's log level alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

#: The lines TensorFlow logs while it is imported that say nothing to a histoseg user.
STARTUP_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\..*)$"
)


def verbose() -> bool:
    """True when the user asked for the framework's own log lines (in this process or the
    command that started it: ``--verbose`` is passed on to worker processes as the variable)."""
    if "--verbose" in sys.argv[1:]:
        os.environ["HISTOSEG_VERBOSE"] = "1"
    return os.environ.get("HISTOSEG_VERBOSE", "") not in ("", "0")


@contextmanager
def _stderr_filtered() -> Iterator[None]:
    """Send fd 2 to a temporary file for the block; replay what is not start-up noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = [line for line in lines if failed or not STARTUP_NOISE.match(line.rstrip())]
            if kept:
                os.write(2, b"".join(kept))


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _stderr_filtered():
            self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # as if never wrapped


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and wraps its loader, once."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and out of the way of the search below
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Turn on the CPU allocator's statistics and quiet the first import of TensorFlow in
    this process (the latter unless :func:`verbose`)."""
    if "tensorflow" in sys.modules:
        return
    # Every CPU memory figure is read from the allocator statistics of TensorFlow's oneDNN
    # build (get_memory_info("CPU:0")). TensorFlow turns oneDNN on by itself only on CPUs
    # with AVX-512 VNNI, BF16 or AMX; on an AVX2-only CPU the statistics do not exist and
    # every memory probe fails. A user's own value wins.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # later C++ notes; a user's value wins
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
