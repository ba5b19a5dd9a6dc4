"""The flag queue under faults (issue 14, item 5), on SQLite and PostgreSQL: a server killed in the middle of a batch
leaves each frame fully in or out; a failing database costs retries, never frames; two servers and two labellers
share one PostgreSQL queue and label every frame exactly once.

PostgreSQL tests run in a schema of their own (``?options=-csearch_path=...``), cleared at the start, so that tests
of other modules using the same database at the same time cannot touch their rows."""
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import ase.db
import ase.io
import numpy as np
import pytest

from sp_server.oracles.faults import structure_hash
from tests.conftest import kill_at_marker
from sp_server.server.queue import FRAME_ROWS, FlagQueue, redact, requeue
from sp_server.store.db import connect

PG_ENV = "SP_SERVER_TEST_POSTGRES"


def _pg_schema_url(request) -> str:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"set {PG_ENV} to a PostgreSQL URL (make test does, via tools/ci_postgres.sh)")
    import psycopg2
    # the pid keeps two suites on one database (one machine, or CI runners sharing a server) apart
    schema = f"spq_{os.getpid()}_" + re.sub(r"\W+", "_", request.node.originalname.lower())[:40]
    con = psycopg2.connect(base)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    con.close()
    url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    with ase.db.connect(url) as db:       # clear it, as the other PostgreSQL fixtures do
        db.delete([r.id for r in db.select()])
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "flags.db")
    return _pg_schema_url(request)


@pytest.fixture
def pg_url(request):
    return _pg_schema_url(request)


def record(k: int, seed: int = 0) -> dict:
    """A flagged frame as the server puts it (5 atoms, frame number k)."""
    rng = np.random.default_rng(1000 * seed + k)
    cell = 4.0 * np.eye(3) + 0.01 * rng.normal(size=(3, 3))
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return {"numbers": np.array([56, 22, 8, 8, 8]), "positions": frac @ cell + 0.05 * rng.normal(size=(5, 3)),
            "cell": cell, "frame": k, "bead": k % 2, "connection": 1, "model_version": 3,
            "energy_ev": -40.0 - 0.01 * k,
            "errors": {"energy_mev_per_cell": 1.5 + k, "force_max": 0.2 + 0.01 * k, "stress_max_gpa": 0.05},
            "max_displacement": 0.1 + 0.001 * k,
            "reason": f"untrusted: atom {k} A from its site" if k % 4 == 3 else "local maximum of force_max > 0.1"}


def expected_kv(r: dict) -> dict:
    return {"state": "untrusted" if r["reason"].startswith("untrusted") else "pending", "reason": r["reason"],
            "frame": r["frame"], "bead": r["bead"], "connection": r["connection"],
            "model_version": r["model_version"], "energy_model": r["energy_ev"],
            "err_energy_mev_per_cell": r["errors"]["energy_mev_per_cell"],
            "err_force_max": r["errors"]["force_max"], "err_stress_max_gpa": r["errors"]["stress_max_gpa"],
            "max_displacement": r["max_displacement"]}


def assert_same_kv(actual: dict, expected: dict, rel=1e-12):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        if isinstance(value, str):
            assert actual[key] == value, key
        else:
            assert actual[key] == pytest.approx(value, rel=rel), key


def assert_rows_are(url, records):
    """The queue holds exactly these records, once each, with all their key-value pairs."""
    with ase.db.connect(url) as db:
        rows = sorted(db.select(), key=lambda r: r.frame)
    assert [r.frame for r in rows] == sorted(r["frame"] for r in records)
    by_frame = {r["frame"]: r for r in records}
    for row in rows:
        rec = by_frame[row.frame]
        assert_same_kv(row.key_value_pairs, expected_kv(rec))
        assert row.toatoms().positions == pytest.approx(rec["positions"], abs=1e-12)
        assert row.toatoms().cell.array == pytest.approx(rec["cell"], abs=1e-12)
        assert list(row.numbers) == list(rec["numbers"])


