"""Commands start quietly: TensorFlow's import-time log lines are kept off stderr unless
--verbose, and nothing else written to stderr during the import is lost."""

from __future__ import annotations

import os
import subprocess
import sys

NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796515702.147555   22113 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results.\n"
)


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_startup_noise_is_dropped_and_everything_else_replayed():
    written = (NOISE + "a real warning\n").encode()
    code = (
        "import os\nfrom histoseg.startup import _stderr_filtered\n"
        f"with _stderr_filtered():\n    os.write(2, {written!r})\n"
    )
    assert _run(code).stderr == "a real warning\n"


def test_a_failed_import_shows_every_captured_line():
    code = (
        "import os\nfrom histoseg.startup import _stderr_filtered\n"
        f"with _stderr_filtered():\n    os.write(2, {NOISE.encode()!r})\n    raise SystemExit(3)\n"
    )
    done = _run(code)
    assert done.returncode == 3 and done.stderr == NOISE


def test_a_command_imports_tensorflow_quietly_and_verbose_shows_its_lines():
    code = "import histoseg, tensorflow, keras; print(tensorflow.__loader__.__module__)"
    quiet = _run(code)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.strip() != "histoseg.startup"  # the loader is put back after the import
    verbose = _run(code, "--verbose")
    # TensorFlow 2.21 logs at import (oneDNN on the CPU); --verbose lets it through
    assert verbose.returncode == 0 and "port.cc" in verbose.stderr, verbose.stderr


def test_the_cpu_allocator_keeps_statistics_unless_the_user_turns_onednn_off():
    """Every CPU memory figure is read from the allocator's statistics, which TensorFlow keeps
    only with oneDNN on; it turns oneDNN on by itself only on some CPUs."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    code = (
        "import histoseg, tensorflow as tf; print(tf.config.experimental.get_memory_info('CPU:0'))"
    )
    on = _run(code, env=env)
    assert on.returncode == 0 and "'peak'" in on.stdout, on.stderr
    code = (
        "from histoseg.errors import ConfigError\nfrom histoseg.memory.probe import allocator_info\n"
        "try:\n    allocator_info('CPU:0')\nexcept ConfigError as err:\n    print(err)\n"
    )
    off = _run(code, env={**env, "TF_ENABLE_ONEDNN_OPTS": "0"})  # the user's value wins
    assert "TF_ENABLE_ONEDNN_OPTS" in off.stdout and off.stdout.count("\n") == 1, off.stderr
