"""The feedback store (SQLite and a real PostgreSQL server that this session starts) and its background writer."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.feedback.store import (
    LATEST_SCHEMA,
    QUEUE_FULL,
    UNAVAILABLE,
    WRITE_FAILED,
    FeedbackRecord,
    FeedbackWriter,
    SchemaTooNew,
    StoreUnavailable,
    open_store,
)
from server.security import redact_url
from tests.postgres import PASSWORD, PostgresCluster, free_port

BACKENDS = ["sqlite", "postgresql"]
IMAGE = bytes(range(256)) * 3 + bytes(range(16))  # 784 bytes, every byte value, NUL included
FAST_RETRY = (0.05, 0.2)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file in tmp_path, or a new database in the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/feedback.db"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"t_{uuid.uuid4().hex[:16]}")


def backends(test: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.parametrize("store_url", BACKENDS, indirect=True)(test)


def record(request_id: str = "r1", **changes: Any) -> FeedbackRecord:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "model": "googlenet-fast",
        "version": "3",
        "kind": "classify",
        "prediction": "7",
        "confidence": 0.9123456789,
        "digit_score": 0.0312345678,
        "label": "7",
        "answered_at": 1_750_000_000.125,
        "received_at": 1_750_000_004.5,
        "image": IMAGE,
    }
    return FeedbackRecord(**(fields | changes))


def raw_sql(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Straight to the database, around the store under test."""
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as conn, conn:
        return conn.execute(sql).fetchall()


@contextlib.contextmanager
def opened(url: str) -> Iterator[Any]:
    store = open_store(url)
    try:
        yield store
    finally:
        store.close()


def count(url: str) -> int:
    with opened(url) as store:
        return store.count()


@backends
def test_a_record_written_is_read_back_whole(store_url: str) -> None:
    wrong = record(kind="read_digits", prediction="2026", label="2028")
    plain = record("r2", digit_score=None, image=None, received_at=1_750_000_005.0)
    with opened(store_url) as store:
        assert store.write([wrong, plain]) == 2
        assert store.records(with_images=True) == [wrong, plain]
        assert store.records() == [dataclasses.replace(wrong, image=None), plain]
        assert store.has("r1", "googlenet-fast") and not store.has("r1", "googlenet-accurate")
    assert [(r, bool(c)) for r, c in raw_sql(store_url, "SELECT request_id, correct FROM feedback ORDER BY id")] == [
        ("r1", False),
        ("r2", True),
    ]


@backends
def test_a_duplicate_is_skipped_not_an_error_while_another_model_or_answer_may_reuse_the_request_id(
    store_url: str,
) -> None:
    first = record()
    with opened(store_url) as store:
        assert store.write([first, first]) == 1
        again = [dataclasses.replace(first, label="1"), dataclasses.replace(first, model="googlenet-accurate")]
        assert store.write(again) == 1
        assert store.count() == 2
        assert store.records(model="googlenet-fast", with_images=True) == [first]
        later = dataclasses.replace(first, answered_at=first.answered_at + 60)  # a client reusing its id
        assert store.write([later]) == 1 and store.count() == 3


@backends
def test_migrations_run_once_and_the_data_stays(store_url: str) -> None:
    with opened(store_url) as store:
        store.write([record()])
    with opened(store_url) as store:
        assert store.schema_version() == LATEST_SCHEMA == 1
        assert store.count() == 1
    assert [v for (v,) in raw_sql(store_url, "SELECT version FROM schema_migrations")] == [1]


