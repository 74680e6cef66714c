"""Engine and session set-up, the SQLite writer lock, and the schema version (Alembic).

SQLite runs in WAL mode and every transaction starts with BEGIN IMMEDIATE, so writers queue instead of
failing half-way. On PostgreSQL, writers lock the accounts they touch (in id order, so they cannot
deadlock) before changing balances, and balances change by `balance = balance + delta`, never by a value
read earlier, so no update is lost.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from recharged.errors import DatabaseError

_BUSY_TIMEOUT_SECONDS = 30  # how long SQLite waits for another writer before giving up


def normalize_url(url: str) -> str:
    """Accept postgres:// and postgresql:// and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def masked_url(url: str) -> str:
    return make_url(normalize_url(url)).render_as_string(hide_password=True)


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite database URL; None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def make_engine(url: str, connections: int | None = None) -> Engine:
    """An engine configured for recharged: WAL and BEGIN IMMEDIATE on SQLite, pre-ping on PostgreSQL.
    `connections`: how many threads may hold a connection at once (the daemon's charge workers and HTTP
    threads); SQLAlchemy's default pool allows 15."""
    url = normalize_url(url)
    pool: dict[str, Any] = {}
    if connections is not None:
        # Kept open up to 40 (the HTTP server's threads): fewer meant a new PostgreSQL session for most requests
        # under load, and one process never needs more than that at once but for a large charge concurrency.
        kept = min(connections, 40)
        pool = {"pool_size": kept, "max_overflow": connections - kept, "pool_timeout": 60}
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not Path(database).parent.exists():
            raise DatabaseError(f"database {url}: directory {Path(database).parent} does not exist")
        engine = create_engine(url, connect_args={"timeout": _BUSY_TIMEOUT_SECONDS}, **pool)

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_SECONDS * 1000}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            read_only = connection.get_execution_options().get(READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, **pool)
    raise DatabaseError(f"database {masked_url(url)}: only sqlite:// and postgresql:// are supported")


READ_ONLY = "recharged_read_only"  # execution option: begin SQLite's transaction deferred


