"""``python -m bench.plots``: see :mod:`bench.plots`."""

from bench.plots import main
from histoseg.cli import run_main

raise SystemExit(run_main(main))
