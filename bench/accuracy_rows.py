"""The accuracy sweep's rows on disk: a point's identity, merging a new row, resuming.

Sweeps of other seeds or tasks may share one results file: each row is merged into it under
a lock as soon as it is made, and a resumed sweep skips the points the file already holds.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from histoseg.files import locked
from histoseg.results import load_rows_if_exists, write_rows

#: Config keys that name a sweep point independently of how it was made to fit (precision
#: and remat may be changed by the planner, steps follow from the budget).
PLANNED_KEYS = ("precision", "remat", "steps")


def point_key(config: dict) -> str:
    """A sweep point's identity: the config without what the planner chose (precision, remat, steps),
    plus what the user asked for, kept in ``requested_*`` keys of the config."""
    return json.dumps(
        {k: v for k, v in config.items() if k not in PLANNED_KEYS}, sort_keys=True, default=str
    )


def replace_point(rows: list[dict], new_row: dict) -> list[dict]:
    """Rows with ``new_row`` replacing any earlier accuracy row of the same sweep point."""
    key = point_key(new_row["config"])
    kept = [
        r
        for r in rows
        if not (r.get("kind") == "accuracy" and point_key(r.get("config", {})) == key)
    ]
    return [*kept, new_row]


def rows_lock(out: Path) -> Path:
    """The lock file that serialises read-merge-write of ``out`` between sweep processes
    (in the temporary folder, so nothing is left beside the user's results)."""
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"histoseg-rows-{key}.lock"


def save_row(out: Path, row: dict) -> None:
    """Write ``row`` into ``out`` as soon as it is made, so an interrupted sweep keeps what it
    measured; merged with what the file holds now, so sweeps of other seeds or tasks may
    share one ``--out``."""
    with locked(rows_lock(out)):
        write_rows(out, replace_point(load_rows_if_exists(out), row))


def finished_row(rows: Sequence[dict], config: dict) -> dict | None:
    """The ok accuracy row already measured for this sweep point, if any (what resume skips)."""
    key = point_key(config)
    for row in rows:
        if (
            row.get("kind") == "accuracy"
            and row.get("status") == "ok"
            and point_key(row.get("config", {})) == key
        ):
            return row
    return None
