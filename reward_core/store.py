"""The comparison store: labellers' judgements and the labelling queue, in SQLite or PostgreSQL.

One interface (:class:`ComparisonStore`) over SQLAlchemy 2.x Core, so the routes, the export
and ``reward train-rm --from-store`` do not care which database it is:

- ``sqlite:///PATH`` (or a bare PATH): a file created on first start, in WAL mode with
  ``synchronous=FULL``, so a commit is on disk (the WAL fsync'd) before the route answers 2xx.
  Readers (an export for training) do not block the service's writes.
- ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB``: through psycopg 3.

The schema is versioned with Alembic (``reward_core/migrations/versions``); opening a store
upgrades it to the newest version, so a new release of the service migrates its database
on start. Every method runs in one transaction, committed before it returns.

A database that cannot be reached or answers with an operational error raises
:class:`StoreUnavailable` (the routes answer 503 with Retry-After); nothing is reported as
stored unless its transaction committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, InterfaceError, OperationalError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# How long a write waits for SQLite's write lock before giving up with a 503: long enough for
# any other writer's transaction here (milliseconds), short of the request deadline.
SQLITE_BUSY_TIMEOUT_S = 10
PG_CONNECT_TIMEOUT_S = 5

metadata = sa.MetaData()

# Kept in step with the migrations by hand (tests/test_comparisons.py checks that the migrated
# schema matches these tables): the migrations create the tables, these describe them to queries.
label_tasks = sa.Table(
    "label_tasks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("prompt", sa.JSON, nullable=False),
    sa.Column("responses", sa.JSON, nullable=False),
    sa.Column("category", sa.String(200), nullable=True),
    sa.Column("source", sa.String(200), nullable=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("leased_to", sa.String(200), nullable=True),
    sa.Column("comparison_id", sa.Integer, nullable=True),
)

comparisons = sa.Table(
    "comparisons", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("labeller", sa.String(200), nullable=False, index=True),
    sa.Column("category", sa.String(200), nullable=True, index=True),
    sa.Column("prompt", sa.JSON, nullable=False),
    sa.Column("responses", sa.JSON, nullable=False),
    sa.Column("ranking", sa.JSON, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("label_tasks.id"), nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("content_sha256", sa.String(64), nullable=False),
    sa.UniqueConstraint("idempotency_key", name="uq_comparisons_idempotency_key"),
)


class StoreError(Exception):
    """A store URL or database that cannot be used; the message says why."""


class StoreUnavailable(StoreError):
    """The database did not answer (down, unreachable, locked past the timeout)."""


class IdempotencyConflict(StoreError):
    def __init__(self, key: str, existing_id: int) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for a different comparison (id {existing_id}); "
            "send a new key for a new comparison, or the same content to get the original back"
        )
        self.existing_id = existing_id


class TaskProblem(StoreError):
    """A comparison names a label task that does not exist (``status`` 422) or is done (409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class NewComparison:
    """What a route hands the store: validated content, ranking best first."""

    prompt: Any
    responses: list[str]
    ranking: list[int]
    kind: str  # "ranking" or "pairwise"
    labeller: str
    category: str | None = None
    tags: list[str] | None = None
    reason: str | None = None
    task_id: int | None = None

    def content_sha256(self) -> str:
        """Digest of everything the labeller sent: a retried POST has the same one."""
        content = {k: getattr(self, k) for k in ("prompt", "responses", "ranking", "kind", "labeller", "category", "reason", "task_id")}
        content["tags"] = list(self.tags or [])
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    labeller: str | None = None
    category: str | None = None


def normalize_url(url: str) -> str:
    """``sqlite:///PATH`` or a bare path -> SQLite; ``postgres(ql)://`` -> psycopg 3. Raises StoreError."""
    text = url.strip()
    if not text:
        raise StoreError("the store URL is empty; give sqlite:///PATH or postgresql://USER@HOST/DB")
    if "://" not in text:
        text = "sqlite:///" + str(Path(text).expanduser())
    try:
        parsed = make_url(text)
    except ArgumentError as exc:
        raise StoreError(f"cannot read the store URL {redact(url)!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise StoreError("an in-memory SQLite store would lose every comparison on restart; give sqlite:///PATH")
        return parsed.set(drivername="sqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise StoreError(f"store URL {redact(url)!r}: only sqlite:///PATH and postgresql://... are supported")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except ArgumentError:
        return "<unreadable URL>"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime | None) -> datetime | None:
    """Aware UTC datetimes everywhere: SQLite hands back naive ones (stored as UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers (an export) and the writer do not block each other; synchronous=FULL: the
    # WAL is fsync'd at every commit, so a comparison acknowledged with 2xx survives a crash
    # or power loss.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.close()


def is_unavailable(exc: DBAPIError) -> bool:
    """A failure of the database, not of the request: unreachable, restarting, locked, out of
    disk. Anything else (a constraint, a value the database refuses) is not retried as a 503."""
    return isinstance(exc, (OperationalError, InterfaceError)) or bool(getattr(exc, "connection_invalidated", False))


def _unavailable(exc: Exception) -> StoreUnavailable:
    detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreUnavailable(f"the comparison store is unavailable ({type(getattr(exc, 'orig', exc)).__name__}: {detail})")


class ComparisonStore:
    """Comparisons and label tasks in one database. Thread-safe (a pooled engine); each
    method is one transaction, committed before it returns."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = normalize_url(url)
        self.display_url = redact(self.url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            path = Path(parsed.database).expanduser()
            if not migrate and not path.is_file():
                raise StoreError(f"there is no SQLite store at {path}; give the path `reward serve --store` uses")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)  # "created on first start"
            except OSError as exc:
                raise StoreError(f"cannot create the folder of the SQLite store {path}: {exc.strerror}") from exc
            self.engine: Engine = sa.create_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(
                self.url, pool_pre_ping=True, pool_timeout=10,  # reconnect after a database restart
                connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
            )
        if migrate:
            self.migrate()

    # -- schema ------------------------------------------------------------------------------

    def migrate(self) -> str:
        """Upgrade the schema to the newest migration; returns that revision."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at every start
        try:
            with self.engine.begin() as connection:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except (OperationalError, DBAPIError) as exc:
            raise StoreError(f"cannot open the comparison store {self.display_url}: {_unavailable(exc)}") from exc
        revision = self.revision()
        log.info("comparison store %s at schema revision %s", self.display_url, revision)
        return revision

    def revision(self) -> str | None:
        from alembic.migration import MigrationContext

        try:
            with self.engine.connect() as connection:
                return MigrationContext.configure(connection).get_current_revision()
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            raise _unavailable(exc) from exc

    def close(self) -> None:
        self.engine.dispose()

    # -- comparisons -------------------------------------------------------------------------

    def add_comparison(self, new: NewComparison, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Store a comparison; returns (its row, created). With a key already used for the same
        content: (the original row, False). Raises IdempotencyConflict, TaskProblem, StoreUnavailable."""
        digest = new.content_sha256()
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    if idempotency_key is not None:
                        existing = conn.execute(
                            sa.select(comparisons).where(comparisons.c.idempotency_key == idempotency_key)
                        ).mappings().first()
                        if existing is not None:
                            if existing["content_sha256"] != digest:
                                raise IdempotencyConflict(idempotency_key, existing["id"])
                            return _comparison_row(existing), False
                    if new.task_id is not None:
                        self._check_task_open(conn, new.task_id)
                    created_at = _now()
                    new_id = conn.execute(comparisons.insert().values(
                        created_at=created_at, labeller=new.labeller, category=new.category, prompt=new.prompt,
                        responses=new.responses, ranking=new.ranking, kind=new.kind, tags=list(new.tags or []),
                        reason=new.reason, task_id=new.task_id, idempotency_key=idempotency_key, content_sha256=digest,
                    )).inserted_primary_key[0]
                    if new.task_id is not None:
                        self._finish_task(conn, new.task_id, new_id)
                    row = conn.execute(sa.select(comparisons).where(comparisons.c.id == new_id)).mappings().one()
                    return _comparison_row(row), True
            except IntegrityError:
                # Two requests with one key raced past the lookup; the loser reads the winner's row.
                if idempotency_key is None or attempt == 1:
                    raise
            except DBAPIError as exc:
                if not is_unavailable(exc):
                    raise
                raise _unavailable(exc) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _check_task_open(conn: Connection, task_id: int) -> None:
        task = conn.execute(sa.select(label_tasks.c.status, label_tasks.c.comparison_id).where(label_tasks.c.id == task_id)).first()
        if task is None:
            raise TaskProblem(422, f"task_id {task_id} is not a label task here; send the id GET /v1/label/tasks/next gave")
        if task.status != "open":
            raise TaskProblem(409, f"label task {task_id} was already labelled (comparison {task.comparison_id}); fetch the next task")

    def _finish_task(self, conn: Connection, task_id: int, comparison_id: int) -> None:
        done = conn.execute(
            label_tasks.update()
            .where(label_tasks.c.id == task_id, label_tasks.c.status == "open")
            .values(status="done", comparison_id=comparison_id, leased_until=None)
        )
        if done.rowcount != 1:  # another labeller's comparison for it committed in between
            self._check_task_open(conn, task_id)
            raise TaskProblem(409, f"label task {task_id} was labelled by someone else meanwhile; fetch the next task")

    def list_comparisons(self, filters: Filters, *, after: int | None = None, limit: int = 100) -> tuple[list[dict], int | None]:
        """One page, oldest first: rows with id > ``after``; and the ``after`` of the next page
        (None when this is the last)."""
        query = self._filtered(filters).order_by(comparisons.c.id).limit(limit + 1)
        if after is not None:
            query = query.where(comparisons.c.id > after)
        with self._reading() as conn:
            rows = [_comparison_row(r) for r in conn.execute(query).mappings()]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["id"] if more else None)

    def iter_comparisons(self, filters: Filters | None = None, page: int = 500) -> Iterator[dict]:
        """Every matching comparison, oldest first, read page by page (bounded memory)."""
        after = None
        while True:
            rows, after = self.list_comparisons(filters or Filters(), after=after, limit=page)
            yield from rows
            if after is None:
                return

    def _filtered(self, f: Filters):
        query = sa.select(comparisons)
        if f.since is not None:
            query = query.where(comparisons.c.created_at >= _utc(f.since))
        if f.until is not None:
            query = query.where(comparisons.c.created_at < _utc(f.until))
        if f.labeller is not None:
            query = query.where(comparisons.c.labeller == f.labeller)
        if f.category is not None:
            query = query.where(comparisons.c.category == f.category)
        return query

    # -- the labelling queue -----------------------------------------------------------------

    def add_tasks(self, tasks: list[dict]) -> list[int]:
        """Queue tasks (``prompt``, ``responses``, optional ``category``/``source``); their ids."""
        try:
            with self.engine.begin() as conn:
                now = _now()
                return [
                    conn.execute(label_tasks.insert().values(
                        created_at=now, prompt=t["prompt"], responses=t["responses"], category=t.get("category"),
                        source=t.get("source"), status="open",
                    )).inserted_primary_key[0]
                    for t in tasks
                ]
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            raise _unavailable(exc) from exc

    def next_task(self, labeller: str, lease_s: float) -> tuple[dict | None, int]:
        """The oldest open task nobody holds, leased to ``labeller`` for ``lease_s`` seconds (so two
        people are not shown the same one); and how many open tasks there are."""
        try:
            with self.engine.begin() as conn:
                now = _now()
                free = sa.or_(label_tasks.c.leased_until.is_(None), label_tasks.c.leased_until < now)
                waiting = int(conn.execute(sa.select(sa.func.count()).where(label_tasks.c.status == "open")).scalar_one())
                # The task this labeller already holds first (a reload of the page shows it again).
                mine = sa.and_(label_tasks.c.leased_to == labeller, label_tasks.c.leased_until >= now)
                for condition in (mine, free):
                    for _ in range(5):  # another labeller may take the row between select and update
                        row = conn.execute(
                            sa.select(label_tasks).where(label_tasks.c.status == "open", condition).order_by(label_tasks.c.id).limit(1)
                        ).mappings().first()
                        if row is None:
                            break
                        taken = conn.execute(
                            label_tasks.update().where(label_tasks.c.id == row["id"], label_tasks.c.status == "open", condition)
                            .values(leased_until=now + timedelta(seconds=lease_s), leased_to=labeller)
                        )
                        if taken.rowcount == 1:
                            return _task_row(row), waiting
                return None, waiting
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            raise _unavailable(exc) from exc

    def set_aside_task(self, task_id: int) -> None:
        """Take a task out of the queue for good (status ``unservable``): its stored text cannot be
        served (it was stored before the protocol checked text), so handing it out would fail."""
        try:
            with self.engine.begin() as conn:
                conn.execute(label_tasks.update().where(label_tasks.c.id == task_id, label_tasks.c.status == "open")
                             .values(status="unservable", leased_until=None))
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            raise _unavailable(exc) from exc

    def _reading(self):
        return _Reading(self.engine)


class _Reading:
    """A read-only connection whose operational failures become StoreUnavailable."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self) -> Connection:
        try:
            self.conn = self.engine.connect()
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            raise _unavailable(exc) from exc
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.conn.close()
        if isinstance(exc, DBAPIError) and is_unavailable(exc):
            raise _unavailable(exc) from exc
        return False


def _comparison_row(row) -> dict:
    return {
        "id": row["id"], "created_at": _utc(row["created_at"]), "labeller": row["labeller"], "category": row["category"],
        "prompt": row["prompt"], "responses": row["responses"], "ranking": row["ranking"], "kind": row["kind"],
        "tags": row["tags"] or [], "reason": row["reason"], "task_id": row["task_id"],
    }


def _task_row(row) -> dict:
    return {
        "id": row["id"], "created_at": _utc(row["created_at"]), "prompt": row["prompt"], "responses": row["responses"],
        "category": row["category"], "source": row["source"],
    }


def rankings_row(comparison: dict) -> dict:
    """A stored comparison as a row of the ``rankings`` format trainer/data.py reads (``prompt``,
    ``responses``, ``ranking`` best first, ``category``), with where it came from beside it."""
    row = {"prompt": comparison["prompt"], "responses": comparison["responses"], "ranking": comparison["ranking"]}
    if comparison.get("category") is not None:
        row["category"] = comparison["category"]
    row["comparison_id"] = comparison["id"]
    row["labeller"] = comparison["labeller"]
    row["created_at"] = comparison["created_at"].isoformat() if isinstance(comparison["created_at"], datetime) else comparison["created_at"]
    if comparison.get("tags"):
        row["tags"] = comparison["tags"]
    return row


def export_jsonl(store: ComparisonStore, path: str | Path, filters: Filters | None = None) -> int:
    """Write every matching comparison as rankings JSONL to ``path`` (atomically: a temporary
    file renamed into place); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for comparison in store.iter_comparisons(filters):
            f.write(json.dumps(rankings_row(comparison), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
