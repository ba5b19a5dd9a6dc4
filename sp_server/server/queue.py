"""The flag queue: frames that need a first-principles label, written to an ase.db (SQLite file or PostgreSQL URL)
by a writer thread, in batches, so the MD never waits for the database.

Each row: the structure (positions, cell, species; Angstrom) and key-value pairs state, reason, frame, bead,
connection, model_version, err_energy_mev_per_cell, err_force_max (eV/A), err_stress_max_gpa (GPa), energy_model
(eV), max_displacement (A).  state is 'pending' (labelling workers claim it), except for frames that left the
trusted range: 'untrusted', kept for inspection and never labelled (an exploded frame spoils a fit; the frame where
its excursion began is queued as pending instead).  ``close()`` flushes everything that was put (also on SIGTERM
through the server).
"""
from __future__ import annotations

import logging
import queue
import threading

from ase import Atoms

from ..store.db import connect

log = logging.getLogger("sp_server.queue")


class FlagQueue:
    def __init__(self, url: str, batch_seconds: float = 0.5):
        self.url = str(url)
        self._q: queue.Queue = queue.Queue()
        self._batch_seconds = batch_seconds
        self._closed = threading.Event()
        self.written = 0
        with connect(self.url):  # fail early, in the caller, on a bad URL or path
            pass
        self._thread = threading.Thread(target=self._writer, name="flag-queue-writer", daemon=True)
        self._thread.start()

    def put(self, record: dict):
        self._q.put(record)

    def _writer(self):
        while True:
            batch = []
            try:
                batch.append(self._q.get(timeout=self._batch_seconds))
                while True:
                    batch.append(self._q.get_nowait())
            except queue.Empty:
                pass
            if batch:
                self._write(batch)
            if self._closed.is_set() and self._q.empty():
                return

    def _write(self, batch):
        try:
            with connect(self.url) as db:
                for r in batch:
                    atoms = Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=True)
                    reason = r.get("reason", "")
                    kv = {"state": "untrusted" if reason.startswith("untrusted") else "pending", "reason": reason,
                          "frame": int(r["frame"]),
                          "bead": int(r["bead"]), "connection": int(r["connection"]),
                          "model_version": int(r["model_version"]), "energy_model": float(r["energy_ev"])}
                    kv.update({f"err_{k}": float(v) for k, v in r.get("errors", {}).items()})
                    if "max_displacement" in r:   # A, largest distance of an atom from its reference site
                        kv["max_displacement"] = float(r["max_displacement"])
                    db.write(atoms, **kv)
            self.written += len(batch)
        except Exception as exc:  # never lose the batch silently
            log.error("flag queue %s: could not write %d frame(s): %s", self.url, len(batch), exc)
            raise

    def close(self, timeout: float = 60.0):
        self._closed.set()
        self._thread.join(timeout)
        log.info("flag queue %s: %d frame(s) written", self.url, self.written)
