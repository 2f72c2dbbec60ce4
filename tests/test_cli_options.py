"""Every command-line module turns a bad option into one line on stderr and exit 2."""

from __future__ import annotations

import importlib

import pytest

from histoseg.cli import run_main

MODULES = [
    "bench.accuracy",
    "bench.cores",
    "bench.memory",
    "bench.plots",
    "bench.results_readme",
    "bench.scaling",
    "bench.torch_step",
    "bench.worker",
    "histoseg.models.__main__",
    "histoseg.scaling",
    "histoseg.train.cli",
    "histoseg.train.engines.selfcheck",
    "histoseg.train.launch",
    "histoseg.train.steptime",
    "histoseg.wsi.patches",
    "histoseg.wsi.synth",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_an_unknown_option_is_one_line_not_the_usage_block(module_name, capsys):
    module = importlib.import_module(module_name)
    assert run_main(module.main, ["--no-such-option"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    # the first thing argparse finds wrong: a required option missing, or the unknown one
    assert err[0].endswith("(see --help)"), err


def test_histoseg_without_a_command_prints_its_usage_to_stderr(capsys):
    from histoseg.__main__ import main

    assert main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("usage: histoseg <command>")
