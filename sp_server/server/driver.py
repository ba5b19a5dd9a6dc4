"""The force server: i-PI driver connections evaluating a model, with per-frame Bayesian error, flagging into a
queue, and hot reload of the model file.

One process holds K connections (threads), all sharing one model holder and one queue writer; each connection has
its own Evaluator (work buffers are per connection).  A bad message or an unmappable frame closes that connection
with a log line naming the frame and the problem; the others go on.  Frames are flagged when their Bayesian error
exceeds the threshold and is a local maximum along that connection's trajectory (the paper's rule), or at once
when they leave the trusted range (atoms far from their sites, a cell strained far from the reference, energy far
below the reference, non-finite); with an untrusted frame the frame where that excursion began is queued too
(reason "entry of an excursion ..."): it is the one worth labelling.  A hot-reloaded version is on probation: if a
frame leaves the trusted range within its first ``probation_frames`` frames, the server goes back to the version
before (ModelHolder).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..model.mapping import MappingError, symmetric_from_voigt
from ..model.native import ModelFileError, load_model
from ..model.posterior import ERROR_KEYS, ErrorThreshold
from ..potential import Evaluator
from ..units import HARTREE_EV
from .protocol import Connection, EngineClosed, ProtocolError, connect
from .queue import FlagQueue

log = logging.getLogger("sp_server.serve")


@dataclass
class ServeSettings:
    threshold: Optional[ErrorThreshold] = None  # default: ErrorThreshold() when the model has a posterior
    max_displacement: float = 1.0       # A: beyond this an atom has left its site (trusted range)
    max_strain: float = 0.15            # largest component of the cell's strain U - 1 from the reference (trusted
                                        # range, the boundedness check's md_max_strain): a runaway of the cell is
                                        # caught here, before the frame stops being mappable.  0.10 stopped the
                                        # demo's 2x2x2 NPT MDs at 150 K (CHGNet's T axis is flat up to c/a 1.07)
    energy_floor: float = -1.0          # eV per reference cell below the reference energy: untrusted
    wait: float = 600.0                 # s to keep retrying the connection while the engine starts
    reload_interval: float = 1.0        # s between checks of the model file
    socket_timeout: float = 3600.0      # s without a message from the engine before giving up
    stop_untrusted: bool = False        # end the connection at an untrusted frame (after queueing it): the engine's
                                        # MD has exploded or left the model's range; the caller stops that engine
    trace_dir: Optional[str] = None     # write every frame's energy and Bayesian errors to trace_dir/trace_K.csv
    excursion_frames: int = 1           # frames queued from an excursion that ended untrusted (its first frame
                                        # above the threshold, then spread along it)
    error_stride: int = 1               # all Bayesian errors every n-th frame of a connection (they cost about 3x
                                        # the energy + forces: docs/performance.md); the others get those of the
                                        # energy pass (energy_mev_per_cell, local_energy_max_mev: ~20%); 0: none;
                                        # flagging on a quantity a frame has; trusted-range checks on every frame
    probation_frames: int = 2000        # after a hot reload, a frame outside the trusted range within this many
                                        # frames (all connections) sends the server back to the version before
                                        # (ModelHolder); 0: no probation
    probation_margin: float = 0.2       # A: during probation, a frame with an atom this much farther from its site
                                        # than any frame of the settled versions (PROBATION_HISTORY frames at
                                        # least) fails it too, before the atom is out of the trusted range and
                                        # too fast to be caught (0: off; docs/learn.md)
    probation_alpha: float = 1e-4       # during probation, a version whose frames are flagged (local maxima above
                                        # the threshold) significantly more often than the settled frames were
                                        # fails it too: one-sided Poisson test at this level (0: off; ModelHolder)
    committee_extras: bool = False      # add i-PI committee extras (committee_pot: committee_energies), so that
                                        # i-PI's <ffcommittee> with parse_json reads the Bayesian energy error


def untrusted_reasons(res, reference, settings: ServeSettings) -> list:
    """Why an evaluated frame (:class:`sp_server.potential.FrameResult`) is outside the trusted range of
    ``settings`` (non-finite, an atom far from its site, a strained cell, an energy far below the reference);
    empty when it is inside."""
    reasons = []
    if not (np.isfinite(res.energy) and np.all(np.isfinite(res.forces))):
        reasons.append("non-finite energy or forces")
    if res.frame.max_displacement > settings.max_displacement:
        reasons.append(f"atom {res.frame.max_displacement:.2f} A from its site")
    strain = float(np.abs(res.frame.stretch - np.eye(3)).max())
    if strain > settings.max_strain:
        reasons.append(f"cell strain {strain:.3f} from the reference")
    ncell = len(res.forces) // reference.natoms
    if (res.energy - ncell * reference.energy) / ncell < settings.energy_floor:
        reasons.append(f"energy {(res.energy - ncell * reference.energy) / ncell:.3f} eV/cell below the reference")
    return reasons


def error_request(stride: int, index: int) -> dict:
    """The Bayesian errors of frame ``index`` (0-based) of a connection for ServeSettings.error_stride ``stride``:
    all of them every stride-th frame, those of the energy pass (cheap) on the others, none with stride 0; the
    keyword arguments of Evaluator.evaluate."""
    return {"errors": stride > 0 and index % stride == 0, "local_errors": stride > 0}


def read_trace(path) -> np.ndarray:
    """A trace file written with ``ServeSettings.trace_dir`` as a structured array, one row per frame (fields:
    frame, bead, model_version, energy_ev, err_<quantity> (NaN where not computed), untrusted); empty when the
    file holds no frame yet."""
    data = np.genfromtxt(path, delimiter=",", names=True, skip_header=1)
    return np.atleast_1d(data) if data.size else data.reshape(0)


def committee_energies(energy_ev: float, error_mev_per_cell: float, ncell: int) -> list:
    """Two committee energies in Hartree, E -/+ sigma/sqrt(2), sigma = the Bayesian error of the total energy
    (eV, from the per-cell ``error_mev_per_cell`` of ``ncell`` reference cells): i-PI's <ffcommittee> (with
    parse_json) takes their mean, exactly E, as the energy and their standard deviation (ddof 1), exactly sigma,
    as its ``committee_uncertainty``, which its active-learning output (active_thresh, active_output) compares to
    its threshold.  The members carry no forces or virials: i-PI then uses the server's own."""
    sigma = 1e-3 * float(error_mev_per_cell) * int(ncell)
    half = sigma / np.sqrt(2.0)
    return [(energy_ev - half) / HARTREE_EV, (energy_ev + half) / HARTREE_EV]


