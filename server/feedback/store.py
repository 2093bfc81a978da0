"""Durable feedback records (SQLite or PostgreSQL) and the bounded background writer that stores them.

A client sends the true label of an earlier answer; the service joins it with the answer it remembers into a
`FeedbackRecord` and hands it to a `FeedbackWriter`. Storing must never slow or fail the serving path, so
`submit` only appends to a bounded queue: a background thread writes batches (`batch` records, or whatever is
queued after `flush_seconds`), and what cannot be queued or written is counted (`on_dropped`) and logged at most
once per 10 s, never raised into the caller.

Stores (`open_store`):

    sqlite:///abs/path.db, sqlite:relative.db, a plain path    SQLite in WAL mode, one connection behind a lock
    postgresql://user:pw@host:port/db (or postgres://)         psycopg 3 with a small pool (1 to 4 connections)

A record whose (request_id, model, answered_at) is already stored is skipped, so a batch written again after a lost
acknowledgement stores it once, while a client that reuses its ids labels each answer. The schema is versioned:
`MIGRATIONS` run at open, each in its own transaction, only those not yet recorded in `schema_migrations`; several
servers starting at once serialize on a PostgreSQL advisory lock (SQLite: on BEGIN IMMEDIATE). A database whose
schema is newer than this code knows is refused (`SchemaTooNew`) rather than written with assumptions that may no
longer hold.

The writer opens its store in its own thread, so a database that is down at start-up does not stop the server:
it retries with backoff (`retry_seconds`) while records wait in the queue (overflow dropped as "queue full").
A failed batch is retried once on a reopened store; a second failure drops it ("database unavailable" when the
database cannot be reached, "write failed" for records the database refuses, each such record singled out so
that one bad value does not take its batch's good records with it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.security import redact_url

log = logging.getLogger("mnist.feedback")

QUEUE_FULL = "queue full"
UNAVAILABLE = "database unavailable"
WRITE_FAILED = "write failed"
CLOSED = "writer closed"  # submitted after close()

LOG_INTERVAL_SECONDS = 10.0  # at most one warning line per this long for each kind of trouble
SQLITE_BUSY_SECONDS = 5.0
MIGRATION_LOCK = 0x6D6E6973_66656564  # pg_advisory_xact_lock key: "mnisfeed"

_TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "double": "REAL", "blob": "BLOB"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY", "double": "DOUBLE PRECISION", "blob": "BYTEA"},
}

SCHEMA_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at {double} NOT NULL)"
)

# (version, SQL): statements separated by ";", with {id}, {double} and {blob} filled in per dialect (_TYPES).
# Append only: a released migration is never edited, since databases that applied it would not run it again.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE feedback (
            id {id},
            request_id TEXT NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            kind TEXT NOT NULL,
            prediction TEXT NOT NULL,
            confidence {double} NOT NULL,
            digit_score {double},
            label TEXT NOT NULL,
            correct BOOLEAN NOT NULL,
            answered_at {double} NOT NULL,
            received_at {double} NOT NULL,
            image {blob},
            UNIQUE (request_id, model, answered_at)
        );
        CREATE INDEX feedback_model_version_received ON feedback (model, version, received_at)
        """,
    ),
]
LATEST_SCHEMA = MIGRATIONS[-1][0]

_COLUMNS = (
    "request_id",
    "model",
    "version",
    "kind",
    "prediction",
    "confidence",
    "digit_score",
    "label",
    "correct",
    "answered_at",
    "received_at",
    "image",
)


@dataclass(frozen=True)
class FeedbackRecord:
    """One answer the server gave, joined with the true label a client sent for it."""

    request_id: str
    model: str
    version: str
    kind: str  # "classify" (a digit) or "read_digits" (a number's text)
    prediction: str
    confidence: float
    digit_score: float | None
    label: str
    answered_at: float
    received_at: float
    image: bytes | None = field(repr=False)  # the 28x28 uint8 input the model saw, or None when not kept

    @property
    def correct(self) -> bool:
        """A digit is right when it is the label; a number when its digits are (ReadDigits' groups not judged)."""
        if self.kind == "classify":
            return self.prediction == self.label
        return "".join(self.prediction.split()) == "".join(self.label.split())


class FeedbackStoreError(RuntimeError):
    """A feedback database could not be used; the message names its URL without the password."""


