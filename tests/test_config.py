"""One config type: each harness writes the same keys for the same train step.

One :class:`StepConfig` is asked of every command line that makes rows (bench.memory,
bench.accuracy, bench.scaling, histoseg.train); each row's config section must hold that
step's keys with its values, whatever keys of its own the harness adds. No TensorFlow.
"""

from __future__ import annotations

import pytest

from histoseg.config import StepConfig, thread_env
from histoseg.errors import ConfigError
from histoseg.results import upgrade_row

STEP = StepConfig(
    patch_size=128,
    batch_size=2,
    backbone="mobilenetv2",
    output_stride=16,
    precision="float32",
    remat="none",
    device="cpu",
    threads=1,
    engine="none",
    workers=1,
    optimizer="sgd",
    backbone_options=(("alpha", 0.35),),
)
COMMON = ["--backbone", "mobilenetv2", "--alpha", "0.35", "--batch-size", "2"]


def _holds_the_step(config: dict) -> None:
    assert {k: config.get(k) for k in STEP.as_dict()} == STEP.as_dict()
    assert "alpha" not in config  # the width lives in backbone_options only


def test_the_memory_harness_sweeps_step_configs():
    from bench import memory

    argv = ["--sizes", "128", "--batch-sizes", "2", "--backbone", "mobilenetv2"]
    argv += ["--backbone-option", "alpha=0.35", "--threads", "1", "--optimizer", "sgd"]
    (config,) = memory.configs_from_args(memory.build_parser().parse_args(argv))
    assert config.replace(steps=STEP.steps) == STEP
    _holds_the_step(config.as_dict())


def test_an_accuracy_row_holds_the_step(tmp_path):
    from bench import accuracy

    argv = ["--sizes", "128", *COMMON, "--threads", "1", "--optimizer", "sgd"]
    argv += ["--seeds", "0", "--synthetic-task", "local", "--out", str(tmp_path / "a.json")]
    args = accuracy.build_parser().parse_args(argv)
    accuracy.check_args(args)
    ((point_args, size),) = accuracy.sweep_points(args)
    config = accuracy.base_config(point_args, size, steps=10)
    _holds_the_step(config)
    assert config["steps"] == 10 and "pixel_budget" in config


def test_a_scaling_row_holds_the_step():
    from bench import scaling

    argv = ["--sizes", "128", *COMMON, "--threads-per-worker", "1"]
    args = scaling.build_parser().parse_args(argv)
    config = scaling.point_config(args, "horovod", 128, "fp16", "overlap", 2)
    step = STEP.replace(engine="horovod", workers=2, optimizer="adam")  # its worker: Adam
    assert {k: config[k] for k in step.as_dict()} == step.as_dict()
    assert (config["compression"], config["step"]) == ("fp16", "overlap")


def test_a_training_row_holds_the_step():
    from histoseg.train import cli

    argv = ["--patch-size", "128", *COMMON, "--threads", "1", "--optimizer", "sgd"]
    options = cli.options_from_args(cli.build_parser().parse_args(argv))
    config = options.row_config(
        device="cpu", engine="none", workers=1, step_mode="overlap", steps=5
    )
    _holds_the_step(config)
    assert (config["steps"], config["step"], config["data"]) == (5, "overlap", "synthetic")


def test_rows_written_before_the_one_config_are_read_with_its_keys():
    old_train = {"kind": "accuracy", "config": {"backbone": "mobilenetv2", "alpha": 0.35}}
    assert upgrade_row(old_train)["config"] == {
        "backbone": "mobilenetv2",
        "backbone_options": {"alpha": 0.35},
    }
    old_scaling = {"kind": "scaling", "config": {"engine": "horovod", "workers": 2}}
    assert upgrade_row(old_scaling)["config"]["optimizer"] == "adam"
    projection = {"kind": "scaling", "config": {"engine": "projection", "workers": 512}}
    assert "optimizer" not in upgrade_row(projection)["config"]


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"patch_size": 100}, "not a multiple of the output stride 16"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"optimizer": "lamb"}, "optimizer 'lamb' is not one of adam, sgd"),
    ],
)
def test_an_invalid_step_is_refused_once_with_the_value(changes, expect):
    with pytest.raises(ConfigError, match=expect):
        STEP.replace(**changes)


def test_thread_env_sets_every_pool_and_refuses_nonsense():
    assert thread_env(2) == {
        "OMP_NUM_THREADS": "2",
        "TF_NUM_INTRAOP_THREADS": "2",
        "TF_NUM_INTEROP_THREADS": "1",
        "HISTOSEG_THREADS": "2",
    }
    assert thread_env(None) == {}
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        thread_env(0)


def test_a_forward_pass_claims_no_optimizer_and_train_rows_keep_their_identity():
    infer = STEP.replace(mode="infer", optimizer=None)
    row = infer.as_dict()
    assert row["mode"] == "infer" and row["optimizer"] is None
    assert {k: v for k, v in row.items() if k not in ("mode", "optimizer")} == {
        k: v for k, v in STEP.as_dict().items() if k != "optimizer"
    }
    assert StepConfig.from_json(infer.to_json()) == infer
    assert "mode" not in STEP.as_dict()  # train rows: the keys they always had
    assert StepConfig().optimizer == "adam" and StepConfig(mode="infer").optimizer is None


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"mode": "serve"}, "mode 'serve' is not one of train, infer"),
        ({"mode": "infer"}, "an inference pass \\(mode infer\\) builds no optimizer"),
        ({"mode": "infer", "optimizer": None, "remat": "blocks"}, "takes remat none"),
    ],
)
def test_a_forward_pass_refuses_what_it_would_not_use(changes, expect):
    with pytest.raises(ConfigError, match=expect):
        STEP.replace(**changes)


def test_a_patch_cut_across_ranks_keeps_old_rows_identity_and_refuses_what_cannot_run():
    cut = StepConfig(patch_size=256, spatial_workers=2)
    assert cut.as_dict()["spatial_workers"] == 2
    assert StepConfig.from_json(cut.to_json()) == cut
    assert "spatial_workers" not in StepConfig(patch_size=256).as_dict()
    refusals = [
        ({"patch_size": 240}, "multiple of spatial_workers x output stride \\(32\\)"),
        ({"precision": "mixed_float16"}, "precision 'mixed_float16' with spatial_workers 2"),
        ({"backend": "torch"}, "backend 'torch' with spatial_workers 2"),
        ({"engine": "tf", "workers": 2}, "composes with data parallelism under engine"),
        ({"workers": 2}, "composes with data parallelism under engine 'horovod'"),
    ]
    for changes, expect in refusals:
        with pytest.raises(ConfigError, match=expect):
            cut.replace(**changes)
    assert cut.replace(precision="mixed_bfloat16", remat="full").remat == "full"  # runs
    # two blocks of two ranks under Horovod: spatial x data parallelism
    assert cut.replace(engine="horovod", workers=2).as_dict()["workers"] == 2