@backends
def test_servers_starting_at_once_migrate_the_database_once(store_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_store(store_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert raw_sql(store_url, "SELECT COUNT(*) FROM schema_migrations") == [(1,)]


@backends
def test_a_database_migrated_by_newer_code_is_refused(store_url: str) -> None:
    open_store(store_url).close()
    raw_sql(store_url, f"INSERT INTO schema_migrations (version, applied_at) VALUES ({LATEST_SCHEMA + 1}, 0)")
    with pytest.raises(SchemaTooNew, match=rf"schema version {LATEST_SCHEMA + 1}, newer .* \({LATEST_SCHEMA}\)"):
        open_store(store_url)


@backends
def test_records_filter_by_model_version_and_since_oldest_first(store_url: str) -> None:
    rows = {
        "a": ("m1", "v1", 30.0),
        "b": ("m1", "v2", 10.0),
        "c": ("m2", "v1", 20.0),
        "d": ("m1", "v1", 5.0),
    }
    with opened(store_url) as store:
        store.write([record(k, model=m, version=v, received_at=t) for k, (m, v, t) in rows.items()])

        def ids(**query: Any) -> str:
            return "".join(r.request_id for r in store.records(**query))

        assert ids() == "dbca"
        assert ids(model="m1") == "dba"
        assert ids(model="m1", version="v1") == "da"
        assert ids(version="v1") == "dca"
        assert ids(since=10.0) == "bca"
        assert ids(model="m1", since=10.0) == "ba"
        assert all(r.image is None for r in store.records()) and store.records(model="m2", with_images=True)[0].image


@backends
def test_the_writer_writes_what_is_submitted_in_batches(store_url: str) -> None:
    batches: list[int] = []
    writer = FeedbackWriter(lambda: open_store(store_url), batch=4, flush_seconds=5.0, on_written=batches.append)
    try:
        assert all(writer.submit(record(f"r{i}", received_at=float(i))) for i in range(10))
        started = time.monotonic()
        assert writer.flush(timeout=10)
        assert time.monotonic() - started < 2.5, "flush() should write the partial batch now, not after 5 s"
        assert batches == [4, 4, 2]
        assert writer.pending == 0 and writer.healthy
    finally:
        writer.close()
    assert count(store_url) == 10


def test_the_writer_writes_a_partial_batch_after_flush_seconds(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/feedback.db"
    writer = FeedbackWriter(lambda: open_store(url), batch=100, flush_seconds=0.1)
    try:
        writer.submit(record())
        deadline = time.monotonic() + 5
        while writer.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.pending == 0
        assert count(url) == 1
    finally:
        writer.close()


def test_a_full_queue_drops_and_counts_and_submit_returns_false(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/feedback.db"
    release = threading.Event()

    def slow_store() -> Any:
        release.wait(10)
        return open_store(url)

    dropped: list[tuple[int, str]] = []
    writer = FeedbackWriter(slow_store, max_pending=3, on_dropped=lambda n, why: dropped.append((n, why)))
    try:
        started = time.monotonic()
        assert [writer.submit(record(f"r{i}")) for i in range(5)] == [True, True, True, False, False]
        assert time.monotonic() - started < 0.5
        assert dropped == [(1, QUEUE_FULL), (1, QUEUE_FULL)]
        assert writer.pending == 3
        release.set()
        assert writer.flush(timeout=10)
        assert writer.submit(record("r9"))
    finally:
        release.set()
        writer.close()
    assert count(url) == 4


def test_callbacks_that_raise_never_reach_the_caller(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/feedback.db"

    def boom(*args: Any) -> None:
        raise RuntimeError("a broken metrics callback")

    writer = FeedbackWriter(lambda: open_store(url), max_pending=1, on_written=boom, on_dropped=boom)
    try:
        assert writer.submit(record("r1"))
        assert writer.flush(timeout=10)
        assert writer.submit(record("r2"))
        writer.submit(record("r3"))  # full or not: no exception either way
        assert writer.flush(timeout=10)
    finally:
        writer.close()
    assert count(url) >= 2


def test_submit_after_close_is_dropped_and_close_is_idempotent(tmp_path: Path) -> None:
    dropped: list[tuple[int, str]] = []
    writer = FeedbackWriter(
        lambda: open_store(f"sqlite://{tmp_path}/f.db"), on_dropped=lambda n, w: dropped.append((n, w))
    )
    writer.close()
    writer.close()
    assert not writer.submit(record())
    assert dropped == [(1, "writer closed")] and not writer.healthy


def down_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/missing/feedback.db"
    return f"postgresql://mnist:{PASSWORD}@127.0.0.1:{free_port()}/feedback"  # nothing listens there


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_database_down_at_start_neither_raises_nor_blocks_and_drops_with_a_reason(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mnist.feedback")
    url = down_url(backend, tmp_path)
    dropped: list[tuple[int, str]] = []
    writer = FeedbackWriter(
        lambda: open_store(url), retry_seconds=FAST_RETRY, on_dropped=lambda n, why: dropped.append((n, why))
    )
    started = time.monotonic()
    assert all(writer.submit(record(f"r{i}")) for i in range(3))
    assert time.monotonic() - started < 0.5
    assert not writer.flush(timeout=0.3)
    assert writer.pending == 3 and not writer.healthy
    writer.close(timeout=0.5)
    assert dropped == [(3, UNAVAILABLE)] and writer.pending == 0
    assert "feedback database unavailable" in caplog.text
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_writer_writes_again_once_the_database_is_reachable(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cluster: PostgresCluster | None = None
    if backend == "sqlite":
        url = f"sqlite://{tmp_path}/later/feedback.db"
    else:
        cluster = request.getfixturevalue("postgres_cluster")
        url = cluster.create_database(f"t_{uuid.uuid4().hex[:16]}")
        cluster.stop()
    dropped: list[tuple[int, str]] = []
    writer = FeedbackWriter(
        lambda: open_store(url), retry_seconds=FAST_RETRY, on_dropped=lambda n, why: dropped.append((n, why))
    )
    try:
        assert writer.submit(record("r1")) and writer.submit(record("r2"))
        assert not writer.flush(timeout=0.3) and not writer.healthy
        if cluster is None:
            (tmp_path / "later").mkdir()
        else:
            cluster.start()
        assert writer.flush(timeout=10) and writer.healthy
        if cluster is not None:
            cluster.restart()  # the pool's connections break under it
        assert writer.submit(record("r3"))
        assert writer.flush(timeout=10)
    finally:
        if cluster is not None:
            with contextlib.suppress(RuntimeError):
                cluster.start()  # already running, unless the test failed with it stopped
        writer.close()
    assert dropped == []
    assert count(url) == 3


class FakeDatabase:
    """A store stand-in that fails on cue: the next `failures` writes raise `error`."""

    def __init__(self, failures: int = 0, error: type[Exception] = StoreUnavailable) -> None:
        self.failures = failures
        self.error = error
        self.opens = 0
        self.rows: list[FeedbackRecord] = []

    def open(self) -> FakeStore:
        self.opens += 1
        return FakeStore(self)


class FakeStore:
    url = "fake://feedback"

    def __init__(self, database: FakeDatabase) -> None:
        self.database = database

    def write(self, records: Sequence[FeedbackRecord]) -> int:
        if self.database.failures:
            self.database.failures -= 1
            raise self.database.error("the write failed")
        self.database.rows += records
        return len(records)

    def close(self) -> None:
        pass


def test_a_failed_batch_is_retried_once_on_a_reopened_store() -> None:
    database = FakeDatabase(failures=1)
    writer = FeedbackWriter(database.open)
    try:
        assert all(writer.submit(record(f"r{i}")) for i in range(3))
        assert writer.flush(timeout=10)
        assert len(database.rows) == 3 and database.opens == 2 and writer.healthy
    finally:
        writer.close()


def test_a_batch_that_fails_twice_is_dropped_and_logged_at_most_once_per_10_s(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mnist.feedback")
    database = FakeDatabase(failures=1000)
    dropped: list[tuple[int, str]] = []
    writer = FeedbackWriter(database.open, on_dropped=lambda n, why: dropped.append((n, why)))
    try:
        for size in (2, 3):
            assert all(writer.submit(record(f"r{size}-{i}")) for i in range(size))
            assert writer.flush(timeout=10)
        assert dropped == [(2, UNAVAILABLE), (3, UNAVAILABLE)] and not writer.healthy
        lines = [r.getMessage() for r in caplog.records if r.name == "mnist.feedback"]
        assert len(lines) == 1 and lines[0].startswith("2 feedback record(s) dropped")
    finally:
        writer.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "mnist.feedback"]
    assert len(lines) == 2 and lines[1].startswith("3 feedback record(s) dropped since the last report")


def test_one_record_the_database_refuses_does_not_take_its_batch_down(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.create_database(f"t_{uuid.uuid4().hex[:16]}")
    dropped: list[tuple[int, str]] = []
    writer = FeedbackWriter(lambda: open_store(url), on_dropped=lambda n, why: dropped.append((n, why)))
    try:
        batch = [record("r1"), record("r2", label="7\x00"), record("r3")]  # PostgreSQL text cannot hold NUL
        assert all(writer.submit(r) for r in batch)
        assert writer.flush(timeout=10)
    finally:
        writer.close()
    with opened(url) as store:
        assert [r.request_id for r in store.records()] == ["r1", "r3"]
    assert dropped == [(1, WRITE_FAILED)]


def test_the_password_never_appears_in_urls_or_errors(postgres_cluster: PostgresCluster) -> None:
    with opened(postgres_cluster.url) as store:
        assert store.url == f"postgresql://mnist:***@127.0.0.1:{postgres_cluster.port}/feedback"
    port = free_port()
    with pytest.raises(StoreUnavailable, match=rf"postgresql://mnist:\*\*\*@127\.0\.0\.1:{port}/feedback") as down:
        open_store(postgres_cluster.url_for("feedback", port=port))
    wrong = "wrong-Passw0rd"
    with pytest.raises(StoreUnavailable, match="password authentication failed") as refused:
        open_store(postgres_cluster.url_for("feedback", password=wrong))
    with pytest.raises(ValueError) as unknown:
        open_store(f"mysql://mnist:{PASSWORD}@db/feedback")
    for error in (down, refused, unknown):
        assert PASSWORD not in str(error.value) and wrong not in str(error.value) and "***" in str(error.value)
    assert redact_url("postgres://u:p%40ss@h:5/db?sslmode=require&password=zz") == (
        "postgres://u:***@h:5/db?sslmode=require&password=***"
    )


@pytest.mark.parametrize("url", ["mysql://u@db/feedback", "redis:feedback", "s3://bucket/feedback.db"])
def test_an_unknown_url_scheme_is_a_value_error_naming_it(url: str) -> None:
    scheme = url.split(":")[0]
    with pytest.raises(ValueError, match=f"unknown feedback database URL scheme '{scheme}'"):
        open_store(url)


@pytest.mark.parametrize("url", ["", "sqlite://host/feedback.db", "sqlite:"])
def test_a_url_without_a_usable_path_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="feedback database URL is empty|names a host|names no file"):
        open_store(url)


def test_sqlite_urls_and_plain_paths_name_the_same_wal_mode_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with opened("sqlite:relative.db") as store:
        store.write([record()])
        assert store.url == f"sqlite://{tmp_path}/relative.db"
    for url in (str(tmp_path / "relative.db"), "relative.db", f"sqlite://{tmp_path}/relative.db"):
        assert count(url) == 1
    assert raw_sql(f"sqlite://{tmp_path}/relative.db", "PRAGMA journal_mode") == [("wal",)]
