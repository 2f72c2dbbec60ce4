"""The accuracy sweep's logic: pixel budget -> steps, memory plans and skip reasons, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import accuracy, accuracy_rows, accuracy_table
from histoseg.errors import ConfigError
from histoseg.results import load_rows, write_rows

REPO = Path(__file__).resolve().parents[2]
GB = 10**9


def test_steps_follow_the_pixel_budget():
    assert accuracy.steps_for_budget(2e8, 1, 256) == 3052  # 2e8 / 65,536 = 3051.8
    assert accuracy.steps_for_budget(2e8, 2, 1024) == 95
    assert accuracy.steps_for_budget(1e3, 1, 2048) == 1  # never zero steps
    with pytest.raises(ConfigError, match="pixel budget"):
        accuracy.steps_for_budget(0, 1, 256)


def _predict(patch_size, precision, remat):
    """A fake memory model: 2 kB per pixel, halved by block remat, 0.7x with bf16."""
    peak = patch_size**2 * 2000
    if remat == "blocks":
        peak //= 2
    if precision == "mixed_bfloat16":
        peak = int(peak * 0.7)
    return peak


def _plan(size, **kw):
    options = {
        "steps": 10,
        "precision": "float32",
        "remat": "none",
        "memory_budget_bytes": 5 * GB,
        "allow_remat": False,
        "allow_bf16": False,
        "predict": _predict,
    }
    options.update(kw)
    return accuracy.plan_size(size, **options)


def test_plan_runs_as_asked_when_it_fits():
    plan = _plan(1024)
    assert plan.run and (plan.precision, plan.remat) == ("float32", "none")
    assert plan.predicted_peak_bytes == 1024**2 * 2000


def test_plan_skips_with_the_reason_when_nothing_allowed_fits():
    plan = _plan(2048)
    assert not plan.run
    assert plan.reason.startswith(
        "predicted peak + error band > 5.0 GB budget (float32/remat none: 8.4 GB + 520 MB band)"
    )
    assert "--allow-remat / --allow-bf16 may make it fit" in plan.reason


def test_plan_uses_remat_then_bf16_where_allowed():
    assert (_plan(2048, allow_remat=True).remat, _plan(2048, allow_remat=True).precision) == (
        "blocks",
        "float32",
    )
    plan = _plan(2048, allow_bf16=True, memory_budget_bytes=7 * GB)  # 5.9 GB + band
    assert (plan.precision, plan.remat, plan.run) == ("mixed_bfloat16", "none", True)
    both = _plan(2560, allow_remat=True, allow_bf16=True)  # 13.1 GB -> 6.6 -> 9.2 -> 4.6
    assert (both.precision, both.remat) == ("mixed_bfloat16", "blocks")
    assert _plan(4096, predict=lambda *a: None).run  # no prediction: run as asked


def test_plan_holds_the_prediction_to_the_planning_band_not_the_raw_peak():
    """A peak just under the budget is refused: the band the fit check uses applies here too."""
    from histoseg.memory.devices import planned_bytes

    peak = 1024**2 * 2000  # 2.1 GB
    assert not _plan(1024, memory_budget_bytes=peak + 1).run
    assert _plan(1024, memory_budget_bytes=planned_bytes(peak)).run


class FakeRunner:
    """Stands in for the training worker: records specs, returns fixed metrics."""

    def __init__(self, status="ok"):
        self.specs = []
        self.status = status

    def __call__(self, spec):
        self.specs.append(spec)
        if self.status != "ok":
            return {"status": self.status, "reason": "ResourceExhaustedError: OOM when allocating"}
        size = spec["config"]["patch_size"]
        return {
            "status": "ok",
            "metrics": {"accuracy": 0.8, "miou": 0.6, "auc": 0.9, "val_patches": 4096 // size},
            "measured": {"peak_bytes": size**2 * 1900},
        }


def _args(tmp_path, *extra):
    argv = ["--sizes", "256", "512", "2048", "--pixel-budget", "1e7", "--memory-budget", "5GB"]
    argv += ["--batch-size", "1", "--seeds", "0", "--synthetic-task", "local"]
    argv += ["--out", str(tmp_path / "accuracy.json"), "--threads", "1", *extra]
    args = accuracy.build_parser().parse_args(argv)
    accuracy.check_args(args)
    args.argv = argv
    return args


def test_sweep_writes_rows_after_each_size_and_resumes(tmp_path):
    runner, lines = FakeRunner(), []
    rows = accuracy.run_sweep(_args(tmp_path), runner=runner, predict=_predict, log=lines.append)

    assert [s["config"]["patch_size"] for s in runner.specs] == [256, 512]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]
    saved = load_rows(tmp_path / "accuracy.json")
    assert [r["status"] for r in saved] == ["ok", "ok", "skipped"]
    first = saved[0]
    assert first["kind"] == "accuracy" and first["config"]["steps"] == 153  # 1e7 / 65,536
    assert first["extra"]["pixels_seen"] == 153 * 256**2
    assert first["extra"]["command"].startswith("python -m bench.accuracy --sizes 256 512 2048")
    assert first["predicted"]["peak_bytes"] == 256**2 * 2000
    assert first["measured"]["peak_bytes"] == 256**2 * 1900
    assert "2048 px, seed 0: skipped — predicted peak + error band > 5.0 GB budget" in "\n".join(
        lines
    )
    assert (tmp_path / "accuracy.csv").exists()

    again = FakeRunner()
    accuracy.run_sweep(_args(tmp_path), runner=again, predict=_predict, log=lines.append)
    assert again.specs == []  # done sizes kept, the skipped one is skipped again without running

    accuracy.run_sweep(
        _args(tmp_path, "--force", "--allow-remat"), runner=again, predict=_predict, log=print
    )
    assert [s["config"]["patch_size"] for s in again.specs] == [256, 512, 2048]
    saved = load_rows(tmp_path / "accuracy.json")
    assert len(saved) == 3, "a size's new row replaces its old one"
    by_size = {r["config"]["patch_size"]: r for r in saved}
    assert by_size[2048]["status"] == "ok" and by_size[2048]["config"]["remat"] == "blocks"
    assert by_size[2048]["config"]["requested_remat"] == "none"


def test_sweep_trains_every_task_and_seed_seed_by_seed_and_resumes(tmp_path):
    argv = ["--seeds", "0", "1", "--synthetic-task", "local", "context", "--sizes", "256", "512"]
    runner = FakeRunner()
    rows = accuracy.run_sweep(_args(tmp_path, *argv), runner=runner, predict=_predict, log=print)
    order = [
        (s["config"]["seed"], s["config"].get("synthetic_task", "local"), s["config"]["patch_size"])
        for s in runner.specs
    ]
    # seeds outermost: a sweep stopped part way holds whole curves for its first seeds
    assert order == [
        (seed, task, size)
        for seed in (0, 1)
        for task in ("local", "context")
        for size in (256, 512)
    ]
    assert [s["data"]["synthetic_task"] for s in runner.specs[2:4]] == ["context"] * 2
    assert len(load_rows(tmp_path / "accuracy.json")) == len(rows) == 8
    again = FakeRunner()
    accuracy.run_sweep(_args(tmp_path, *argv), runner=again, predict=_predict, log=print)
    assert again.specs == []  # every (seed, task, size) already measured


def test_the_side_rule_scales_the_learning_rate_and_keeps_the_reference_size(tmp_path):
    """``--lr-rule side``: the rate grows with the patch side; at 256 px it is the fixed
    rule's, so a fixed-rate sweep's 256 px row is that point already measured."""
    accuracy.run_sweep(_args(tmp_path), runner=FakeRunner(), predict=_predict, log=print)
    runner = FakeRunner()
    rows = accuracy.run_sweep(
        _args(tmp_path, "--lr-rule", "side"), runner=runner, predict=_predict, log=print
    )
    assert [s["config"]["patch_size"] for s in runner.specs] == [512]  # 256 px: kept
    rates = {r["config"]["patch_size"]: r["config"]["learning_rate"] for r in rows}
    assert rates == {256: 1e-3, 512: 2e-3, 2048: 8e-3}
    assert rows[1]["extra"]["lr_rule"] == "side: 0.001 x px / 256"


def test_sweeps_side_by_side_keep_each_others_rows(tmp_path):
    """Another seed's sweep writing the same --out while this one trains loses nothing."""
    other = accuracy.run_sweep(
        _args(tmp_path, "--seeds", "1", "--sizes", "256"), runner=FakeRunner(), predict=_predict
    )
    (tmp_path / "accuracy.json").unlink()  # this sweep starts from no file at all

    class WritesMeanwhile(FakeRunner):
        def __call__(self, spec):
            if not self.specs:  # the other sweep lands its row after this one has started
                write_rows(tmp_path / "accuracy.json", other)
            return super().__call__(spec)

    accuracy.run_sweep(
        _args(tmp_path, "--sizes", "256", "512"), runner=WritesMeanwhile(), predict=_predict
    )
    saved = load_rows(tmp_path / "accuracy.json")
    assert sorted((r["config"]["seed"], r["config"]["patch_size"]) for r in saved) == [
        (0, 256),
        (0, 512),
        (1, 256),
    ]


