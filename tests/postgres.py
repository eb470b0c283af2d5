"""A PostgreSQL server on this machine, for the tests: Debian's `postgresql` binaries, a cluster of
its own in a temporary folder (owned by the `postgres` user, which the server must run as),
listening on loopback with trust authentication, stopped and removed afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def missing() -> str | None:
    """Why no PostgreSQL server can be started here, or None."""
    absent = [name for name in ("initdb", "pg_ctl") if _binary(name) is None]
    if absent:
        return f"no {', '.join(absent)} (Debian's postgresql package)"
    try:
        import psycopg  # noqa: F401 - SQLAlchemy's driver for postgresql:// stores
    except ImportError:
        return "no psycopg (the dev extra installs psycopg[binary])"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "no postgres user to run the server as"
    return None


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def start() -> tuple[Path, str]:
    """Start a fresh cluster with a database `mlflow`; returns (its folder, the store URI)."""
    root = Path(tempfile.mkdtemp(prefix="falcon-exp-pg-"))  # outside pytest's root-only folder: postgres must enter it
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(_as_postgres([_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c max_connections=200"
    subprocess.run(_as_postgres([_binary("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start"]),
                   check=True, capture_output=True)
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as connection:
        connection.execute("CREATE DATABASE mlflow")
    return root, f"postgresql://postgres@127.0.0.1:{port}/mlflow"


def stop(root: Path) -> None:
    subprocess.run(_as_postgres([_binary("pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop"]), capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
