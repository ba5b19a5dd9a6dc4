"""Database connections and locks that never outlive their process.

ase.db's SQLite backend takes, by default, a lock *file* (``NAME.lock``, created with O_EXCL, waited on forever);
a process killed while holding it leaves the file behind and every later writer sleeps on it, silently.  Every
connection of sp_server goes through :func:`connect`, which turns that lock file off: SQLite's own locking (fcntl,
released by the kernel when the process dies) protects each transaction, and the store's claims are serialised
by :func:`store_lock`, an ``flock`` (SQLite files) or a PostgreSQL session advisory lock (released by the server
when the client's connection dies).  Every wait on a lock is bounded and logged with the holder (host:pid, read
from the lock file).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import time
from pathlib import Path

import ase.db

log = logging.getLogger("sp_server.store")

#: seconds a writer waits for the store lock before giving up with an error naming the holder
LOCK_TIMEOUT_S = 300.0
#: seconds between "still waiting" log lines
LOCK_LOG_EVERY_S = 10.0
#: the PostgreSQL advisory lock key of the store's claims
PG_LOCK_KEY = 727271
#: seconds a PostgreSQL connection attempt may take
PG_CONNECT_TIMEOUT_S = 10


class LockTimeout(RuntimeError):
    """A lock was not obtained within its time limit (the message names the holder)."""


def is_postgres(url) -> bool:
    return str(url).startswith(("postgresql://", "postgres://"))


def connect(url):
    """An ase.db connection (SQLite path or PostgreSQL URL) without ase's lock file; every process talks to the
    database itself (``serial=True``: ase's default under MPI would make rank 0 read and broadcast, which
    deadlocks ranks that work independently); a PostgreSQL connection attempt gives up after
    PG_CONNECT_TIMEOUT_S."""
    return ase.db.connect(db_url(str(url)), serial=True, use_lock_file=False)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    return re.sub(r"^(\w+://[^:/@]*):[^@/]*@", r"\1:***@", str(url))


def db_url(url: str) -> str:
    """The URL with a connection time-out on PostgreSQL (libpq waits for the TCP timeout otherwise, minutes)."""
    if is_postgres(url) and "connect_timeout" not in url:
        return f"{url}{'&' if '?' in url else '?'}connect_timeout={PG_CONNECT_TIMEOUT_S}"
    return url


@contextlib.contextmanager
def transaction(url: str):
    """An ase.db connection whose writes form one transaction: committed when the block ends normally, rolled
    back (and the connection closed) on any error, the original error propagating."""
    db = connect(url)
    db.__enter__()                      # opens the connection (SQLite: sqlite3, PostgreSQL: psycopg2), no commit
    con = db.connection
    raw = getattr(con, "con", con)      # ase-db-backends wraps psycopg2's connection, without rollback()
    db.change_count = 0.5               # ase.db commits by itself whenever change_count (+1 per write) % 5000 == 0:
                                        # never, from a half-integer
    try:
        yield db
        raw.commit()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            raw.rollback()
        disk = _disk_error(exc, url)
        if disk is not None:
            raise disk from exc
        raise
    finally:
        db.connection = None
        with contextlib.suppress(Exception):
            raw.close()


def _disk_error(exc: BaseException, url) -> OSError | None:
    """SQLite's "database or disk is full" / "readonly database" as an OSError naming the database (SQLite's own
    message names no file), else None."""
    import errno
    import sqlite3
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "database or disk is full" in text:
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({text})", str(url))
        if "readonly database" in text:
            return OSError(errno.EROFS, f"{os.strerror(errno.EROFS)} ({text})", str(url))
    return None


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text or "unknown"


@contextlib.contextmanager
def file_lock(path, *, timeout: float = LOCK_TIMEOUT_S, what: str = "store lock"):
    """An exclusive ``flock`` on ``path`` (created when missing), released by the kernel if the process dies.  The
    holder writes host:pid into the file, so that a waiter can say whom it waits for; the wait is bounded."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        t0 = time.monotonic()
        next_log = t0 + 1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - t0 > timeout:
                    raise LockTimeout(f"could not take the {what} {path} in {timeout:.0f} s: held by "
                                      f"{_holder(path)}") from None
                if now >= next_log:
                    log.warning("waiting for the %s %s held by %s (%.0f s so far)", what, path, _holder(path),
                                now - t0)
                    next_log = now + LOCK_LOG_EVERY_S
                time.sleep(0.01)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk must not stop the lock: the holder's name is only for the log
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def pg_lock(url, key: int = PG_LOCK_KEY, *, timeout: float = LOCK_TIMEOUT_S, what: str = "store lock"):
    """A PostgreSQL session advisory lock: the server releases it when this client's connection ends, also when
    the client is killed.  The wait is bounded and logged with the holder's backend pid and client address."""
    import psycopg2
    conn = psycopg2.connect(db_url(str(url)))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            t0 = time.monotonic()
            next_log = t0 + 1.0
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                if cur.fetchone()[0]:
                    break
                now = time.monotonic()
                if now - t0 > timeout or now >= next_log:
                    cur.execute("SELECT l.pid, a.client_addr, a.application_name FROM pg_locks l JOIN "
                                "pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND "
                                "l.objid = %s AND l.granted", (key,))
                    holder = ", ".join(f"backend {p} ({addr or 'local'})" for p, addr, _ in cur.fetchall())
                    if now - t0 > timeout:
                        raise LockTimeout(f"could not take the {what} of {url} in {timeout:.0f} s: held by "
                                          f"{holder or 'unknown'}")
                    log.warning("waiting for the %s of %s held by %s (%.0f s so far)", what, url,
                                holder or "unknown", now - t0)
                    next_log = now + LOCK_LOG_EVERY_S
                time.sleep(0.02)
            try:
                yield
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()


def store_lock(url, **kwargs):
    """The store-wide lock of a database: an flock beside a SQLite file, an advisory lock on PostgreSQL."""
    if is_postgres(url):
        return pg_lock(url, **kwargs)
    path = Path(url)
    return file_lock(path.with_name(path.name + ".sp_claims.lock"), **kwargs)
