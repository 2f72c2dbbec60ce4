"""histoseg: memory-aware training of segmentation models on gigapixel whole-slide images."""

from histoseg import startup
from histoseg.errors import HistosegError

# TensorFlow's start-up lines would open every command's output (histoseg.startup);
# warnings and errors still show, and --verbose shows everything.
startup.install()

__version__ = "0.1.0"

__all__ = ["HistosegError", "__version__"]
