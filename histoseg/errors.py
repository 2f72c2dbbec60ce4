"""The one error family of histoseg: every failure a user can cause is a HistosegError.

CLIs catch it once in ``main(argv) -> int`` and print its message as one line on stderr.
Messages say what was received, what is allowed, and which file or value.
"""

from __future__ import annotations


class HistosegError(Exception):
    """Base class of every error histoseg raises on purpose (bad input, bad config)."""

    exit_code = 2


class SlideError(HistosegError):
    """A slide file is missing, corrupt, unsupported, or lacks what the caller needs."""


class AnnotationError(HistosegError):
    """An annotation file (ASAP XML) is malformed or names unknown groups."""


class ConfigError(HistosegError):
    """A configuration value is outside what is allowed (patch size, backbone, ...)."""


class ResultsError(HistosegError):
    """A results file is unreadable or holds rows of another schema."""


class EngineUnavailableError(HistosegError):
    """An engine or framework was asked for and is not installed or usable: a distributed
    engine (horovod, tf), or PyTorch for Keras's torch backend."""


class OutOfMemoryError(HistosegError):
    """A configuration is predicted or observed not to fit in the available memory."""
