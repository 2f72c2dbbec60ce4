"""bench.cores: the machine's own scaling over cores (real processes, short runs)."""

from __future__ import annotations

from bench.cores import main
from histoseg.cli import run_main


def test_prints_copy_and_matmul_rates_with_efficiency(capsys):
    assert main(["--processes", "2", "--seconds", "0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["kernel", "unit"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"copy", "matmul"}
    for fields in rows.values():
        alone, each, efficiency = float(fields[2]), float(fields[3]), fields[4]
        assert alone > 0 and each > 0 and efficiency.endswith("%")


def test_one_process_is_a_one_line_error(capsys):
    assert run_main(main, ["--processes", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
