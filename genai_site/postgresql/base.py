"""Django's PostgreSQL backend, with a pooled connection checked without a round trip.

With a pool and `CONN_HEALTH_CHECKS`, Django has psycopg_pool check each connection as it is
taken, by sending it an empty query: a round trip to PostgreSQL for every request and every
task (two per /v1 completion: the web process's and the worker's). A connection that
PostgreSQL ended while it sat in the pool (a restart, `pg_terminate_backend`, an idle timeout)
has the server's last message or the end of the stream waiting on its socket; a sound idle
connection has nothing waiting. So this backend looks at the socket first, a system call, and
sends the empty query only when something is waiting. A connection that fails is closed and
another is taken. Settings use it, with the pool's own check off, whenever the pool is on.
"""

import select
from collections.abc import Callable
from typing import Any

import psycopg
from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool


def connection_sound(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection from the pool can be used: nothing is waiting on its
    socket, or, when something is, the server still answers."""
    if conn.closed or conn.broken:
        return False
    poller = select.poll()
    try:
        poller.register(conn.fileno(), select.POLLIN)
    except (psycopg.Error, OSError, ValueError):
        return False
    if not poller.poll(0):
        return True
    try:
        ConnectionPool.check_connection(conn)
    except psycopg.Error:
        return False
    return True


class DatabaseWrapper(base.DatabaseWrapper):
    # Django's own, which its type stubs do not declare.
    pool: ConnectionPool | None
    close_pool: Callable[[], None]

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        while True:
            connection = super().get_new_connection(conn_params)
            if self.pool is None or connection_sound(connection):
                return connection
            # Closed, it is dropped from the pool, which opens another in its place.
            connection.close()
            self.pool.putconn(connection)
