"""Decoding ``event_log`` rows into ``Event``s: one row at a time (``decode_event``), or one mentor's rows in one
call (``decode_events``, how replay reads the log). Never raises for bad data: a row of a kind this code does not
know, of a version it cannot upgrade, or whose data its struct refuses, becomes ``UnknownPayload``, so replay goes on.
What the kinds and versions are is ``events.py``'s.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Any, Literal
from uuid import UUID

import msgspec

from .events import CURRENT_VERSION, KINDS, UPGRADES, BasePayload, Event, Payload, UnknownPayload

__all__ = ["decode_event", "decode_events"]


@cache
def _typed_decoder(payload_type: type[BasePayload]) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(payload_type, strict=False)


def decode_event(
    seq: int,
    mentor_id: UUID | None,
    kind: str,
    version: int,
    data: Mapping[str, Any] | str | bytes,
    recorded_at: datetime,
    xid: int = 0,
) -> Event:
    """Turn an event_log row into an Event. Never raises for bad data: it becomes UnknownPayload."""
    payload_type = KINDS.get(kind)
    if payload_type is not None and version == CURRENT_VERSION[kind] and isinstance(data, (str, bytes)):
        # The common case - the current version, as JSON text - decoded straight into its struct, without the dict
        # in between, a cost replay pays once per event. Anything odd takes the general path.
        try:
            typed: Payload = _typed_decoder(payload_type).decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        else:
            return Event(
                seq=seq,
                mentor_id=mentor_id,
                kind=kind,
                version=version,
                recorded_at=recorded_at,
                payload=typed,
                xid=xid,
            )
    raw: dict[str, Any]
    if isinstance(data, str | bytes):
        try:
            decoded = msgspec.json.decode(data)
        except msgspec.DecodeError:
            decoded = {"undecodable": str(data)[:200]}
        raw = decoded if isinstance(decoded, dict) else {"value": decoded}
    else:
        raw = dict(data)
    payload_type = KINDS.get(kind)
    payload: Payload
    if (
        payload_type is None
        or not 1 <= version <= CURRENT_VERSION[kind]
        or any((kind, old) not in UPGRADES for old in range(version, CURRENT_VERSION[kind]))
    ):
        payload = UnknownPayload(raw=raw)
    else:
        body = raw
        for old in range(version, CURRENT_VERSION[kind]):
            body = UPGRADES[(kind, old)](body)
        try:
            payload = msgspec.convert(body, payload_type, strict=False)  # type: ignore[assignment]
        except msgspec.ValidationError:
            payload = UnknownPayload(raw=raw)
    return Event(
        seq=seq, mentor_id=mentor_id, kind=kind, version=version, recorded_at=recorded_at, payload=payload, xid=xid
    )


class _LogRow(msgspec.Struct, array_like=True, frozen=True):
    kind: str
    seq: int
    version: int
    recorded_at: datetime
    xid: int
    data: msgspec.Raw


def _typed_row(kind: str, payload_type: type[BasePayload]) -> Any:
    """The row struct of a kind at its current version: tagged by its first element, so that a union of them decodes
    a whole array of rows in one call. A row of another version does not match its ``Literal`` and so fails."""
    version: Any = Literal[CURRENT_VERSION[kind]]
    return msgspec.defstruct(
        f"_{payload_type.__name__}Row",
        [("seq", int), ("version", version), ("recorded_at", datetime), ("xid", int), ("payload", payload_type)],
        array_like=True,
        frozen=True,
        gc=False,
        tag=kind,
        namespace={"kind": kind},
    )


_any_typed_row: Any = functools.reduce(operator.or_, (_typed_row(kind, type_) for kind, type_ in KINDS.items()))
_typed_rows: msgspec.json.Decoder[list[Any]] = msgspec.json.Decoder(list[_any_typed_row], strict=False)
_log_rows = msgspec.json.Decoder(list[_LogRow])


def decode_events(mentor_id: UUID | None, rows: str | bytes) -> list[Event]:
    """Decode a JSON array of one mentor's event_log rows, each ``[kind, seq, version, recorded_at, xid, data]`` (how
    replay reads the log), into Events exactly as ``decode_event`` decodes each row, in seq order whatever the order
    of the array.

    The common case, every row of a known kind at its current version, is decoded straight into typed payloads in
    one call: the per-event decoder calls and intermediate objects were a large share of replay's client time. Anything
    else (an old version, an unknown kind, data its struct refuses) sends the whole array down the general path.
    """
    events: list[Event] = []
    append = events.append
    ordered = True
    previous = -1
    try:
        typed = _typed_rows.decode(rows)
    except msgspec.ValidationError:
        for r in _log_rows.decode(rows):
            ordered = ordered and r.seq > previous
            previous = r.seq
            append(decode_event(r.seq, mentor_id, r.kind, r.version, bytes(r.data), r.recorded_at, r.xid))
    else:
        # One loop that also checks the order: as cheap as a list comprehension plus a separate check is not.
        for r in typed:
            seq = r.seq
            if seq <= previous:
                ordered = False
            previous = seq
            append(
                Event(
                    seq=seq,
                    mentor_id=mentor_id,
                    kind=r.kind,
                    version=r.version,
                    recorded_at=r.recorded_at,
                    payload=r.payload,
                    xid=r.xid,
                )
            )
    if not ordered:
        events.sort(key=_by_seq)
    return events


def _by_seq(event: Event) -> int:
    return event.seq