def wait_for(predicate, timeout, what):
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------- 1. killed mid-batch
KILLED_WRITER = r"""
import sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from sp_server.store.db import connect
from sp_server.server.queue import FlagQueue
from tests.server.test_queue_faults import record

url, marker = sys.argv[1], Path(sys.argv[2])
backend = type(connect(url))          # ase.db's SQLite3Database, or ase-db-backends' PostgreSQLDatabase
original = backend._write
calls = []
a_last_row, release_a = threading.Event(), threading.Event()

def paused_write(self, *args, **kwargs):          # the injected pause, inside the transaction of a batch
    out = original(self, *args, **kwargs)
    calls.append(out)
    if len(calls) == 3:        # the last row of batch A: hold it until the whole of batch B is queued
        a_last_row.set()
        release_a.wait(60)
    elif len(calls) == 6:      # the 3rd row of batch B (one batch of 6): the test kills us here
        marker.write_text(f"rows {calls}")
        time.sleep(600)
    return out

backend._write = paused_write
q = FlagQueue(url, batch_seconds=0.05)
for k in range(3):
    q.put(record(k))
assert a_last_row.wait(60)
for k in range(10, 16):
    q.put(record(k))
release_a.set()
time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_server_killed_mid_batch_leaves_each_frame_fully_in_or_out(tmp_path, url):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    marker = tmp_path / "inside_batch_b"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # killed when batch B's 3 rows are written, uncommitted; batch A was committed before B began
    proc = kill_at_marker([sys.executable, str(script), url, str(marker), root], marker, limit=40,
                          what="the 3rd row of batch B")
    assert proc.returncode == -signal.SIGKILL
    assert_rows_are(url, [record(k) for k in range(3)])     # A intact, none of B
    # the queue is usable at once (no lock or open transaction of the dead writer in the way)
    q = FlagQueue(url, batch_seconds=0.05)
    q.put(record(20))
    t0 = time.monotonic()
    assert q.close(timeout=10) == 0 and q.written == 1
    assert time.monotonic() - t0 < 5
    assert_rows_are(url, [record(k) for k in (0, 1, 2, 20)])


# ------------------------------------------------------------------------------------- 2. failing database
def _inject(monkeypatch, url, fail):
    """Patch the backend's row write: ``fail(row_in_transaction)`` may raise (or wait) before a row is written."""
    backend = type(connect(url))
    original = backend._write

    def faulty_write(self, *args, **kwargs):
        self._rows_in_tx = getattr(self, "_rows_in_tx", 0) + 1    # one connection object per transaction
        fail(self._rows_in_tx)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(backend, "_write", faulty_write)


def _error(url, text):
    if url.startswith("postgresql"):
        import psycopg2
        return psycopg2.OperationalError(text)
    import sqlite3
    return sqlite3.OperationalError(text)


