"""Alembic environment for the review store.

``upgrade_database`` in ``platform/storage/store.py`` passes an open connection in ``config.attributes["connection"]``;
the ``alembic -c anomaly_discovery/platform/storage/migrations/alembic.ini`` command line connects to the URL in the
ini file or, when set, in ``ADISC_DATABASE_URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from anomaly_discovery.platform.storage.models import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    return os.environ.get("ADISC_DATABASE_URL") or config.get_main_option("sqlalchemy.url")


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
