"""The one way histoseg writes a file: whole, with the user's mode, or not at all.

:func:`atomic_output` hands out a temporary sibling of the target to write to, and renames it
over the target only once the writer is done, so a crash, a full disk or Ctrl-C never leaves
half a file behind (nor a stray temporary file), and a reader never sees a partial one.
Results rows, CSVs, checkpoints, slide pyramids, probability maps, previews and plots all go
through it. (A process killed outright, SIGKILL, leaves its hidden ``.<name>.<random>.tmp``
behind; nothing reads such a file.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit, make it ``path``.

    The temporary file exists (empty) when the block starts; the writer replaces or fills
    it. On a clean exit it is synced to disk, given the mode a plain ``open(path, "w")``
    gives a new file (:func:`new_file_mode`, not mkstemp's 0600) and renamed over ``path``
    (atomic within a filesystem). If the block raises, it is removed and ``path`` is as it
    was. The temporary name is hidden and ends in ``suffix`` (".tmp"), never in the
    target's extension, so that a process killed mid-write leaves nothing a scan for
    slides, annotations or checkpoints would pick up; writers that add an extension to a
    path they are given (numpy's ``savez``) are given an open file instead.

    Example:
        >>> with atomic_output(tmp_dir / "rows.csv") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("a,b\\n1,2\\n")
    """
    with atomic_outputs([path], suffixes=[suffix]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_outputs(
    paths: Sequence[str | os.PathLike], *, suffixes: Sequence[str] | None = None
) -> Iterator[list[Path]]:
    """:func:`atomic_output` for files that belong together (a results JSON and its CSV):
    every file is synced before the first is renamed, so a failure while writing or
    syncing any of them leaves all of them as they were."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target, suffix in zip(targets, suffixes or [".tmp"] * len(targets), strict=True):
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
            os.close(fd)
            temps.append(Path(name))
        yield temps
        for tmp, target in zip(temps, targets, strict=True):
            try:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, new_file_mode())
            except OSError as exc:
                exc.filename = os.fspath(target)  # which file could not be made whole
                raise
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (nothing when None) for the block.

    Serialises what must not overlap between processes: timed runs on a shared machine,
    and read-merge-write of one results file by sweeps running side by side.
    """
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask (0644 under 022)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # /proc reads it without changing it; os.umask must set it to read it.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
