"""argparse that reports bad arguments as a ConfigError (see :class:`histoseg.cli.ArgumentParser`)."""

from histoseg.cli import ArgumentParser

__all__ = ["ArgumentParser"]
