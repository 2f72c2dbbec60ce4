"""The training CLI end to end on tiny synthetic slides, and its pieces (split, schedule)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoseg.cli import run_main
from histoseg.errors import ConfigError
from histoseg.train.checkpoints import load_checkpoint
from histoseg.train.cli import main
from histoseg.train.schedule import WarmupSchedule
from histoseg.train.split import split_slides
from histoseg.train.summaries import read_scalars

TINY = [
    "--synthetic-slides", "3",
    "--synthetic-size", "2048x2048",
    "--backbone", "mobilenetv2",
    "--alpha", "0.35",
    "--patch-size", "64",
    "--batch-size", "2",
    "--max-val-patches", "8",
    "--checkpoint-every", "2",
    "--no-progress",
    "--bn-recalibration-batches", "2",
]  # fmt: skip


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "Examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--patch-size", "100"], "multiple of the output stride"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--epochs", "-1"], "--epochs must be > 0"),
        (["--norm", "instance"], "invalid choice: 'instance' (choose from 'auto', 'batch'"),
        (["--synthetic-task", "far"], "invalid choice: 'far' (choose from 'local', 'context')"),
        (["--tumour-weight", "0"], "--tumour-weight must be > 0, got 0.0"),
        (["--tumor-ratio", "1.5"], "--tumor-ratio must be in [0, 1], got 1.5"),
        (["--spatial-workers", "2"], "--spatial-workers 2 needs --engine horovod"),
        (["--spatial-workers", "0"], "--spatial-workers"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    assert run_main(main, flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _checkpoint_metrics(run, shift=None):
    """Metrics of ``run``'s newest checkpoint, restored onto a fresh model, in inference mode
    over the run's validation patches (what inference does with it), with the tumour logit
    shift the checkpoint records unless ``shift`` is given."""
    from histoseg.data import make_dataset
    from histoseg.models import build_deeplabv3plus
    from histoseg.train.cli import build_parser, options_from_args
    from histoseg.train.engines import get_engine
    from histoseg.train.slides import train_and_val_slides, validation_patches
    from histoseg.train.validation import evaluate

    saved = json.loads((run / "options.json").read_text())
    argv = [*TINY, "--synthetic-dir", saved["synthetic_dir"], "--run-dir", str(run)]
    options = options_from_args(build_parser().parse_args(argv))
    engine = get_engine("none")
    refs = validation_patches(options, train_and_val_slides(options, engine)[1])
    size = (options.patch_size, options.patch_size, 3)
    model = build_deeplabv3plus("mobilenetv2", size, 2, 16, "float32", "none", alpha=0.35)
    with np.load(sorted((run / "checkpoints").glob("ckpt-*.npz"))[-1]) as data:
        assert bool(data["bn_recalibrated"])
        shift = float(data["tumour_logit_shift"]) if shift is None else shift
        names = sorted(k for k in data.files if k.startswith("v"))
        for name, variable in zip(names, model.variables, strict=False):
            variable.assign(data[name])
    batches = make_dataset(refs, 2, shuffle=False, repeat=False, drop_remainder=False)
    return evaluate(model, batches, engine, tumour_logit_shift=shift).result()


def test_train_validate_checkpoint_and_resume(tmp_path, capsys):
    data, run = tmp_path / "slides", tmp_path / "run"
    common = [*TINY, "--synthetic-dir", str(data), "--run-dir", str(run)]
    assert main([*common, "--steps", "2", "--prior-correction"]) == 0
    rows = json.loads((run / "results.json").read_text())
    assert len(rows) == 1
    row = rows[0]
    assert row["kind"] == "accuracy" and row["status"] == "ok"
    assert row["config"]["workers"] == 1 and row["config"]["engine"] == "none"
    assert row["config"]["step"] == "overlap"  # the default step mode
    assert row["measured"]["allreduce_s"] == 0.0  # one worker: nothing to communicate
    for key in ("accuracy", "miou", "auc", "val_patches", "baseline_miou"):
        assert key in row["metrics"]
    assert 0 < row["metrics"]["val_patches"] <= 8
    assert row["extra"]["bn_recalibration_batches"] == 2
    # the prior correction: from the training slides, the sampler's tumour-rich patches
    correction = row["extra"]["prior_correction"]
    assert row["config"]["prior_correction"] is True
    assert correction["train_tumour_share"] > correction["slide_tumour_share"] > 0
    assert correction["logit_shift"] > 0
    assert correction["applied"] is True
    for key in ("accuracy", "miou", "iou_background", "iou_tumour"):
        assert correction["corrected"][key] == row["metrics"][key]
    assert (run / "results.csv").exists()
    scalars = read_scalars(run / "tensorboard")
    assert {"train/loss", "val/miou", "val/auc"} <= set(scalars)
    assert scalars["val/miou"] == [(2, pytest.approx(row["metrics"]["miou"], abs=1e-6))]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002.npz"]
    assert "validation (" in capsys.readouterr().out
    # the checkpoint is the model validation scored, batch-norm statistics included
    restored = _checkpoint_metrics(run)
    for key in ("miou", "auc"):
        assert restored[key] == pytest.approx(row["metrics"][key], abs=1e-6), key
    # the row's uncorrected figures are those of the model's own probability
    raw = _checkpoint_metrics(run, shift=0.0)
    for key in ("accuracy", "miou"):
        assert raw[key] == pytest.approx(correction["uncorrected"][key], abs=2e-3), key

    # resume: continues from step 2 to step 3, adds a second row (another steps count);
    # without --prior-correction (the default), its row scores the model's own probability
    assert main([*common, "--steps", "3", "--resume", "auto"]) == 0
    rows = json.loads((run / "results.json").read_text())
    assert [r["config"]["steps"] for r in rows] == [2, 3]
    assert rows[1]["extra"]["start_step"] == 2
    correction = rows[1]["extra"]["prior_correction"]
    assert rows[1]["config"]["prior_correction"] is False and correction["applied"] is False
    assert correction["uncorrected"]["miou"] == rows[1]["metrics"]["miou"]
    assert _checkpoint_metrics(run)["miou"] == pytest.approx(rows[1]["metrics"]["miou"], abs=1e-6)

    # a checkpoint refuses a model it was not made for
    import keras

    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ConfigError, match="variables"):
        load_checkpoint(run / "checkpoints", other, keras.optimizers.SGD())


@pytest.mark.slow  # ~15 s; the task's geometry, its ceiling and the norm default are tested apart
def test_context_task_at_batch_1_with_group_norm(tmp_path):
    run = tmp_path / "run"
    argv = [*TINY, "--batch-size", "1", "--steps", "2", "--run-dir", str(run)]
    argv += ["--synthetic-task", "context", "--tumour-weight", "3"]  # --norm auto: group
    assert main([*argv, "--synthetic-dir", str(tmp_path / "c")]) == 0
    (row,) = json.loads((run / "results.json").read_text())
    assert row["config"]["synthetic_task"] == "context" and row["config"]["norm"] == "group"
    assert row["config"]["tumour_weight"] == 3.0
    assert row["extra"]["bn_recalibration_batches"] == 0  # group norm has no statistics
    assert row["extra"]["command"].startswith("python -m histoseg.train ")
    assert "--synthetic-task context" in row["extra"]["command"]
    ceiling = row["extra"]["bayes_ceiling"]
    # 64 px patches: part of the lesions is out of sight, the ceiling is below 1
    assert 0 < ceiling["decidable_fraction"] < 1 and row["metrics"]["miou"] <= ceiling["miou"]
    assert "synthetic.json" in {p.name for p in (tmp_path / "c").iterdir()}


def test_defaults_per_task_and_batch_size(tmp_path):
    from histoseg.models.norm import NORMS
    from histoseg.train import cli
    from histoseg.wsi.synth import TASKS

    def options(*flags):
        argv = ["--run-dir", str(tmp_path / "r"), *flags]
        return cli.options_from_args(cli.build_parser().parse_args(argv))

    default = options()
    assert default.synthetic_task == "local" and default.synthetic_dir == "data/synthetic"
    assert default.norm == "batch"  # batch 2: runs made before --norm keep their setup
    assert options("--batch-size", "1").norm == "group"
    assert options("--batch-size", "1", "--norm", "batch").norm == "batch"
    assert options("--synthetic-task", "context").synthetic_dir == "data/synthetic-context"
    # the CLI keeps its own copies so that --help starts no TensorFlow; they must agree
    assert cli.NORMS == NORMS and cli.SYNTHETIC_TASKS == TASKS
    from histoseg.train.schedule import SCHEDULES

    assert cli.SCHEDULES == SCHEDULES


def test_split_by_slide_keeps_tumour_in_validation():
    pairs = [(f"slide_{i:03d}.tif", "a.xml" if i % 3 != 2 else None) for i in range(6)]
    train, val = split_slides(pairs)
    assert [p[0] for p in val] == ["slide_004.tif", "slide_005.tif"]
    assert any(x for _, x in val) and any(x for _, x in train)
    assert not set(map(tuple, train)) & set(map(tuple, val))


def test_split_by_centre_for_camelyon17_names():
    names = [f"patient_{p:03d}_node_{n}.tif" for p in (0, 1, 20, 45) for n in range(2)]
    train, val = split_slides(names)  # auto -> centre: the last centre (2) validates
    assert val == ["patient_045_node_0.tif", "patient_045_node_1.tif"]
    assert len(train) == 6
    _, val = split_slides(names, how="centre", val_centres=[0])
    assert len(val) == 4 and all("patient_00" in v for v in val)
    with pytest.raises(ConfigError, match="CAMELYON17"):
        split_slides(["a.tif", "b.tif"], how="centre")


def test_warmup_then_poly_decay():
    schedule = WarmupSchedule(0.4, total_steps=110, warmup_steps=10, decay="poly", power=1.0)
    values = np.array([float(schedule(s)) for s in (0, 4, 9, 10, 60, 110)])
    np.testing.assert_allclose(values, [0.04, 0.2, 0.4, 0.4, 0.2, 0.0], atol=1e-6)
    assert WarmupSchedule.from_config(schedule.get_config()).get_config() == schedule.get_config()


def _one_error_line(capsys) -> str:
    """stderr of a failed run_main: exactly one line, starting with "error:"."""
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    return err


def test_argparse_errors_are_one_line(capsys):
    assert run_main(main, ["--optimizer", "rmsprop"]) == 2
    err = _one_error_line(capsys)
    assert "rmsprop" in err and "usage:" not in err


def test_zero_threads_is_rejected(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(main, ["--threads", "0", "--run-dir", str(run)]) == 2
    assert "--threads must be >= 1, got 0" in _one_error_line(capsys)
    assert not run.exists()


def test_run_dir_that_is_a_file_is_rejected(tmp_path, capsys):
    run = tmp_path / "run"
    run.write_text("not a folder")
    assert run_main(main, ["--run-dir", str(run), "--synthetic-dir", str(tmp_path / "s")]) == 2
    err = _one_error_line(capsys)
    assert str(run) in err and "must be a folder" in err
    assert run.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no slides made


@pytest.mark.parametrize("kind", ["folder", "suffix"])
def test_results_must_be_a_json_file(tmp_path, capsys, kind):
    results = tmp_path / "out" if kind == "folder" else tmp_path / "results.txt"
    if kind == "folder":
        results.mkdir()
    run = tmp_path / "run"
    argv = ["--results", str(results), "--run-dir", str(run)]
    assert run_main(main, [*argv, "--synthetic-dir", str(tmp_path / "s")]) == 2
    err = _one_error_line(capsys)
    assert str(results) in err and ".json file path" in err
    assert not run.exists() and not (tmp_path / "s").exists()  # failed before any work


def _corrupt_level0_tiles(tif):
    """Overwrite every full-resolution tile of ``tif`` with random bytes (header intact)."""
    import tifffile

    with tifffile.TiffFile(tif) as t:
        page = t.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    rng = np.random.default_rng(0)
    with open(tif, "r+b") as f:
        for offset, count in spans:
            f.seek(offset)
            f.write(rng.integers(0, 256, count, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def corrupt_slides(tmp_path_factory):
    """Two tiny synthetic slides whose level-0 tiles are garbage (lower levels still read)."""
    from histoseg.wsi.synth import write_synthetic_slide

    folder = tmp_path_factory.mktemp("corrupt")
    for i, tumor in enumerate((True, False)):
        tif, _ = write_synthetic_slide(
            folder / f"slide_{i:03d}.tif", (1024, 1024), seed=i, tile_px=256, tumor=tumor,
            progress=False,
        )  # fmt: skip
        _corrupt_level0_tiles(tif)
    return folder


def test_corrupt_slide_is_one_line_error_in_training(corrupt_slides, tmp_path, capsys):
    argv = [*TINY, "--slides", str(corrupt_slides), "--run-dir", str(tmp_path / "run")]
    assert run_main(main, [*argv, "--steps", "1", "--bn-recalibration-batches", "0"]) == 2
    err = _one_error_line(capsys)
    assert "slide_00" in err and ".tif" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_corrupt_slide_is_slide_error_in_validation_batches(corrupt_slides):
    # evaluate and recalibrate_batch_norm read batches through the same iterate_batches
    from histoseg.data import iterate_batches, make_dataset
    from histoseg.errors import SlideError
    from histoseg.wsi.patches import grid_patches

    tif = corrupt_slides / "slide_001.tif"
    refs = grid_patches(tif, 64, 0, 0.0)[:2]
    batches = make_dataset(refs, 2, shuffle=False, repeat=False, drop_remainder=False)
    with pytest.raises(SlideError, match=r"slide_001\.tif"):
        list(iterate_batches(batches))
