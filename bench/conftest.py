"""pytest-benchmark set-up for ``pytest bench/``: options, machine info, TF thread pinning.

``pytest bench/ --benchmark-json out.json`` runs the benchmarks here (the default test run
collects ``tests/`` only, so benchmarks never slow it down). Sizes default to a few minutes'
worth on a 2-core machine; ``--bench-sizes 256 512 1024`` asks for more.
"""

from __future__ import annotations

# TensorFlow starts in the environment every histoseg command gives it (histoseg.startup).
import histoseg  # noqa: F401

DEFAULT_SIZES = (128, 256)


def pytest_addoption(parser):
    group = parser.getgroup("histoseg benchmarks")
    group.addoption(
        "--bench-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        help=f"patch sizes (px) for the train-step benchmarks (default {DEFAULT_SIZES})",
    )
    group.addoption(
        "--bench-backbone",
        default="xception65",
        help="backbone for the train-step benchmarks (default xception65)",
    )
    group.addoption(
        "--bench-precision",
        default="float32",
        help="precision policy for the train-step benchmarks (default float32)",
    )
    group.addoption(
        "--bench-remat",
        default="none",
        help="recomputation mode for the train-step benchmarks (default none)",
    )


def pytest_generate_tests(metafunc):
    if metafunc.definition.name == "test_train_step":
        metafunc.parametrize("patch_size", metafunc.config.getoption("--bench-sizes"))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add what the memory and speed figures depend on: TF, Keras, GPU, commit, RAM."""
    from histoseg.results import machine_info as histoseg_machine_info

    info = histoseg_machine_info()
    machine_info["histoseg"] = info
    machine_info["tensorflow"] = info["versions"]["tensorflow"]
    machine_info["keras"] = info["versions"]["keras"]
    machine_info["gpu"] = info["gpu"]
    machine_info["ram_bytes"] = info["ram_bytes"]
    machine_info["commit"] = info["commit"]