class StoreUnavailable(FeedbackStoreError):
    """The database cannot be reached (connection refused or lost, file cannot be opened): retrying may help."""


class SchemaTooNew(FeedbackStoreError):
    """The database was migrated by newer code: writing to it with this code's assumptions could corrupt it."""


class FeedbackStore(Protocol):
    url: str  # where it writes, any password removed (safe to log)

    def write(self, records: Sequence[FeedbackRecord]) -> int: ...

    def has(self, request_id: str, model: str) -> bool: ...

    def records(
        self,
        model: str | None = None,
        version: str | None = None,
        with_images: bool = False,
        since: float | None = None,
    ) -> list[FeedbackRecord]: ...

    def count(self) -> int: ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...


def migration_statements(sql: str, dialect: str) -> list[str]:
    """The statements of one migration (or of SCHEMA_MIGRATIONS_TABLE) in `dialect`'s types."""
    return [s.strip() for s in sql.format(**_TYPES[dialect]).split(";") if s.strip()]


def _secrets(url: str) -> list[str]:
    """The password of `url` as written and decoded: what must not appear in any message."""
    found = []
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found += [v for k, v in urllib.parse.parse_qsl(parts.query) if k.lower() == "password" and v]
        raw = parts.netloc.rsplit("@", 1)[0].partition(":")[2] if "@" in parts.netloc else ""
        if raw:
            found.append(raw)
    return sorted({s for s in found if s} | {urllib.parse.unquote(s) for s in found if s}, key=len, reverse=True)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def open_store(url: str, *, connect_timeout: float = 5.0) -> FeedbackStore:
    """Open (creating and migrating as needed) the feedback database at `url`.

    "sqlite:///abs/path.db", "sqlite:relative.db", a plain file path (SQLite; its folder must exist), or
    "postgresql://user:pw@host:port/db" ("postgres://" too). ValueError for a URL of another kind;
    StoreUnavailable when the database cannot be reached; SchemaTooNew for a database newer than this code.
    """
    if not url or not url.strip():
        raise ValueError("the feedback database URL is empty: give sqlite:///path.db, a file path or postgresql://...")
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else None  # "C:" is a drive, not a scheme
    if scheme is None:
        return SQLiteStore(os.path.expanduser(url))
    if scheme == "sqlite":
        return SQLiteStore(_sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, connect_timeout=connect_timeout)
    raise ValueError(
        f"unknown feedback database URL scheme {scheme!r} in {redact_url(url)}: "
        "use sqlite:///abs/path.db, sqlite:relative.db, a file path, or postgresql://user:password@host:port/db"
    )


def _sqlite_path(url: str) -> str:
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):
        host, _, path = rest[2:].partition("/")
        if host:
            raise ValueError(
                f"the SQLite URL {url!r} names a host ({host!r}): use sqlite:///abs/path.db or sqlite:relative.db"
            )
        path = "/" + path
    else:
        path = rest
    if path in ("", "/"):
        raise ValueError(f"the SQLite URL {url!r} names no file: use sqlite:///abs/path.db or sqlite:relative.db")
    return os.path.expanduser(path)


def _row(record: FeedbackRecord) -> tuple[Any, ...]:
    return (
        record.request_id,
        record.model,
        record.version,
        record.kind,
        record.prediction,
        float(record.confidence),
        None if record.digit_score is None else float(record.digit_score),
        record.label,
        record.correct,
        float(record.answered_at),
        float(record.received_at),
        None if record.image is None else bytes(record.image),
    )


