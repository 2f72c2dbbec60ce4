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
