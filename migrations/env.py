"""Alembic environment: imports only the models' metadata; recharged passes the connection in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from recharged.store.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:  # plain `alembic` use: the URL comes from `-x url=...`
        url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise SystemExit("give the database with: alembic -x url=sqlite:///recharged.db upgrade head")
        with create_engine(url).connect() as conn:
            _run(conn)
        return
    _run(connection)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite needs batch mode for ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `recharged db upgrade`")
run_migrations_online()
