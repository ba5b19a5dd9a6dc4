"""The labelling store: atomic claims across processes, leases, retries, exclusions (SQLite and PostgreSQL)."""
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
from ase.build import bulk

from sp_server.store import Store
from tests.conftest import kill_at_marker


def frames(n):
    out = []
    for k in range(n):
        a = bulk("Cu", cubic=True)
        a.positions[0, 0] += 0.01 * k
        out.append(a)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    from tests.server.test_queue_faults import _pg_schema_url
    return _pg_schema_url(request)   # skips without SP_SERVER_TEST_POSTGRES; a schema of this test's own


def _worker(url, owner, q):
    store = Store(url)
    got = []
    while True:
        claimed = store.claim(owner, n=2)
        if not claimed:
            break
        for fid, atoms in claimed:
            assert store.complete(fid, owner, energy=-1.0, forces=np.zeros((len(atoms), 3)), stress=np.zeros(6))
            got.append(fid)
    q.put(got)


def test_concurrent_workers_never_label_twice_and_lose_nothing(url):
    store = Store(url)
    ids = [store.add(a) for a in frames(16)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, f"w{k}", q)) for k in range(2)]
    for p in procs:
        p.start()
    done = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    labeled = sorted(i for d in done for i in d)
    assert labeled == sorted(ids)  # every frame exactly once
    assert store.counts()["labeled"] == 16 and store.counts()["pending"] == 0


def _crash_after_claim(url, q):
    store = Store(url)
    q.put([fid for fid, _ in store.claim("doomed", n=3, lease_seconds=1.0)])
    q.close()
    q.join_thread()  # the message must reach the pipe before the kill
    os.kill(os.getpid(), signal.SIGKILL)


def test_claims_of_a_killed_worker_expire_and_are_retried(url):
    store = Store(url)
    for a in frames(3):
        store.add(a)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_crash_after_claim, args=(url, q))
    p.start()
    lost = q.get(timeout=60)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL and len(lost) == 3
    assert store.claim("rescuer", n=3) == []  # still leased
    time.sleep(1.2)
    again = store.claim("rescuer", n=3)
    assert sorted(f for f, _ in again) == sorted(lost)
    # the dead worker's late answer is refused: the frame is someone else's now
    assert not store.complete(lost[0], "doomed", energy=0.0, forces=np.zeros((4, 3)), stress=np.zeros(6))


def test_failures_are_counted_and_retried_up_to_the_limit(url):
    store = Store(url, max_attempts=2)
    fid = store.add(frames(1)[0])
    (got,) = store.claim("w")
    assert store.fail(fid, "w", "SCF not converged") == "pending"
    store.claim("w")
    assert store.fail(fid, "w", "SCF not converged again") == "failed"
    assert store.claim("w") == []
    assert store.counts()["failed"] == 1


def test_excluded_frames_stay_out(url):
    store = Store(url)
    a, b = (store.add(x) for x in frames(2))
    store.exclude(a, "bad structure, dropped by hand")
    assert [f for f, _ in store.claim("w", n=5)] == [b]
    assert store.counts()["excluded"] == 1


def test_labeled_frames_come_back_with_their_results(url):
    store = Store(url)
    fid = store.add(frames(1)[0])
    store.claim("w")
    f = np.arange(12.0).reshape(4, 3)
    assert store.complete(fid, "w", energy=-3.5, forces=f, stress=np.ones(6))
    (label, atoms), = list(store.labeled())
    assert atoms.get_potential_energy() == -3.5 and np.allclose(atoms.get_forces(), f)


# ---------------------------------------------------------------------------------------------------------------
# locks that die with their process (issue 14): a writer killed with SIGKILL *inside* the database write (an
# injected pause, not a random sleep) must not block the next writer
# ---------------------------------------------------------------------------------------------------------------
KILLED_WRITER = r"""
import sys, time
from pathlib import Path
import numpy as np
from ase.build import bulk
import ase.db.sqlite
from sp_server.store import Store

url, marker, how = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
original = ase.db.sqlite.SQLite3Database._write

def paused_write(self, *args, **kwargs):          # the injected fault: stop inside the transaction, locks held
    out = original(self, *args, **kwargs)
    marker.write_text("inside the write")
    time.sleep(600)
    return out

ase.db.sqlite.SQLite3Database._write = paused_write
if how == "store":
    Store(url).add_many([(bulk("Cu", cubic=True), {"role": "train"}) for _ in range(3)], run="killed")
else:
    from sp_server.server.queue import FlagQueue
    q = FlagQueue(url, batch_seconds=0.05)
    a = bulk("Cu", cubic=True)
    q.put({"numbers": a.numbers, "positions": a.positions, "cell": a.cell.array, "reason": "local maximum",
           "frame": 1, "bead": 0, "connection": 0, "model_version": 1, "energy_ev": -1.0, "errors": {}})
    time.sleep(600)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["store", "queue"])
def test_writer_killed_inside_the_write_does_not_block_the_next(tmp_path, how):
    import sys
    url = tmp_path / "store.db"
    Store(url).add_many([(bulk("Cu", cubic=True), {"role": "train"})], run="before")
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    marker = tmp_path / "inside"
    kill_at_marker([sys.executable, str(script), str(url), str(marker), how], marker, limit=60,
                   what="the write")
    assert not list(tmp_path.glob("*.db.lock")), "ase.db's lock file is in use"
    t0 = time.monotonic()
    store = Store(url)
    store.add_many([(bulk("Cu", cubic=True), {"role": "train"})], run="after")   # the next writer goes on
    claimed = store.claim("next", n=5)
    assert time.monotonic() - t0 < 10
    # the killed transaction left nothing half-written: its rows are all out
    runs = sorted(r.get("run") for r in store.rows())
    assert runs == ["after", "before"] and len(claimed) == 2


@pytest.mark.timeout(60)
def test_lock_wait_is_bounded_and_names_the_holder(tmp_path, caplog):
    import multiprocessing
    from sp_server.store.db import LockTimeout, file_lock
    path = tmp_path / "x.lock"
    ctx = multiprocessing.get_context("spawn")
    holder = ctx.Process(target=_hold_lock, args=(str(path), 30.0))
    holder.start()
    t0 = time.monotonic()
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    with pytest.raises(LockTimeout, match=f":{holder.pid}"):
        with file_lock(path, timeout=1.5):
            pass
    assert any(f":{holder.pid}" in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records)
    os.kill(holder.pid, signal.SIGKILL)           # the kernel releases an flock when its holder dies
    holder.join(10)
    t0 = time.monotonic()
    with file_lock(path, timeout=5):
        pass
    assert time.monotonic() - t0 < 2


def _hold_lock(path, seconds):
    from sp_server.store.db import file_lock
    with file_lock(path):
        time.sleep(seconds)
