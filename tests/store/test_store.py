"""The labelling store: atomic claims across processes, leases, retries, exclusions (SQLite and PostgreSQL)."""
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
from ase.build import bulk

from sp_server.store import Store


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
    pg = os.environ.get("SP_SERVER_TEST_POSTGRES")
    if not pg:
        pytest.skip("set SP_SERVER_TEST_POSTGRES (make test does)")
    import ase.db
    with ase.db.connect(pg) as db:
        db.delete([r.id for r in db.select()])
    return pg


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
