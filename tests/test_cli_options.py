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
    "bench.worker",
    "histoseg.models.__main__",
    "histoseg.scaling.__main__",
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


def test_numeric_option_types_refuse_non_finite_and_out_of_range():
    import argparse

    from histoseg.cli import finite_float, int_in_range, positive_int

    unit = finite_float(0, 1)
    assert unit("0") == 0.0 and unit("1") == 1.0 and unit(" 0.25 ") == 0.25
    above_zero = finite_float(0, 4, lo_open=True)
    assert above_zero("4") == 4.0
    assert finite_float()("-1e300") == -1e300
    for parse, text in [
        (unit, "nan"),
        (unit, "inf"),
        (unit, "-0.001"),
        (unit, "1.0000001"),
        (unit, "0x1"),
        (above_zero, "0"),
        (finite_float(), "1e400"),
        (positive_int, "0"),
        (positive_int, "1.0"),
        (positive_int, "nan"),
        (int_in_range(32, 64), "65"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text!r}"):
            parse(text)
    assert positive_int("7") == 7 and int_in_range(32, 64)("64") == 64


def test_printable_shows_undecodable_bytes_and_never_raises():
    import os

    from histoseg.cli import printable

    name = os.fsdecode(b"slide_\xff.tif")
    assert printable(name) == "slide_\\xff.tif"
    assert printable("plain é") == "plain é"
    assert printable("\ud800 lone") == "\\ud800 lone"
    printable(name).encode("utf-8")  # printing it cannot fail


def test_same_file_sees_through_links_and_dots(tmp_path):
    from histoseg.cli import same_file

    target = tmp_path / "a.tif"
    target.write_text("x")
    (tmp_path / "link.tif").symlink_to(target)
    (tmp_path / "sub").mkdir()
    assert same_file(tmp_path / "link.tif", target)
    assert same_file(tmp_path / "sub" / ".." / "a.tif", target)
    assert same_file(tmp_path / "new.csv", tmp_path / "sub" / ".." / "new.csv")
    assert not same_file(tmp_path / "new.csv", target)


def test_every_documented_command_is_a_histoseg_command():
    """Each `python -m X` the README and docs/ give runs as `histoseg <command>` too."""
    import re
    from pathlib import Path

    from histoseg.__main__ import COMMANDS

    root = Path(__file__).resolve().parent.parent
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    documented = {m for t in texts for m in re.findall(r"python -m ([\w.]+)", t.read_text())}
    internal = {"pytest", "bench.worker", "bench.results_readme"}  # not user commands
    dispatched = {module for module, _ in COMMANDS.values()}
    assert documented - internal - dispatched == set()


@pytest.mark.parametrize("command", ["memory", "plots", "project", "evaluate"])
def test_histoseg_hands_a_command_its_arguments(command, capsys):
    from histoseg.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
