"""The plots, the results README and the study's reference numbers, from small fixture rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plots, reference
from bench.plots import caption, select
from bench.plots.accuracy import draw_memory_vs_accuracy, seed_points
from bench.plots.readme import render_readme, write_readme
from histoseg.cli import command_line, run_main
from histoseg.errors import ResultsError
from histoseg.results import make_row, write_rows

REPO = Path(__file__).resolve().parents[2]


def _svg_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_draws_all_three_figures_without_a_display(results_dir, tmp_path):
    import matplotlib

    out = tmp_path / "plots"
    outcomes = plots.draw_all(plots.load_results([results_dir]), out)

    assert matplotlib.get_backend().lower() == "agg"
    assert [o.name for o in outcomes] == list(plots.PLOT_NAMES)
    for outcome in outcomes:
        assert outcome.drawn, outcome.notes
        png, svg = out / f"{outcome.name}.png", out / f"{outcome.name}.svg"
        assert outcome.paths == [png, svg]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in _svg_text(svg)
    # Captions (SVG keeps text as text) name the machine and what did not run.
    accuracy_svg = _svg_text(out / "memory_vs_accuracy.svg")
    assert "Test CPU" in accuracy_svg
    assert "2048 px: skipped" in accuracy_svg
    assert "CAMELYON16" in accuracy_svg and "histoseg estimate" in accuracy_svg
    assert "predicted 26.1 GB" in _svg_text(out / "memory_vs_patch_size.svg")
    assert "4 workers need 4 cores" in _svg_text(out / "weak_scaling.svg")
    assert not list(out.glob(".*")), "no temporary files left behind"


def test_partly_failed_sweep_draws_what_exists_and_says_what_is_missing(tmp_path, fixture_rows):
    rows = [r for r in fixture_rows["accuracy"] if r["status"] != "ok"] + fixture_rows["memory"]
    outcomes = {o.name: o for o in plots.draw_all({"sweep.json": rows}, tmp_path)}

    assert outcomes["memory_vs_patch_size"].drawn
    assert any(
        "2048 px, float32, none: skipped" in n for n in outcomes["memory_vs_patch_size"].notes
    )
    accuracy = outcomes["memory_vs_accuracy"]
    assert not accuracy.drawn
    assert not (tmp_path / "memory_vs_accuracy.png").exists()
    assert any("predicted 10.3 GB > 8.0 GB budget" in n for n in accuracy.notes)
    assert not outcomes["weak_scaling"].drawn
    lines = plots.report_lines(list(outcomes.values()))
    assert any(line.startswith("weak_scaling: not drawn — no scaling rows") for line in lines)


def test_study_points_are_omitted_and_said_so_without_a_memory_row(tmp_path, fixture_rows):
    outcome = draw_memory_vs_accuracy(fixture_rows["accuracy"], tmp_path)

    assert outcome.drawn
    assert any("study's points at 256, 704, 1024, 2048 px omitted" in n for n in outcome.notes)


def test_memory_axis_prefers_measured_then_predicted(fixture_rows):
    index = select.memory_index(fixture_rows["memory"])
    by_size = {r["config"]["patch_size"]: r for r in fixture_rows["accuracy"]}
    assert select.accuracy_memory(by_size[256], index)[1] == "measured"
    assert select.accuracy_memory(by_size[1024], index) == (2.7e9, "predicted")
    # The study's config at 2048 px was skipped here but predicted: placed by the estimate.
    assert select.study_memory(2048, index) == (26.1e9, "predicted")


def test_projection_and_compression_are_read_from_rows(fixture_rows, machine):
    horovod_1 = fixture_rows["scaling"][0]
    assert select.compression_of(horovod_1) == "fp16"
    assert select.projection_of(horovod_1)[-1][0] == 512
    legacy = make_row(
        "scaling",
        {"engine": "horovod", "workers": 2},
        extra={"fp16_allreduce": True},
        machine=machine,
    )
    assert select.compression_of(legacy) == "fp16"


def test_caption_says_when_rows_come_from_several_machines(machine):
    other = dict(machine, cpu="Other CPU")
    rows = [make_row("memory", {"patch_size": 256}, machine=m) for m in (machine, other)]
    assert caption.machines_line(rows).startswith("rows from 2 machines")
    assert caption.config_line(rows, varied=("patch_size",)) == "config: -; varies: patch_size"


def test_cli_rejects_rows_of_another_schema_in_one_line(tmp_path):
    bad = tmp_path / "results"
    bad.mkdir()
    (bad / "other.json").write_text(json.dumps([{"schema": "someone.else/2", "kind": "memory"}]))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.plots", "--results", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )

    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert (
        "someone.else/2" in lines[0]
        and "histoseg.result/1" in lines[0]
        and "other.json" in lines[0]
    )
    assert not list(bad.glob("*.png"))


def test_cli_with_no_results_files_is_a_user_error(tmp_path, capsys):
    assert run_main(plots.main, ["--results", str(tmp_path)]) == 2
    assert "no results files" in capsys.readouterr().err


def test_cli_exits_1_when_no_figure_can_be_drawn(tmp_path, capsys, fixture_rows):
    write_rows(
        tmp_path / "accuracy.json", [r for r in fixture_rows["accuracy"] if r["status"] != "ok"]
    )
    assert run_main(plots.main, ["--results", str(tmp_path), "--no-readme"]) == 1
    out = capsys.readouterr().out
    assert out.count("not drawn") == 3
    with pytest.raises(ResultsError):
        plots.load_results([tmp_path / "absent"])


def test_results_readme_names_command_and_machine_and_embeds_plots(results_dir):
    (results_dir / "weak_scaling.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a plot that exists
    readme = write_readme(results_dir).read_text(encoding="utf-8")

    assert readme.count("\n- `") == 3
    assert "`memory.json` (+ `memory.csv`)" in readme
    assert "Made by `python -m bench.memory --sizes 256 704 1024 2048`" in readme
    assert "Command not recorded in the rows" in readme  # scaling fixture rows carry none
    assert "Machine: Test CPU @ 2.0GHz, 2 cores" in readme
    assert "Validation: 256 px: mIoU 0.620, AUC 0.840; 512 px: mIoU 0.740" in readme
    assert "![weak_scaling](weak_scaling.png)" in readme
    assert "### memory_vs_accuracy\n\nNot drawn yet" in readme
    assert render_readme(results_dir, plots.load_results([results_dir])) == readme


def test_command_line_quotes_arguments():
    assert command_line("bench.accuracy", ["--sizes", "256", "--slides", "a b"]) == (
        "python -m bench.accuracy --sizes 256 --slides 'a b'"
    )


def test_reference_numbers_are_the_studys_tables():
    assert set(reference.PUBLISHED) == {"CAMELYON16", "CAMELYON17"}
    for table in reference.PUBLISHED.values():
        assert tuple(table) == reference.STUDY_PATCH_SIZES_PX
        for figures in table.values():
            assert all(0 < figures[m] < 1 for m in ("accuracy", "miou", "auc"))
    assert reference.PUBLISHED["CAMELYON16"][2048]["miou"] == 0.9231
    assert reference.PUBLISHED["CAMELYON17"][256]["val_patches"] == 552
    assert reference.STUDY_CONFIG["backbone"] == "xception65"


@pytest.mark.parametrize("kind", ["memory", "accuracy", "scaling"])
def test_fixture_rows_follow_the_schema(kind, tmp_path, fixture_rows):
    write_rows(tmp_path / "rows.json", fixture_rows[kind])  # validates every row


def test_projection_falls_back_to_the_scaling_model(machine):
    def row(workers):
        return make_row(
            "scaling",
            {"engine": "horovod", "workers": workers, "patch_size": 512, "compression": "none"},
            measured={"step_s": 2.0, "gradient_bytes": 1.6e8, "allreduce_s": 0.05 * (workers - 1)},
            scaling={"efficiency": 1.0, "throughput_per_worker": 0.5},
            machine=machine,
        )

    curve, inputs = select.projection_from_model([row(1), row(2)], 512, "fp16")
    assert curve[0] == (1, 1.0) and curve[-1][0] == 512
    assert all(0 < eff <= 1 for _, eff in curve)
    assert "bandwidth_gbps=100" in inputs
    curve, why_not = select.projection_from_model([], 512, "none")
    assert curve == [] and why_not


def test_single_training_runs_stay_out_of_the_budget_sweep(tmp_path, fixture_rows, machine):
    swept = [dict(r, config={**r["config"], "pixel_budget": 1e8}) for r in fixture_rows["accuracy"]]
    single = make_row(
        "accuracy",
        {"patch_size": 128, "backbone": "mobilenetv2", "steps": 300},
        metrics={"accuracy": 0.9, "miou": 0.8, "auc": 0.95, "val_patches": 96},
        machine=machine,
    )
    outcome = draw_memory_vs_accuracy([*swept, single], tmp_path)
    assert outcome.drawn
    assert (
        "1 accuracy row(s) without a pixel budget (single training runs) not drawn" in outcome.notes
    )
    assert "1e+08 px seen per size" in _svg_text(tmp_path / "memory_vs_accuracy.svg")


def test_notes_for_many_rows_with_one_reason_are_one_line():
    items = [(f"{s} px, {m}", "skipped", "predicted only") for s in (1024, 2048) for m in "abc"]
    items.append(("512 px, a", "oom", "ResourceExhaustedError"))
    assert caption.compact_notes(items) == [
        "6 configs (1024 px, a ... 2048 px, c): skipped — predicted only",
        "512 px, a: oom — ResourceExhaustedError",
    ]


def test_accuracy_panels_show_the_all_background_baseline(tmp_path, fixture_rows):
    rows = [
        dict(r, metrics={**r["metrics"], "baseline_accuracy": 0.97, "baseline_miou": 0.485})
        for r in fixture_rows["accuracy"]
        if r["status"] == "ok"
    ]
    draw_memory_vs_accuracy(rows, tmp_path)
    assert "all-background prediction" in _svg_text(tmp_path / "memory_vs_accuracy.svg")


def test_tasks_and_norms_are_separate_series(tmp_path, fixture_rows):
    swept = [dict(r, config={**r["config"], "pixel_budget": 1e8}) for r in fixture_rows["accuracy"]]
    context = [
        dict(r, config={**r["config"], "synthetic_task": "context", "norm": "group"}) for r in swept
    ]
    draw_memory_vs_accuracy([*swept, *context], tmp_path)
    svg = _svg_text(tmp_path / "memory_vs_accuracy.svg")
    assert "context" in svg and "group" in svg


def test_a_training_row_finds_the_memory_row_of_its_width_multiplier():
    from histoseg.results import upgrade_row

    config = {"backbone": "mobilenetv2", "output_stride": 16, "precision": "float32"}
    config.update(remat="none", batch_size=1, optimizer="adam", patch_size=512)
    memory = make_row("memory", {**config, "backbone_options": {"alpha": 0.35}})
    memory["measured"] = {"peak_bytes": 123e6}
    index = select.memory_index([memory])
    training = make_row("accuracy", {**config, "backbone_options": {"alpha": 0.35}})
    assert select.accuracy_memory(training, index) == (123e6, "measured")
    # a training row written before the one config type named the width config.alpha
    legacy = upgrade_row(make_row("accuracy", {**config, "alpha": 0.35}))
    assert select.accuracy_memory(legacy, index) == (123e6, "measured")
    wider = make_row("accuracy", {**config, "backbone_options": {"alpha": 1.0}})
    assert select.accuracy_memory(wider, index) == (None, None)


def test_seeds_of_a_point_are_one_mean_with_their_spread_per_task_panel(tmp_path, fixture_rows):
    ok = [r for r in fixture_rows["accuracy"] if r["status"] == "ok"]
    rows = []
    for task in ("local", "context"):
        for seed, miou in ((0, 0.6), (1, 0.7), (2, 0.8)):
            for r in ok:
                config = {**r["config"], "seed": seed, "synthetic_task": task, "pixel_budget": 1e8}
                extra = {**r.get("extra", {}), "bayes_ceiling": {"miou": 0.9}}
                rows.append(
                    dict(r, config=config, metrics={**r["metrics"], "miou": miou}, extra=extra)
                )
    points = seed_points(rows, select.memory_index(fixture_rows["memory"]))
    assert len(points) == 2 * len(ok)  # one per task and size, the seeds folded in
    assert all(sorted(p["miou"]) == [0.6, 0.7, 0.8] and p["ceiling"] == 0.9 for p in points)
    draw_memory_vs_accuracy(rows, tmp_path)
    svg = _svg_text(tmp_path / "memory_vs_accuracy.svg")
    assert "context task" in svg and "local task (control)" in svg
    assert "Bayes ceiling" in svg and "n=3" in svg


def test_a_per_size_learning_rate_rule_is_one_curve_named_by_its_rule(fixture_rows):
    """Under ``--lr-rule side`` each size runs its own rate; the sizes still make one curve."""
    ok = [r for r in fixture_rows["accuracy"] if r["status"] == "ok"]
    assert len({r["config"]["patch_size"] for r in ok}) > 1
    rows = []
    for r in ok:
        rate = 1e-3 * r["config"]["patch_size"] / 256
        config = {**r["config"], "learning_rate": rate, "pixel_budget": 1e8}
        extra = {**r.get("extra", {}), "lr_rule": "side: 0.001 x px / 256"}
        rows.append(dict(r, config=config, extra=extra))
    points = seed_points(rows, select.memory_index(fixture_rows["memory"]))
    assert len({p["series"] for p in points}) == 1
    assert points[0]["config"]["learning_rate"] == "0.001 x px / 256"


def test_prior_corrected_and_uncorrected_rows_are_two_curves_named_so(fixture_rows):
    """Rows made before the prior correction were scored uncorrected: they never share a
    curve with corrected ones, and the legend says which is which."""
    ok = [r for r in fixture_rows["accuracy"] if r["status"] == "ok"]
    rows = []
    for r in ok:
        old = {k: v for k, v in r["config"].items() if k != "prior_correction"}
        rows.append(dict(r, config={**old, "pixel_budget": 1e8}))
        rows.append(dict(r, config={**old, "pixel_budget": 1e8, "prior_correction": True}))
    points = seed_points(rows, select.memory_index(fixture_rows["memory"]))
    assert len({p["series"] for p in points}) == 2
    labels = {
        caption.label_part("prior_correction", p["config"]["prior_correction"]) for p in points
    }
    assert labels == {"prior-corrected", "uncorrected"}


def test_inference_rows_are_never_a_training_runs_memory():
    """bench.memory --mode infer rows measure a forward pass alone: the memory figure
    leaves them out, and a training row is never matched to one."""
    config = {"backbone": "mobilenetv2", "output_stride": 16, "precision": "float32"}
    config.update(remat="none", batch_size=1, patch_size=512)
    infer = make_row("memory", {**config, "mode": "infer", "optimizer": None})
    infer["measured"] = {"peak_bytes": 50e6}
    assert not select.is_train_memory_row(infer)
    training = make_row("accuracy", {**config, "optimizer": "adam"})
    assert select.accuracy_memory(training, select.memory_index([infer])) == (None, None)


def test_the_patch_size_figure_leaves_a_random_draw_out():
    from bench.plots.memory import drawn_rows

    def row(size, draw=None):
        extra = {"draw": draw} if draw else {}
        config = {"patch_size": size, "batch_size": 1, "backbone": "xception65"}
        return make_row("memory", config, measured={"peak_bytes": 1e9}, extra=extra)

    notes: list[str] = []
    kept = drawn_rows([row(256), row(512), row(288, {"sample": 48, "seed": 0})], notes)
    assert [r["config"]["patch_size"] for r in kept] == [256, 512]
    assert notes == ["1 rows of a random draw (bench.memory --sample) left out"]
