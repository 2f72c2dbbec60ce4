"""`histoseg <command> ...`: one entry point over the package's command-line modules."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from histoseg.cli import run_main

# command -> (module with a main(argv) -> int, one-line summary). The harness's commands are
# handed to their bench module by name: no histoseg module imports bench.
COMMANDS = {
    "train": ("histoseg.train", "train DeepLabV3+ on slides (one process or many)"),
    "launch": ("histoseg.train.launch", "start N training workers (horovodrun or tf.distribute)"),
    "selfcheck": ("histoseg.train.engines.selfcheck", "check that N workers train like one"),
    "model": ("histoseg.models", "summarise a model: parameters, multiply-adds, output shape"),
    "steptime": ("histoseg.train.steptime", "time N train steps on random data"),
    "synth": ("histoseg.wsi.synth", "write synthetic pyramidal slides with ASAP annotations"),
    "patches": ("histoseg.wsi.patches", "list the patches a slide yields (CSV, preview)"),
    "ceiling": ("histoseg.wsi.ceiling", "best score a patch size allows on a synthetic task"),
    "infer": ("histoseg.infer", "run a checkpoint over slides: probability pyramid, overlay"),
    "evaluate": ("histoseg.infer.evaluate", "CAMELYON16 slide AUC and lesion FROC of inferences"),
    "project": ("histoseg.scaling", "project weak-scaling efficiency to N workers (a model)"),
    "memory": ("bench.memory", "memory per patch size: measured, predicted, largest that fits"),
    "accuracy": ("bench.accuracy", "what a bigger patch buys: each size on the same pixel budget"),
    "scaling": ("bench.scaling", "weak scaling over workers, measured beside the projection"),
    "cores": ("bench.cores", "does this machine scale over its cores at all?"),
    "plots": ("bench.plots", "draw the figures and the README of a results folder"),
    "spatial": ("bench.spatial", "one patch split over N ranks: check it equals the whole step"),
}


def _usage() -> str:
    lines = ["usage: histoseg <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `histoseg <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its command module's ``main``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        # asked for: stdout, exit 0; no command at all is a usage error: stderr, exit 2
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    module_name = COMMANDS[name][0]
    module = importlib.import_module(module_name)
    if not hasattr(module, "main"):  # a package whose CLI lives in its __main__ module
        module = importlib.import_module(f"{module_name}.__main__")
    return run_main(module.main, rest)


def entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