@pytest.mark.timeout(40)
def test_a_failing_database_costs_retries_not_frames(url, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sp_server.queue")
    entered, go = threading.Event(), threading.Event()
    attempts = []

    def fail(row):
        if row == 1:
            attempts.append(1)
        if len(attempts) == 1:               # attempt 1 (frame 0 alone): wait until 0-4 are put, then "unreachable"
            entered.set()
            go.wait(20)
            raise _error(url, "injected: could not connect to server")
        if len(attempts) == 2 and row == 3:  # attempt 2 (frames 0-4): "disk full" after 2 rows, inside the batch
            raise _error(url, "injected: database or disk is full")

    q = FlagQueue(url, batch_seconds=0.05, retry_first=0.05, retry_max=0.2)
    _inject(monkeypatch, url, fail)
    q.put(record(0))
    assert entered.wait(20)
    for k in range(1, 5):
        q.put(record(k))
    go.set()
    wait_for(lambda: q.written == 5, 20, "the 5 frames written after the failures")
    assert q._thread.is_alive() and q.failures == 2
    for k in range(5, 8):                    # the writer lives on: later frames are written too
        q.put(record(k))
    assert q.close(timeout=10) == 0 and q.unwritten == 0 and q.dump_path is None
    assert q.written == 8 and len(attempts) >= 4   # 2 failed attempts, frames 0-4 at once, then 5-7
    assert_rows_are(url, [record(k) for k in range(8)])    # each once: the half-written attempt was rolled back
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    for n, (msg, text) in enumerate(zip(errors, ("could not connect", "disk is full"))):
        assert f"flag queue {redact(url)}: could not write 5 frame(s) held (attempt {n + 1}:" in msg and text in msg
    password = re.match(r"\w+://[^:/@]*:([^@/]*)@", url)
    if password:
        assert f":{password.group(1)}@" not in " ".join(errors)    # the password is not logged
    assert any("written again after 2 failed attempt(s)" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(40)
def test_frames_that_cannot_be_written_are_reported_and_dumped_at_close(url, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sp_server.queue")
    monkeypatch.chdir(tmp_path)           # a PostgreSQL queue dumps into the current folder
    broken = threading.Event()
    broken.set()

    def fail(row):
        if broken.is_set():
            raise _error(url, "injected: database or disk is full")

    q = FlagQueue(url, batch_seconds=0.05, retry_first=0.05, retry_max=0.2)
    _inject(monkeypatch, url, fail)
    records = [record(k, seed=4) for k in range(4)]
    for r in records:
        q.put(r)
    wait_for(lambda: q.failures >= 3, 10, "three failed attempts")
    t0 = time.monotonic()
    assert q.close(timeout=1.0) == 4                        # retries until the time limit, then gives up
    assert time.monotonic() - t0 < 5
    assert q.unwritten == 4 and q.written == 0 and not q._thread.is_alive()
    with ase.db.connect(url) as db:
        assert db.count() == 0
    path = q.dump_path
    assert path is not None and path.exists() and path.suffix == ".extxyz"
    assert path.parent == tmp_path
    final = [r.getMessage() for r in caplog.records if "could NOT be written" in r.getMessage()]
    assert len(final) == 1 and "4 frame(s) could NOT be written" in final[0] and str(path) in final[0]
    dumped = ase.io.read(path, ":")
    assert len(dumped) == 4
    for a, r in zip(dumped, records):
        assert a.positions == pytest.approx(r["positions"], abs=1e-8)
        assert a.cell.array == pytest.approx(r["cell"], abs=1e-8)
        assert_same_kv({k: v for k, v in a.info.items() if k != "queue"}, expected_kv(r), rel=1e-8)
    broken.clear()                          # the database is back: the dump goes into the queue
    assert requeue(path, url) == 4
    with ase.db.connect(url) as db:
        rows = sorted(db.select(), key=lambda row: row.frame)
    assert [row.frame for row in rows] == [0, 1, 2, 3]
    assert [row.state for row in rows] == [expected_kv(r)["state"] for r in records]
    assert rows[2].toatoms().positions == pytest.approx(records[2]["positions"], abs=1e-8)


# ------------------------------------------------------------------- 3. two servers, two labellers, one queue
def _trajectory(toy, n, seed):
    """n distinct frames whose displacement amplitude goes up and down: every other frame a local maximum of the
    Bayesian error; then one frame with an atom far from its site (untrusted, never labelled)."""
    rng = np.random.default_rng(seed)
    base = toy.supercell((2, 2, 2))
    pattern = rng.normal(size=base.positions.shape)
    frames = []
    for k in range(n):
        a = base.copy()
        a.positions = base.positions + (0.03 + 0.04 * (k % 2) + 0.0005 * k) * pattern
        frames.append(a)
    far = frames[0].copy()
    far.positions[3] += [1.6, 0.0, 0.0]
    return frames + [far]


def _expected_flags(errors, threshold):
    """Frames the paper's rule flags (local maxima above the threshold; the last frame compared with its
    predecessor only)."""
    out = []
    for k, e in enumerate(errors):
        prev = errors[k - 1] if k else -np.inf
        nxt = errors[k + 1] if k + 1 < len(errors) else -np.inf
        if e > threshold and e >= prev and e >= nxt:
            out.append(k)
    return out


@pytest.mark.timeout(150)
def test_two_servers_and_two_labellers_share_one_postgresql_queue(tmp_path, toy, fitted_toy, pg_url):
    from sp_server.model import save_model
    from sp_server.store import Store
    from sp_server.store.db import pg_lock
    from tests.server.engine import FakeEngine
    path = save_model(fitted_toy, tmp_path / "fit.h5")
    threshold = 1e-6                      # eV/A: every local maximum of the force error is flagged
    n = 15                                # odd: the last trusted frame (before the untrusted one) is no maximum
    names = [f"spq{uuid.uuid4().hex[:8]}" for _ in range(2)]
    trajs = [_trajectory(toy, n, seed) for seed in (31, 32)]
    engines = [FakeEngine(name) for name in names]
    servers = [subprocess.Popen([sys.executable, "-m", "sp_server.cli.main", "serve", str(path), "--address", name,
                                 "--unix", "--wait", "60", "--queue", pg_url, "--threshold",
                                 f"force_max={threshold}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for name in names]
    results = [None, None]

    def drive(i):
        drv = engines[i].accept()
        results[i] = [drv.frame(a) for a in trajs[i]]
        drv.exit()

    try:
        threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        outs = [p.communicate(timeout=60)[0] for p in servers]
    finally:
        for p in servers:
            p.kill()
        for e in engines:
            e.close()
    assert all(r is not None for r in results), outs
    assert [p.returncode for p in servers] == [0, 0], outs

    # the queue: what each server flagged, exactly once, nothing lost
    with ase.db.connect(pg_url) as db:
        rows = list(db.select(FRAME_ROWS))
        assert db.count(state="progress") == 2        # one progress row per server (sp-server learn's flag rate)
    expected = set()
    for i in range(2):
        errs = [x[3]["bayesian_error"]["force_max"] for x in results[i][:n]]
        flags = _expected_flags(errs, threshold)
        assert len(flags) >= n // 2 - 1
        expected |= {(i, k) for k in flags}
    found, reasons = Counter(), {}
    for row in rows:
        pos = row.toatoms().positions
        match = [(i, k) for i in range(2) for k in range(n + 1) if np.allclose(pos, trajs[i][k].positions, atol=1e-9)]
        assert len(match) == 1, f"row {row.id} ({row.reason}) matches {match}"
        found[match[0] + (row.state,)] += 1
        reasons[match[0]] = row.reason
    assert all(c == 1 for c in found.values()), found
    untrusted = {(i, k) for i, k, s in found if s == "untrusted"}
    pending = {(i, k) for i, k, s in found if s == "pending"}
    assert untrusted == {(0, n), (1, n)}
    assert expected <= pending                       # the local maxima, plus the entry of each excursion
    assert all(reasons[ik].startswith("entry") for ik in pending - expected)

    # two labellers, started together behind the store lock so that both take part
    state_dir = tmp_path / "faults"
    cmd = [sys.executable, "-m", "sp_server.cli.main", "label", pg_url, "--oracle", "faulty",
           "--oracle-option", 'oracle="model"', "--oracle-option", f'path="{path}"',
           "--oracle-option", 'faults=["none"]', "--oracle-option", f'state_dir="{state_dir}"',
           "--call-timeout", "0", "--no-progress"]
    import psycopg2
    watch = psycopg2.connect(os.environ[PG_ENV])
    watch.autocommit = True
    labellers = []
    try:
        with pg_lock(pg_url):
            labellers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                         for _ in range(2)]

            def waiting():            # both labellers poll for the store lock (their first claim)
                for p in labellers:
                    assert p.poll() is None, p.stdout.read()
                with watch.cursor() as cur:
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_try_advisory_lock%' "
                                "AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)")
                    return cur.fetchone()[0] >= 2
            wait_for(waiting, 60, "both labellers at the store lock")
        outs = [p.communicate(timeout=60)[0] for p in labellers]
    finally:
        watch.close()
        for p in labellers:
            p.kill()
    assert [p.returncode for p in labellers] == [0, 0], outs
    done = [int(re.search(r"(\d+) frame\(s\) labelled, 0 failed", out).group(1)) for out in outs]
    assert sum(done) == len(pending) and min(done) >= 1, outs

    store = Store(pg_url)
    counts = store.counts()
    assert counts["labeled"] == len(pending) and counts["pending"] == counts["claimed"] == counts["failed"] == 0
    assert len(store.rows(state="untrusted")) == 2     # never offered to the labellers
    labeled = store.rows(state="labeled")
    calls = [line.split() for line in (state_dir / "calls.log").read_text().splitlines()]
    per_hash = Counter(h for h, _, _, _ in calls)
    assert all(kind == "none" and attempt == "1" for _, attempt, kind, _ in calls)
    hashes = {f"{structure_hash(row.toatoms()):012x}": row for row in labeled}
    assert len(hashes) == len(labeled) == len(pending)
    assert set(per_hash) == set(hashes) and set(per_hash.values()) == {1}   # each frame labelled exactly once
    pids = {str(p.pid) for p in labellers}
    for h, _, _, pid in calls:                      # by the labeller that holds the claim
        assert hashes[h].owner.split(":")[1] == pid
    assert {row.owner.split(":")[1] for row in labeled} == pids   # the work was shared
    for row in labeled:
        assert row.attempts == 1 and np.isfinite(row.energy) and row.forces.shape == (40, 3)
