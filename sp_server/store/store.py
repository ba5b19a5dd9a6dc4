"""ase.db-backed store of frames with atomic claims and leases (see the package docstring)."""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from ..processes import process_alive
from .db import connect, is_postgres, store_lock, transaction

STATES = ("pending", "claimed", "labeled", "failed", "excluded")


def _owner_pid(owner, host: str) -> Optional[int]:
    """The pid of a claim's owner 'host:pid:tag' (sp_server.otf.label.owner_name) when it is a process of ``host``,
    else None."""
    parts = str(owner or "").split(":")
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
        return None
    return int(parts[1])


class StoreError(RuntimeError):
    pass


class Store:
    """Frames to label and labelled frames.  ``url``: a SQLite file path or a postgresql:// URL."""

    def __init__(self, url, *, max_attempts: int = 3):
        self.url = str(url)
        self.max_attempts = int(max_attempts)
        self.is_postgres = is_postgres(self.url)
        with self._db():
            pass

    def _db(self):
        return connect(self.url)

    # ------------------------------------------------------------------------------------------------ locking
    def _locked(self):
        return store_lock(self.url)

    # ------------------------------------------------------------------------------------------------ writing
    def add(self, atoms, *, state: str = "pending", **meta) -> int:
        """Add a frame (pending by default; 'labeled' when ``atoms`` carries energy/forces/stress)."""
        if state not in STATES:
            raise StoreError(f"unknown state {state!r}")
        with transaction(self.url) as db:
            return db.write(atoms, state=state, attempts=0, **meta)

    def add_many(self, frames, *, run: Optional[str] = None) -> int:
        """Add [(Atoms, meta dict)] in one transaction.  With ``run`` (a name for this batch, e.g. one MD) the
        batch is added at most once: if rows of that run exist already nothing is written (a restart that
        repeats the import cannot duplicate frames).  Returns the number of rows of the run in the store."""
        with self._locked():
            with transaction(self.url) as db:
                if run is not None:
                    existing = db.count(run=run)
                    if existing:
                        return existing
                for atoms, meta in frames:
                    meta = dict(meta)
                    meta.setdefault("state", "pending")
                    if meta["state"] not in STATES:
                        raise StoreError(f"unknown state {meta['state']!r}")
                    meta.setdefault("attempts", 0)
                    if run is not None:
                        meta["run"] = run
                    db.write(atoms, **meta)
                return len(frames)

    def has_run(self, run: str) -> bool:
        with self._db() as db:
            return db.count(run=run) > 0

    def claimed_by_this_host(self) -> int:
        """How many frames are claimed by processes of this host (alive or not)."""
        host = socket.gethostname()
        with self._db() as db:
            return sum(1 for r in db.select(state="claimed") if _owner_pid(r.get("owner"), host) is not None)

    def release_dead_claims(self) -> int:
        """Claims of processes of this host that no longer exist (owner 'host:pid:tag', see
        sp_server.otf.label.owner_name) go back to pending at once (or to failed when that was the last attempt);
        returns how many were released.

        Blame: when a single claim died, its attempt counts (a structure that kills its worker every time must end
        as failed).  When several died together (MPI ends a crashed rank's siblings), at most one of them is the
        culprit: none of their attempts counts, each gets a ``deaths`` mark instead, and a frame is failed only after
        2 x max_attempts deaths.  So a good frame that was merely in flight beside a crashing one is never failed
        for it, and a structure that always kills its rank still ends failed."""
        host = socket.gethostname()
        released = 0
        with self._locked():
            with transaction(self.url) as db:
                dead = []
                for row in list(db.select(state="claimed")):
                    pid = _owner_pid(row.get("owner"), host)
                    if pid is not None and not process_alive(pid):
                        dead.append(row)
                shared = len({str(r.get("owner")) for r in dead}) > 1
                for row in dead:
                    attempts = int(row.get("attempts", 1))
                    deaths = int(row.get("deaths", 0)) + 1
                    if shared:      # collateral possible: the attempt is given back, the death is counted
                        attempts = max(attempts - 1, 0)
                    failed = attempts >= self.max_attempts or deaths >= 2 * self.max_attempts
                    db.update(row.id, state="failed" if failed else "pending", owner="", attempts=attempts,
                              deaths=deaths, last_error=f"the labelling process {row.get('owner')} died during the "
                                                        "call" + (" (with others)" if shared else ""))
                    released += 1
        return released

    def claim(self, owner: str, *, n: int = 1, lease_seconds: float = 600.0) -> list:
        """Atomically claim up to n frames (pending, or claimed with an expired lease); returns [(id, Atoms)]."""
        now = time.time()
        out = []
        with self._locked():
            with transaction(self.url) as db:
                candidates = [r for r in db.select("state=pending", sort="id", limit=n)]
                if len(candidates) < n:
                    expired = [r for r in db.select("state=claimed", sort="id")
                               if r.get("lease_until", 0.0) < now][: n - len(candidates)]
                    candidates += expired
                for row in candidates:
                    attempts = int(row.get("attempts", 0)) + 1
                    db.update(row.id, state="claimed", owner=owner, lease_until=now + lease_seconds,
                              attempts=attempts)
                    out.append((row.id, row.toatoms()))
        return out

    def _own(self, db, frame_id: int, owner: str):
        row = db.get(id=frame_id)
        if row.get("state") != "claimed" or row.get("owner") != owner:
            return None
        return row

    def complete(self, frame_id: int, owner: str, energy: float, forces, stress, **meta) -> bool:
        """Store the label of a claimed frame; False (nothing written) when the claim is no longer ours."""
        forces = np.asarray(forces, dtype=float)
        stress = np.asarray(stress, dtype=float)
        with self._locked():
            with transaction(self.url) as db:
                row = self._own(db, frame_id, owner)
                if row is None:
                    return False
                atoms = row.toatoms()
                atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=forces, stress=stress)
                db.update(frame_id, atoms=atoms, state="labeled", labeled_at=time.time(), **meta)
        return True

    def fail(self, frame_id: int, owner: str, reason: str) -> Optional[str]:
        """A failed label: back to pending until max_attempts, then 'failed'.  Returns the new state (None if
        the claim was not ours)."""
        with self._locked():
            with transaction(self.url) as db:
                row = self._own(db, frame_id, owner)
                if row is None:
                    return None
                state = "failed" if int(row.get("attempts", 0)) >= self.max_attempts else "pending"
                db.update(frame_id, state=state, last_error=str(reason)[:500], owner="")
                return state

    def exclude(self, frame_id: int, reason: str):
        """Take a frame out for good (later runs respect it)."""
        with self._locked():
            with transaction(self.url) as db:
                db.update(frame_id, state="excluded", excluded_reason=str(reason)[:500])

    # ------------------------------------------------------------------------------------------------ reading
    def counts(self, **filters) -> dict:
        with self._db() as db:
            return {s: db.count(state=s, **filters) for s in STATES}

    def labeled(self, **filters):
        """Yield (label, Atoms with results) of every labelled frame (matching the key=value filters)."""
        with self._db() as db:
            for row in db.select(state="labeled", sort="id", **filters):
                yield f"{self.url}: id={row.id}", row.toatoms()

    def rows(self, **filters) -> list:
        """ase.db rows (with key-value pairs) matching the filters, by id."""
        with self._db() as db:
            return list(db.select(sort="id", **filters))


