import csv
import io
import itertools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.test import AsyncClient, Client

from governance.audit import (
    EXPORT_FIELDS,
    GENESIS_HASH,
    audit_event_hash,
    audit_record,
    audit_verify,
)
from governance.models import AuditEvent
from tests.conftest import BASE_DIR
from tests.factories import PASSWORD, user_create

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/governance/auditevent/"


def _linked(event: AuditEvent) -> AuditEvent:
    """The event as the database linked it at its commit."""
    return AuditEvent.objects.get(pk=event.pk)


def _record_events(n: int, actor: User | None = None) -> list[AuditEvent]:
    return [
        _linked(
            audit_record(
                actor=actor,
                action="test.event",
                target_type="thing",
                target_id=i,
                details={"n": i, "ratio": i / 3, "nested": {"b": [1, 2.0], "a": "x"}},
                ip="2001:db8:0:0::1",
            )
        )
        for i in range(n)
    ]


@contextmanager
def _append_only_trigger_disabled() -> Iterator[None]:
    """What someone with the table owner's rights could do to hide a change."""
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE governance_auditevent DISABLE TRIGGER governance_auditevent_append_only"
        )
        try:
            yield
        finally:
            cursor.execute(
                "ALTER TABLE governance_auditevent ENABLE TRIGGER governance_auditevent_append_only"
            )


def _verify_audit_output() -> str:
    out = io.StringIO()
    call_command("verify_audit", stdout=out)
    return out.getvalue()