def migrations_dir() -> Path:
    """Alembic scripts: inside the installed package, or the repository's migrations/ in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise DatabaseError("the migrations folder is missing from this installation")


class Database:
    """One database: its engine, transactions and schema version."""

    def __init__(self, url: str, connections: int | None = None) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, connections)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite lets one transaction at a time write, and every transaction here is a writer (BEGIN IMMEDIATE).
        # Its busy handler waits by sleeping, longer each time (up to 100 ms), so threads of one process that
        # wait for it leave the database idle between turns. They queue on this lock instead, and the next one
        # starts the moment the last one ends; other processes still meet SQLite's lock and busy timeout.
        self._writer = threading.Lock() if self.dialect == "sqlite" else None
        self._writing: dict[int, int] = {}  # thread id -> transactions open in that thread

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self._writer_turn():
            try:
                with self._sessions.begin() as session:
                    yield session
            except OperationalError as exc:
                raise DatabaseError(f"database {masked_url(self.url)}: {exc.orig}") from exc

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """On SQLite, wait for this process's turn to write (a transaction nested in the same thread takes none;
        after the busy timeout the wait is left to SQLite, as it was)."""
        if self._writer is None:
            yield
            return
        thread = threading.get_ident()
        depth = self._writing.get(thread, 0)
        queued = depth == 0 and self._writer.acquire(timeout=_BUSY_TIMEOUT_SECONDS)
        self._writing[thread] = depth + 1
        try:
            yield
        finally:
            if depth:
                self._writing[thread] = depth
            else:
                del self._writing[thread]
            if queued:
                self._writer.release()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reading only, rolled back at the end. On SQLite it takes no write lock (a deferred
        transaction: in WAL mode readers see one snapshot and never hold up the writer), so `verify`, `plan`,
        `status`, health probes and account reads never stall usage recording or charging."""
        try:
            with self.engine.connect() as connection:
                connection.execution_options(**{READ_ONLY: True})
                with Session(bind=connection, expire_on_commit=False) as session:
                    yield session  # closing ends the transaction; what was read stays loaded
        except OperationalError as exc:
            raise DatabaseError(f"database {masked_url(self.url)}: {exc.orig}") from exc

    # Alembic is imported only where the schema is changed: it is slow to import (a third of a second), and every
    # command checks the schema version (require_current), which reads Alembic's table and scripts without it.
    def _alembic(self) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        return config

    def head_revision(self) -> str:
        """The newest schema revision: read from the migration scripts' `revision` and `down_revision` lines, or
        by Alembic when they are not one plain chain (a merge, a revision it would compute)."""
        return _chain_head(migrations_dir() / "versions") or self.alembic_head_revision()

    def alembic_head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic()).get_current_head()
        assert head is not None
        return head

    def current_revision(self) -> str | None:
        """The database's schema revision (Alembic's `alembic_version` table); None when it has none. On SQLite
        the read takes no write lock."""
        try:
            with self.engine.connect() as connection:
                connection.execution_options(**{READ_ONLY: True})
                if not inspect(connection).has_table("alembic_version"):
                    return None
                versions: list[str] = list(
                    connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalars()
                )
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database {masked_url(self.url)}: {getattr(exc, 'orig', exc)}") from exc
        if len(versions) > 1:
            raise DatabaseError(f"database {masked_url(self.url)} is at several schema revisions at once: {versions}")
        return versions[0] if versions else None

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the database to the newest schema; returns (revision before, revision after)."""
        from alembic import command

        before = self.current_revision()
        config = self._alembic()
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        return before, self.head_revision()

    def require_current(self) -> None:
        """Refuse to work on a database that is missing or not at the newest schema."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            state = "has no recharged schema" if current is None else f"is at schema {current}, not {head}"
            raise DatabaseError(f"database {masked_url(self.url)} {state}: run `recharged db upgrade`")

    def optimize(self) -> None:
        """Refresh the query planner's statistics: PRAGMA optimize on SQLite, which keeps none unless asked (it is
        cheap). Elsewhere nothing: PostgreSQL's autovacuum keeps its own."""
        if self.dialect != "sqlite":
            return
        with self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA optimize")

    def ping(self) -> None:
        """One round trip to the database (raises what the driver raises when it cannot answer)."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        self.engine.dispose()


_REVISION = re.compile(r"^revision(?:\s*:[^=]+)?\s*=\s*['\"]([^'\"]+)['\"]\s*$", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision(?:\s*:[^=]+)?\s*=\s*(?:None|['\"]([^'\"]+)['\"])\s*$", re.MULTILINE)


def _chain_head(versions: Path) -> str | None:
    """The last revision of the migration scripts in `versions` when each names its revision and the one before
    as plain strings, and they make one chain without branches; None otherwise (Alembic must read them)."""
    revises: dict[str, str | None] = {}
    for script in versions.glob("*.py"):
        text = script.read_text(encoding="utf-8")
        revision, down = _REVISION.findall(text), _DOWN_REVISION.findall(text)
        if len(revision) != 1 or len(down) != 1 or revision[0] in revises:
            return None
        revises[revision[0]] = down[0] or None
    heads = set(revises) - set(revises.values())
    roots = [r for r, down in revises.items() if down is None]
    downs = set(revises.values())
    if len(heads) != 1 or len(roots) != 1 or len(downs) != len(revises) or not downs <= {None, *revises}:
        return None
    return heads.pop()


# --- statements -------------------------------------------------------------------------------------------


def dialect_insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


# --- receipts, the outbox, notices, statements ------------------------------------------------------------------


def insert_once(session: Session, model: Any, values: Mapping[str, Any], conflict: Sequence[str]) -> bool:
    """Insert one row unless a row with the same `conflict` columns exists; True when this call inserted it."""
    statement = (
        dialect_insert(session, model.__table__)
        .values(**values)
        .on_conflict_do_nothing(index_elements=conflict)
        # Without it SQLAlchemy 2 does not keep an INSERT's rowcount: psycopg's reads -1, and -1 is true.
        .execution_options(preserve_rowcount=True)
    )
    return bool(cast(Any, session.execute(statement)).rowcount == 1)
