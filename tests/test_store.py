"""The store's address is never printed with its secrets, whoever prints it."""

from __future__ import annotations

import io
import logging

import pytest

from falcon_exp import store


@pytest.mark.parametrize("uri, shown", [
    ("http://falcon:pw@host:5000", "http://falcon:***@host:5000"),
    ("https://tok3n-value@host", "https://***@host"),
    ("postgresql://falcon:p%40ss@db:5432/mlflow", "postgresql://falcon:***@db:5432/mlflow"),
    ("postgresql://falcon@db/mlflow?sslmode=require&password=hunter22", "postgresql://falcon@db/mlflow?sslmode=require&password=***"),
    ("postgresql://falcon@db/mlflow", "postgresql://falcon@db/mlflow"),  # a database user alone is no secret
    ("postgresql://alice:s3cr/t?#x@db/mlflow", "postgresql://alice:***@db/mlflow"),  # SQLAlchemy reads a password up to the @
    ("postgresql://u@db/m?password=se+cret&key=abcdef", "postgresql://u@db/m?password=***&key=abcdef"),
    ("postgresql://u@db/m?password=abc&key=abcdef", "postgresql://u@db/m?password=***&key=abcdef"),  # not a prefix elsewhere
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
])
def test_an_address_is_shown_without_its_secrets(uri, shown):
    assert store.shown_uri(uri) == shown


def test_no_logged_line_shows_a_secret_of_the_store(monkeypatch):
    """MLflow's logger keeps a handler of its own (it does not propagate); a record it logs, with a
    traceback whose message holds the address, reaches that handler masked, as the root's do."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://falcon:hunter22@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")
    stream = io.StringIO()
    root = logging.StreamHandler(stream)
    logging.getLogger().addHandler(root)
    try:
        store.client()  # every client puts the filter on the handlers there are, MLflow's own among them
        own = logging.getLogger("mlflow").handlers[0]  # MLflow's, made at its import
        before = own.setStream(stream)
        try:
            raise ConnectionError(f"API request to {store.tracking_uri()}/api/2.0 failed (token tok-0123456789)")
        except ConnectionError:
            logging.getLogger("mlflow.store.rest").exception("request failed for http://falcon:hunter22@127.0.0.1:9")
            logging.getLogger("sqlalchemy.pool").error("pool: hunter22", exc_info=True)
        own.setStream(before)
    finally:
        logging.getLogger().removeHandler(root)
    printed = stream.getvalue()
    assert "request failed for http://falcon:***@127.0.0.1:9" in printed and "ConnectionError: API request to" in printed
    assert "hunter22" not in printed and "tok-0123456789" not in printed
