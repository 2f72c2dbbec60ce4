"""``python -m bench.memory``: predict-only sweeps, resume, GPU-less skips, user errors."""

import json
import re

import pytest

from bench.memory import main
from histoseg.cli import run_main
from histoseg.errors import ConfigError
from histoseg.results import load_rows

ARGS = ["--backbone", "mobilenetv2", "--backbone-option", "alpha=0.35", "--quiet"]


def test_predict_only_writes_one_predicted_row_per_config(tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = [*ARGS, "--sizes", "64", "128", "--device", "cpu", "gpu", "--predict-only"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = load_rows(out)
    assert len(rows) == 4 and out.with_suffix(".csv").exists()
    # a GPU's figures are predicted without one: nothing runs
    assert all(r["status"] == "skipped" and r["predicted"]["peak_bytes"] > 0 for r in rows)
    assert all(r["reason"].startswith("predicted only") for r in rows)
    assert all(r["config"]["backbone_options"] == {"alpha": 0.35} for r in rows)
    assert "machine" in rows[0] and rows[0]["kind"] == "memory"
    table = capsys.readouterr().out
    assert "predicted" in table and "not measured" in table


def test_a_sample_keeps_the_precisions_asked_for(tmp_path):
    out = tmp_path / "m.json"
    argv = ["--sample", "6", "--precision", "mixed_bfloat16", "--predict-only", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    # the draw gives every precision a third of its configs; the others are left out
    assert [r["config"]["precision"] for r in load_rows(out)] == ["mixed_bfloat16"] * 2


def test_configs_that_cannot_fit_are_predicted_not_run(tmp_path, capsys):
    out = tmp_path / "m.json"
    # xception65 at 8192 px needs ~400 GB: more than this machine has free.
    assert main(["--sizes", "8192", "--out", str(out), "--quiet"]) == 0
    (row,) = load_rows(out)
    assert row["status"] == "skipped"
    assert row["reason"].startswith("predicted ") and "free" in row["reason"]
    assert row["predicted"]["peak_bytes"] > 100e9
    assert "measured" not in row


def test_device_memory_reports_the_largest_patch(tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = [*ARGS, "--sizes", "64", "--predict-only", "--device-memory", "1GB"]
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "largest patch whose predicted step peak fits 1.0 GB" in text
    assert " px (predicted peak " in text


def test_infer_mode_predicts_forward_passes_and_answers_the_largest_tile(tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = [*ARGS, "--sizes", "64", "--mode", "train", "infer", "--optimizer", "sgd"]
    argv += ["--remat", "none", "blocks", "--predict-only", "--device-memory", "1GB"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = load_rows(out)
    infer = [r for r in rows if r["config"].get("mode") == "infer"]
    train = [r for r in rows if "mode" not in r["config"]]
    # the train steps take both remat modes and SGD; the forward pass takes neither
    assert len(train) == 2 and {r["config"]["optimizer"] for r in train} == {"sgd"}
    (row,) = infer
    assert row["config"]["optimizer"] is None and row["config"]["remat"] == "none"
    assert 0 < row["predicted"]["activation_bytes"] < row["predicted"]["peak_bytes"]
    assert row["predicted"]["peak_bytes"] < min(r["predicted"]["peak_bytes"] for r in train)
    text = capsys.readouterr().out
    assert " infer " in text and " train " in text
    assert "largest patch whose predicted step peak fits 1.0 GB" in text
    assert "largest inference tile whose predicted forward-pass peak fits 1.0 GB" in text
    tile = text.split("largest inference tile")[1]
    assert "mobilenetv2 OS16 float32 batch 1: " in tile and " px (predicted peak " in tile


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--optimizer", "sgd"], "builds no optimizer"),
        (["--remat", "blocks"], "takes remat none"),
    ],
)
def test_infer_mode_alone_refuses_an_optimizer_or_recomputation(tmp_path, extra, expect):
    out = tmp_path / "m.json"
    with pytest.raises(ConfigError, match=expect):
        main([*ARGS, "--sizes", "64", "--mode", "infer", *extra, "--out", str(out)])
    assert not out.exists()


def test_bad_out_name_is_one_line_and_exit_2(tmp_path, capsys):
    assert run_main(main, ["--out", str(tmp_path / "m.txt"), "--predict-only"]) == 2
    assert "must end in .json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        main(["--backbone-option", "alpha", "--predict-only", "--out", str(tmp_path / "a.json")])


def test_worker_config_is_json_it_can_read():
    from histoseg.config import StepConfig

    text = StepConfig(patch_size=64, backbone="mobilenetv2").to_json()
    assert json.loads(text)["steps"] == 3


def test_a_failing_worker_becomes_an_error_row_naming_why():
    from bench.memory import run_worker
    from histoseg.config import StepConfig

    # A backbone option the builder refuses: the config is well-formed, the worker fails.
    config = StepConfig(
        patch_size=64, backbone="mobilenetv2", backbone_options=(("no_such_option", 1),), steps=1
    )
    row = run_worker(config)
    assert row["status"] == "error"
    assert "worker exited with 2" in row["reason"] and "no_such_option" in row["reason"]
    assert row["config"]["backbone_options"] == {"no_such_option": 1}


def test_repeats_below_one_are_refused_before_any_work(tmp_path):
    out = tmp_path / "m.json"
    with pytest.raises(
        ConfigError, match=re.escape("--repeats: must be a whole number >= 1, got '0'")
    ):
        main([*ARGS, "--sizes", "64", "--repeats", "0", "--out", str(out)])
    assert not out.exists()


@pytest.mark.slow  # three worker processes, ~40 s; the choice of row is tested just below
def test_repeated_config_keeps_the_median_process_and_every_figure(tmp_path, capsys):
    """--repeats: several fresh worker processes, the median one's row, all their figures."""
    out = tmp_path / "m.json"
    argv = [*ARGS, "--sizes", "64", "--steps", "1", "--repeats", "3", "--out", str(out)]
    assert main(argv) == 0
    (row,) = load_rows(out)
    assert row["status"] == "ok" and row["predicted"]["peak_bytes"] > 0
    repeats = row["extra"]["repeats"]
    assert len(repeats) == 3 and all(r["activation_bytes"] > 0 for r in repeats)
    middle = sorted(r["activation_bytes"] for r in repeats)[1]
    assert row["measured"]["activation_bytes"] == middle
    capsys.readouterr()
    assert main(["--show", "--markdown", "--out", str(out)]) == 0
    assert ", 3 runs) |" in capsys.readouterr().out


def test_the_median_process_is_one_whole_row_and_failures_are_kept():
    from bench.memory import median_process
    from histoseg.results import make_row

    def measured(act, peak):
        return make_row(
            "memory", {"patch_size": 64}, measured={"activation_bytes": act, "peak_bytes": peak}
        )

    rows = [measured(30, 300), measured(10, 100), measured(20, 250), measured(40, 400)]
    rows.append(make_row("memory", {"patch_size": 64}, status="oom", reason="killed"))
    row = median_process(rows)
    # four measured: the lower middle, its own peak beside it
    assert (row["measured"]["activation_bytes"], row["measured"]["peak_bytes"]) == (20, 250)
    assert [r["activation_bytes"] for r in row["extra"]["repeats"]] == [30, 10, 20, 40]
    assert row["extra"]["failed_repeat"] == "oom: killed"
    failed = make_row("memory", {"patch_size": 64}, status="error", reason="bad")
    assert median_process([failed]) is failed


def test_the_worker_runs_one_profiler_at_a_time(tmp_path, capsys):
    from bench.worker import main as worker_main

    argv = ["--config", "{}", "--allocator-trace", "--allocator-events", str(tmp_path / "e.json")]
    assert run_main(worker_main, argv) == 2
    assert "one profiler at a time" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
    argv = ["--config", "{}", "--allocator-events", str(tmp_path / "missing" / "e.json")]
    assert run_main(worker_main, argv) == 2
    assert "no such folder" in capsys.readouterr().err


def test_allocator_trace_records_the_chunk_waste_of_a_profiled_step():
    from bench.memory import run_worker
    from histoseg.config import StepConfig

    # Large enough that the step's allocator reads show up as totals in the trace.
    config = StepConfig(patch_size=256, backbone="mobilenetv2", steps=1)
    row = run_worker(config, allocator_trace=True)
    assert row["status"] == "ok", row.get("reason")
    assert "allocator_trace_note" not in row["extra"]
    trace = row["extra"]["allocator_trace"]
    assert trace["activation_chunk_waste_bytes"] >= 0 and trace["peak_chunk_waste_bytes"] >= 0
    # the traced step's peak is one of the allocator's totals: never above its step peak
    assert 0 < trace["traced_peak_bytes"] <= row["measured"]["peak_bytes"] * 1.01


@pytest.mark.slow  # a second profiled step, ~14 s; the placed trace above runs in CI
def test_a_trace_that_cannot_be_placed_is_a_row_note_not_a_silence():
    from bench.memory import run_worker
    from histoseg.config import StepConfig

    # At 64 px with alpha 0.35 the step's reads are not among the trace's running totals.
    config = StepConfig(
        patch_size=64, backbone="mobilenetv2", backbone_options=(("alpha", 0.35),), steps=1
    )
    row = run_worker(config, allocator_trace=True)
    assert row["status"] == "ok", row.get("reason")
    assert "allocator_trace" not in row["extra"]
    assert row["extra"]["allocator_trace_note"].startswith("not recorded: ")
