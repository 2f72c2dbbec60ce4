"""histoseg: memory-aware training of segmentation models on gigapixel whole-slide images."""

import os

# TensorFlow's C++ start-up notes (CPU instructions and the like) would open every command's
# output; warnings and errors still show. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from histoseg.errors import HistosegError

__version__ = "0.1.0"

__all__ = ["HistosegError", "__version__"]
