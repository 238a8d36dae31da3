"""The embedded PostgreSQL that the launcher starts where DATABASE_URL is unset."""

import subprocess
import sys
from pathlib import Path

from genai_site.embedded import MAX_CONNECTIONS

# A launcher's start of the embedded server on `var`, in a process of its own (pgserver keeps
# its servers in process-wide state and stops them at exit): what the server then allows.
_START = """
import sys
from contextlib import ExitStack
from pathlib import Path

import psycopg

from genai_site.embedded import start_postgres

with ExitStack() as stack:
    url = start_postgres(Path(sys.argv[1]), stack)
    with psycopg.connect(url) as conn:
        print(conn.execute("SHOW max_connections").fetchone()[0])
        print(conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone()[0])
"""


def _start(var: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _START, str(var)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_new_embedded_postgresql_allows_the_pools_of_many_processes(tmp_path: Path) -> None:
    # A new data directory: initialised, started, its connection limit raised and restarted;
    # then started again, keeping it.
    assert _start(tmp_path) == [str(MAX_CONNECTIONS), "1"]
    assert _start(tmp_path) == [str(MAX_CONNECTIONS), "1"]