class _SQLStore:
    """What both dialects share: the SQL (written with ? placeholders) and the migration procedure."""

    dialect: str
    url: str
    placeholder = "?"

    def _transaction(self, migrating: bool = False) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.placeholder)

    def _migrate(self) -> None:
        with self._transaction(migrating=True) as cur:
            for statement in migration_statements(SCHEMA_MIGRATIONS_TABLE, self.dialect):
                cur.execute(statement)
            applied = self._applied(cur)
        newest = max(applied, default=0)
        if newest > LATEST_SCHEMA:
            raise SchemaTooNew(
                f"the feedback database {self.url} has schema version {newest}, newer than this server knows "
                f"({LATEST_SCHEMA}): run a newer server, or point this one at another database"
            )
        for version, sql in MIGRATIONS:
            if version in applied:
                continue
            with self._transaction(migrating=True) as cur:
                if version in self._applied(cur):  # another server applied it since we looked
                    continue
                for statement in migration_statements(sql, self.dialect):
                    cur.execute(statement)
                cur.execute(
                    self._sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"),
                    (version, time.time()),
                )
            log.info("feedback database %s: applied schema migration %d", self.url, version)

    def _applied(self, cur: Any) -> set[int]:
        cur.execute("SELECT version FROM schema_migrations")
        return {int(row[0]) for row in cur.fetchall()}

    def write(self, records: Sequence[FeedbackRecord]) -> int:
        if not records:
            return 0
        sql = (
            f"INSERT INTO feedback ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            "ON CONFLICT (request_id, model, answered_at) DO NOTHING"
        )
        with self._transaction() as cur:
            cur.executemany(self._sql(sql), [_row(r) for r in records])
            return max(0, cur.rowcount)

    def has(self, request_id: str, model: str) -> bool:
        sql = "SELECT 1 FROM feedback WHERE request_id = ? AND model = ? LIMIT 1"
        return bool(self._query(self._sql(sql), (request_id, model)))

    def records(
        self,
        model: str | None = None,
        version: str | None = None,
        with_images: bool = False,
        since: float | None = None,
    ) -> list[FeedbackRecord]:
        """Stored records, oldest (received_at) first; `since`: received at or after that unix time."""
        where, params = [], []
        for column, value, test in (("model", model, "="), ("version", version, "="), ("received_at", since, ">=")):
            if value is not None:
                where.append(f"{column} {test} ?")
                params.append(value)
        columns = ", ".join(_COLUMNS[:8] + _COLUMNS[9:11]) + (", image" if with_images else ", NULL")
        sql = f"SELECT {columns} FROM feedback"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY received_at, id"
        return [
            FeedbackRecord(*row[:10], image=None if row[10] is None else bytes(row[10]))
            for row in self._query(self._sql(sql), params)
        ]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM feedback")[0][0])

    def schema_version(self) -> int:
        return int(self._query("SELECT MAX(version) FROM schema_migrations")[0][0] or 0)


class SQLiteStore(_SQLStore):
    """One connection in autocommit mode, serialized by a lock; transactions are explicit (BEGIN IMMEDIATE)."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.url = "sqlite::memory:" if path == ":memory:" else "sqlite://" + os.path.abspath(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                path, timeout=SQLITE_BUSY_SECONDS, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the feedback database {self.url}: {exc}") from exc
        try:
            with self._errors():
                self._conn.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
                self._wal()
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _wal(self) -> None:
        """Switch to WAL; retried, because SQLite answers "locked" at once, without waiting out the busy timeout,
        while another connection (a second server starting) is creating the same file."""
        deadline = time.monotonic() + SQLITE_BUSY_SECONDS
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:  # locked, I/O error, file gone: the database, not the data
            raise StoreUnavailable(f"feedback database {self.url}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self, migrating: bool = False) -> Iterator[sqlite3.Cursor]:
        with self._lock, self._errors():
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._errors():
            return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresStore(_SQLStore):
    """psycopg 3 and a pool of 1 to 4 connections (autocommit, explicit transactions), each checked before use."""

    dialect = "postgresql"
    placeholder = "%s"

    def __init__(self, url: str, connect_timeout: float = 5.0) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise FeedbackStoreError(
                f"a PostgreSQL feedback database needs psycopg and psycopg-pool ({exc}): install the `serve` extra"
            ) from exc

        self._psycopg = psycopg
        self.url = redact_url(url)
        self._hidden = _secrets(url)
        kwargs = {
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(connect_timeout)),  # libpq: whole seconds, at least 2
            "application_name": "mnist-feedback",
        }
        try:
            # A direct connection first: a pool that cannot connect only says it timed out, this says why.
            self._first: Any = psycopg.connect(url, **kwargs)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to the feedback database {self.url}: {self._scrub(exc)}") from None
        self._pool: Any = None
        try:
            with self._first:
                self._migrate()
            self._first = None
            self._pool = ConnectionPool(
                url,
                min_size=1,
                max_size=4,
                kwargs=kwargs,
                timeout=connect_timeout,
                check=ConnectionPool.check_connection,
                name="mnist-feedback",
                open=False,
            )
            with self._errors():
                self._pool.open(wait=True, timeout=connect_timeout)
        except BaseException:
            self.close()
            raise

    def _scrub(self, error: BaseException | str) -> str:
        text = str(error).strip()
        for secret in self._hidden:
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (self._psycopg.OperationalError, self._psycopg.InterfaceError) as exc:  # PoolTimeout included
            raise StoreUnavailable(f"feedback database {self.url}: {self._scrub(exc)}") from None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        if self._first is not None:
            yield self._first
        else:
            with self._pool.connection() as conn:
                yield conn

    @contextlib.contextmanager
    def _transaction(self, migrating: bool = False) -> Iterator[Any]:
        with self._errors(), self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            if migrating:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            yield cur

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._errors(), self._connection() as conn:
            return conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        if self._first is not None:
            with contextlib.suppress(Exception):
                self._first.close()
            self._first = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.close()
            self._pool = None


class _Throttle:
    """Counts events and says when a log line is due: at most one per `interval` s, with the count since the last."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: float | None = None
        self._count = 0

    def add(self, count: int) -> int | None:
        with self._lock:
            self._count += count
            now = time.monotonic()
            if self._last is not None and now - self._last < self._interval:
                return None
            total, self._count, self._last = self._count, 0, now
            return total

    def take(self) -> int:
        with self._lock:
            total, self._count = self._count, 0
            return total


