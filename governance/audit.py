"""The audit log: an append-only, hash-chained list of events.

Every event stores `prev_hash`, the hash of the event before it in the chain (`GENESIS_HASH` for
the first), and `hash`, a sha256 over its own content and `prev_hash`. Altering a row breaks its
hash; removing or reordering rows breaks the next event's link. The chain's order is
`chain_position`, the order in which events were linked: an event is written with its hashed
text and no link, and a constraint trigger deferred to its transaction's commit (migration 0010)
takes the chain's lock, links it after the newest event and computes its hash. So the chain is
serialized only while a transaction commits, inside the server, not from an event's INSERT to
its transaction's end; and an event whose transaction rolls back never enters it. A trigger
refuses UPDATE (but that link, made by the link trigger itself) and DELETE, so tampering needs
the table owner's rights and still shows in `audit_verify`. Removing the newest events leaves a
shorter chain that is still intact: keep the last hash that `verify_audit` prints somewhere else
to notice that.
"""

import csv
import hashlib
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from typing import Any, Literal

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Max, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from genai_site.rows import row_insert
from governance.models import AuditEvent

GENESIS_HASH = "0" * 64
# Where the previous event's hash goes in an unlinked event's `hash_input`.
_PREV_HASH_MARK = "\x1f"

ExportFormat = Literal["csv", "jsonl"]
EXPORT_FIELDS = (
    "id",
    "chain_position",
    "created_at",
    "actor_id",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "ip",
    "details",
    "prev_hash",
    "hash",
)


def _canonical_json(value: Any) -> Any:
    """The value as PostgreSQL's jsonb gives it back: jsonb keeps numbers as the decimals they
    were written as, so a whole float such as 1e16 returns as an int, and 1e23 as 10**23 (not
    the float's own binary value, int(1e23)). Whole floats count as ints on both sides."""
    if isinstance(value, float) and value.is_integer():
        return int(Decimal(repr(value)))
    if isinstance(value, dict):
        return {str(k): _canonical_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_json(v) for v in value]
    return value


def _canonical_ip(ip: str | None) -> str | None:
    """PostgreSQL's inet may spell an address differently than it was written (IPv6)."""
    if not ip:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


def _hash_input(event: AuditEvent) -> str:
    """The canonical JSON of the event's content and `prev_hash` that its hash is taken over."""
    content = {
        "prev_hash": event.prev_hash,
        "actor_id": event.actor_id,
        "actor_label": event.actor_label,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "details": _canonical_json(event.details),
        "ip": _canonical_ip(event.ip),
        "created_at": event.created_at.astimezone(UTC).isoformat(),
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)


def audit_event_hash(event: AuditEvent) -> str:
    """sha256 over a canonical JSON of the event's content and `prev_hash`."""
    return hashlib.sha256(_hash_input(event).encode()).hexdigest()


_PREV_HASH_KEY = '"prev_hash":"'


def _hash_input_around_prev(event: AuditEvent) -> tuple[str, str]:
    """`_hash_input` cut where `prev_hash`'s value goes: the database puts the chain's head
    between the two parts. The top-level key is the last `"prev_hash":"` in the text (keys are
    sorted, and a quote inside a JSON string is always escaped)."""
    data = _hash_input(event)
    start = data.rindex(_PREV_HASH_KEY) + len(_PREV_HASH_KEY)
    assert data[start : start + 64] == event.prev_hash
    return data[:start], data[start + 64 :]


def request_client_ip(request: HttpRequest | None) -> str | None:
    return _canonical_ip(request.META.get("REMOTE_ADDR")) if request is not None else None


def audit_record(
    *,
    actor: User | AnonymousUser | None,
    action: str,
    target_type: str = "",
    target_id: object = "",
    details: dict[str, Any] | None = None,
    ip: str | None = None,
    actor_label: str | None = None,
) -> AuditEvent:
    """Append one audit event. Call it inside the transaction of the change it records: the
    event is linked into the chain as that transaction commits, and not at all if it rolls back.

    The returned event is the row as written, unlinked: the database sets its `prev_hash`,
    `hash` and `chain_position` at the commit (read the row again for them). `actor_label`
    defaults to the user's name, or "system" without a user.
    """
    user = actor if isinstance(actor, User) else None
    if actor_label is None:
        actor_label = user.get_username() if user is not None else "system"
    event = AuditEvent(
        actor=user,
        actor_label=actor_label[:150],
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        details=details or {},
        ip=_canonical_ip(ip),
        created_at=timezone.now(),
        prev_hash=GENESIS_HASH,  # a stand-in of the same length, to cut the hashed text at
    )
    before, after = _hash_input_around_prev(event)
    event.prev_hash = None
    event.hash_input = before + _PREV_HASH_MARK + after
    return row_insert(event)


