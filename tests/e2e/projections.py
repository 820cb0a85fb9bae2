"""A Python read-model handler, loaded by the gateway under test as `tests.e2e.projections:tally`."""

from __future__ import annotations

from typing import Any


def tally(document: dict[str, Any] | None, event: Any) -> dict[str, Any] | None:
    """Counts a stream's events by type; `StreamClosed` deletes the document."""
    if event.type == "StreamClosed":
        return None
    if event.type == "Explode":
        raise RuntimeError(f"cannot tally {event.data!r}")
    document = document or {"events": 0, "types": {}}
    document["events"] += 1
    document["types"][event.type] = document["types"].get(event.type, 0) + 1
    return document


def tally_fixed(document: dict[str, Any] | None, event: Any) -> dict[str, Any] | None:
    """`tally` once its bug is fixed: `Explode` is counted like any other type."""
    if event.type == "StreamClosed":
        return None
    document = document or {"events": 0, "types": {}}
    document["events"] += 1
    document["types"][event.type] = document["types"].get(event.type, 0) + 1
    return document
