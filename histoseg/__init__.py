"""histoseg: memory-aware training of segmentation models on gigapixel whole-slide images."""

from histoseg.errors import HistosegError

__version__ = "0.1.0"

__all__ = ["HistosegError", "__version__"]