@dataclass(frozen=True)
class AuditVerification:
    events: int  # events found intact, in the chain's order, before the first broken one
    last_hash: str  # hash of the last intact event (GENESIS_HASH if there is none)
    broken_event_id: int | None = None
    problem: str = ""
    # Events outside the chain: only an open transaction's own (this one's), unless the link
    # trigger was bypassed (disabled, or `session_replication_role = replica`).
    unlinked: int = 0

    @property
    def intact(self) -> bool:
        return self.broken_event_id is None


def audit_verify() -> AuditVerification:
    """Walk the chain in its order and stop at the first event that does not check out.

    Events not linked are not part of the chain and are counted apart (`unlinked`)."""
    expected_prev = GENESIS_HASH
    previous_id: int | None = None
    count = 0
    unlinked = AuditEvent.objects.filter(chain_position__isnull=True).count()
    chain = AuditEvent.objects.filter(chain_position__isnull=False).order_by("chain_position")
    for event in chain.iterator(chunk_size=2000):
        problem = ""
        digest = audit_event_hash(event)
        if digest != event.hash:
            problem = "hash mismatch: the row was altered after it was written"
        elif event.prev_hash != expected_prev:
            after = f"event {previous_id}" if previous_id is not None else "the chain's start"
            problem = (
                f"prev_hash mismatch: it does not follow {after}; "
                "an event was removed or the rows were reordered"
            )
        if problem:
            return AuditVerification(
                events=count,
                last_hash=expected_prev,
                broken_event_id=event.pk,
                problem=problem,
                unlinked=unlinked,
            )
        expected_prev, previous_id = digest, event.pk
        count += 1
    return AuditVerification(events=count, last_hash=expected_prev, unlinked=unlinked)


def _export_row(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.pk,
        "chain_position": event.chain_position,
        "created_at": event.created_at.astimezone(UTC).isoformat(),
        "actor_id": event.actor_id,
        "actor_label": event.actor_label,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "ip": event.ip,
        "details": event.details,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


class _Echo:
    """A file-like object for csv.writer that hands back each line instead of storing it."""

    def write(self, value: str) -> str:
        return value


def _csv_cell(value: Any) -> Any:
    # Spreadsheets run cells that start like a formula; actor labels and target ids can come
    # from users (a failed login's username). JSON lines keep the exact values.
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value


def _csv_lines(events: QuerySet[AuditEvent]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(EXPORT_FIELDS)
    for event in events.iterator(chunk_size=2000):
        row = _export_row(event)
        row["details"] = json.dumps(row["details"], sort_keys=True, ensure_ascii=False)
        yield writer.writerow([_csv_cell(row[field]) for field in EXPORT_FIELDS])


def _jsonl_lines(events: QuerySet[AuditEvent]) -> Iterator[str]:
    for event in events.iterator(chunk_size=2000):
        yield json.dumps(_export_row(event), sort_keys=True, ensure_ascii=False) + "\n"


def audit_export(
    *, events: QuerySet[AuditEvent], fmt: ExportFormat, actor: User | AnonymousUser, ip: str | None
) -> Iterator[str]:
    """Record the export as `audit.exported`, then return the events' lines in the chain's
    order.

    The lines are read lazily, as the response streams. The export is fixed to the events
    linked when it was asked for: later links have higher positions.
    """
    last = events.aggregate(last=Max("chain_position"))["last"] or 0
    events = events.filter(chain_position__lte=last).order_by("chain_position")
    audit_record(
        actor=actor,
        action="audit.exported",
        target_type="audit_event",
        details={"format": fmt, "count": events.count(), "last_position": last},
        ip=ip,
    )
    return _csv_lines(events) if fmt == "csv" else _jsonl_lines(events)
