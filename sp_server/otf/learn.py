"""Learning during production: the flag queues of running force servers feed labelling and refits of an
on-the-fly run, and the servers hot-reload the published versions (``sp-server learn RUN_DIR --queue DB ...``).

The run folder is an on-the-fly run's (sp_server.otf.loop): its configuration (config.toml: oracle, fit, labelling
workers), harmonic part, candidate pool, store, sufficient statistics and model.h5, which the servers
(``sp-server serve RUN_DIR/model.h5 --queue DB``, ``sp-server lammps ... --model RUN_DIR/model.h5 --queue DB``)
evaluate and reload.  One cycle:

1. pull: the pending frames of every queue (SQLite files or PostgreSQL URLs), the excursion entries first, then the
   largest Bayesian force errors; frames with an atom beyond ``[md] label_max_displacement`` are skipped; a frame
   of more than ``max_atoms`` atoms becomes a periodic sub-cell around its atom of largest per-atom Bayesian force
   error (sp_server.otf.carve); near-duplicates of any frame already in the store (or pulled before in the same
   cycle) are skipped; at most the budget (labels per hour, in total) goes to the store, the rest stays pending in
   its queue for later.  Every ``validation_every``-th frame is kept for validation (never trained on).
2. label: the store's pending frames with the run's oracle and workers (``[label] workers``: mpiexec, mpi4py),
   with every check, retry and lease of ``sp-server label``.
3. refit: the new labels join the sufficient statistics; the bounded fit of ``[fit]`` gives a candidate.  It is
   published (models/model_vNNN.h5, then model.h5 replaced atomically) only when it passes the boundedness check
   and is not worse than the current model on the validation frames (energy, force and stress RMSE each within
   ``accept_tolerance``, relative), and NPT MD of it from each queue's latest frame stays in the trusted range
   (the production gate); otherwise the current model stays, and the log says why.  States on the way out of
   every hot MD that left the trusted range (the check's rounds, the gate) go to the store as training frames
   (``escape_labels``), so that the next refit has the oracle's word where this one ran away.

Exactly once: a queue frame is first written to the store with its source (queue and row id), then marked in its
queue (state learned | duplicate | skipped); a stop in between is found by the source on the next start.  The
statistics record the store ids they hold, the publication is atomic, and the learner's own state
(learn_state.json) is written atomically after each cycle, so a learner killed at any moment (SIGKILL included)
continues with the same command, losing and doubling nothing.

One log line per refit (learn.log and standard output): flags received, duplicates and skipped frames, labels,
the decision and version, validation RMSE before and after, and the flag rate per ps of MD over the window
(flags written by the servers / MD time; MD steps from the servers' progress rows, sp_server.server.queue).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..fit.bayes import FrozenPrior
from ..fit.bound import BoundSettings, escape_rays, hot_md
from ..io.jsonfile import write_json
from ..model.mapping import FrameMapper, MappingError
from ..model.native import load_model, save_model
from ..potential import Evaluator
from ..server.queue import FRAME_ROWS
from ..store.db import PG_LOCK_KEY, connect, file_lock, is_postgres, pg_lock, redact, transaction
from .carve import Patterns, carve, carve_frame, carve_shape, exact_shape
from .config import OtfConfig
from .loop import OnTheFly

LEARNER_LOCK_WAIT_S = 10.0           # a second learner on the same run folder or queue gives up after this
PG_LEARNER_LOCK_KEY = PG_LOCK_KEY + 1   # the learner's advisory lock on a PostgreSQL queue database

#: queue states the learner writes (the servers write pending, untrusted and progress)
QUEUE_STATES = ("learned", "duplicate", "skipped")


@dataclass
class LearnSettings:
    max_atoms: int = 135                 # frames above this become sub-cells (135: 3x3x3 perovskite cells)
    dedup_displacement: float = 0.03     # A: frames closer than this (every atom, after a lattice translation) ...
    dedup_strain: float = 0.005          # ... and every strain component closer than this are duplicates
    labels_per_hour: Optional[float] = None   # budget: frames sent to labelling per hour (None: no limit)
    labels_total: Optional[int] = None        # budget: in all, over the learner's life (None: no limit)
    batch: int = 40                      # frames pulled per cycle at most
    min_labels: int = 10                 # refit once this many new labels are in (or the queues ran dry)
    poll_s: float = 30.0                 # seconds between looks at the queues when there is nothing to do
    timestep_fs: tuple = (2.0,)          # the engines' MD time step, fs, one for all queues or one per queue (the
                                         # flag rate per ps)
    accept_tolerance: float = 0.05       # a candidate may be this much worse (relative RMSE) and still be published
    validation_every: int = 8            # every n-th pulled frame is a validation frame (0: none)
    workers: Optional[int] = None        # labelling workers (None: the run's [label] workers)
    freeze_prior: bool = True            # refits keep the terms, column scales and prior/noise widths of the model
                                         # the session started from (learn_prior.h5): no frame's Bayesian error can
                                         # grow from one version to the next (False: re-select and re-optimise)
    gate_steps: int = 500                # production gate: fs of NPT MD of the candidate from each queue's latest
                                         # frame (0: no gate)
    gate_temperature: Optional[float] = None  # K (None: 1.5 x the highest temperature of the run's [loop])
    gate_max_cells: int = 216            # the gate's MD runs on at most this many cells of the frame (a sub-cell
                                         # around its most displaced atom)
    escape_labels: int = 8               # per refit, at most this many states on the way out of the hot MDs that
                                         # left the trusted range (the bounded fit's rounds, the gate) go to
                                         # labelling as training frames (0: none): the data then show the fit the
                                         # energy where it ran away, instead of constraints only (docs/learn.md)
    kept_cuts: bool = False              # refits start from the run's kept constraints (bound_cuts.npz) too; off:
                                         # from the probes alone, so that every hole the check finds again is a
                                         # state to label, and no constraint of a hole the data now cover holds
                                         # the fit away from them (docs/learn.md)


@dataclass
class PullCounts:
    received: int = 0       # queue frames taken in this cycle (any outcome)
    added: int = 0          # written to the store for labelling
    duplicates: int = 0
    skipped: int = 0        # too far from the reference sites to be labelled
    carved: int = 0
    deferred: int = 0       # left pending in their queue (budget)
    failed: int = 0         # could not be read or mapped (named in the log, marked skipped)

    def add(self, other: "PullCounts"):
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class CycleResult:
    pulled: PullCounts = field(default_factory=PullCounts)
    labeled: int = 0
    refit: bool = False
    published: Optional[int] = None      # the version published, if any


class Learner:
    """``sp-server learn``: see the module docstring.  ``run()`` cycles until stopped (SIGTERM/SIGINT, ``max_cycles``
    or ``idle_exit_s`` without any new frame); ``cycle()`` is one pass."""

    def __init__(self, run_dir, queues, settings: LearnSettings = LearnSettings(), *, config=None,
                 progress: bool = False, log: Optional[Callable] = None):
        self.dir = Path(run_dir).resolve()
        if not (self.dir / "harmonic.h5").exists() or not (self.dir / "model.h5").exists():
            raise FileNotFoundError(f"{self.dir}: not an on-the-fly run folder (harmonic.h5 and model.h5 are needed: "
                                    "sp-server otf CONFIG builds one)")
        path = Path(config) if config is not None else self.dir / "config.toml"
        if not path.exists():
            raise FileNotFoundError(f"{path}: the run's configuration is missing (pass --config)")
        cfg = OtfConfig.load(path)
        cfg.run_dir = self.dir
        if settings.workers is not None:
            cfg.label.workers = int(settings.workers)
        self.settings = settings
        self.queues = [str(q) for q in queues]
        if not self.queues:
            raise ValueError("at least one --queue is needed")
        steps = [float(t) for t in np.atleast_1d(settings.timestep_fs)]
        if len(steps) not in (1, len(self.queues)) or min(steps) <= 0:
            raise ValueError(f"--timestep-fs: one positive value for all queues or one per queue ({len(self.queues)}), "
                             f"got {steps}")
        self.timesteps = steps * len(self.queues) if len(steps) == 1 else steps
        self._print = log or print
        # the loop's own lines (labelling, fit) go to otf.log through OnTheFly.log, and to learn.log
        self.otf = OnTheFly(cfg, progress=progress, log=self.log)
        self.store = self.otf.store
        self.state_path = self.dir / "learn_state.json"
        self.state = self._load_state()
        self.stop = False
        self._exclusive_depth = 0     # exclusive() held (re-entrant)
        self._cycles = 0
        self._warned_shapes: set = set()
        if not (self.dir / "pool.h5").exists():   # a shipped run folder leaves the candidate pool out: rebuild it
            self.log("the candidate pool (pool.h5) is missing: generating it from the configuration's [terms]")
            self.otf.setup()
        self.prior_path = self.dir / "learn_prior.h5"
        if settings.freeze_prior and not self.prior_path.exists():   # the session's prior: the model it starts from
            save_model(load_model(self.dir / "model.h5"), self.prior_path)
        if self.state.get("decided_n_train") is None:   # the current model's training frames are the baseline
            current = load_model(self.dir / "model.h5")
            n = (current.metadata.get("otf") or {}).get("n_train")
            self.state["decided_n_train"] = int(n) if n is not None else self._labeled_train()
            self._save_state()
        for url in self.queues:
            if not is_postgres(url) and not Path(url).exists():
                self.log(f"queue {url} does not exist yet: created empty (the servers add to it)")
            with transaction(url) as db:    # creates the tables of a new queue; fails early on a bad URL
                db.count()

    # ------------------------------------------------------------------------------------------------ plumbing
    def log(self, msg: str):
        self._print(msg)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {msg}\n".encode()
        fd = os.open(self.dir / "learn.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _load_state(self) -> dict:
        import json
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"cycle": 0, "decided_n_train": None, "window": {}, "rate_marks": {}, "history": [],
                "started": time.time()}

    def _save_state(self):
        write_json(self.state_path, self.state)

    def _version(self) -> int:
        """The version a new publication gets: one above every version the run has written."""
        versions = [int(p.stem.split("_v")[-1]) for p in (self.dir / "models").glob("model_v*.h5")
                    if p.stem.split("_v")[-1].isdigit()]
        current = load_model(self.dir / "model.h5").version
        return max(versions + [int(current), int(self.otf.state.get("model_version", 0))]) + 1

    # ------------------------------------------------------------------------------------------------ budget
    def budget(self, mine: Optional[list] = None) -> int:
        """Frames that may go to labelling now: the batch, within the per-hour and total budgets (counted from the
        store: every frame the learner added, labelled or not; ``mine``: those rows, when the caller has them)."""
        s = self.settings
        n = int(s.batch)
        mine = self.store.rows(origin="learn") if mine is None else mine
        if s.labels_total is not None:
            n = min(n, int(s.labels_total) - len(mine))
        if s.labels_per_hour is not None:
            recent = sum(1 for r in mine if float(r.get("imported_at", 0.0)) > time.time() - 3600.0)
            n = min(n, int(math.floor(float(s.labels_per_hour))) - recent)
        return max(n, 0)

    # ------------------------------------------------------------------------------------------------ pull
    def _known_patterns(self, evaluator: Evaluator) -> tuple[Patterns, set]:
        patterns = Patterns(self.settings.dedup_displacement, self.settings.dedup_strain)
        sources = set()
        for r in self.store.rows():
            if r.get("source"):
                sources.add(str(r.get("source")))
            if r.get("state") == "excluded":
                continue
            try:
                a = r.toatoms()
                patterns.add(r.id, evaluator.mapper.map(a.cell.array, a.positions, a.numbers))
            except MappingError:
                continue
        return patterns, sources

    @staticmethod
    def _priority(row) -> tuple:
        entry = str(row.get("reason", "")).startswith("entry")
        f = row.get("err_force_max", float("nan"))
        e = row.get("err_local_energy_max_mev", float("nan"))
        f = -float(f) if f is not None and np.isfinite(f) else float("inf")
        e = -float(e) if e is not None and np.isfinite(e) else float("inf")
        return (not entry, f, e, row.id)

    def pull(self) -> PullCounts:
        """Step 1 of a cycle (see the module docstring)."""
        counts = PullCounts()
        model = load_model(self.dir / "model.h5")
        evaluator = Evaluator(model)
        patterns, sources = self._known_patterns(evaluator)
        mine = self.store.rows(origin="learn")
        budget = self.budget(mine)
        far = float(self.otf.config.md.label_max_displacement)
        n_learn = len(mine)
        for url in self.queues:
            qname = redact(url)
            with connect(url) as db:
                rows = sorted(db.select(state="pending"), key=self._priority)
            new, marks = [], []
            for row in rows:
                source = f"{qname}#{row.id}"
                if source in sources:          # written to the store before a stop: only its mark was missing
                    marks.append((row.id, "learned", {}))
                    continue
                small = int(row.get("natoms", 0)) <= self.settings.max_atoms
                if small and float(row.get("max_displacement", 0.0)) > far:   # labelled as it is: too far already
                    marks.append((row.id, "skipped", {"learn_note": f"an atom {row.get('max_displacement'):.2f} A "
                                                                    f"from its site (> {far} A)"}))
                    counts.received += 1
                    counts.skipped += 1
                    continue
                if budget <= 0:
                    counts.deferred += 1
                    continue
                counts.received += 1
                try:
                    atoms, meta = self._labellable(model, evaluator, row)
                    frame = evaluator.mapper.map(atoms.cell.array, atoms.positions, atoms.numbers)
                except (MappingError, ValueError) as exc:
                    self.log(f"  queue {qname} frame id={row.id}: cannot be used ({type(exc).__name__}: {exc}); "
                             "marked skipped")
                    marks.append((row.id, "skipped", {"learn_note": f"{type(exc).__name__}: {exc}"[:300]}))
                    counts.failed += 1
                    continue
                if frame.max_displacement > far:   # what would be labelled (the sub-cell of a big frame) is too far
                    marks.append((row.id, "skipped", {"learn_note": f"an atom {frame.max_displacement:.2f} A from "
                                                                    f"its site in the labelled cell (> {far} A)"}))
                    counts.skipped += 1
                    continue
                dup = patterns.duplicate_of(frame)
                if dup is not None:
                    marks.append((row.id, "duplicate", {"learn_note": f"repeats {dup}"}))
                    counts.duplicates += 1
                    continue
                patterns.add(f"{qname}#{row.id}", frame)
                n_learn += 1
                every = int(self.settings.validation_every)
                role = "validation" if every > 0 and n_learn % every == 0 else "train"
                meta.update(self._store_meta(role, source))
                new.append((atoms, meta))
                marks.append((row.id, "learned", {}))
                counts.added += 1
                counts.carved += int("carved" in meta)
                budget -= 1
            if new:   # first the store (one transaction), then the marks: see "Exactly once"
                self.store.add_many(new)
                sources |= {m["source"] for _, m in new}
            if marks:
                with transaction(url) as db:
                    for rid, state, kv in marks:
                        db.update(rid, state=state, learned_at=time.time(), **kv)
        return counts

    def _labellable(self, model, evaluator: Evaluator, row) -> tuple:
        """(Atoms, meta) of a queue row: the frame itself, or its sub-cell when it has more than max_atoms atoms."""
        atoms = row.toatoms()
        atoms.calc = None
        meta = {"reason": str(row.get("reason", "")), "model_version": int(row.get("model_version", 0)),
                "md_frame": int(row.get("frame", -1)), "bead": int(row.get("bead", 0))}
        for k in ("err_force_max", "err_local_energy_max_mev", "err_energy_mev_per_cell"):
            if row.get(k) is not None:
                meta[k] = float(row.get(k))
        if len(atoms) <= self.settings.max_atoms:
            return atoms, meta
        frame = evaluator.mapper.map(atoms.cell.array, atoms.positions, atoms.numbers)
        shape = carve_shape(model.natoms, frame.mesh, self.settings.max_atoms)
        if shape is None:
            raise ValueError(f"{len(atoms)} atoms and max_atoms {self.settings.max_atoms}: not even one cell fits")
        exact = exact_shape(model, frame.mesh)
        if any(m < e for m, e in zip(shape, exact)) and exact not in self._warned_shapes:
            self._warned_shapes.add(exact)
            self.log(f"  WARNING: sub-cells of {'x'.join(map(str, shape))} cells are smaller than the model's reach "
                     f"({'x'.join(map(str, exact))} cells, {model.natoms * int(np.prod(exact))} atoms): the centre "
                     "atoms do not see their whole environment; raise --max-atoms")
        if model.posterior is not None:   # around the atom of largest Bayesian force error
            carved = carve(model, atoms, shape, evaluator)
        else:   # no posterior (an imported model): around the atom farthest from its site
            d = frame.u.reshape(-1, 3) - frame.u.reshape(-1, 3).mean(axis=0)
            site = int(np.argmax((d ** 2).sum(axis=1)))
            carved = carve_frame(model, frame, shape, site)
            carved.error = float(np.sqrt((d[site] ** 2).sum()))
        meta.update(self._carved_meta(carved, len(atoms)))
        return carved.atoms, meta

    def _store_meta(self, role: str, source: str) -> dict:
        """The key-value pairs of a frame the learner adds to the run's store."""
        return {"role": role, "origin": "learn", "source": source, "imported_at": time.time(),
                "learn_cycle": int(self.state["cycle"]), "temperature": -1.0, "iteration": -1, "phase": ""}

    @staticmethod
    def _carved_meta(carved, natoms: int) -> dict:
        """The key-value pairs that say a stored frame is a sub-cell of a frame of ``natoms`` atoms."""
        return {"carved": f"{'x'.join(map(str, carved.shape))} of {natoms} atoms",
                "carved_centre_site": carved.centre_site, "carved_centre_error": carved.error}

    # ------------------------------------------------------------------------------------------------ rates
    def flag_rates(self) -> dict:
        """Flags written by the servers and MD time (progress rows x the queue's time step) since the last refit,
        in all and per queue: {"flags", "ps", "per_ps", "queues": {name: {"flags", "ps", "per_ps"}}, "mark"}; the
        marks move on at each refit (see _refit)."""
        marks = self.state.get("rate_marks", {})
        flags_all, ps_all, queues, mark = 0, 0.0, {}, {}
        for url, dt in zip(self.queues, self.timesteps):
            name = redact(url)
            with connect(url) as db:
                n_flags = db.count(FRAME_ROWS)
                steps = sum(float(r.get("md_steps", 0.0)) for r in db.select(state="progress"))
            m = marks.get(name, {"flags": 0, "steps": 0.0})
            flags, ps = n_flags - int(m["flags"]), (steps - float(m["steps"])) * dt / 1000.0
            queues[name] = {"flags": flags, "ps": ps, "per_ps": flags / ps if ps > 0 else float("nan")}
            mark[name] = {"flags": n_flags, "steps": steps}
            flags_all += flags
            ps_all += ps
        return {"flags": flags_all, "ps": ps_all, "per_ps": flags_all / ps_all if ps_all > 0 else float("nan"),
                "queues": queues, "mark": mark}

    # ------------------------------------------------------------------------------------------------ a cycle
    @contextlib.contextmanager
    def exclusive(self):
        """One learner per run folder and per queue: flocks on RUN/learn.lock and beside each SQLite queue
        (QUEUE.sp_learner.lock), an advisory lock on each PostgreSQL queue database, all released by the kernel or
        the database server when the process dies.  Re-entrant; a second learner fails after LEARNER_LOCK_WAIT_S
        with a LockTimeout naming the holder (pulling takes no row locks, so two learners would take a frame
        twice)."""
        if self._exclusive_depth:
            self._exclusive_depth += 1
            try:
                yield
            finally:
                self._exclusive_depth -= 1
            return
        with contextlib.ExitStack() as stack:
            what = "learner lock"
            stack.enter_context(file_lock(self.dir / "learn.lock", timeout=LEARNER_LOCK_WAIT_S,
                                          what=f"{what} of the run folder"))
            for url in self.queues:
                if is_postgres(url):
                    stack.enter_context(pg_lock(url, PG_LEARNER_LOCK_KEY, timeout=LEARNER_LOCK_WAIT_S,
                                                what=f"{what} of the queue"))
                else:
                    q = Path(url)
                    stack.enter_context(file_lock(q.with_name(q.name + ".sp_learner.lock"),
                                                  timeout=LEARNER_LOCK_WAIT_S, what=f"{what} of the queue"))
            self._exclusive_depth = 1
            try:
                yield
            finally:
                self._exclusive_depth = 0

    def cycle(self) -> CycleResult:
        """One pass: pull, label, refit when due (see the module docstring); holds the learner locks."""
        with self.exclusive():
            return self._cycle()

    def _cycle(self) -> CycleResult:
        result = CycleResult()
        t0 = time.monotonic()
        released = self.store.release_dead_claims()
        if released:
            self.log(f"  {released} claim(s) of a stopped labelling process returned to pending")
        result.pulled = self.pull()
        window = self.state.setdefault("window", {})
        for k, v in asdict(result.pulled).items():
            window[k] = int(window.get(k, 0)) + int(v)
        if result.pulled.received or result.pulled.deferred:
            p = result.pulled
            self.log(f"cycle {self.state['cycle']}: {p.received} flag(s) taken ({p.added} to label, {p.carved} carved,"
                     f" {p.duplicates} duplicate, {p.skipped} too far, {p.failed} unusable), {p.deferred} left "
                     "pending (budget)")
        before = self.store.counts()["labeled"]
        if self.store.counts()["pending"]:
            try:
                self.otf.label_stage()
            except RuntimeError as exc:     # frames still pending after the retries: they wait for the next cycle
                self.log(f"  {exc}")
        result.labeled = self.store.counts()["labeled"] - before
        window["labels"] = int(window.get("labels", 0)) + result.labeled
        self.state["cycle"] = int(self.state["cycle"]) + 1
        self._save_state()
        if self._refit_due(result):
            self._refit(t0, result)
        return result

    def _labeled_train(self) -> int:
        return int(self.store.counts(role="train")["labeled"])

    def _refit_due(self, result: CycleResult) -> bool:
        """New training labels since the last decision (counted in the store, so a stop anywhere loses none): at
        least min_labels, or any once a cycle could add nothing more (the queues ran dry or the budget is spent);
        or a refit that a stop interrupted."""
        if self.state.get("refit_interrupted", False):
            return True
        new = self._labeled_train() - int(self.state["decided_n_train"])
        return new >= self.settings.min_labels or (new > 0 and result.pulled.added == 0)

    def _refit(self, t0: float, result: CycleResult):
        self.state["refit_interrupted"] = True   # a stop before the decision is written redoes the refit
        self._save_state()
        otf = self.otf
        ts, report, harmonic, bounding, _ = otf.training_statistics()
        current = load_model(self.dir / "model.h5")
        meta = current.metadata.get("otf") or {}
        window = dict(self.state["window"])
        rates = self.flag_rates()
        before = otf.validation_rmse(current)
        if meta.get("n_train") == ts.n_structures:
            # already fitted and published on these very statistics (stopped after publishing, before the state)
            decision, version, after, model = "kept (already published)", int(current.version), before, current
        else:
            version = self._version()
            model, report, bounded, after, decision, escapes = self._fit_and_gate(ts, harmonic, bounding, version,
                                                                                  report, before)
            window["escape_labels"] = self._label_escapes(model, escapes)
            if decision == "published":
                model.metadata["otf"] = {"iteration": f"learn_c{self.state['cycle']:04d}", "n_train": ts.n_structures,
                                         "bounded": bounded}
                model.metadata["ready"] = bool(bounded) if bounded is not None else True
                model.metadata["learn"] = {"cycle": int(self.state["cycle"]), "labels": int(window.get("labels", 0)),
                                           "queues": [redact(q) for q in self.queues]}
                save_model(model, self.dir / "models" / f"model_v{version:03d}.h5")
                save_model(model, self.dir / "model.h5")   # atomic: every server hot-reloads it between two frames
                result.published = version
        result.refit = True
        record = {"cycle": int(self.state["cycle"]), "time": time.time(), "window": window,
                  "decision": decision, "version": version, "n_train": ts.n_structures,
                  "rmse_before": before, "rmse_after": after,
                  "flags": rates["flags"], "md_ps": rates["ps"], "flags_per_ps": rates["per_ps"],
                  "rates_by_queue": rates["queues"],
                  "refit_s": time.monotonic() - t0}
        self.log(self._line(record))
        self.state["history"] = self.state["history"] + [record]
        self.state["rate_marks"] = rates["mark"]
        self.state["window"] = {}
        self.state["decided_n_train"] = self._labeled_train()
        self.state["refit_interrupted"] = False
        self._save_state()

    def _fit_and_gate(self, ts, harmonic, bounding, version, report, before) -> tuple:
        """The candidate: the bounded fit, its decision, and the production gate (a candidate that runs away there
        is refitted once with the escape as constraints and gated again).  Returns (model, report, bounded,
        validation RMSE, decision, escapes of every hot MD that left the trusted range)."""
        otf = self.otf
        frozen = self._frozen(ts)
        kept = bool(self.settings.kept_cuts)
        model, report, check = otf.fit_model(ts, harmonic, bounding, version, report, frozen=frozen, kept_cuts=kept)
        bounded = check.bounded if check is not None else None
        escapes = list(check.details.get("escapes", [])) if check is not None else []
        after = otf.validation_rmse(model)
        decision = self._decide(bounded, before, after)
        if decision != "published" or self.settings.gate_steps <= 0:
            return model, report, bounded, after, decision, escapes
        ok, msg, escape = self.production_gate(model)
        if not ok and escape is not None and check is not None:
            # its escape becomes constraints of the refit (kept with kept_cuts), and the gate runs again
            escapes.append(escape)
            self.log(f"  production gate: {msg}; refitting with the escape as constraints")
            model, report, check = otf.fit_model(ts, harmonic, bounding, version, report, frozen=frozen,
                                                 extra_cuts=escape_rays(escape), kept_cuts=kept)
            bounded = check.bounded
            escapes += check.details.get("escapes", [])
            after = otf.validation_rmse(model)
            decision = self._decide(bounded, before, after)
            if decision == "published":
                ok, msg, escape = self.production_gate(model)
                escapes += [escape] if escape is not None else []
        self.log(f"  production gate: {msg}")
        if decision == "published" and not ok:
            decision = f"rejected (production gate: {msg})"
        return model, report, bounded, after, decision, escapes

    def _label_escapes(self, model, escapes) -> int:
        """Send states on the way out of the hot MDs that left the trusted range (each :class:`Escape`'s samples,
        carved to ``max_atoms`` around the atom of largest Bayesian force error whose sub-cell stays within the
        labelling range) to the store as training frames, at most ``escape_labels`` and the budget, one escape
        after the other; near-duplicates skipped.  They are labelled in the next cycle and join the next refit.
        Returns how many went."""
        n = min(int(self.settings.escape_labels), self.budget())
        if n <= 0 or not escapes or model.posterior is None:
            return 0
        far = float(self.otf.config.md.label_max_displacement)
        evaluator = Evaluator(model)
        patterns, _ = self._known_patterns(evaluator)
        order = [(k, j) for j in range(max(len(e.samples) for e in escapes)) for k in range(len(escapes))
                 if j < len(escapes[k].samples)]
        cycle = int(self.state["cycle"])
        new, skipped = [], 0
        for k, j in order:
            if len(new) >= n:
                break
            atoms = escapes[k].samples[-1 - j]       # the latest sample of each escape first
            shape = carve_shape(model.natoms, escapes[k].mesh, self.settings.max_atoms)   # the MD's own mesh
            try:
                carved = carve(model, atoms, shape, evaluator, max_displacement=far) if shape is not None else None
                if shape is not None and carved is None:
                    skipped += 1
                    continue
                cell = carved.atoms if carved is not None else atoms
                frame = evaluator.mapper.map(cell.cell.array, cell.positions, cell.numbers)
            except MappingError:
                skipped += 1
                continue
            if frame.max_displacement > far or patterns.duplicate_of(frame) is not None:
                skipped += 1
                continue
            source = f"escape:c{cycle}:{k}:{j}"
            patterns.add(source, frame)
            meta = dict(self._store_meta("train", source), reason="escape (hot MD)", model_version=int(model.version))
            if carved is not None:
                meta.update(self._carved_meta(carved, len(atoms)))
            new.append((cell, meta))
        if new:
            self.store.add_many(new)
        self.log(f"  {len(new)} state(s) on the way out of {len(escapes)} escape(s) of the hot MDs sent to labelling"
                 f" ({skipped} too far, duplicate or unmappable)")
        return len(new)

    def _frozen(self, ts) -> Optional[FrozenPrior]:
        """The session's prior (learn_prior.h5) for the refit, or None (``freeze_prior`` off; a prior model without
        posterior or with terms outside the pool, said in the log)."""
        if not self.settings.freeze_prior:
            return None
        prior = load_model(self.prior_path)
        try:
            return FrozenPrior.of_model(prior, ts.pool)
        except ValueError as exc:
            self.log(f"  the session's prior cannot be frozen ({exc}): terms re-selected, widths re-optimised")
            return None

    def production_states(self, model) -> list:
        """(name, Frame) per queue: its latest frame that the model maps and holds within the labelling range (the
        state a production MD is in now), cut to ``gate_max_cells`` cells around its most displaced atom."""
        far = float(self.otf.config.md.label_max_displacement)
        mapper = FrameMapper(model.reference)   # what an Evaluator maps with, without compiling the model's terms
        out = []
        for url in self.queues:
            with connect(url) as db:
                rows = list(db.select(FRAME_ROWS, sort="-id", limit=50))
            for row in rows:
                if str(row.get("reason", "")).startswith("untrusted") or \
                        float(row.get("max_displacement", 0.0)) > far:
                    continue
                try:
                    a = row.toatoms()
                    frame = mapper.map(a.cell.array, a.positions, a.numbers)
                except MappingError:
                    continue
                mesh = tuple(int(n) for n in frame.mesh)
                if int(np.prod(mesh)) > self.settings.gate_max_cells:
                    shape = carve_shape(1, mesh, int(self.settings.gate_max_cells))
                    d = frame.u.reshape(-1, 3) - frame.u.reshape(-1, 3).mean(axis=0)
                    carved = carve_frame(model, frame, shape, int(np.argmax((d ** 2).sum(axis=1))))
                    frame = mapper.map(carved.atoms.cell.array, carved.atoms.positions, carved.atoms.numbers)
                out.append((f"{redact(url)}#{row.id}", frame))
                break
        return out

    def production_gate(self, model) -> tuple:
        """(ok, message, escape): NPT MD of ``model`` (the boundedness check's soft Berendsen NPT, ``gate_steps``
        steps of 1 fs at ``gate_temperature``) from each queue's current production state
        (:meth:`production_states`); not ok when one leaves the trusted range (escape: its last frame inside, for
        the constrained fit).  A published version of 2026-12-04 passed the boundedness check (6x6x6, 800 K, 1000
        steps) and ran away 50 steps after a 10x10x10 NPT production run at 350 K reloaded it (docs/learn.md)."""
        temperature = self.settings.gate_temperature or 1.5 * max(self.otf.config.loop.temperatures)
        settings = BoundSettings(md_temperature=float(temperature), md_steps=int(self.settings.gate_steps),
                                 md_cell=True, seed=int(self.state["cycle"]))
        states = self.production_states(model)
        if not states:
            return True, "no production state in the queues yet: not run", None
        for name, frame in states:
            ok, msg, escape = hot_md(model, settings, start=frame, label=f"NPT MD from {name}")
            if not ok:
                return False, msg, escape
        return True, f"{len(states)} production state(s) held {self.settings.gate_steps} fs at {temperature:g} K " \
                     "(NPT)", None

    def _decide(self, bounded, before: dict, after: dict) -> str:
        if bounded is False:
            return "rejected (not bounded)"
        tol = 1.0 + float(self.settings.accept_tolerance)
        if before.get("n") and after.get("n"):
            worse = [f"{k} {after[k]:.4g} > {before[k]:.4g}" for k in ("energy_mev_per_cell", "forces", "stress_gpa")
                     if after[k] > tol * before[k]]
            if worse:
                return "rejected (worse on the validation frames: " + ", ".join(worse) + ")"
        return "published"

    @staticmethod
    def _line(r: dict) -> str:
        w = r["window"]

        def val(v):
            return (f"E {v['energy_mev_per_cell']:.2f} F {v['forces']:.3f} S {v['stress_gpa']:.3f}"
                    if v.get("n") else "-")
        rate = f"{r['flags_per_ps']:.2f}/ps over {r['md_ps']:.2f} ps" if np.isfinite(r["flags_per_ps"]) else \
            "- (no MD progress reported)"
        head = f"v{r['version']} {r['decision']}"
        return (f"refit: flags {r['flags']} received, {w.get('received', 0)} taken ({w.get('duplicates', 0)} "
                f"duplicate, {w.get('skipped', 0)} too far, {w.get('carved', 0)} carved), {w.get('labels', 0)} "
                f"labels, {w.get('escape_labels', 0)} escape state(s) sent to labelling; {head}; train "
                f"{r['n_train']}; val RMSE before {val(r['rmse_before'])} after "
                f"{val(r['rmse_after'])} (meV/cell, eV/A, GPa; n={r['rmse_after'].get('n', 0)}); flag rate {rate} "
                f"[{r['refit_s']:.1f} s]")

    # ------------------------------------------------------------------------------------------------ service
    def run(self, *, max_cycles: Optional[int] = None, idle_exit_s: Optional[float] = None) -> int:
        """Cycle until SIGTERM/SIGINT, ``max_cycles`` cycles or ``idle_exit_s`` seconds without a new frame or
        label; returns the number of cycles run."""
        def on_signal(signum, frame):
            self.log(f"signal {signum}: stopping after this step")
            self.stop = True
        import threading
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
        self.log(f"learning from {', '.join(redact(q) for q in self.queues)} into {self.dir} (model v"
                 f"{load_model(self.dir / 'model.h5').version}; max_atoms {self.settings.max_atoms}, budget "
                 f"{self.settings.labels_per_hour or 'no limit'}/h, {self.settings.labels_total or 'no limit'} "
                 "in all)")
        self._cycles = 0
        try:
            with self.exclusive():
                self._serve(max_cycles, idle_exit_s)
        except KeyboardInterrupt:
            self.log("interrupted: stopping (the same command continues)")
        return self._cycles

    def _serve(self, max_cycles, idle_exit_s) -> int:
        cycles = self._cycles = 0
        idle_since = time.monotonic()
        while not self.stop and (max_cycles is None or cycles < max_cycles):
            result = self.cycle()
            cycles = self._cycles = cycles + 1
            if result.pulled.received or result.labeled or result.refit:
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                self.log(f"no new frame for {idle_exit_s:g} s: stopping")
                break
            if max_cycles is not None and cycles >= max_cycles:
                break
            if not (result.pulled.deferred and self.budget() > 0):
                deadline = time.monotonic() + self.settings.poll_s
                while not self.stop and time.monotonic() < deadline:
                    time.sleep(min(0.2, self.settings.poll_s))
        return cycles
