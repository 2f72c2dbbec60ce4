"""Test-run options shared by the whole suite."""

import os

import pytest

# Keep TensorFlow's start-up chatter out of test logs; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow starts in the environment every histoseg command gives it (histoseg.startup:
# the CPU allocator's statistics on), whichever test module imports it first.
import histoseg  # noqa: F401


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
