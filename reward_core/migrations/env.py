"""Alembic environment of the comparison store. ``ComparisonStore.migrate`` runs it with an open
connection in ``config.attributes["connection"]``; there is no alembic.ini.

New migration: ``alembic -x url=sqlite:///x.db -c /dev/null revision -m "what"`` is not needed;
copy the newest file in versions/, give it the next number as ``revision`` and the previous one
as ``down_revision``, and describe the change with ``op`` calls (keep reward_core/store.py's tables
in step: a test compares them with the migrated schema)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the comparison store's migrations through reward_core.store.ComparisonStore.migrate")

context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        # Replicas starting together would otherwise run the same migration twice; this lock
        # (held to the end of the transaction) makes them take turns.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(726572)")
    context.run_migrations()
