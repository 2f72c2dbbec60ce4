"""python -m histoseg.train.steptime: a tiny real run, and the fit check before it."""

from __future__ import annotations

import json

from histoseg.cli import run_main
from histoseg.train.steptime import main

TINY = ["--backbone", "mobilenetv2", "--alpha", "0.35", "--patch-size", "64", "--steps", "1"]


def test_a_tiny_configuration_runs_and_reports_its_memory(capsys):
    assert run_main(main, [*TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peak_bytes"] > result["bytes_before_step"] > 0
    assert len(result["step_s"]) == 1 and result["device"] == "CPU:0"


def test_a_configuration_predicted_not_to_fit_is_refused_before_it_is_built(monkeypatch, capsys):
    import histoseg.memory.devices as devices

    monkeypatch.setattr(devices, "available_bytes", lambda device: 1_000_000)  # 1 MB free
    assert run_main(main, TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predicted" in err[0] and "> 1 MB free" in err[0], err
    assert "--force" in err[0]
