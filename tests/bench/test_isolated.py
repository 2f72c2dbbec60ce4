"""bench.isolated: every way a worker process can end becomes a status, and a stopped sweep
leaves no worker behind. Workers here are a few lines of Python, no TensorFlow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.isolated import run_isolated


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_the_status_line_is_the_result():
    result = run_isolated(_py('print("noise"); print(\'{"status": "ok", "x": 1}\')'))
    assert result == {"status": "ok", "x": 1}


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("import sys; sys.exit(3)", "error", "worker exited with 3: no output"),
        ("raise ValueError('bad value')", "error", "ValueError: bad value"),
        ("raise MemoryError('ResourceExhaustedError: OOM')", "oom", "ResourceExhausted"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "oom", "SIGKILL"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "error", "SIGSEGV"),
        ('print(\'{"status": "ok"}\'); raise SystemExit(1)', "error", "exited with 1"),
        ("print('{not json')", "error", "exited with 0"),
    ],
)
def test_a_failed_worker_becomes_a_status_with_its_reason(code, status, reason):
    result = run_isolated(_py(code))
    assert result["status"] == status and reason in result["reason"], result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether ``pid`` is gone within ``within_s``: a SIGKILL sent to a process group is
    delivered asynchronously, and on a loaded machine (the suite under xdist) the sweep can
    exit before every member of the group has been scheduled to die."""
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


SLEEPER = """
    import subprocess, sys, time
    child = subprocess.Popen(["sleep", "600"])
    open(sys.argv[1], "w").write(f"{child.pid}")
    time.sleep(600)
"""


def test_a_timeout_ends_the_worker_and_its_children(tmp_path):
    pids = tmp_path / "pids"
    # long enough for the worker to start its child on a loaded machine
    result = run_isolated([*_py(SLEEPER), str(pids)], timeout_s=6)
    assert result == {"status": "error", "reason": "timed out after 6 s"}
    assert _gone(int(pids.read_text()))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_sweep_leaves_no_worker_running(tmp_path, signum):
    pids = tmp_path / "pids"
    sweep = f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from bench.isolated import run_isolated
        run_isolated([sys.executable, "-c", {textwrap.dedent(SLEEPER)!r}, {str(pids)!r}])
        print("not reached")
    """
    proc = subprocess.Popen(_py(sweep), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = int(pids.read_text())
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and b"not reached" not in out
    assert _gone(grandchild)


def test_a_signal_while_the_worker_starts_is_held_until_it_can_be_ended(tmp_path, monkeypatch):
    """SIGINT while the worker is being started is noted, not raised, and raised again once
    the guard that ends the worker's group is in place: no worker is left running."""
    import bench.isolated as isolated

    pids = tmp_path / "pids"
    real_popen = subprocess.Popen

    started = []

    def popen_then_interrupted(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGINT)  # arrives before run_process has the worker
        time.sleep(0.2)
        return proc

    monkeypatch.setattr(isolated.subprocess, "Popen", popen_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_isolated([*_py(SLEEPER), str(pids)], timeout_s=60)
    (worker,) = started
    assert worker.returncode is not None and not _alive(worker.pid)
    if pids.exists() and pids.read_text():
        assert _gone(int(pids.read_text()))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_broken_stderr_does_not_hang_the_worker(monkeypatch):
    """Echoing to a closed stderr (``... 2>&1 | head``) drops the echo, not the reading:
    a worker that writes a lot to stderr still finishes."""
    import io

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no .buffer: every echo fails
    code = "import sys; sys.stderr.write('x' * 1_000_000); print('{\"status\": \"ok\"}')"
    assert run_isolated(_py(code), timeout_s=60, echo_stderr=True) == {"status": "ok"}
