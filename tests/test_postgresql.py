"""A pooled connection is checked by its socket: no query for a sound one, and one that
PostgreSQL ended while it sat in the pool is replaced before anyone uses it. Statements that a
connection runs again are prepared on the server."""

import time

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from genai_site.postgresql.base import DatabaseWrapper, connection_sound

pytestmark = pytest.mark.django_db(transaction=True)


def _other() -> psycopg.Connection:  # type: ignore[type-arg]
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg.connect(**params, autocommit=True)


def _backend(conn: psycopg.Connection, pid: int) -> tuple[str, str] | None:  # type: ignore[type-arg]
    return conn.execute(
        "SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()


def _gone(conn: psycopg.Connection, pid: int) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + 10
    while _backend(conn, pid) is not None:
        assert time.monotonic() < deadline, f"backend {pid} did not end"
        time.sleep(0.05)


def test_a_sound_idle_connection_passes_without_a_query_and_an_ended_one_fails() -> None:
    with _other() as watcher, _other() as conn:
        conn.execute("SELECT 'the last query'")
        assert connection_sound(conn)
        # The server saw no query since: not even the empty one of psycopg_pool's check.
        assert _backend(watcher, conn.info.backend_pid) == ("idle", "SELECT 'the last query'")

        watcher.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        _gone(watcher, conn.info.backend_pid)
        assert not connection_sound(conn)


def test_a_pooled_connection_that_postgresql_ended_is_replaced_before_use() -> None:
    # A pool of one connection, as the settings make them, so that the next one taken is
    # the one that was ended.
    settings_dict = {
        **connection.settings_dict,
        "OPTIONS": {**connection.settings_dict["OPTIONS"], "pool": {"min_size": 1, "max_size": 1}},
    }
    pooled = DatabaseWrapper(settings_dict, alias="pooled-check")
    params = pooled.get_connection_params()
    pool = pooled.pool
    assert pool is not None
    try:
        conn = pooled.get_new_connection(params)
        ended = conn.info.backend_pid
        pool.putconn(conn)  # back to the pool, idle
        with _other() as watcher:
            watcher.execute("SELECT pg_terminate_backend(%s)", [ended])
            _gone(watcher, ended)
        conn = pooled.get_new_connection(params)
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (conn.info.backend_pid,)
        assert conn.info.backend_pid != ended
        pool.putconn(conn)
    finally:
        pooled.close_pool()


def test_a_statement_run_again_is_prepared_on_its_connection() -> None:
    # As the budget reservation or the job's claim is, request after request: PostgreSQL
    # parses and plans it once per connection, and the pool keeps the connection.
    sql = "SELECT count(*) FROM auth_user WHERE id > %s AND username <> %s"
    runs = (settings.DATABASES["default"]["OPTIONS"].get("prepare_threshold") or 5) + 1
    with connection.cursor() as cursor:
        for _ in range(runs):
            cursor.execute(sql, [0, "nobody"])
            assert cursor.fetchone() == (0,)
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    assert "SELECT count(*) FROM auth_user WHERE id > $1 AND username <> $2" in prepared
