"""Runs the platform, or a command, with its services.

    python -m genai_site.launcher up          # migrate, import the model, serve web + worker
    python -m genai_site.launcher run -- CMD  # run CMD (e.g. pytest) with the services up
    python -m genai_site.launcher worker --queues Q1,Q2  # a worker for deployments' queues

PostgreSQL and Redis come from DATABASE_URL / REDIS_URL when set, embedded ones otherwise.
"""

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from genai_site.embedded import ensure_services, process_alive
from genai_site.web_server import WebServer

BASE_DIR = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _var_dir() -> Path:
    path = Path(os.environ.get("GENAI_VAR_DIR", BASE_DIR / "var"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _local_defaults(var_dir: Path) -> None:
    """Settings for running on this machine over plain HTTP; the environment overrides each."""
    key_file = var_dir / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    os.environ.setdefault("DJANGO_SECRET_KEY", key_file.read_text().strip())
    os.environ.setdefault("DJANGO_SECURE_SSL_REDIRECT", "0")
    os.environ.setdefault("DJANGO_SECURE_COOKIES", "0")
    os.environ.setdefault("DJANGO_HSTS_SECONDS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir(var_dir))


def _metrics_dir(var_dir: Path) -> Path:
    """A fresh directory where this launch's web and worker processes pool Prometheus samples.

    One per launch: files left by an earlier run would be summed in, and a second launcher
    (`make manage` beside `make up`) must not wipe the first one's.
    """
    root = var_dir / "prometheus"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        if not (old.name.isdigit() and process_alive(int(old.name))):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / str(os.getpid())
    mine.mkdir(exist_ok=True)
    return mine


def _manage(*args: str) -> None:
    subprocess.run([sys.executable, str(BASE_DIR / "manage.py"), *args], check=True)


def default_concurrency() -> int:
    """Task threads per worker: as many as the engine has slots (`ENGINE_MAX_BATCH`), so that
    every slot can be generating at once (with 4 threads, 8 slots never held more than 4)."""
    return int(os.environ.get("WORKER_CONCURRENCY") or os.environ.get("ENGINE_MAX_BATCH", "8"))


def worker_command(
    queues: str = "inference,default",
    concurrency: int | None = None,
    beat_schedule: Path | None = None,
) -> list[str]:
    """The worker; with `beat_schedule`, it also runs Celery beat (the retention purge)."""
    concurrency = concurrency or default_concurrency()
    beat = ["--beat", "--schedule", str(beat_schedule)] if beat_schedule else []
    return [
        str(BIN / "celery"),
        "-A",
        "genai_site",
        "worker",
        "-Q",
        queues,
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        *beat,
    ]


def up(host: str, port: int) -> int:
    var_dir = _var_dir()
    _local_defaults(var_dir)
    with ExitStack() as stack:
        started = ensure_services(var_dir, stack)
        for name in started:
            print(f"Embedded {name.split('_')[0].lower()} started under {var_dir}")
        _manage("migrate", "--no-input", "-v", "0")
        _manage("import_default_model")
        _manage("ensure_admin")
        web = WebServer(host, port, start_new_session=True).start()
        worker = subprocess.Popen(
            worker_command(beat_schedule=var_dir / "celerybeat-schedule"),
            start_new_session=True,
        )

        def stop_children() -> None:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            web.stop()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()

        stack.callback(stop_children)
        print(f"\ngenai-site is running at http://{host}:{port}/  (Ctrl-C stops everything)\n")
        try:
            while worker.poll() is None and web.replace_ended():
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nStopping...")
            return 0
        failed = [c for c in (worker, *web.procs) if c.poll() not in (None, 0)]
        return 1 if failed else 0


def run(command: list[str]) -> int:
    var_dir = _var_dir()
    _local_defaults(var_dir)
    with ExitStack() as stack:
        ensure_services(var_dir, stack)
        if not command:
            print("Nothing to run.", file=sys.stderr)
            return 2
        try:
            return subprocess.call(command)
        except KeyboardInterrupt:
            return 130


def worker(queues: str, concurrency: int | None) -> int:
    """A worker serving the given queues (each deployment names its own), with the services up.

    A GPU node runs one for the large model's queue while CPU nodes serve the small one's.
    """
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        print("Name at least one queue.", file=sys.stderr)
        return 2
    return run(worker_command(queues=",".join(names), concurrency=concurrency))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C, so every child and embedded service is stopped on the way out.
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # A shell that starts us in the background hands down SIGINT ignored; Ctrl-C must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(prog="genai_site.launcher")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up_parser = sub.add_parser("up", help="serve the platform")
    up_parser.add_argument("--host", default=os.environ.get("GENAI_HOST", "127.0.0.1"))
    up_parser.add_argument("--port", type=int, default=int(os.environ.get("GENAI_PORT", "8000")))
    run_parser = sub.add_parser("run", help="run a command with the services up")
    run_parser.add_argument("command", nargs=argparse.REMAINDER)
    worker_parser = sub.add_parser("worker", help="run a worker for the given queues")
    worker_parser.add_argument(
        "--queues", default="inference,default", help="comma-separated Celery queues"
    )
    worker_parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="task threads (default: WORKER_CONCURRENCY, or ENGINE_MAX_BATCH)",
    )
    args = parser.parse_args()
    if args.cmd == "up":
        return up(args.host, args.port)
    if args.cmd == "worker":
        return worker(args.queues, args.concurrency)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run(command)


if __name__ == "__main__":
    sys.exit(main())
