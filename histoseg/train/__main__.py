"""`python -m histoseg.train`: the training CLI (see histoseg.train.cli)."""

from histoseg.cli import run_main
from histoseg.train.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(run_main(main))