def test_sweep_records_an_out_of_memory_size_and_goes_on(tmp_path):
    rows = accuracy.run_sweep(
        _args(tmp_path, "--memory-budget", "100GB"),
        runner=FakeRunner("oom"),
        predict=_predict,
        log=lambda _: None,
    )
    assert [r["status"] for r in rows] == ["oom"] * 3
    assert "ResourceExhaustedError" in rows[0]["reason"] and "metrics" not in rows[0]
    table = accuracy_table.summary_table(rows)
    assert table.count("oom: ResourceExhaustedError") == 3


def test_a_failing_worker_becomes_an_error_row():
    spec = {"config": {"threads": 1}, "data": {}}  # no patch size: the worker fails
    result = accuracy.run_worker(spec)
    assert result["status"] == "error"
    assert result["reason"].startswith("worker exited with 1")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "250"], "not a positive multiple of output stride 16"),
        (["--slides", "."], "give both --slides and --annotations"),
        (["--out", "x.csv"], "must end in .json"),
        (["--seeds", "1", "1"], "--seeds must differ"),
        (["--synthetic-dir", "d"], "give it with one --synthetic-task"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.accuracy", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


def test_point_key_ignores_what_the_planner_chose():
    a = {
        "patch_size": 256,
        "precision": "float32",
        "remat": "none",
        "steps": 3,
        "requested_remat": "none",
    }
    b = dict(a, remat="blocks", steps=4)
    assert accuracy_rows.point_key(a) == accuracy_rows.point_key(b)
    assert accuracy_rows.point_key(a) != accuracy_rows.point_key(dict(a, requested_remat="blocks"))
    assert json.loads(accuracy_rows.point_key(a)) == {"patch_size": 256, "requested_remat": "none"}


def test_tiny_sweep_end_to_end(tmp_path):
    """One real size through histoseg.train: 64 px, 2 steps, narrow MobileNetV2 (~20 s here)."""
    out = tmp_path / "results" / "accuracy.json"
    argv = ["--sizes", "64", "--pixel-budget", "16384", "--alpha", "0.35", "--threads", "1"]
    argv += ["--synthetic-dir", str(tmp_path / "synth"), "--synthetic-slides", "3"]
    argv += ["--synthetic-size", "2048x1536", "--max-val-patches", "8"]
    argv += ["--seeds", "0", "--synthetic-task", "local"]
    argv += ["--run-dir", str(tmp_path / "runs"), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.accuracy", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = load_rows(out)
    assert row["status"] == "ok" and row["config"]["steps"] == 2
    assert row["metrics"]["val_patches"] == 8
    assert 0 <= row["metrics"]["accuracy"] <= 1 and 0 <= row["metrics"]["miou"] <= 1
    assert row["measured"]["peak_bytes"] > 0 and row["predicted"]["peak_bytes"] > 0
    assert (out.parent / "memory_vs_accuracy.png").exists()
    assert "accuracy.json" in (out.parent / "README.md").read_text(encoding="utf-8")


def test_seed_summary_gives_each_point_its_mean_and_range_over_seeds():
    def row(task, size, seed, miou, status="ok"):
        config = {"patch_size": size, "seed": seed, "steps": 10, "data": "synthetic 6x8000x6000"}
        if task != "local":
            config["synthetic_task"] = task
        metrics = {"miou": miou, "iou_tumour": miou - 0.4, "baseline_miou": 0.41}
        extra = {"bayes_ceiling": {"miou": 0.843 if size == 256 else 1.0}}
        if size == 256:  # scored with the prior correction: the uncorrected mIoU beside it
            extra["prior_correction"] = {
                "corrected": {"miou": miou},
                "uncorrected": {"miou": miou - 0.1},
            }
        return {"status": status, "config": config, "metrics": metrics, "extra": extra}

    rows = [
        row("context", 256, 0, 0.6),
        row("context", 256, 1, 0.7),
        row("context", 1024, 0, 0.9),
        row("context", 1024, 1, 0.1, status="oom"),  # not an ok run: not in the summary
        row("local", 256, 0, 0.98),
    ]
    lines = accuracy_table.seed_summary(rows, markdown=True).splitlines()
    assert lines[2] == (
        "| context | 256 | 10 | 2 | 0.650 (0.600-0.700) | 0.250 (0.200-0.300) | 0.843 | 0.410 "
        "| - | - | 0.650 (0.600-0.700) | 0.550 (0.500-0.600) |"
    )
    assert lines[3].endswith("| - | - |")  # a row without both scorings
    assert lines[3].startswith("| context | 1024 | 10 | 1 | 0.900 (0.900-0.900)")
    assert lines[4].startswith("| local | 256 |") and len(lines) == 5
