"""argparse that reports bad arguments as a ConfigError (one line on stderr, exit 2)."""

from __future__ import annotations

import argparse
from typing import NoReturn

from histoseg.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors go through ``histoseg.cli.run_main``."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")
