"""``python -m bench.results_readme``: rewrite results/README.md from its rows and plots.

The README's text is made by :mod:`bench.plots.readme`; this module is its command.

Examples:
    python -m bench.results_readme
    python -m bench.results_readme --results results/
"""

from bench.plots.readme import main
from histoseg.cli import run_main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
