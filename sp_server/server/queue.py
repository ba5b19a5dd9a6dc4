"""The flag queue: frames that need a first-principles label, written to an ase.db (SQLite file or PostgreSQL URL)
by a writer thread, in batches, so the MD never waits for the database.

Each row: the structure (positions, cell, species; Angstrom) and key-value pairs state, reason, frame, bead,
connection, model_version, the Bayesian errors the frame has (err_energy_mev_per_cell, err_force_max (eV/A),
err_stress_max_gpa (GPa), err_local_energy_max_mev (meV): sp_server.model.posterior.ERROR_KEYS), energy_model (eV),
max_displacement (A).  state is 'pending' (labelling workers claim it), except for frames that left the
trusted range: 'untrusted', kept for inspection and never labelled (an exploded frame spoils a fit; the frame where
its excursion began is queued as pending instead).  ``close()`` flushes everything that was put (also on SIGTERM
through the server).

Atomicity: a batch (at most :data:`MAX_BATCH` frames) is written in one database transaction, so a server killed
in the middle of a write (SIGKILL, node failure) leaves each frame either fully in the queue or not at all.  ase.db's
own ``with db:`` is not quite enough for that: it commits by itself every 5000 writes, and on PostgreSQL
(ase-db-backends) its rollback fails with an AttributeError that hides the real error and leaves the connection
open, so :func:`sp_server.store.db.transaction` manages the transaction itself.

Failures: a batch that cannot be written (database unreachable, disk full, locked) is kept and retried with a
bounded back-off (``retry_first`` doubling up to ``retry_max`` seconds), each failure logged with the queue and the
number of frames held; frames put meanwhile wait behind it, in order.  What is still unwritten when ``close()``
gives up is reported (log and return value) and dumped to an extxyz file beside the queue (SQLite) or in the
current folder (PostgreSQL); :func:`requeue` writes such a dump into a queue later.

Progress: with :meth:`FlagQueue.report_progress`, the writer also keeps one row per process with state 'progress'
(no atoms; key-value pairs server = host:pid:start, frames = force evaluations so far, md_steps = MD steps so far,
summed over the engines: frames / beads for each, updated_at = Unix time; reason 'progress' and frame -1), refreshed every few seconds and at
close, so that a consumer (``sp-server learn``) can turn the flags into a rate per ps of MD.  A failed progress
write is logged and never holds back a frame.  Select the frames of a queue with :data:`FRAME_ROWS`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ase import Atoms

from ..store.db import PG_CONNECT_TIMEOUT_S, is_postgres, redact, transaction as _transaction

log = logging.getLogger("sp_server.queue")

#: the ase.db selection of a queue's frames (every row but the servers' progress rows)
FRAME_ROWS = "state!=progress"


def is_progress_row(row) -> bool:
    """A server's progress row (no atoms; see the module docstring), for readers that select every row of a
    database that may be a flag queue (FRAME_ROWS would also drop rows without a state)."""
    return row.get("state") == "progress"

#: frames per transaction at most (a larger backlog, e.g. after an outage, goes in several transactions)
MAX_BATCH = 1000


def record_to_row(r: dict) -> tuple:
    """(Atoms, key-value pairs) of a queued record."""
    atoms = Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=True)
    reason = r.get("reason", "")
    kv = {"state": "untrusted" if reason.startswith("untrusted") else "pending", "reason": reason,
          "frame": int(r["frame"]), "bead": int(r["bead"]), "connection": int(r["connection"]),
          "model_version": int(r["model_version"]), "energy_model": float(r["energy_ev"])}
    kv.update({f"err_{k}": float(v) for k, v in r.get("errors", {}).items()})
    if "max_displacement" in r:   # A, largest distance of an atom from its reference site
        kv["max_displacement"] = float(r["max_displacement"])
    return atoms, kv


def requeue(path, url) -> int:
    """Write the frames of a dump (see :meth:`FlagQueue.close`) into the queue at ``url``, in one transaction;
    returns their number."""
    import ase.io
    frames = ase.io.read(str(path), ":", format="extxyz")
    with _transaction(str(url)) as db:
        for atoms in frames:
            kv = {k: v for k, v in atoms.info.items() if k != "queue"}
            db.write(Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True), **kv)
    return len(frames)


class FlagQueue:
    def __init__(self, url: str, batch_seconds: float = 0.5, *, retry_first: float = 0.5, retry_max: float = 30.0,
                 dump_dir=None):
        self.url = str(url)
        self._q: queue.Queue = queue.Queue()
        self._batch_seconds = batch_seconds
        self.retry_first = float(retry_first)
        self.retry_max = float(retry_max)
        self.dump_dir = dump_dir
        self._closed = threading.Event()
        self._wake = threading.Event()   # ends a back-off wait early (close)
        self._lock = threading.Lock()    # guards _held between the writer and close()
        self._held: list = []            # (Atoms, key-value pairs) taken from the queue, not yet written
        self._deadline = float("inf")
        self._abandoned = False
        self.written = 0
        self.failures = 0                # failed write attempts
        self.rejected = 0                # records that could not be turned into a row (a bug: logged)
        self.unwritten = 0               # frames that close() could not write
        self.dump_path: Optional[Path] = None
        self._progress: Optional[Callable[[], dict]] = None
        self._progress_every = 5.0
        self._progress_at = -float("inf")
        self._progress_row: Optional[int] = None
        self.progress_key = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        for attempt in range(3):  # fail early, in the caller, on a bad URL or path; create the tables once, here
            try:
                with _transaction(self.url) as db:
                    db.count()
                break
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(0.5)      # two servers creating the tables of an empty PostgreSQL database at once
        self._thread = threading.Thread(target=self._writer, name="flag-queue-writer", daemon=True)
        self._thread.start()

    def put(self, record: dict):
        self._q.put(record)

    def report_progress(self, source: Callable[[], dict], every: float = 5.0):
        """Keep this process's progress row up to date (see the module docstring): ``source()`` returns
        {"frames": int, "md_steps": float}; called by the writer thread every ``every`` s and once at close."""
        self._progress = source
        self._progress_every = float(every)

    def _write_progress(self, force: bool = False):
        if self._progress is None or (not force and time.monotonic() - self._progress_at < self._progress_every):
            return
        self._progress_at = time.monotonic()
        try:
            p = self._progress()
            kv = {"frames": int(p.get("frames", 0)), "md_steps": float(p.get("md_steps", 0.0)),
                  "updated_at": time.time()}
            with _transaction(self.url) as db:
                if self._progress_row is not None and db.count(id=self._progress_row, server=self.progress_key):
                    db.update(self._progress_row, **kv)
                else:
                    self._progress_row = db.write(Atoms(), state="progress", reason="progress", frame=-1, bead=-1,
                                                  connection=-1, server=self.progress_key, **kv)
        except Exception as exc:   # progress is for rates only: never a reason to stop or to hold frames
            log.warning("flag queue %s: progress row not written (%s: %s)", redact(self.url), type(exc).__name__,
                        exc)

    # ------------------------------------------------------------------------------------------------ writer
    def _held_total(self) -> int:
        return len(self._held) + self._q.qsize()

    def _take(self, block: bool):
        """Move queued records into _held (waiting up to batch_seconds for the first one when ``block``)."""
        records = []
        try:
            if block:
                records.append(self._q.get(timeout=self._batch_seconds))
            while True:
                records.append(self._q.get_nowait())
        except queue.Empty:
            pass
        rows = []
        for r in records:
            if r is None:   # close()'s wake-up
                continue
            try:
                rows.append(record_to_row(r))
            except Exception as exc:
                self.rejected += 1
                log.error("flag queue %s: a record that cannot be written was left out (frame %s): %s: %s",
                          redact(self.url), r.get("frame") if isinstance(r, dict) else "?", type(exc).__name__, exc)
        if rows:
            with self._lock:
                self._held.extend(rows)

    def _writer(self):
        delay = self.retry_first
        failed_in_row = 0
        while True:
            self._take(block=not self._held)
            self._write_progress()
            if self._held:
                chunk = self._held[:MAX_BATCH]
                try:
                    self._write(chunk)
                except Exception as exc:
                    self.failures += 1
                    failed_in_row += 1
                    now = time.monotonic()
                    if self._closed.is_set() and now >= self._deadline:
                        log.error("flag queue %s: could not write %d frame(s) (attempt %d: %s: %s); closing, "
                                  "giving up", redact(self.url), self._held_total(), failed_in_row,
                                  type(exc).__name__, exc)
                        return
                    wait = min(delay, max(self._deadline - now, 0.0))
                    log.error("flag queue %s: could not write %d frame(s) held (attempt %d: %s: %s); retrying in "
                              "%.1f s", redact(self.url), self._held_total(), failed_in_row, type(exc).__name__,
                              exc, wait)
                    if self._wake.wait(wait):
                        self._wake.clear()
                    delay = min(2 * delay, self.retry_max)
                    continue
                with self._lock:
                    if not self._abandoned:
                        del self._held[:len(chunk)]
                self.written += len(chunk)
                if failed_in_row:
                    log.warning("flag queue %s: written again after %d failed attempt(s)", redact(self.url),
                                failed_in_row)
                delay, failed_in_row = self.retry_first, 0
            if self._closed.is_set() and not self._held and self._q.empty():
                return

    def _write(self, rows):
        """One batch, one transaction: all of its frames are in the queue afterwards, or none (an error is
        raised)."""
        with _transaction(self.url) as db:
            for atoms, kv in rows:
                db.write(atoms, **kv)

    # ------------------------------------------------------------------------------------------------ closing
    def close(self, timeout: float = 60.0) -> int:
        """Write what is left (retrying a failing database for up to ``timeout`` s), stop the writer; returns the
        number of frames that could not be written (0 normally), which are dumped to an extxyz file
        (``dump_path``)."""
        self._deadline = time.monotonic() + timeout
        self._closed.set()
        self._q.put(None)
        self._wake.set()
        self._thread.join(timeout + PG_CONNECT_TIMEOUT_S + 5.0)
        stuck = self._thread.is_alive()
        with self._lock:
            self._abandoned = True
            left = list(self._held)
        if not stuck:
            self._write_progress(force=True)
        self._take(block=False)   # put after the writer stopped (or while it hangs)
        with self._lock:
            left += self._held[len(left):]
            self._held.clear()    # reported (and dumped) once, also if close() is called again
        self.unwritten = len(left)
        if not left:
            log.info("flag queue %s: %d frame(s) written", redact(self.url), self.written)
            return 0
        what = (" (the writer is stuck in a write: the first of them may still be committed)" if stuck else "")
        self.dump_path = self._dump(left)
        where = f"saved to {self.dump_path} (sp_server.server.queue.requeue puts them back)" if self.dump_path \
            else "LOST: no file could be written either"
        log.error("flag queue %s: %d frame(s) written, %d frame(s) could NOT be written%s; %s", redact(self.url),
                  self.written, len(left), what, where)
        return len(left)

    def _dump_dirs(self) -> list:
        dirs = [Path(self.dump_dir)] if self.dump_dir is not None else []
        if not is_postgres(self.url):
            dirs.append(Path(self.url).resolve().parent)
        return dirs + [Path.cwd(), Path(tempfile.gettempdir())]

    def _dump(self, rows) -> Optional[Path]:
        import ase.io
        stem = Path(self.url).name if not is_postgres(self.url) else "flag_queue"
        name = f"{stem}.unwritten-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.extxyz"
        frames = []
        for atoms, kv in rows:
            a = atoms.copy()
            a.info.update(kv)
            a.info["queue"] = redact(self.url)
            frames.append(a)
        for folder in self._dump_dirs():
            path = folder / name
            try:
                ase.io.write(str(path), frames, format="extxyz")
                return path
            except Exception as exc:
                log.error("flag queue %s: could not dump the unwritten frames to %s: %s", redact(self.url), path, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
        return None