class FeedbackWriter:
    """Bounded, asynchronous: submit() never blocks and never raises; a background thread writes in batches."""

    def __init__(
        self,
        store_factory: Callable[[], FeedbackStore],
        max_pending: int = 10_000,
        batch: int = 256,
        flush_seconds: float = 0.2,
        on_written: Callable[[int], None] = lambda n: None,
        on_dropped: Callable[[int, str], None] = lambda n, why: None,
        retry_seconds: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        if max_pending < 1 or batch < 1 or flush_seconds < 0 or not 0 < retry_seconds[0] <= retry_seconds[1]:
            raise ValueError(
                f"FeedbackWriter: max_pending {max_pending} and batch {batch} must be >= 1, flush_seconds "
                f"{flush_seconds} >= 0, retry_seconds {retry_seconds} a (first, longest) pair of positive seconds"
            )
        self._factory = store_factory
        self._max_pending = max_pending
        self._batch = batch
        self._flush_seconds = flush_seconds
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._retry_first, self._retry_longest = retry_seconds
        self._queue: collections.deque[FeedbackRecord] = collections.deque()
        self._cond = threading.Condition()
        self._accepted = 0  # records submit() queued ...
        self._taken = 0  # ... of which the thread (or close) took this many off the queue ...
        self._finished = 0  # ... and this many are written or dropped
        self._flush_target = 0  # flush() wants records up to this one written now, without waiting for a batch
        self._closing = False
        self._stop = threading.Event()
        self._store: FeedbackStore | None = None
        self._last_write_ok = True
        self._drop_log = _Throttle()
        self._open_log = _Throttle()
        self._open_failed = False
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    def submit(self, record: FeedbackRecord) -> bool:
        """Queue `record` for writing; False when it was dropped (queue full, or the writer closed)."""
        try:
            with self._cond:
                reason = CLOSED if self._closing else QUEUE_FULL
                accepted = not self._closing and self._accepted - self._finished < self._max_pending
                if accepted:
                    self._queue.append(record)
                    self._accepted += 1
                    if len(self._queue) == 1 or len(self._queue) >= self._batch:
                        self._cond.notify_all()
            if not accepted:
                self._dropped(1, reason, f"{self._max_pending} records pending" if reason == QUEUE_FULL else "")
            return accepted
        except Exception:
            log.exception("feedback record not queued")
            return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written or dropped; False if `timeout` came first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._accepted
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            while self._finished < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush, stop the thread and close the store; what is still unwritten after `timeout` is dropped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            first = not self._closing
            self._closing = True
        if first:
            self.flush(timeout)
            with self._cond:
                self._stop.set()
                self._cond.notify_all()
        self._thread.join(max(0.05, deadline - time.monotonic()))
        if not first:
            return
        if self._thread.is_alive():  # stuck connecting or writing: it must not hold the records any longer
            self._drain(UNAVAILABLE, "the writer did not finish within the close timeout")
        left = self._drop_log.take()
        if left:
            log.warning("%d feedback record(s) dropped since the last report", left)

    @property
    def pending(self) -> int:
        """Records submitted and not yet written or dropped."""
        with self._cond:
            return self._accepted - self._finished

    @property
    def healthy(self) -> bool:
        """The store is open and the last write succeeded."""
        return self._store is not None and self._last_write_ok

    def _run(self) -> None:
        delay = self._retry_first
        try:
            while True:
                if self._store is None:
                    if self._stop.is_set():
                        self._drain(UNAVAILABLE, "closed before the database could be reached")
                        return
                    if not self._open():
                        self._stop.wait(delay)
                        delay = min(delay * 2, self._retry_longest)
                        continue
                    delay = self._retry_first
                batch = self._take()
                if batch is None:
                    return
                self._write(batch)
        except BaseException:
            log.exception("the feedback writer stopped")  # a bug: drop what is left rather than leave it hanging
            with self._cond:
                self._closing = True
            self._drain(WRITE_FAILED, "the writer stopped")
        finally:
            self._close_store()

    def _open(self) -> bool:
        try:
            self._store = self._factory()
        except Exception as exc:
            self._open_failed = True
            if self._open_log.add(1) is not None:
                log.warning(
                    "feedback database unavailable, retrying (up to every %.0f s): %s", self._retry_longest, exc
                )
            return False
        if self._open_failed:
            log.warning("feedback database %s reachable again", self._store.url)
            self._open_failed = False
        return True

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception as exc:
                log.debug("closing the feedback store: %s", exc)

    def _take(self) -> list[FeedbackRecord] | None:
        """The next batch: `batch` records, or fewer after flush_seconds, at stop or on flush(); None at stop."""
        with self._cond:
            deadline: float | None = None
            while True:
                queued = len(self._queue)
                if queued >= self._batch or (queued and (self._stop.is_set() or self._flush_target > self._taken)):
                    break
                if not queued:
                    if self._stop.is_set():
                        return None
                    deadline = None
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._flush_seconds
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            batch = [self._queue.popleft() for _ in range(min(queued, self._batch))]
            self._taken += len(batch)
            return batch

    def _write(self, batch: list[FeedbackRecord]) -> None:
        assert self._store is not None
        try:
            self._written(batch, self._store.write(batch))
            return
        except Exception as exc:
            error: Exception = exc
        self._last_write_ok = False
        self._close_store()
        if not self._open():
            self._drop(batch, UNAVAILABLE, error)
            return
        assert self._store is not None
        try:
            self._written(batch, self._store.write(batch))
            return
        except StoreUnavailable as exc:
            self._close_store()
            self._drop(batch, UNAVAILABLE, exc)
            return
        except Exception as exc:
            error = exc
        self._write_singly(batch, error)

    def _write_singly(self, batch: list[FeedbackRecord], error: Exception) -> None:
        """After a batch failed twice with the database reachable: one bad value must not take the good ones down."""
        assert self._store is not None
        written, rows, failed = 0, 0, []
        for index, record in enumerate(batch):
            try:
                rows += self._store.write([record])
                written += 1
            except StoreUnavailable as exc:
                self._close_store()
                self._drop(batch[index:], UNAVAILABLE, exc)
                break
            except Exception as exc:
                failed.append(record)
                error = exc
        if written:
            self._call(self._on_written, rows)
            self._finish(written)
        self._drop(failed, WRITE_FAILED, error)
        self._last_write_ok = written == len(batch)

    def _written(self, batch: list[FeedbackRecord], rows: int) -> None:
        self._last_write_ok = True
        self._call(self._on_written, rows)
        self._finish(len(batch))

    def _drop(self, records: Sequence[FeedbackRecord], reason: str, error: BaseException | str) -> None:
        if records:
            self._dropped(len(records), reason, str(error))
            self._finish(len(records))

    def _drain(self, reason: str, why: str) -> None:
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._taken += len(left)
        self._drop(left, reason, why)

    def _dropped(self, count: int, reason: str, detail: str) -> None:
        self._call(self._on_dropped, count, reason)
        total = self._drop_log.add(count)
        if total is not None:
            log.warning(
                "%d feedback record(s) dropped since the last report; the latest %d: %s%s",
                total,
                count,
                reason,
                f" ({detail})" if detail else "",
            )

    def _finish(self, count: int) -> None:
        with self._cond:
            self._finished += count
            self._cond.notify_all()

    @staticmethod
    def _call(callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("feedback callback %r failed", callback)