class UntrustedFrame(RuntimeError):
    """A frame outside the model's trusted range, with ServeSettings.stop_untrusted set."""


#: settled frames (outside any probation) that the displacement and flag-rate watches of a probation need before
#: they judge
PROBATION_HISTORY = 200


def poisson_tail(n: int, mu: float) -> float:
    """P(X >= n) for X ~ Poisson(mu)."""
    from scipy.stats import poisson
    return float(poisson.sf(int(n) - 1, float(mu)))


def version_switches(lines, connection: int = 0) -> list:
    """[(frame, version)]: where one connection switched model version, read from the server's log lines (hot
    reloads, "connection K: frame N evaluated with model version V", and the probation's returns, "connection K,
    frame N: evaluated again with model version V"; both are written by :class:`ForceServer`), in order.  The
    version served before the first switch is not in the log."""
    pattern = re.compile(rf"connection {int(connection)}(?::|,) frame (\d+):? evaluated (?:again )?with model "
                         r"version (\d+)")
    out = []
    for line in lines:
        m = pattern.search(line)
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
    return out


class ModelHolder:
    """The current model, reloaded when its file is atomically replaced (checked at most every interval s).

    Probation: for the first ``probation_frames`` frames after a reload, a frame that leaves the trusted range
    (``report(generation, False)``) sends the holder back to the version before, which had served its own probation
    (or was the first); that file's contents are not loaded again, the next publication is.  A published version
    of 2026-12-04 took a 10x10x10 NPT production run out of the trusted range 50 steps after it was loaded, and the
    run was lost (docs/learn.md).

    Displacement watch (``probation_margin``, A): during probation a frame whose farthest atom is more than the
    margin beyond the farthest of every settled frame (served outside any probation; at least PROBATION_HISTORY of
    them) fails too.  A version published on 2026-12-04 (third run) had a local hole: a Ti and two O of one cell
    fell into it together at 350 K, and by the time one O was 1.06 A out (the trusted range) they were falling too
    fast for the version before to hold them (the run was lost); the settled frames had reached 0.54 A.

    Flag-rate watch (``probation_alpha``): during probation a version whose frames are flagged (``report(...,
    flagged=True)``: a local maximum of the Bayesian error above the threshold) more often than the settled frames'
    rate allows (one-sided Poisson test at level ``probation_alpha``; the settled rate is (flags + 1) / frames, so
    that a run without settled flags is not judged on a rate of zero) fails too.  In the fourth run of 2026-12-04
    the same version with the hole was flagged 20 times per ps against 2.5 of the version before; the displacement
    watch sent it back at 0.84 A, again too late to hold the atoms (docs/learn.md).  Replayed on that run's queue,
    this watch sends it back after 266 frames (8 flags where 1.3 were expected), with its farthest atom at 0.5 A.
    In the fifth run it did so after 388 frames, and both runs went on to their end."""

    def __init__(self, path, interval: float = 1.0, probation_frames: int = 0, probation_margin: float = 0.0,
                 probation_alpha: float = 0.0):
        self.path = Path(path)
        self.interval = interval
        self.lock = threading.Lock()
        self.model = load_model(self.path)
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self.generation = 0
        self.probation_frames = int(probation_frames)
        self.probation = 0            # frames the current version still has to hold in the trusted range
        self.proven = self.model      # the last version that held its probation (or the first)
        self.reverted: list = []      # (version rejected, version back to, reason)
        self.probation_margin = float(probation_margin)
        self.settled_frames = 0       # trusted frames served outside any probation ...
        self.settled_displacement = 0.0   # ... and the farthest any of their atoms was from its site, A
        self.settled_flags = 0        # ... and how many of them were flagged
        self.probation_alpha = float(probation_alpha)
        self.probation_flags = 0      # frames of the version on probation flagged so far

    def report(self, generation: int, trusted: bool, why: str = "", displacement: float = float("nan"),
               flagged: bool = False) -> Optional[int]:
        """After each frame evaluated with ``generation`` (``displacement``: its farthest atom from its site, A;
        ``flagged``: a frame was flagged with it): counts the probation down, or, for a frame outside the trusted
        range during it (or beyond the displacement or flag-rate watch), goes back to the proven version; returns
        that version's generation, else None."""
        with self.lock:
            if generation != self.generation:
                return None
            if self.probation <= 0:
                if trusted and np.isfinite(displacement):
                    self.settled_frames += 1
                    self.settled_flags += int(bool(flagged))
                    self.settled_displacement = max(self.settled_displacement, float(displacement))
                return None
            self.probation_flags += int(bool(flagged))
            if trusted and flagged and self.probation_alpha > 0 and self.settled_frames >= PROBATION_HISTORY:
                seen = self.probation_frames - self.probation + 1
                mu = seen * (self.settled_flags + 1) / self.settled_frames
                p = poisson_tail(self.probation_flags, mu)
                if p < self.probation_alpha:
                    trusted = False
                    why = (f"{self.probation_flags} flags in {seen} frames, where the rate of {self.settled_frames} "
                           f"settled frames ({self.settled_flags} flags) predicts {mu:.2g} (Poisson p = {p:.1g})")
            if trusted and self.probation_margin > 0 and self.settled_frames >= PROBATION_HISTORY and \
                    displacement > self.settled_displacement + self.probation_margin:
                trusted = False
                why = (f"atom {displacement:.2f} A from its site, more than {self.probation_margin:g} A beyond the "
                       f"farthest of {self.settled_frames} settled frames ({self.settled_displacement:.2f} A)")
            if trusted:
                self.probation -= 1
                if self.probation == 0:
                    self.proven = self.model
                    log.info("model version %s held its probation (%d frames)", self.model.version,
                             self.probation_frames)
                return None
            bad = self.model
            self.reverted.append((bad.version, self.proven.version, why))
            log.warning("model version %s failed its probation %d frames after it was loaded (%s): back to "
                        "version %s; the file is loaded again when it changes", bad.version,
                        self.probation_frames - self.probation, why, self.proven.version)
            self.model = self.proven
            self.probation = 0
            self.generation += 1
            return self.generation

    def _stat(self):
        st = os.stat(self.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def poll(self):
        """Between frames: reload if the file changed; returns the current (generation, model)."""
        now = time.monotonic()
        with self.lock:
            if now - self._checked >= self.interval:
                self._checked = now
                try:
                    stamp = self._stat()
                except OSError:
                    stamp = self._stamp
                if stamp != self._stamp:
                    try:
                        new = load_model(self.path)
                    except ModelFileError as exc:
                        log.error("model file changed but cannot be read (%s); keeping version %s", exc,
                                  self.model.version)
                    else:
                        log.info("hot reload: model %s version %s -> %s%s", self.path, self.model.version,
                                 new.version, f" (on probation for {self.probation_frames} frames)"
                                 if self.probation_frames else "")
                        if self.probation <= 0:
                            self.proven = self.model
                        self.model = new
                        self.generation += 1
                        self.probation = self.probation_frames
                        self.probation_flags = 0
                    self._stamp = stamp
            return self.generation, self.model


class _Trajectory:
    """Flagging along one connection.  Local maxima (the paper's rule): frame k is decided when frame k+1 arrives.
    Excursions: the last ``history`` trusted frames are kept, so that when a frame leaves the trusted range the
    frame where the excursion began (the first of the last run of frames above the threshold, else the frame
    ``back`` steps before) can be labelled instead of the untrusted frame itself, which lies far outside anything
    a polynomial should be fitted to (FLARE and VASP label where the uncertainty first exceeds the threshold)."""

    def __init__(self, threshold: Optional[ErrorThreshold], history: int = 64, back: int = 20):
        self.threshold = threshold
        self.prev = None  # (value, record)
        self.cur = None
        self.recent: deque = deque(maxlen=max(int(history), 1))
        self.back = int(back)
        self.flagged: set = set()   # (frame, bead) already put in the queue

    def push(self, value: float, record: dict, trusted: bool = True):
        out = None
        if self.threshold is not None and self.cur is not None:
            v_prev = self.prev[0] if self.prev is not None else -np.inf
            v_cur, rec = self.cur
            if v_cur > self.threshold.value and v_cur >= v_prev and v_cur >= value:
                out = self._once(rec)
        self.prev, self.cur = self.cur, (value, record)
        if trusted:
            self.recent.append((value, record))
        return out

    def _once(self, rec):
        key = (rec.get("frame"), rec.get("bead"))
        if key in self.flagged:
            return None
        self.flagged.add(key)
        return rec

    def entry(self, count: int = 3, cap: float = 10.0) -> list:
        """Frames of the current excursion worth labelling (see the class docstring): its first frame and up to
        ``count - 1`` more spread along it, leaving out frames whose error exceeds ``cap`` x the threshold (already
        too far out); [] when nothing was kept."""
        if not self.recent:
            return []
        items = list(self.recent)
        start = len(items)
        if self.threshold is not None:
            while start > 0 and items[start - 1][0] > self.threshold.value:
                start -= 1
        if start == len(items):   # no frame above the threshold just before: the model was confidently wrong
            start = max(len(items) - self.back, 0)
        limit = cap * self.threshold.value if self.threshold is not None else np.inf
        run = [rec for value, rec in items[start:] if value <= limit] or [items[start][1]]
        picks = sorted({round(i) for i in np.linspace(0, len(run) - 1, min(count, len(run)))})
        return [rec for rec in (self._once(run[i]) for i in picks) if rec is not None]

    def finish(self):
        """At the end of the trajectory the last frame can still be a maximum."""
        if self.threshold is None or self.cur is None:
            return None
        v_prev = self.prev[0] if self.prev is not None else -np.inf
        v_cur, rec = self.cur
        return self._once(rec) if v_cur > self.threshold.value and v_cur >= v_prev else None


class ForceServer:
    def __init__(self, model_path, address, port: Optional[int] = None, unix: bool = False,
                 connections: int = 1, queue: Optional[str] = None, settings: ServeSettings = ServeSettings()):
        self.holder = ModelHolder(model_path, settings.reload_interval, settings.probation_frames,
                                  settings.probation_margin, settings.probation_alpha)
        # one or several engines (e.g. two i-PI instances): each address gets `connections` connections
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.port, self.unix = port, unix
        self.n_connections = connections
        self.settings = settings
        if settings.committee_extras and (self.holder.model.posterior is None or settings.error_stride == 0):
            raise ValueError(f"committee extras need the Bayesian errors: {model_path} has no posterior"
                             if self.holder.model.posterior is None else
                             "committee extras need the Bayesian errors on every frame: not with --error-stride 0")
        if settings.threshold is None and self.holder.model.posterior is not None:
            settings.threshold = ErrorThreshold()
        self.queue = FlagQueue(queue) if queue else None
        self._beads: dict = {}    # engine (address index) -> bead indices seen (PIMD: one frame per bead and step)
        if self.queue is not None:
            self.queue.report_progress(self.progress)
        self.stop = threading.Event()
        self.results: list = []
        self.outcomes: dict = {}  # connection index -> "exit" | "error" | "untrusted" | "stopped" | ...
        self.connected: set = set()  # connection indices that reached their engine
        self.frames: dict = {}    # connection index -> frames evaluated
        self.reasons: dict = {}   # connection index -> why it ended early (untrusted frame, error), for the caller
        self._open: set = set()  # connections to shut down on stop (their threads wait in recv)

    @property
    def frames_total(self) -> int:
        return sum(self.frames.values())

    def progress(self) -> dict:
        """{"frames": force evaluations so far, "md_steps": MD steps so far summed over the engines (each engine's
        frames divided by the number of beads it sent)}: the flag queue's progress row."""
        frames = dict(self.frames)
        steps = 0.0
        for a in range(len(self.addresses)):
            n = sum(frames.get(k, 0) for k in range(a * self.n_connections, (a + 1) * self.n_connections))
            steps += n / max(len(self._beads.get(a, ())), 1)
        return {"frames": sum(frames.values()), "md_steps": steps}

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _connect(self, k: int) -> Optional[Connection]:
        deadline = time.monotonic() + self.settings.wait
        address = self.addresses[k // self.n_connections]
        where = f"/tmp/ipi_{address}" if self.unix else f"{address}:{self.port}"
        while not self.stop.is_set():
            try:
                conn = connect(address, self.port, self.unix, self.settings.socket_timeout)
                log.info("connection %d: connected to %s", k, where)
                return conn
            except (ConnectionRefusedError, FileNotFoundError, socket.timeout, OSError) as exc:
                if time.monotonic() > deadline:
                    log.error("connection %d: no engine at %s after %.0f s (%s)", k, where, self.settings.wait, exc)
                    return None
                time.sleep(0.2)
        return None

    def serve_forever(self) -> int:
        """Run K connections until the engine says EXIT (or they fail); returns 0 when every connection ended
        with EXIT, 1 otherwise."""
        def on_term(signum, frame):
            log.warning("signal %d: stopping, flushing the queue", signum)
            self.stop.set()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
        threads = [threading.Thread(target=self._run_connection, args=(k,), daemon=True)
                   for k in range(self.n_connections * len(self.addresses))]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
                if self.stop.is_set():
                    for conn in list(self._open):
                        conn.shutdown()
        finally:
            self.stop.set()
            if self.queue is not None:
                self.queue.close()
        ok = ("exit", "stopped")
        return 0 if self.results and all(r in ok for r in self.results) else 1

    # ------------------------------------------------------------------------------------------------ one client
    def _run_connection(self, k: int):
        conn = self._connect(k)
        if conn is None:
            self.results.append("no engine")
            return
        self._open.add(conn)
        self.connected.add(k)
        outcome = "closed"
        generation, evaluator = -1, None
        traj = _Trajectory(self.settings.threshold)
        trace = self._open_trace(k)
        frame = 0
        bead = k
        have_data = False
        answer = None
        initialized = False
        t_eval = 0.0  # seconds spent evaluating, and between the first and last POSDATA (the engine's step time)
        t_errors, n_errors = 0.0, 0   # of which the Bayesian errors, on the frames that had them
        t_first = t_last = None
        try:
            while not self.stop.is_set():
                msg = conn.recv_header()
                if msg == "STATUS":
                    conn.send_header("HAVEDATA" if have_data else ("READY" if initialized else "NEEDINIT"))
                elif msg == "INIT":
                    bead, _ = conn.recv_init()
                    initialized = True
                elif msg == "POSDATA":
                    cell, pos = conn.recv_posdata()
                    t0 = time.perf_counter()
                    self._beads.setdefault(k // self.n_connections, set()).add(bead)
                    t_first = t0 if t_first is None else t_first
                    t_last = t0
                    gen, model = self.holder.poll()
                    if gen != generation:  # hot reload happens here, between two frames
                        if evaluator is not None:
                            log.info("connection %d: frame %d evaluated with model version %s", k, frame,
                                     model.version)
                        generation, evaluator = gen, Evaluator(model)
                    answer, err_s, bad, far, flagged = self._evaluate(k, bead, frame, evaluator, model, cell, pos,
                                                                      traj, trace)
                    if self.holder.report(generation, not bad, "; ".join(bad), far, flagged) is not None:
                        # the new version failed its probation: this frame and the next get the proven version's
                        # forces (this frame was queued above)
                        generation, model = self.holder.poll()
                        evaluator = Evaluator(model)
                        log.warning("connection %d, frame %d: evaluated again with model version %s", k, frame,
                                    model.version)
                        answer, err_s, bad, *_ = self._evaluate(k, bead, frame, evaluator, model, cell, pos, traj,
                                                                None, flag=False)
                    if bad and self.settings.stop_untrusted:
                        raise UntrustedFrame("; ".join(bad))
                    if frame > 0:  # the first frame includes set-up (Ewald sums, compilation)
                        t_eval += time.perf_counter() - t0
                        if err_s is not None:
                            t_errors += err_s
                            n_errors += 1
                    have_data = True
                    initialized = True
                elif msg == "GETFORCE":
                    if not have_data:
                        raise ProtocolError("GETFORCE before POSDATA")
                    conn.send_force(*answer)
                    have_data = False
                    frame += 1
                    self.frames[k] = frame
                elif msg == "EXIT":
                    outcome = "exit"
                    log.info("connection %d: EXIT after %d frames", k, frame)
                    break
                else:
                    raise ProtocolError(f"unknown message {msg!r}")
        except EngineClosed:
            outcome = "exit"
            log.info("connection %d: the engine closed the connection after %d frames", k, frame)
        except UntrustedFrame as exc:
            log.warning("connection %d, frame %d: %s; ending this trajectory", k, frame, exc)
            outcome = "untrusted"
            self.reasons[k] = f"frame {frame}: {exc}"
        except (ProtocolError, MappingError, ValueError) as exc:
            log.error("connection %d, frame %d: %s; closing this connection", k, frame, exc)
            outcome = "error"
            self.reasons[k] = f"frame {frame}: {exc}"
        except (socket.timeout, TimeoutError):
            log.error("connection %d, frame %d: no message from the engine for %.0f s; closing", k, frame,
                      self.settings.socket_timeout)
            outcome = "error"
        except OSError as exc:
            log.error("connection %d, frame %d: socket error %s; closing", k, frame, exc)
            outcome = "error"
        finally:
            if frame > 2 and t_first is not None and t_last > t_first:
                step = (t_last - t_first) / (frame - 1)
                ev = t_eval / (frame - 1)
                log.info("connection %d: timing: %.3f ms per MD step, %.3f ms evaluating (%.0f%%), engine + socket "
                         "%.0f%%", k, 1e3 * step, 1e3 * ev, 100 * ev / step, 100 * (1 - ev / step))
                if n_errors:
                    log.info("connection %d: timing: Bayesian errors on %d of %d frames (--error-stride %d), %.3f ms "
                             "each; %.3f ms per MD step on average (%.0f%% of the step)", k, n_errors, frame - 1,
                             self.settings.error_stride, 1e3 * t_errors / n_errors, 1e3 * t_errors / (frame - 1),
                             100 * t_errors / (frame - 1) / step)
            last = traj.finish()
            if last is not None and self.queue is not None:
                self.queue.put(last)
            conn.close()
            self._open.discard(conn)
            if trace is not None:
                trace.close()
            if self.stop.is_set() and outcome not in ("exit", "untrusted"):
                outcome = "stopped"
            self.results.append(outcome)
            self.outcomes[k] = outcome

    def _open_trace(self, k: int):
        if not self.settings.trace_dir:
            return None
        Path(self.settings.trace_dir).mkdir(parents=True, exist_ok=True)
        fh = open(Path(self.settings.trace_dir) / f"trace_{k}.csv", "w", buffering=1)
        fh.write("# every frame of connection %d: energy in eV, Bayesian errors (energy meV/cell, forces eV/A, "
                 "stress GPa); flagged: untrusted or candidate\n" % k)
        fh.write("frame,bead,model_version,energy_ev," + ",".join(f"err_{q}" for q in ERROR_KEYS) + ",untrusted\n")
        return fh

    def _evaluate(self, k, bead, frame, evaluator, model, cell, pos, traj, trace=None, flag: bool = True):
        """(answer for GETFORCE, seconds spent on Bayesian errors or None, reasons the frame is outside the trusted
        range, its farthest atom from its site in A, whether a frame was flagged as a local maximum of the error);
        queues the frame when it is flagged (with ``flag``)."""
        ref = model.reference
        # the i-PI protocol sends no species: atoms are matched to the model's sites by position alone (once,
        # then cached), and take the species of their sites
        res = evaluator.evaluate(cell, pos, None, **error_request(self.settings.error_stride, frame))
        numbers = np.empty(len(pos), dtype=int)
        numbers[res.frame.order] = np.tile(ref.numbers, len(pos) // ref.natoms)
        ncell = len(pos) // ref.natoms
        reasons = untrusted_reasons(res, ref, self.settings)
        errors = res.errors or {}
        extra = {"model": model.name, "model_version": model.version, "frame": frame, "bead": bead}
        if errors:
            extra["bayesian_error"] = errors
            extra.update({f"sp_err_{key}": v for key, v in errors.items()})
            if self.settings.committee_extras and "energy_mev_per_cell" in errors:
                extra["committee_pot"] = committee_energies(res.energy, errors["energy_mev_per_cell"], ncell)
        record = {"cell": cell, "positions": pos, "numbers": numbers, "frame": frame, "bead": bead,
                  "connection": k, "model_version": model.version, "errors": errors,
                  "energy_ev": float(res.energy), "max_displacement": float(res.frame.max_displacement)}
        flagged = False
        if self.queue is not None and flag:
            if reasons:
                for n, entry in enumerate(traj.entry(self.settings.excursion_frames)):
                    where = "entry" if n == 0 else "along"
                    self.queue.put(dict(entry, reason=f"entry: {where} an excursion that left the trusted range at "
                                                      f"frame {frame}"))
                self.queue.put(dict(record, reason="untrusted: " + "; ".join(reasons)))
                # the frame before, even if it ends as a "maximum" here, belongs to this excursion: the excursion's
                # entry (and frames spread along it) were queued above instead, so the push's answer is dropped
                traj.push(-np.inf, record, trusted=False)
            elif self.settings.threshold is not None and self.settings.threshold.quantity in errors:
                value = errors[self.settings.threshold.quantity]
                out = traj.push(value, dict(record, reason=f"local maximum of {self.settings.threshold}"))
                if out is not None:
                    self.queue.put(out)
                    flagged = True
        if trace is not None:
            trace.write(f"{frame},{bead},{model.version},{res.energy:.10g},"
                        + ",".join(f"{errors.get(q, float('nan')):.6g}" for q in ERROR_KEYS)
                        + f",{int(bool(reasons))}\n")
        if reasons:
            log.warning("connection %d, frame %d: %s", k, frame, "; ".join(reasons))
        stress = symmetric_from_voigt(res.stress)
        return ((res.energy, res.forces, stress, abs(np.linalg.det(cell)), json.dumps(extra)),
                res.error_seconds if res.errors is not None else None, reasons, float(res.frame.max_displacement),
                flagged)

