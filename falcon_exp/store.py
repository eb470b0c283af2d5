"""The MLflow store: which one, how its address may be printed, and whether it can be used.

Torch-free: the job, the sweep and the analysis all check the store here first, so an
unreachable or unusable one is one line in seconds, and no line shows a secret of its address.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from falcon_exp.cache import file_lock
from falcon_exp.errors import FalconExpError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
DATABASES = ("postgresql", "mysql", "mssql")  # MLflow's database stores besides SQLite
SCHEMES = ("sqlite", "http", "https", "file", "databricks", *DATABASES)
# A tracking server that goes away should fail a job in seconds, not after MLflow's default
# minutes of retries; a user's own settings win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "access_token", "secret")
SECRET_ENVIRONMENT = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
MASK = "***"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def client(uri: str | None = None) -> MlflowClient:
    """An MLflow client of the store, with bounded retries. Where the address holds a secret,
    MLflow's own "View run at" lines (printed whole to stdout) are turned off."""
    from mlflow import MlflowClient

    from falcon_exp.console import guard_log_handlers

    uri = uri or tracking_uri()
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    if secrets(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    made = MlflowClient(tracking_uri=uri)
    guard_log_handlers()  # MLflow's logger has a handler of its own, made at its import
    return made


# An address's user and password as SQLAlchemy reads them: the password runs to the `@`, so it may
# hold `/`, `?` or `#`, which a URL parser would take for the end of the host part.
USERINFO = re.compile(r"^[\w+.-]+://(?:(?P<user>[^:/@]*)(?::(?P<password>[^@]*))?@)?")


def secrets(uri: str | None = None) -> list[str]:
    """What must never be printed: the address's password, a token given as an http address's
    user name, a password or token in its query (as written and decoded), and MLflow's password
    and token variables."""
    uri = uri or tracking_uri()
    found = [os.environ[name] for name in SECRET_ENVIRONMENT if os.environ.get(name)]
    userinfo = USERINFO.match(uri)
    if userinfo and userinfo["password"]:
        found.append(userinfo["password"])
    elif userinfo and userinfo["user"] and uri.startswith(("http://", "https://")):
        found.append(userinfo["user"])
    query = uri.partition("?")[2].partition("#")[0]
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if urllib.parse.unquote(key).lower() in SECRET_QUERY_KEYS and value:
            found.append(value)
    found += [urllib.parse.unquote_plus(s) for s in found] + [urllib.parse.unquote(s) for s in found]
    found += [urllib.parse.quote(s, safe="") for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact(text: str, uri: str | None = None) -> str:
    """`text` with every secret of the store's address masked: those of eight characters or more
    wherever they stand, shorter ones where an address puts them (`:pw@`, `//tok@`, `=pw` before
    the next `&`, space, quote or the end)."""
    for secret in secrets(uri):
        if len(secret) >= 8:
            text = text.replace(secret, MASK)
            continue
        quoted = re.escape(secret)
        text = re.sub(f"(?<=:){quoted}(?=@)|(?<=//){quoted}(?=@)|(?<==){quoted}(?=[&\\s'\")]|$)", MASK, text)
    return text


def shown_uri(uri: str | None = None) -> str:
    """The store's address as it may be printed."""
    uri = uri or tracking_uri()
    return redact(uri, uri)


def check(uri: str | None = None, create: bool = True, timeout_s: float = 5.0) -> None:
    """Fail in seconds, in one line naming the address without its secrets, where the store
    cannot be reached or used. A job creates a SQLite store that does not exist yet (`create`);
    the analysis, which only reads, refuses it."""
    uri = uri or tracking_uri()
    shown, scheme = shown_uri(uri), uri.partition("://")[0].partition("+")[0]
    if "://" in uri and scheme not in SCHEMES:
        raise FalconExpError(f"MLFLOW_TRACKING_URI={shown!r} is not a store address; give sqlite:///PATH.db, http(s)://HOST:PORT "
                             f"or a database URI ({', '.join(DATABASES)})")
    if scheme in ("http", "https"):
        _health(uri, shown, timeout_s)
    elif scheme in DATABASES:
        _connect_once(uri, timeout_s)
    elif scheme == "sqlite":
        _sqlite_file(uri, shown, create)
    # MLflow creates or migrates a SQLite store's tables on first use; two sweeps starting together
    # would race doing it: one at a time
    lock = file_lock(Path(uri.removeprefix("sqlite:///") + ".lock")) if create and scheme == "sqlite" else contextlib.nullcontext()
    try:
        with lock:
            client(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means: no usable store
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FalconExpError(f"the MLflow store {shown} cannot be used: {redact(message, uri)}") from None


def _health(uri: str, shown: str, timeout_s: float) -> None:
    parts = urllib.parse.urlsplit(uri)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))
    request = urllib.request.Request(bare.rstrip("/") + "/health")
    if parts.username is not None:  # credentials go in a header: urllib refuses them in the address
        token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}".encode())
        request.add_header("Authorization", f"Basic {token.decode()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = redact(str(getattr(error, "reason", error)), uri)
        raise FalconExpError(f"the MLflow tracking server {shown} is unreachable ({reason})") from None


def _sqlite_file(uri: str, shown: str, create: bool) -> None:
    """A SQLite store is a database file: not in memory, not a folder, writable where a job
    writes, and a database where it exists."""
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        raise FalconExpError(f"the MLflow store {shown} is in memory and keeps nothing after the process; "
                             "give a database file, e.g. sqlite:///mlruns/mlflow.db")
    database = Path(path)
    if database.is_dir():
        raise FalconExpError(f"the MLflow store {shown} is a directory; give the path of a database file, e.g. sqlite:///mlruns/mlflow.db")
    if not database.exists() and not create:
        raise FalconExpError(f"there is no MLflow store at {shown}; run `falcon-exp` first or set MLFLOW_TRACKING_URI")
    if database.exists():
        try:
            with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
                connection.execute("select name from sqlite_master limit 1").fetchall()
        except sqlite3.Error as error:
            raise FalconExpError(f"the MLflow store {shown} is not a SQLite database ({error})") from None
    if not create:
        return
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FalconExpError(f"the MLflow store {shown} cannot be created ({error.strerror})") from None
    if not os.access(database.parent, os.W_OK) or (database.exists() and not os.access(database, os.W_OK)):
        raise FalconExpError(f"the MLflow store {shown} is not writable")


def _connect_once(uri: str, timeout_s: float) -> None:
    """One connection to a database store, where MLflow would retry for minutes (about ten
    attempts with growing pauses) before saying that it is down or refuses the credentials."""
    import sqlalchemy

    connect_args = {"connect_timeout": max(1, int(timeout_s))} if uri.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as error:  # noqa: BLE001 - a missing driver, a refused connection, bad credentials: all one line
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FalconExpError(f"the MLflow store {shown_uri(uri)} cannot be used: {redact(message, uri)}") from None
