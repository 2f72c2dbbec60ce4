"""Sizes, configs and sweeps: the harness's plain-Python parts (no TensorFlow run)."""

import json

import pytest

from bench.config import expand_sweep
from bench.memory import build_parser, compare_to_baseline, configs_from_args
from bench.memory_table import summary_table
from histoseg.config import StepConfig
from histoseg.errors import ConfigError
from histoseg.memory.devices import available_bytes, format_bytes, parse_size, total_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24 * 10**9),
        ("80GiB", 80 * 2**30),
        ("512 MB", 512 * 10**6),
        ("1.5G", 1_500_000_000),
        ("100", 100),
        (2e9, 2_000_000_000),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "24 parsecs", "-3GB", "1e9GB"])
def test_parse_size_rejects_what_is_not_a_size(text):
    with pytest.raises(ConfigError, match="memory size"):
        parse_size(text)


def test_format_bytes_uses_gb_then_mb():
    assert format_bytes(24_800_000_000) == "24.8 GB"
    assert format_bytes(123_000_000) == "123 MB"
    assert format_bytes(None) == "-"


def test_cpu_memory_is_known_and_gpu_absent_is_none():
    assert 0 < available_bytes("cpu") <= total_bytes("cpu")
    with pytest.raises(ConfigError, match="device"):
        available_bytes("tpu")


def test_config_as_dict_has_the_design_keys_and_round_trips():
    config = StepConfig(patch_size=256, backbone_options=(("alpha", 0.35),), threads=2)
    d = config.as_dict()
    for key in (
        "patch_size",
        "batch_size",
        "backbone",
        "output_stride",
        "precision",
        "remat",
        "device",
        "threads",
        "engine",
        "workers",
    ):
        assert key in d
    assert "steps" not in d  # steps change timing, not the config's identity
    assert d["backbone_options"] == {"alpha": 0.35}
    assert StepConfig.from_json(config.to_json()) == config
    assert StepConfig.from_dict(json.loads(json.dumps(d))) == config.replace(steps=3)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"patch_size": 250}, "multiple of the output stride"),
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "float8"}, "precision"),
        ({"remat": "some"}, "remat"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_rejects_bad_values_naming_them(changes, match):
    with pytest.raises(ConfigError, match=match):
        StepConfig(**changes)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown config key"):
        StepConfig.from_dict({"patch_size": 256, "colour": "red"})


def test_sweep_is_the_product_of_the_list_options():
    args = build_parser().parse_args(
        ["--sizes", "256", "512", "--batch-sizes", "1", "2", "--remat", "none", "blocks"]
    )
    configs = configs_from_args(args)
    assert len(configs) == 8
    assert len({c.as_dict()["patch_size"] for c in configs}) == 2
    assert configs[0].patch_size == 256 and configs[1].patch_size == 512  # size varies fastest
    assert expand_sweep(StepConfig(), patch_size=[256, 256]) == [StepConfig(patch_size=256)]


def _row(activation, peak):
    return {"measured": {"activation_bytes_per_patch": activation, "peak_bytes_per_patch": peak}}


def test_baseline_comparison_flags_growth_and_shrinkage():
    base = _row(100.0, 200.0)
    verdicts = {c["metric"]: c["verdict"] for c in compare_to_baseline(base, _row(106, 204))}
    assert verdicts == {"activation_bytes_per_patch": "grew", "peak_bytes_per_patch": "same"}
    verdicts = {c["metric"]: c["verdict"] for c in compare_to_baseline(base, _row(90, 200))}
    assert verdicts["activation_bytes_per_patch"] == "shrank"


def test_summary_table_marks_predicted_rows_and_lists_reasons():
    rows = [
        {
            "status": "skipped",
            "reason": "predicted 26.5 GB > 21.9 GB free",
            "config": StepConfig(patch_size=2048, threads=2).as_dict(),
            "predicted": {"activation_bytes": 25e9, "peak_bytes": 26.5e9},
        }
    ]
    table = summary_table(rows)
    assert "predicted" in table and "26.50" in table
    assert "predicted 26.5 GB > 21.9 GB free" in table


def test_config_choices_mirror_the_model_registries():
    from histoseg import config, models

    assert tuple(models.BACKBONES) == config.BACKBONES
    assert tuple(models.PRECISIONS) == config.PRECISIONS
    assert tuple(models.REMAT_MODES) == config.REMAT_MODES
    assert tuple(models.NORMS) == config.NORMS


def test_an_unknown_backbone_is_a_config_error():
    from histoseg.config import StepConfig

    with pytest.raises(ConfigError, match="backbone 'foo' is not one of xception65"):
        StepConfig(backbone="foo")


def test_sampled_configs_cover_every_axis_and_repeat_for_a_seed():
    from bench.config import sample_configs
    from histoseg.config import BACKBONES, OPTIMIZERS, PRECISIONS, REMAT_MODES

    configs = sample_configs(24, seed=3)
    assert configs == sample_configs(24, seed=3)
    assert configs != sample_configs(24, seed=4)
    for axis, values in [
        ("backbone", BACKBONES),
        ("optimizer", OPTIMIZERS),
        ("precision", PRECISIONS),
        ("remat", REMAT_MODES),
        ("output_stride", (8, 16)),
    ]:
        assert {getattr(c, axis) for c in configs} == set(values), axis
    assert all(c.batch_size * c.patch_size**2 <= 0.27e6 or c.batch_size == 1 for c in configs)
    assert {c.batch_size for c in configs} >= {1, 2}


def test_drawn_norms_leave_the_rest_of_a_draw_as_it_was():
    """Normalisations come from a stream of their own: a seed's draw with batch norm alone
    (every draw made before norms were drawn) is the same configs, norm aside."""
    from bench.config import sample_configs
    from histoseg.config import NORMS

    plain = sample_configs(12, seed=0)
    mixed = sample_configs(12, seed=0, norms=NORMS)
    norms = [dict(c.backbone_options).get("norm", "batch") for c in mixed]
    assert sorted(norms) == sorted(NORMS * 4)
    strip = [c.replace(backbone_options=tuple(o for o in c.backbone_options if o[0] != "norm"))
             for c in mixed]  # fmt: skip
    assert strip == plain
