"""Small fixture rows for the plots and results-README tests (no training, no TensorFlow)."""

from __future__ import annotations

import pytest

from histoseg.results import make_row, write_rows

MACHINE = {
    "cpu": "Test CPU @ 2.0GHz",
    "cores": 2,
    "ram_bytes": 24 * 10**9,
    "gpu": None,
    "versions": {"python": "3.11", "tensorflow": "2.21.0", "keras": "3.15.1", "horovod": None},
    "commit": "abc123def456",
}
GB = 10**9


def _config(patch_size, **overrides):
    config = {
        "patch_size": patch_size,
        "batch_size": 1,
        "backbone": "xception65",
        "output_stride": 16,
        "precision": "float32",
        "remat": "none",
        "device": "cpu",
        "threads": 2,
        "engine": "none",
        "workers": 1,
    }
    config.update(overrides)
    return config


def memory_rows():
    """xception65 float32 (256-1024 measured, 2048 skipped but predicted) and a bf16/blocks series."""
    rows = []
    for size, peak in ((256, 0.95), (704, 3.6), (1024, 6.95)):
        rows.append(
            make_row(
                "memory",
                _config(size),
                measured={"peak_bytes": peak * GB, "activation_bytes": 0.8 * peak * GB},
                predicted={"peak_bytes": 1.02 * peak * GB},
                extra={"command": "python -m bench.memory --sizes 256 704 1024 2048"},
                machine=MACHINE,
            )
        )
    rows.append(
        make_row(
            "memory",
            _config(2048),
            status="skipped",
            reason="predicted 26.1 GB > 21.9 GB free",
            predicted={"peak_bytes": 26.1 * GB},
            extra={"command": "python -m bench.memory --sizes 256 704 1024 2048"},
            machine=MACHINE,
        )
    )
    for size, peak in ((256, 0.5), (1024, 2.1), (2048, 7.0)):
        rows.append(
            make_row(
                "memory",
                _config(size, precision="mixed_bfloat16", remat="blocks"),
                measured={"peak_bytes": peak * GB},
                predicted={"peak_bytes": 0.97 * peak * GB},
                machine=MACHINE,
            )
        )
    return rows


def accuracy_rows():
    """mobilenetv2: two measured sizes, one with predicted memory only, one skipped."""
    rows = []
    metrics = {
        256: {"accuracy": 0.81, "miou": 0.62, "auc": 0.84, "val_patches": 96},
        512: {"accuracy": 0.88, "miou": 0.74, "auc": 0.91, "val_patches": 24},
    }
    for size, m in metrics.items():
        rows.append(
            make_row(
                "accuracy",
                _config(size, backbone="mobilenetv2", data="synthetic"),
                measured={"peak_bytes": (0.2 + size**2 * 2.4e3 / 1e9) * GB},
                metrics=m,
                extra={"command": "python -m bench.accuracy --sizes 256 512 1024 2048"},
                machine=MACHINE,
            )
        )
    rows.append(
        make_row(
            "accuracy",
            _config(1024, backbone="mobilenetv2", data="synthetic"),
            predicted={"peak_bytes": 2.7 * GB},
            metrics={"accuracy": 0.9, "miou": 0.78, "auc": 0.93, "val_patches": 6},
            machine=MACHINE,
        )
    )
    rows.append(
        make_row(
            "accuracy",
            _config(2048, backbone="mobilenetv2", data="synthetic"),
            status="skipped",
            reason="predicted 10.3 GB > 8.0 GB budget; rerun with --allow-remat",
            machine=MACHINE,
        )
    )
    return rows


def scaling_rows():
    """horovod with fp16 compression and tf without, 1 and 2 workers, one failed 4-worker run."""
    rows = []
    projection = [
        {"workers": w, "efficiency": 1.0 / (1 + 0.01 * w**0.5)} for w in (1, 2, 8, 64, 512)
    ]
    for engine, compression in (("horovod", "fp16"), ("tf", "none")):
        for workers, eff in ((1, 1.0), (2, 0.93)):
            rows.append(
                make_row(
                    "scaling",
                    _config(
                        512, engine=engine, workers=workers, threads=1, compression=compression
                    ),
                    scaling={
                        "throughput_per_worker": 1.5 * eff,
                        "efficiency": eff,
                        "allreduce_s": 0.02,
                    },
                    extra={"projection": projection} if engine == "horovod" else None,
                    machine=MACHINE,
                )
            )
    rows.append(
        make_row(
            "scaling",
            _config(512, engine="horovod", workers=4, threads=1, compression="fp16"),
            status="error",
            reason="4 workers need 4 cores, this machine has 2",
            machine=MACHINE,
        )
    )
    return rows


@pytest.fixture
def machine():
    """The fixed machine every fixture row names."""
    return dict(MACHINE)


@pytest.fixture
def fixture_rows():
    """All fixture rows by kind."""
    return {"memory": memory_rows(), "accuracy": accuracy_rows(), "scaling": scaling_rows()}


@pytest.fixture
def results_dir(tmp_path, fixture_rows):
    """A results folder holding one file per kind, written with the schema's own writer."""
    folder = tmp_path / "results"
    for kind, rows in fixture_rows.items():
        write_rows(folder / f"{kind}.json", rows)
    return folder
