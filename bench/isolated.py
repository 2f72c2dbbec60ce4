"""One protocol for running a sweep point in a fresh process: :func:`run_isolated`.

A point runs in its own process so that its allocator peak, thread pools and any crash are
its own. The worker prints one JSON object with a ``status`` ("ok", "oom" or "error") as the
last line of its stdout and exits 0; everything else it prints goes to stderr. Whatever
else happens becomes a result with a reason, never an exception in the sweep:

- a timeout: the worker's process group is killed, ``error``, "timed out after N s";
- death by SIGKILL (what the kernel's out-of-memory killer sends): ``oom``; another signal:
  ``error``, naming it;
- a non-zero exit without a status line: ``error`` (``oom`` when its stderr names an
  allocator failure), with the last line of its stderr.

The worker runs in a new session, so a signal sent to the sweep reaches the sweep only:
SIGINT or SIGTERM ends the worker's whole process group (SIGTERM, then SIGKILL after
:data:`STOP_GRACE_S`), waits for it, and then ends the sweep, so no worker outlives it and
no half-measured point is written.

For timed sweeps on a shared machine, :func:`wait_for_quiet` waits before a launch until
other jobs leave the cores alone, and :func:`busy_cpu_s` says how busy they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from histoseg.cli import Terminated

#: Seconds a worker's group gets between SIGTERM and SIGKILL when the sweep is stopped.
STOP_GRACE_S = 5.0
#: Bytes of a worker's stderr kept for a failure's reason.
TAIL_BYTES = 4000


def worker_env() -> dict[str, str]:
    """This process's environment with the repository on PYTHONPATH (``python -m bench.x``
    must import ``bench`` from the same tree whatever the working directory)."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def run_isolated(
    command: Sequence[str],
    *,
    timeout_s: float | None = None,
    echo_stderr: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``command`` (a worker) in its own process group; return its status object.

    Args:
        command: The worker's argv.
        timeout_s: Kill the worker's group after this many seconds (None: no limit).
        echo_stderr: Pass the worker's stderr through as it comes (progress bars).
        env: The worker's environment (default :func:`worker_env`).

    Returns:
        The worker's last-line JSON object when it exited 0 with one, else
        ``{"status": "oom" | "error", "reason": ...}``.
    """
    finished = run_process(command, timeout_s=timeout_s, echo_stderr=echo_stderr, env=env)
    if finished.timed_out:
        return {"status": "error", "reason": f"timed out after {timeout_s:g} s"}
    return _outcome(finished)


@dataclasses.dataclass(frozen=True)
class Finished:
    """How a process run by :func:`run_process` ended."""

    returncode: int
    stdout: bytes
    stderr_tail: bytes
    elapsed_s: float
    timed_out: bool

    @property
    def last_stderr_line(self) -> str:
        text = self.stderr_tail.decode("utf-8", "replace").replace("\r", "\n")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1][:300] if lines else "no output"


def run_process(
    command: Sequence[str],
    *,
    timeout_s: float | None = None,
    echo_stderr: bool = False,
    env: dict[str, str] | None = None,
) -> Finished:
    """Run ``command`` in a new session, its stdout kept and its stderr's tail, and end its
    whole process group on a timeout or when this process is stopped (module docstring).
    For launchers whose result is not a status line (``bench.scaling``'s ranks write files);
    a worker that prints one is run with :func:`run_isolated`."""
    started = time.monotonic()
    out: list[bytes] = []
    tail = bytearray()
    timed_out = False
    with _guarded_worker(command, env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, out.append), daemon=True),
            threading.Thread(
                target=_drain, args=(proc.stderr, _tail_writer(tail, echo_stderr)), daemon=True
            ),
        ]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # the worker is done (or timed out): nothing of its group may outlive it, and a
        # child of it still holding the pipes must not hold this process either
        _kill_group(proc)
        for reader in readers:
            reader.join(timeout=STOP_GRACE_S)
    elapsed = time.monotonic() - started
    return Finished(proc.returncode, b"".join(out), bytes(tail), elapsed, timed_out)


def _outcome(finished: Finished) -> dict[str, Any]:
    """What a finished worker gave back (see the module docstring for the rules)."""
    returncode = finished.returncode
    status_line = _last_json(finished.stdout.decode("utf-8", "replace"))
    if returncode == 0 and status_line is not None and "status" in status_line:
        return status_line
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-returncode}"
        after = f"after {finished.elapsed_s:.0f} s"
        if returncode == -signal.SIGKILL:
            reason = f"worker killed by {name} (likely the out-of-memory killer) {after}"
            return {"status": "oom", "reason": reason}
        return {"status": "error", "reason": f"worker killed by {name} {after}"}
    last = finished.last_stderr_line
    oom = b"ResourceExhausted" in finished.stderr_tail or "OOM" in last
    return {
        "status": "oom" if oom else "error",
        "reason": f"worker exited with {returncode}: {last}",
    }


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _drain(stream: IO[bytes], sink) -> None:
    """Read ``stream`` to its end, handing each chunk to ``sink``. A sink that fails (a
    closed stderr to echo to) is dropped, but the pipe is still read, so the worker is
    never blocked on a full pipe."""
    try:
        # os.read returns what is there: progress bars end lines with \r, not \n
        while chunk := os.read(stream.fileno(), 65536):
            if sink is not None:
                try:
                    sink(chunk)
                except (OSError, ValueError, AttributeError):
                    sink = None
    finally:
        stream.close()


def _tail_writer(tail: bytearray, echo: bool):
    def write(chunk: bytes) -> None:
        if echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        tail.extend(chunk)
        del tail[:-TAIL_BYTES]

    return write


def _kill_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """End the worker's process group: SIGTERM, then SIGKILL after ``grace_s``. The SIGKILL
    is sent whatever interrupts the grace period (a second Ctrl-C)."""
    try:
        if grace_s > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _guarded_worker(command: Sequence[str], env: dict[str, str] | None) -> Iterator[Any]:
    """Start the worker in a new session; whatever ends the block (SIGINT, SIGTERM, any
    exception) ends the worker's process group first.

    While the worker is being started, SIGINT and SIGTERM are only noted: they are raised
    again once the guard is in place, so none can unwind past a started worker. Under
    ``histoseg.cli.run_main`` SIGTERM unwinds the command (it raises
    :class:`histoseg.cli.Terminated`); elsewhere the guard makes it do so while the worker
    runs, since dying at once would leave the worker (in its own session) running. Signal
    handlers can only be set in the main thread: elsewhere a signal to this process does
    not reach the worker.
    """
    main = threading.current_thread() is threading.main_thread()
    noted: list[int] = []
    previous: dict[int, Any] = {}
    if main:
        previous = {s: signal.signal(s, lambda n, f: noted.append(n)) for s in _STOP_SIGNALS}
    try:
        proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env if env is not None else worker_env(),
            start_new_session=True,
        )
    except BaseException:
        _restore(previous, noted)
        raise
    try:
        if main and previous[signal.SIGTERM] in (signal.SIG_DFL, None):
            previous[signal.SIGTERM] = _raise_terminated
        _restore(previous, noted)
        yield proc
    except BaseException:
        _kill_group(proc, grace_s=STOP_GRACE_S)
        raise
    finally:
        if main and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _restore(previous: dict[int, Any], noted: list[int]) -> None:
    """Put the handlers back, then raise the signals noted meanwhile through them."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    for signum in noted:
        signal.raise_signal(signum)


def wait_for_quiet(max_cores: float, timeout_s: float = 120.0) -> None:
    """Before a launch, wait (up to ``timeout_s``) until the machine's busy cores, sampled
    over 2 s, fall to ``max_cores`` or fewer: other jobs' start-ups and tests pass by."""
    if max_cores >= (os.cpu_count() or 1):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy0, wall0 = busy_cpu_s(), time.monotonic()
        time.sleep(2.0)
        if (busy_cpu_s() - busy0) / (time.monotonic() - wall0) <= max_cores:
            return


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


# ----------------------------------------------------------------------------- driver side