def test_events_link_into_a_chain_that_verifies() -> None:
    user = user_create()
    _record_events(2)
    _record_events(2, actor=user)
    events = list(AuditEvent.objects.order_by("chain_position"))
    assert [e.chain_position for e in events] == [1, 2, 3, 4]
    assert events[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.hash
    assert all(re.fullmatch("[0-9a-f]{64}", e.hash or "") for e in events)
    assert len({e.hash for e in events}) == 4
    assert "audit chain intact: 4 events" in _verify_audit_output()


def test_events_whose_content_imitates_the_chain_fields_still_verify() -> None:
    # The database links each event into the chain; its hash input must be cut at the real
    # prev_hash, whatever text the event carries.
    tricky = '"prev_hash":"' + "0" * 64 + '","x":"\u00e9\\'
    audit_record(
        actor=None,
        action="test.tricky",
        target_type=tricky,
        target_id=tricky,
        details={"prev_hash": tricky, "nested": {"prev_hash": "1" * 64}, "text": "h\u00e9llo ☃"},
        ip="::ffff:10.0.0.1",
    )
    event = audit_record(
        actor=None, action="test.after", details={"n": 1.0, "big": 1e16, "bigger": [1e23, -2e300]}
    )
    assert _linked(event).hash == audit_event_hash(_linked(event))
    assert _linked(event).hash is not None
    assert "audit chain intact: 2 events" in _verify_audit_output()


def test_verify_audit_passes_on_an_empty_log() -> None:
    assert "audit chain intact: 0 events" in _verify_audit_output()


def test_the_database_refuses_to_update_or_delete_an_event() -> None:
    event = _record_events(1)[0]
    with pytest.raises(DatabaseError, match="append-only"), connection.cursor() as cursor:
        cursor.execute("UPDATE governance_auditevent SET details = '{}' WHERE id = %s", [event.pk])
    with pytest.raises(DatabaseError, match="append-only"):
        AuditEvent.objects.filter(pk=event.pk).delete()
    with pytest.raises(DatabaseError, match="append-only"):
        AuditEvent.objects.filter(pk=event.pk).update(action="something.else")
    assert AuditEvent.objects.get(pk=event.pk).details == event.details


def test_verify_audit_names_an_altered_event_and_exits_non_zero(
    subprocess_env: dict[str, str],
) -> None:
    events = _record_events(4)
    altered = events[2]
    with _append_only_trigger_disabled(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE governance_auditevent SET details = '{\"n\": 99}' WHERE id = %s",
            [altered.pk],
        )

    with pytest.raises(CommandError, match=rf"event {altered.pk}: hash mismatch"):
        call_command("verify_audit")
    result = audit_verify()
    assert (result.broken_event_id, result.events) == (altered.pk, 2)

    # As an operator runs it: the exit status says the chain is broken.
    proc = subprocess.run(
        [sys.executable, "manage.py", "verify_audit"],
        env=subprocess_env,
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"audit chain broken at event {altered.pk}" in proc.stderr


def test_verify_audit_names_the_event_after_a_deleted_one() -> None:
    events = _record_events(4)
    with _append_only_trigger_disabled():
        AuditEvent.objects.filter(pk=events[1].pk).delete()

    with pytest.raises(CommandError, match=rf"event {events[2].pk}: prev_hash mismatch") as exc:
        call_command("verify_audit")
    assert f"does not follow event {events[0].pk}" in str(exc.value)


def test_verify_audit_notices_a_removed_first_event() -> None:
    events = _record_events(3)
    with _append_only_trigger_disabled():
        AuditEvent.objects.filter(pk=events[0].pk).delete()
    result = audit_verify()
    assert result.broken_event_id == events[1].pk and "prev_hash mismatch" in result.problem


def test_concurrent_appends_form_one_intact_chain() -> None:
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            start.wait()
            for i in range(5):
                audit_record(actor=None, action="test.concurrent", details={"w": worker, "i": i})
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = audit_verify()
    assert result.intact and result.events == 40


def test_events_are_linked_as_their_transactions_commit_in_commit_order() -> None:
    """An open transaction's event does not hold the chain: a later one commits past it, and
    the chain follows the commits. An event whose transaction rolls back never enters it."""
    recorded = threading.Event()
    may_commit = threading.Event()
    slow: list[AuditEvent] = []

    def open_transaction() -> None:
        try:
            with transaction.atomic():
                slow.append(audit_record(actor=None, action="test.slow"))
                assert slow[0].hash is None and slow[0].chain_position is None
                recorded.set()
                assert may_commit.wait(timeout=30)
        finally:
            connection.close()

    thread = threading.Thread(target=open_transaction)
    thread.start()
    try:
        assert recorded.wait(timeout=30)
        # Taken while the other transaction is still open (a chain lock held since its INSERT
        # would make this wait for it).
        fast = _linked(audit_record(actor=None, action="test.fast"))
        with pytest.raises(RuntimeError), transaction.atomic():
            audit_record(actor=None, action="test.rolled_back")
            raise RuntimeError
    finally:
        may_commit.set()
        thread.join()

    slow_event = AuditEvent.objects.get(pk=slow[0].pk)
    assert slow_event.pk < fast.pk
    assert (fast.chain_position, slow_event.chain_position) == (1, 2)
    assert fast.prev_hash == GENESIS_HASH and slow_event.prev_hash == fast.hash
    assert not AuditEvent.objects.filter(action="test.rolled_back").exists()
    assert slow_event.hash_input is None
    result = audit_verify()
    assert result.intact and result.events == 2 and result.last_hash == slow_event.hash


def test_linking_is_the_only_update_the_database_allows() -> None:
    with transaction.atomic():
        event = audit_record(actor=None, action="test.event", details={"n": 1})
        row = AuditEvent.objects.get(pk=event.pk)
        assert row.hash_input is not None
        # The link's own shape, sent by the session itself: refused, even with the right hash
        # and with the content unchanged; so is any other change to an event not linked yet.
        row.prev_hash = GENESIS_HASH
        right = audit_event_hash(row)
        for prev_hash, digest, details in [
            (GENESIS_HASH, right, '{"n": 1}'),
            (GENESIS_HASH, "1" * 64, '{"n": 1}'),
            (GENESIS_HASH, right, "{}"),
        ]:
            with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute(
                        "UPDATE governance_auditevent SET details = %s, prev_hash = %s, "
                        "hash = %s, chain_position = 1, hash_input = NULL WHERE id = %s",
                        [details, prev_hash, digest, event.pk],
                    )
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            AuditEvent.objects.filter(pk=event.pk).update(action="test.other")
        # An event must be written unlinked, with its hashed text.
        with pytest.raises(IntegrityError), transaction.atomic():
            AuditEvent.objects.create(action="test.forged", prev_hash="2" * 64, hash="3" * 64)
    linked = AuditEvent.objects.get(pk=event.pk)
    assert linked.details == {"n": 1} and linked.chain_position == 1
    assert linked.hash == right
    assert audit_verify().intact


def test_verify_audit_reports_events_committed_outside_the_chain() -> None:
    _record_events(2)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE governance_auditevent DISABLE TRIGGER governance_audit_link")
        try:
            audit_record(actor=None, action="test.unlinked")
        finally:
            cursor.execute("ALTER TABLE governance_auditevent ENABLE TRIGGER governance_audit_link")
    result = audit_verify()
    assert result.intact and (result.events, result.unlinked) == (2, 1)
    with pytest.raises(CommandError, match="1 committed audit event"):
        call_command("verify_audit")


def test_deleting_a_user_leaves_their_events_intact() -> None:
    user = user_create()
    event = audit_record(actor=user, action="test.event")
    user_id = user.pk
    user.delete()
    assert AuditEvent.objects.get(pk=event.pk).actor_id == user_id
    assert audit_verify().intact


def test_sign_in_failed_sign_in_and_sign_out_are_audited() -> None:
    user = user_create()
    client = Client()
    refused = client.post("/accounts/login/", {"username": user.username, "password": "nope"})
    assert refused.status_code == 200
    signed_in = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD})
    assert signed_in.status_code == 302
    assert client.post("/accounts/logout/").status_code == 302

    events = list(AuditEvent.objects.order_by("id"))
    assert [e.action for e in events] == ["auth.login_failed", "auth.login", "auth.logout"]
    failed, login, logout = events
    assert failed.actor_id is None and failed.actor_label == "anonymous"
    assert failed.details == {"username": user.username}
    assert "nope" not in json.dumps(failed.details)
    assert login.actor_id == logout.actor_id == user.pk
    assert login.target_id == str(user.pk)
    assert {e.ip for e in events} == {"127.0.0.1"}
    assert audit_verify().intact


