"""Database fixtures: a SQLite file per test, and a fresh database per test on the PostgreSQL server named by
ADISC_TEST_POSTGRES_URL (start one with `eval "$(bash scripts/postgres.sh)"`); PostgreSQL tests skip with the
reason when the variable is unset or the server cannot be reached.

``database_url`` runs a test once on each backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

POSTGRES_URL_VARIABLE = "ADISC_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def postgres_server_url() -> URL:
    value = os.environ.get(POSTGRES_URL_VARIABLE)
    if not value:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is unset: start a server with `eval \"$(bash scripts/postgres.sh)\"`")
    url = make_url(value)
    try:
        engine = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    except ModuleNotFoundError as exc:
        pytest.skip(f"no PostgreSQL driver for {url.drivername}: {exc}")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL at {url.render_as_string(hide_password=True)} is unreachable: {exc.orig}")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def postgres_url(postgres_server_url: URL) -> Iterator[str]:
    """URL of a new, empty database on the test server, dropped after the test."""
    name = f"adisc_{uuid.uuid4().hex[:16]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'adisc.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh empty database: a SQLite file, then a PostgreSQL database."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
