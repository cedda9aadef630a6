"""What a run folder was started on, so a resume cannot go on with other data, ids or settings.

A run folder resumes from its checkpoints; resumed with another image set or identifier map, the
loop would train a model whose id rows belong to neither. ``fingerprint.json`` records what the
run was started on, and a resume that differs is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grace.atomic_io import write_json
from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.identifiers import IdentifierMap

FINGERPRINT_FILE = "fingerprint.json"
# Settings a resumed run may change: how long it goes on and how it is run, not what it learns.
RESUMABLE_SETTINGS = frozenset(
    {"epochs", "max_seconds", "num_threads", "checkpoint_every", "keep_checkpoints", "processes"}
)


# (fingerprint part, what it is, what it counts)
_PARTS = (("data", "image set", "images"), ("identifiers", "identifier map", "ids"))


def _digest(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def run_fingerprint(
    records: Sequence[ImageRecord], id_map: IdentifierMap, config: dict[str, Any]
) -> dict[str, Any]:
    """The data, identifier map and settings a run trains on, as digests and a settings dict.

    Args:
        records: The live records the run trains on (their key is the image bytes' sha256).
        id_map: The identifier map.
        config: ``TrainConfig.to_dict()``.
    """
    data = sorted((r.key, r.path, r.split, list(r.captions)) for r in records)
    ids = [id_map.scheme, id_map.params, sorted(id_map.ids.items()), sorted(id_map.retired)]
    fingerprint = {
        "data": {"sha256": _digest(data), "images": len(data)},
        "identifiers": {"sha256": _digest([ids]), "scheme": id_map.scheme, "ids": len(id_map)},
        "settings": {k: v for k, v in config.items() if k not in RESUMABLE_SETTINGS},
    }
    return json.loads(json.dumps(fingerprint))  # as it reads back: tuples are lists


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one readable line each."""
    out = []
    for part, name, count in _PARTS:
        a, b = before[part], now[part]
        if a["sha256"] != b["sha256"]:
            scheme = f", scheme {a['scheme']} -> {b['scheme']}" if "scheme" in a else ""
            out.append(f"{part}: another {name} ({a[count]} {count} -> {b[count]}{scheme})")
    old, new = before["settings"], now["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"setting {key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def check_or_record(
    out: str | os.PathLike, fingerprint: dict[str, Any], resuming: bool, record: bool = True
) -> None:
    """Record ``fingerprint`` in a new run folder; on a resume, refuse one that differs.

    Args:
        out: The run folder.
        fingerprint: ``run_fingerprint`` of this run.
        resuming: Whether ``out`` already holds a run to go on with.
        record: Whether this process writes the file (the main rank only).

    Raises:
        GraceError: The folder's run was started on other data, ids or settings.
    """
    path = Path(out) / FINGERPRINT_FILE
    if resuming and path.is_file():
        found = differences(json.loads(path.read_text()), fingerprint)
        if found:
            raise GraceError(
                f"{out} holds a run started on something else, so it cannot resume: "
                + "; ".join(found)
                + ". Train into a new folder, or delete this one to start over"
            )
        return
    if record:  # a folder from before fingerprints gets one now
        write_json(path, fingerprint)