async def _export(
    client: AsyncClient, action: str, data: dict[str, object], query: str = ""
) -> Any:
    return await client.post(f"{CHANGELIST}{query}", {"action": action, "index": 0, **data})


async def _body(response: Any) -> str:
    return b"".join([chunk async for chunk in response.streaming_content]).decode()


async def test_staff_export_selected_events_as_csv() -> None:
    admin = await sync_to_async(User.objects.create_superuser)("boss", "", PASSWORD)
    events = await sync_to_async(_record_events)(3)
    client = AsyncClient()
    await client.aforce_login(admin)

    selected = [events[0].pk, events[2].pk]
    response = await _export(client, "export_csv", {"_selected_action": selected})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(await _body(response))))
    assert [int(r["id"]) for r in rows] == selected
    assert list(rows[0]) == list(EXPORT_FIELDS)
    assert rows[1]["hash"] == events[2].hash and rows[1]["ip"] == "2001:db8::1"
    assert json.loads(rows[1]["details"]) == events[2].details

    exported = await AuditEvent.objects.aget(action="audit.exported")
    assert exported.actor_id == admin.pk
    assert exported.details == {
        "format": "csv",
        "count": 2,
        "last_position": events[2].chain_position,
    }
    assert (await sync_to_async(audit_verify)()).intact


async def test_staff_export_everything_a_filter_matches_as_json_lines() -> None:
    admin = await sync_to_async(User.objects.create_superuser)("boss", "", PASSWORD)
    events = await sync_to_async(_record_events)(3)
    await sync_to_async(audit_record)(actor=None, action="other.event")
    client = AsyncClient()
    await client.aforce_login(admin)

    response = await _export(
        client,
        "export_jsonl",
        {"select_across": 1, "_selected_action": [events[0].pk]},
        query="?action__exact=test.event",
    )
    assert response.status_code == 200
    lines = [json.loads(line) for line in (await _body(response)).splitlines()]
    assert [line["id"] for line in lines] == [e.pk for e in events]
    assert [line["hash"] for line in lines] == [e.hash for e in events]
    assert lines[0]["details"] == events[0].details
    assert await AuditEvent.objects.filter(action="audit.exported").acount() == 1


async def test_export_is_refused_to_a_user_who_is_not_staff() -> None:
    user = await sync_to_async(user_create)()
    events = await sync_to_async(_record_events)(1)
    client = AsyncClient()
    await client.aforce_login(user)
    response = await _export(client, "export_csv", {"_selected_action": [events[0].pk]})
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    assert not await AuditEvent.objects.filter(action="audit.exported").aexists()


async def test_export_is_refused_to_staff_without_view_permission() -> None:
    staff = await sync_to_async(user_create)(is_staff=True)
    events = await sync_to_async(_record_events)(1)
    client = AsyncClient()
    await client.aforce_login(staff)
    response = await _export(client, "export_jsonl", {"_selected_action": [events[0].pk]})
    assert response.status_code == 403
    assert not await AuditEvent.objects.filter(action="audit.exported").aexists()

    # With the permission, the same request exports.
    view = await Permission.objects.aget(codename="view_auditevent")
    await sync_to_async(staff.user_permissions.add)(view)
    staff = await User.objects.aget(pk=staff.pk)  # fresh permission cache
    await client.aforce_login(staff)
    response = await _export(client, "export_jsonl", {"_selected_action": [events[0].pk]})
    assert response.status_code == 200
    assert json.loads(await _body(response))["id"] == events[0].pk
