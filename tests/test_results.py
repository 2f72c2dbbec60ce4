"""The results-row schema: building, validating, merging and atomic files."""

import json

import pytest

from histoseg.errors import ResultsError
from histoseg.results import (
    SCHEMA,
    config_key,
    load_rows,
    make_row,
    merge_rows,
    write_rows,
)

CONFIG = {"patch_size": 256, "batch_size": 1, "backbone": "mobilenetv2"}


def test_make_row_omits_absent_sections_and_carries_machine():
    row = make_row("memory", CONFIG, measured={"peak_bytes": 10})
    assert row["schema"] == SCHEMA
    assert row["measured"] == {"peak_bytes": 10}
    assert "metrics" not in row and "scaling" not in row
    assert row["machine"]["cores"] >= 1
    assert row["machine"]["versions"]["python"]


def test_make_row_rejects_bad_kind_status_and_missing_reason():
    with pytest.raises(ResultsError, match="kind"):
        make_row("speed", CONFIG)
    with pytest.raises(ResultsError, match="status"):
        make_row("memory", CONFIG, status="fine")
    with pytest.raises(ResultsError, match="reason"):
        make_row("memory", CONFIG, status="oom")


def test_write_and_load_round_trip_with_csv(tmp_path):
    rows = [make_row("memory", CONFIG, measured={"peak_bytes": 1}, machine={"cores": 2})]
    path = write_rows(tmp_path / "r.json", rows)
    assert load_rows(path) == rows
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert "config.patch_size" in header and "measured.peak_bytes" in header
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_rejects_other_schema_naming_file_and_row(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"schema": "someone.else/2", "kind": "memory"}]))
    with pytest.raises(ResultsError, match=r"other\.json row 0: schema 'someone.else/2'"):
        load_rows(path)
    path.write_text("{not json")
    with pytest.raises(ResultsError, match="not JSON"):
        load_rows(path)
    with pytest.raises(ResultsError, match="no such results file"):
        load_rows(tmp_path / "absent.json")


def test_merge_replaces_same_config_and_keeps_order():
    a = make_row("memory", CONFIG, measured={"peak_bytes": 1}, machine={})
    b = make_row("memory", {**CONFIG, "patch_size": 512}, machine={})
    a2 = make_row("memory", dict(reversed(CONFIG.items())), measured={"peak_bytes": 2}, machine={})
    merged = merge_rows([a, b], [a2])
    assert [r["config"]["patch_size"] for r in merged] == [256, 512]
    assert merged[0]["measured"]["peak_bytes"] == 2
    assert config_key(a["config"]) == config_key(a2["config"])


def _rows(peak_bytes: int = 1) -> list[dict]:
    return [make_row("memory", CONFIG, measured={"peak_bytes": peak_bytes}, machine={})]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_results_files_get_the_users_umask_not_the_temporary_files_0600(tmp_path, umask, mode):
    import os

    old = os.umask(umask)
    try:
        write_rows(tmp_path / "r.json", _rows())
        write_rows(tmp_path / "r.json", _rows(2))  # replacing keeps the same rule
    finally:
        os.umask(old)
    for name in ("r.json", "r.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_full_disk_leaves_both_old_files_intact_and_says_so(tmp_path, monkeypatch, failing):
    import errno
    import os

    path = write_rows(tmp_path / "r.json", _rows())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = getattr(os, failing)
    calls = []

    def full(fd, *args):
        calls.append(fd)
        if len(calls) == 2:  # the JSON went through, the CSV does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args)

    monkeypatch.setattr(os, failing, full)
    with pytest.raises(ResultsError) as info:
        write_rows(path, _rows(2))
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert "r.csv: not written" in message and "previous file is unchanged" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp left


def test_a_foreign_json_or_companion_csv_is_refused_without_force(tmp_path):
    from histoseg.results import check_results_path

    path = tmp_path / "side.json"
    (tmp_path / "side.csv").write_text("name,score\nalice,3\n")
    with pytest.raises(ResultsError, match=r"side\.csv exists and is not a histoseg"):
        write_rows(path, _rows())
    assert not path.exists() and (tmp_path / "side.csv").read_text() == "name,score\nalice,3\n"
    write_rows(path, _rows(), force=True)
    write_rows(path, _rows(2))  # our own files are ours to replace
    assert load_rows(path)[0]["measured"]["peak_bytes"] == 2
    path.write_text('{"my": "notes"}')
    with pytest.raises(ResultsError, match=r"side\.json exists and is not a histoseg"):
        check_results_path(path)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(ResultsError, match="is a directory"):
        check_results_path(tmp_path / "d.json", force=True)
