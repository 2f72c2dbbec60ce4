"""Engines: the interface, its errors, and real 2-rank runs (Horovod over Gloo, tf.distribute).

The multi-rank tests run ``histoseg.train.engines.selfcheck`` (a tiny mobilenetv2 DeepLabV3+
at 64 px, 2 SGD steps) as real processes on localhost and compare with one worker given the
combined batch. Batch normalisation runs in inference mode there (see the selfcheck's
docstring): with batch statistics, two ranks normalise their halves separately and would
legitimately differ from one worker normalising the whole batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from histoseg.errors import ConfigError, EngineUnavailableError
from histoseg.train import launch
from histoseg.train.engines import get_engine, horovod_available

STEPS = 2
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
SELFCHECK = [sys.executable, "-m", "histoseg.train.engines.selfcheck", "--steps", str(STEPS)]


def test_none_engine_is_a_world_of_one():
    engine = get_engine("none").init()
    assert (engine.rank, engine.size, engine.local_rank, engine.is_chief) == (0, 1, 0, True)
    grads = [np.ones(3, np.float32), None]
    assert engine.allreduce_gradients(grads, compression="fp16") == grads
    engine.broadcast_variables([])
    engine.barrier()
    with pytest.raises(ConfigError, match="fp16"):
        engine.allreduce_gradients(grads, compression="int8")


def test_unknown_engine_and_missing_horovod_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="none, horovod, tf"):
        get_engine("mpi")
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)  # as if not installed
    with pytest.raises(EngineUnavailableError, match=r"build_horovod\.sh"):
        get_engine("horovod")


def test_launcher_helpers():
    ports = launch.free_ports(3)
    assert len(set(ports)) == 3
    config = json.loads(launch.tf_config(["127.0.0.1:1", "127.0.0.1:2"], 1))
    assert config == {
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 1},
    }
    with pytest.raises(ConfigError):
        launch.tf_config(["a:1"], 1)
    assert launch.thread_env(1)["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ConfigError):
        launch.thread_env(0)


@pytest.mark.skipif(not horovod_available(), reason="Horovod not built (scripts/build_horovod.sh)")
def test_horovodrun_command_for_a_cluster():
    cmd = launch.horovodrun_command(4, ["python", "-m", "x"], hosts="a:2,b:2")
    assert cmd[1:] == ["-np", "4", "-H", "a:2,b:2", "--gloo", "python", "-m", "x"]


def _load(folder, ranks):
    return [dict(np.load(folder / f"rank{r}.npz")) for r in range(ranks)]


@pytest.fixture(scope="module")
def single_worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcheck-none")
    subprocess.run([*SELFCHECK, "--engine", "none", "--out", str(out)], env=ENV, check=True)
    return _load(out, 1)[0]


def _check_against_single(ranks, single):
    weights = [k for k in single if k.startswith("w")]
    # identical weights on every rank, bit for bit: both ranks applied the same averaged
    # gradients to the same broadcast initial weights
    for other in ranks[1:]:
        assert all(np.array_equal(ranks[0][k], other[k]) for k in weights)
    # same loss as one worker with the combined batch, within float tolerance (the two
    # halves go through differently-sized convolutions, so the rounding differs)
    np.testing.assert_allclose(ranks[0]["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    worst = max(float(np.max(np.abs(ranks[0][k] - single[k]))) for k in weights)
    assert worst < 1e-5
    # fp16 compression: within the fp16 rounding bound of the fp32 allreduce, and not free
    assert float(ranks[0]["fp16_max_ratio"]) <= 1.0
    assert float(ranks[0]["fp16_max_abs_diff"]) > 0.0


@pytest.fixture(scope="module")
def horovod_ranks(tmp_path_factory):
    """Run (once per step mode) the selfcheck as 2 Horovod ranks; returns the ranks' files."""
    runs = {}

    def run(step_mode):
        if step_mode not in runs:
            out = tmp_path_factory.mktemp(f"selfcheck-horovod-{step_mode}")
            command = [*SELFCHECK, "--engine", "horovod", "--step", step_mode, "--out", str(out)]
            subprocess.run(launch.horovodrun_command(2, command), env=ENV, check=True, timeout=300)
            runs[step_mode] = _load(out, 2)
        return runs[step_mode]

    return run


@pytest.mark.horovod
@pytest.mark.skipif(not horovod_available(), reason="Horovod not built (scripts/build_horovod.sh)")
def test_two_horovod_ranks_train_like_one_worker(horovod_ranks, single_worker):
    ranks = horovod_ranks("overlap")  # the default step mode
    assert str(ranks[0]["step_mode"]) == "overlap"
    _check_against_single(ranks, single_worker)
    # one allreduce op per gradient inside the compiled step, none of them chained to
    # another op by a control edge (each waits only for its own gradient)
    assert int(ranks[0]["collective_ops"]) == int(single_worker["trainable_variables"])
    assert int(ranks[0]["chained_collective_ops"]) == 0


@pytest.mark.slow  # a second horovodrun launch: ~25 s of CI's ten minutes
@pytest.mark.horovod
@pytest.mark.skipif(not horovod_available(), reason="Horovod not built (scripts/build_horovod.sh)")
def test_the_three_call_horovod_step_trains_like_the_overlapped_one(horovod_ranks, single_worker):
    separate = horovod_ranks("separate")
    assert str(separate[0]["step_mode"]) == "separate"
    _check_against_single(separate, single_worker)
    overlap = horovod_ranks("overlap")
    for key in (k for k in single_worker if k.startswith("w")):
        np.testing.assert_allclose(overlap[0][key], separate[0][key], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(overlap[0]["losses"], separate[0]["losses"], rtol=1e-6)


@pytest.mark.slow  # two MultiWorkerMirroredStrategy processes: over a minute of CI's ten
def test_two_tf_distribute_workers_train_like_one_worker(tmp_path, single_worker):
    codes = launch.launch_tf_workers(
        2,
        [*SELFCHECK, "--engine", "tf", "--step", "overlap", "--out", str(tmp_path)],
        env={"TF_CPP_MIN_LOG_LEVEL": "2"},
        log_dir=tmp_path / "logs",
        timeout_s=300,
    )
    assert codes == [0, 0], (tmp_path / "logs" / "worker-1.log").read_text()[-2000:]
    ranks = _load(tmp_path, 2)
    _check_against_single(ranks, single_worker)
    # the overlapped step reduces its gradients in a few packed collectives inside the graph
    assert int(ranks[0]["collective_ops"]) >= 2


def test_a_launch_reports_the_first_real_failure():
    assert launch.exit_status([0, 0]) == 0
    assert launch.exit_status([-15, 3]) == 3  # rank 1 failed; the launcher stopped rank 0
    assert launch.exit_status([0, -9]) == 137  # killed by SIGKILL, as a shell reports it
