"""The on-the-fly loop (paper's Fig. 8): harmonic part and phonon-derived training set from the oracle, then at each
temperature MD -> flag -> label -> refit until no frame is flagged, then the next temperature.

Everything lives in the run folder, and the store (``store.db``) is the only truth about frames:

    state.json        stage of the loop (setup | md | label | fit | done), temperature index, iteration, history
    store.db          every frame: role train | validation, origin, temperature, iteration, phase, state
    harmonic.h5       the harmonic model (reference + harmonic part, from the oracle)
    pool.h5           the candidate anharmonic terms (coefficients zero)
    stats.npz         the training statistics (Phi^T Phi, ...) and the store ids already in them
    bound_cuts.npz    the probe rays the boundedness checks found failing, kept as constraints for the next fits
    model.h5          the current model (the force server hot-reloads it); models/model_vN.h5 every version
    md/T..._it../     the i-PI runs of one iteration, their traces (Bayesian error of every frame), queue.db
    otf.log           one line per iteration;  report/  the figures (sp_server.otf.report)

Each stage is idempotent, and the state is written atomically after it: a run killed at any moment (kill -9
included) continues with ``sp-server otf CONFIG`` from the stage it was in; an interrupted MD is run again (its
flagged frames reach the store in one transaction, once), claims of dead labelling processes are released,
labelled frames are never labelled again.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import ase.io
import numpy as np
from tqdm import tqdm

from ..fit.bound import BoundSettings, bounding_coefficients, fit_bounded
from ..fit.probes import load_rays, save_rays
from ..fit.fit import (
    FitReport,
    QuantityScales,
    TrainingSet,
    add_structures,
    fingerprint,
    fit_training_set,
)
from ..fit.generate import generate_terms
from ..fit.harmonic import HarmonicSettings, harmonic_from_oracle, read_phonopy_born
from ..io.jsonfile import write_bytes, write_json
from ..model.model import Model
from ..model.native import load_model, save_model
from ..model.posterior import ErrorThreshold
from ..model.terms import AnharmonicPart
from ..oracles import isolated_oracle
from ..potential import Evaluator
from ..processes import die_with_parent, stop_process
from ..server.driver import read_trace
from ..server.queue import is_progress_row
from ..store import Store
from .config import OtfConfig
from .label import LabelChecks, owner_name, run_worker
from .md import MDJob, MDSettings, run_md, trajectory_tail
from .report import frame_pairs, parity_data, rmse, write_report
from .structures import (chain_backgrounds, cubic_perovskite, initial_structures, polar_backgrounds,
                         polar_structure)

STAGES = ("setup", "md", "label", "fit", "holdout", "done")


class OnTheFly:
    """The loop for one configuration.  ``run()`` goes on from wherever the run folder says it stopped."""

    def __init__(self, config: OtfConfig, *, progress: bool = True, log: Optional[Callable] = None):
        self.config = config
        self.dir = Path(config.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self._print = log or print
        self.store = Store(self.dir / "store.db", max_attempts=config.label.max_attempts)
        self.state_path = self.dir / "state.json"
        self.state = self._load_state()
        self._oracle = None
        self.threshold = ErrorThreshold.parse(config.loop.threshold)
        if config.path is not None and not (self.dir / "config.toml").exists():
            write_bytes(self.dir / "config.toml", Path(config.path).read_bytes())   # atomic: never half a copy

    # ------------------------------------------------------------------------------------------------ plumbing
    def log(self, msg: str):
        self._print(msg)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {msg}\n".encode()
        fd = os.open(self.dir / "otf.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(fd, line)   # one append: whole lines only, also when the disk fills up
        finally:
            os.close(fd)

    def _load_state(self) -> dict:
        if self.state_path.exists():
            with open(self.state_path) as fh:
                return json.load(fh)
        return {"stage": "setup", "t_index": -1, "iteration": 0, "model_version": 0, "history": [],
                "oracle_calls": 0, "md_steps": 0, "wall_s": 0.0}

    def _save_state(self, **changes):
        self.state.update(changes)
        write_json(self.state_path, self.state)

    @property
    def oracle(self):
        if self._oracle is None:
            self._oracle = isolated_oracle(self.config.oracle, self.config.oracle_options,
                                           self.config.label.call_timeout_s)
        return self._oracle

    def schedule(self) -> list:
        """[(temperature K, MD supercell)]: the ramp on [md] supercell, then [loop] final_temperatures on
        [loop] final_supercell (a larger cell finds local holes the small one cannot hold)."""
        cfg = self.config
        out = [(float(t), tuple(cfg.md.supercell)) for t in cfg.loop.temperatures]
        if cfg.loop.final_supercell:
            finals = cfg.loop.final_temperatures or [max(cfg.loop.temperatures)]
            out += [(float(t), tuple(cfg.loop.final_supercell)) for t in finals]
        return out

    @property
    def temperature(self) -> Optional[float]:
        t = self.state["t_index"]
        sched = self.schedule()
        return sched[t][0] if 0 <= t < len(sched) else None

    @property
    def md_supercell(self) -> tuple:
        t = self.state["t_index"]
        sched = self.schedule()
        return sched[t][1] if 0 <= t < len(sched) else tuple(self.config.md.supercell)

    def _iteration_key(self) -> str:
        if self.state["t_index"] < 0:
            return "initial"
        if self.temperature is None:
            return "done"
        mesh = self.md_supercell
        cell = "" if mesh == tuple(self.config.md.supercell) else "_" + "x".join(str(n) for n in mesh)
        return f"T{self.temperature:06.1f}{cell}_it{self.state['iteration']:02d}"

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self) -> Path:
        """Run (or continue) the loop to the end; returns the final model's path."""
        if self.state["stage"] == "done":
            if not (self.dir / "report" / "summary.md").exists():   # stopped while the report was written
                write_report(self.dir)
            self.log(f"already done: model {self.dir / 'model.h5'} (version {self.state['model_version']}); "
                     f"report {self.dir / 'report'} (sp-server otf CONFIG --report rewrites it)")
            return self.dir / "model.h5"
        t_start = time.monotonic()
        wall0 = float(self.state.get("wall_s", 0.0))
        released = self.store.release_dead_claims()
        if released:
            self.log(f"resumed: {released} claim(s) of a stopped labelling process returned to pending")
        if self.state["stage"] != "setup":
            self.log(f"resuming at stage {self.state['stage']} ({self._iteration_key()})")
        while self.state["stage"] != "done":
            stage = self.state["stage"]
            if stage == "setup":
                self.setup()
                self._save_state(stage="label")
            elif stage == "md":
                self.md_stage()
                self._save_state(stage="label")
            elif stage == "label":
                self.label_stage()
                self._save_state(stage="fit")
            elif stage == "fit":
                self.fit_stage()
            elif stage == "holdout":
                self.holdout_stage()
                self._save_state(stage="done")
            self._save_state(wall_s=wall0 + time.monotonic() - t_start)
        report = write_report(self.dir)
        self.log(f"done: model {self.dir / 'model.h5'} (version {self.state['model_version']}); report {report}")
        return self.dir / "model.h5"

    def bound_settings(self, harmonic: Model) -> BoundSettings:
        """The boundedness check of every fit, from ``[fit]``: hot MD (temperature, cell, steps), relaxations from the
        polar starts (and the polar-chain patterns with ``bound_chains``), pair walls, a top order positive by form."""
        f = self.config.fit
        hot = f.bound_temperature or max(300.0, 2.0 * max(self.config.loop.temperatures))
        backgrounds = polar_backgrounds(harmonic) + (chain_backgrounds(harmonic) if f.bound_chains else [])
        return BoundSettings(md_temperature=float(hot), backgrounds=tuple(backgrounds), md_cell=bool(f.bound_md_cell),
                             md_mesh=tuple(int(n) for n in f.bound_md_supercell), md_steps=int(f.bound_md_steps),
                             pair_wall=float(f.bound_pair_wall), relax_max_strain=float(f.bound_relax_strain),
                             top_order_positive=bool(f.bound_top_positive))

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self):
        cfg = self.config
        harmonic_path = self.dir / "harmonic.h5"
        if not harmonic_path.exists():
            if cfg.system.structure == "BaTiO3":
                atoms = cubic_perovskite(cfg.system.a)
            else:
                atoms = ase.io.read(cfg.system.structure)
            hs = HarmonicSettings(supercell=tuple(cfg.harmonic.supercell), displacement=cfg.harmonic.displacement,
                                  strain_step=cfg.harmonic.strain_step, relax_lattice=cfg.harmonic.relax_lattice)
            born = read_phonopy_born(cfg.harmonic.born, atoms) if cfg.harmonic.born else None
            self.log(f"harmonic part from the oracle {cfg.oracle} on a {hs.mesh()} supercell")
            for note in cfg.notes():
                self.log(f"  NOTE: {note}")
            # every call retried like a label, every result kept in harmonic_calls/: a stop or a failure here is
            # continued by the same command without repeating what was computed
            harmonic = harmonic_from_oracle(atoms, self.oracle, hs, born=born, name="otf",
                                            log=lambda m: self.log(f"  {m}"), attempts=cfg.label.max_attempts,
                                            cache_dir=self.dir / "harmonic_calls")
            save_model(harmonic, harmonic_path)
            calls = int(harmonic.metadata["n_oracle_calls"])
            self._save_state(harmonic_calls=calls, oracle_calls=calls)
        harmonic = load_model(harmonic_path)
        a0 = float(np.cbrt(harmonic.reference.volume))
        pool_path = self.dir / "pool.h5"
        if not pool_path.exists():
            t = cfg.terms
            gs = t.generator_settings(a0)
            pool = generate_terms(harmonic.reference, gs, progress=self.progress)
            bounding = bounding_coefficients(harmonic)
            self.log(f"{len(pool)} candidate terms (cutoff {gs.cutoff:.3f} A = {t.cutoff_factor} a0) + "
                     f"{len(bounding)} bounding terms (fitted under the boundedness constraints)")
            pool = pool + bounding
            save_model(Model(harmonic.reference, harmonic.harmonic, AnharmonicPart(pool, np.zeros(len(pool))),
                             name="pool", metadata={"generator": asdict(gs), "n_bounding": len(bounding)}),
                       pool_path)
        if not self.store.has_run("initial"):
            ini = cfg.initial
            mesh = tuple(cfg.md.supercell)
            frames = initial_structures(harmonic, mesh, ini.amplitudes, ini.modes_per_q * int(np.prod(mesh)),
                                        ini.strains, ini.mixed, ini.seed, polar_amplitudes=ini.polar_amplitudes,
                                        rattled=ini.rattled, rattle_amplitudes=ini.rattle_amplitudes,
                                        polar_strains=ini.polar_strains,
                                        polar_strain_amplitudes=ini.polar_strain_amplitudes,
                                        chain_amplitudes=ini.chain_amplitudes)
            # a few of them (every 8th) are kept for validation only
            rows = [(atoms, dict(meta, role="validation" if k % 8 == 7 else "train", temperature=0.0,
                                 iteration=-1, phase="")) for k, (atoms, meta) in enumerate(frames)]
            self.store.add_many(rows, run="initial")
            self.log(f"initial set: {len(rows)} phonon-derived structures (frozen phonons of the "
                     f"{ini.modes_per_q * int(np.prod(mesh))} lowest modes at the commensurate q of {mesh}, the soft "
                     f"mode along 111/110/001, strains, mixtures, {ini.rattled} rattled"
                     f"{', polar cells strained' if ini.polar_strains else ''}"
                     f"{', polar-chain phases' if ini.chain_amplitudes else ''}) queued for labelling")

    # ------------------------------------------------------------------------------------------------ MD
    def md_stage(self):
        cfg = self.config
        key = self._iteration_key()
        folder = self.dir / "md" / key
        if self.store.has_run(key):
            # this MD finished and its frames are in the store: nothing to redo, but its record may not have reached
            # the state (stopped in between): take it from summary.json, written before the frames
            if (self.state.get("pending_record") or {}).get("key") != key:
                record = json.loads((folder / "summary.json").read_text())
                self._save_state(md_steps=self.state["md_steps"] + int(record["md_steps"]), pending_record=record)
            return

        if folder.exists():  # an interrupted run of this MD: start it again from scratch
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        model = load_model(self.dir / "model.h5")
        mesh = self.md_supercell
        T = self.temperature
        jobs = [MDJob(ph, polar_structure(model, mesh, ph, cfg.md.polar_displacement), folder / ph, T,
                      int(cfg.md.steps), seed=1000 * self.state["t_index"] + 10 * self.state["iteration"] + k + 1)
                for k, ph in enumerate(cfg.md.phases)]
        settings = MDSettings(cfg.md.timestep_fs, cfg.md.pressure_gpa, cfg.md.thermostat_tau_fs,
                              cfg.md.barostat_tau_fs, cfg.md.trajectory_stride, cfg.md.timeout_s,
                              cfg.md.excursion_frames)
        threshold = self._current_threshold()
        total = len(jobs) * (int(cfg.md.steps) + 1)
        bar = tqdm(total=total, desc=f"MD {T:g} K it {self.state['iteration']}", unit="step",
                   disable=not self.progress, file=sys.stderr)

        def progress(n):
            bar.update(n - bar.n)
        try:
            outcomes = run_md(self.dir / "model.h5", jobs, str(folder / "queue.db"), threshold, settings, progress)
        finally:
            bar.close()
        for o in outcomes:
            if o.status != "done":
                self.log(f"  MD {o.name} at {T:g} K: {o.status} after {o.frames} frames {o.message}".rstrip())
        # flagged frames: the largest errors first, at most the cap; untrusted frames always
        rows = [] if not (folder / "queue.db").exists() else [r for r in Store(folder / "queue.db").rows()
                                                               if not is_progress_row(r)]
        q = f"err_{threshold.quantity}"
        # untrusted frames (far outside the data: exploded MD) are not labelled; the frame where each such
        # excursion began is, first; then the local maxima with the largest errors, up to the cap
        # frames with an atom more than [md] label_max_displacement from its site are not labelled either: a
        # Taylor expansion has no business there, and one such frame can spoil the fit of all the others
        untrusted = [r for r in rows if str(r.get("reason", "")).startswith("untrusted")]
        near = [r for r in rows if float(r.get("max_displacement", 0.0)) <= cfg.md.label_max_displacement]
        firsts = [r for r in near if str(r.get("reason", "")).startswith("entry: entry")]
        along = [r for r in near if str(r.get("reason", "")).startswith("entry: along")]
        maxima = sorted((r for r in near if str(r.get("reason", "")).startswith("local maximum")),
                        key=lambda r: -float(r.get(q, 0.0)))
        chosen = (firsts + along + maxima)[: cfg.loop.max_labels_per_iteration]
        phases = {k: j.name for k, j in enumerate(jobs)}
        new = []
        for r in chosen:
            meta = {"role": "train", "origin": "md", "temperature": T, "iteration": self.state["iteration"],
                    "phase": phases.get(int(r.get("connection", -1)), ""), "md_frame": int(r.get("frame", -1)),
                    "reason": str(r.get("reason", "")), "model_version": int(r.get("model_version", 0)),
                    q: float(r.get(q, np.nan))}
            new.append((r.toatoms(), meta))
        # validation frames: random frames of the second half of each trajectory that ran to the end (one that
        # left the trusted range is not the equilibrium ensemble), never trained on
        rng = np.random.default_rng(7919 * (self.state["t_index"] + 1) + self.state["iteration"])
        for job, outcome in zip(jobs, outcomes):
            if cfg.loop.validation_per_md <= 0 or outcome.status != "done":
                continue
            late = trajectory_tail(job.directory / "md.pos_0.extxyz", self.log)
            for idx in rng.choice(len(late), size=min(cfg.loop.validation_per_md, len(late)), replace=False):
                atoms = late[int(idx)]
                atoms.calc = None
                new.append((atoms, {"role": "validation", "origin": "md", "temperature": T,
                                    "iteration": self.state["iteration"], "phase": job.name}))
        # a frame already in the store (e.g. the starting structure, flagged again) is not added twice
        known = {fingerprint(r.toatoms(), 5) for r in self.store.rows()}
        unique = []
        for atoms, meta in new:
            fp = fingerprint(atoms, 5)
            if fp not in known:
                known.add(fp)
                unique.append((atoms, meta))
        new = unique
        # the traces: max error and steps of this iteration
        max_err, steps = self._trace_summary(folder)
        n_flag = len(chosen)
        record = {"key": key, "temperature": T, "supercell": list(mesh), "iteration": self.state["iteration"],
                  "flagged": len(rows),
                  "selected": n_flag, "untrusted": len(untrusted), "max_error": max_err, "md_steps": steps,
                  "md_status": {o.name: o.status for o in outcomes}}
        # one transaction, once (a restart after this point finds the run in the store; an empty batch is simply
        # redone: it added nothing)
        # the record first (summary.json), then the frames in one transaction, once, then the state: a stop between
        # any two of these (kill -9, a full disk) is picked up by the next start (see the top of md_stage)
        write_json(folder / "summary.json", record)
        self.store.add_many(new, run=key)
        self._save_state(md_steps=self.state["md_steps"] + steps, pending_record=record)

    def holdout_stage(self):
        """The held-out set: ``[loop] holdout_frames`` frames of the last MD at the highest temperature (second
        halves of the trajectories that ran to the end, with the final model), labelled as validation frames
        (origin "holdout") and never trained on; the report's held-out RMSE is computed on them."""
        n = int(self.config.loop.holdout_frames)
        if n > 0 and not self.store.has_run("holdout"):
            top = max(float(t) for t in self.config.loop.temperatures)
            last = next((r for r in reversed(self.state["history"]) if r.get("temperature") == top), None)
            frames = []
            if last is not None:
                for phase, status in (last.get("md_status") or {}).items():
                    if status == "done":
                        late = trajectory_tail(self.dir / "md" / last["key"] / phase / "md.pos_0.extxyz",
                                               self.log)
                        frames += [(phase, a) for a in late]
            # not the frames already labelled as that MD's validation frames
            known = {fingerprint(r.toatoms(), 5) for r in self.store.rows(temperature=top)}
            frames = [(ph, a) for ph, a in frames if fingerprint(a, 5) not in known]
            picks = np.unique(np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)) \
                if frames else []
            rows = []
            for k in picks:
                phase, atoms = frames[int(k)]
                atoms.calc = None
                rows.append((atoms, {"role": "validation", "origin": "holdout", "temperature": top,
                                     "iteration": -1, "phase": phase}))
            self.store.add_many(rows, run="holdout")
            self.log(f"held-out set: {len(rows)} frame(s) of the last {top:g} K MD ({last['key'] if last else '-'}) "
                     "queued for labelling, never trained on")
        self.label_stage()

    def _trace_summary(self, folder: Path) -> tuple[float, int]:
        q = self.threshold.quantity
        max_err, steps = 0.0, 0
        for trace in sorted((folder / "traces").glob("trace_*.csv")) if (folder / "traces").exists() else []:
            data = read_trace(trace)
            if data.size == 0:
                continue
            steps += int(data.size)
            values = data[f"err_{q}"]
            if np.any(np.isfinite(values)):
                max_err = max(max_err, float(np.nanmax(values)))
        return max_err, steps

    def _current_threshold(self) -> ErrorThreshold:
        mode = self.config.loop.threshold_mode
        if mode == "absolute":
            return self.threshold
        if mode == "calibrated":
            c = float((self.state.get("error_calibration") or {}).get("factor", 1.0))
            return ErrorThreshold(self.threshold.quantity, self.threshold.value / c)
        rel = float(self.state.get("training_median_error", 0.0))
        return ErrorThreshold(self.threshold.quantity, self.threshold.value * rel)

    # ------------------------------------------------------------------------------------------------ labelling
    def label_stage(self):
        cfg = self.config
        pending = self.store.counts()["pending"]
        if pending == 0:
            return
        t0 = time.monotonic()
        before = self.store.counts()["labeled"]
        # a labelling process that dies mid-call (MPI takes its sibling ranks with it) leaves claims behind: they
        # go back to pending (the attempt counts) and the workers are started again, while that makes progress
        for _ in range(cfg.label.max_attempts + 1):
            if cfg.label.workers > 1:
                self._label_mpi()
            else:
                run_worker(self.store, self.oracle, owner=owner_name("otf"),
                           checks=LabelChecks(max_force=cfg.label.max_force), lease_seconds=cfg.label.lease_s,
                           progress=self.progress, log=lambda m: self.log(f"  {m}"))
            released = self._release_after_workers()
            if released:
                self.log(f"  {released} claim(s) of a labelling process that died mid-call returned to pending")
            counts = self.store.counts()
            if not counts["pending"] and not counts["claimed"]:
                break
        counts = self.store.counts()
        labeled = counts["labeled"] - before
        # oracle calls: the harmonic part's + one per labelled or failed frame in the store (so a labelling process
        # killed half-way is counted right on resume)
        self._save_state(oracle_calls=int(self.state.get("harmonic_calls", 0)) + counts["labeled"] + counts["failed"])
        self.log(f"  labelled {labeled} frame(s) in {time.monotonic() - t0:.1f} s with {cfg.oracle}; "
                 f"{counts['failed']} failed in all, {counts['pending']} pending")
        if counts["pending"] or counts["claimed"]:
            raise RuntimeError(f"{counts['pending']} frame(s) are still pending and {counts['claimed']} claimed after "
                               "labelling (see otf.log); run sp-server otf again to retry them")

    def _release_after_workers(self, wait_s: float = 30.0) -> int:
        """The labelling processes have returned: claims of this host left behind belong to ranks that died or are
        dying (MPI ends a crashed rank's siblings asynchronously).  Release them, waiting up to ``wait_s`` for the
        last ranks to go (a claim must not be mistaken for live work and left claimed)."""
        released = self.store.release_dead_claims()
        deadline = time.monotonic() + wait_s
        while self.store.claimed_by_this_host() and time.monotonic() < deadline:
            time.sleep(0.2)
            released += self.store.release_dead_claims()
        return released

    def _label_mpi(self):
        cfg = self.config
        if cfg.path is None:
            raise ValueError("[label] workers > 1 needs the configuration file (its [oracle] table)")
        cmd = [cfg.label.mpiexec, "-n", str(cfg.label.workers), sys.executable, "-m", "sp_server.cli.main",
               "label", str(self.dir / "store.db"), "--oracle", cfg.oracle, "--oracle-config", str(cfg.path),
               "--max-force", str(cfg.label.max_force), "--max-attempts", str(cfg.label.max_attempts),
               "--lease", str(cfg.label.lease_s), "--call-timeout", str(cfg.label.call_timeout_s)]
        if not self.progress:
            cmd.append("--no-progress")
        self.log("  " + " ".join(cmd))
        # mpiexec gets SIGTERM if the loop dies (even by SIGKILL) and takes its ranks with it
        proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)
        try:
            proc.wait()
        finally:
            stop_process(proc)

    # ------------------------------------------------------------------------------------------------ refit
    def training_statistics(self) -> tuple:
        """(TrainingSet, FitReport, harmonic model, bounding term indices, number of frames added now): the run's
        sufficient statistics (stats.npz) brought up to date with every labelled training frame of the store not yet in them (an unusable
        frame is excluded in the store, with its reason).  Idempotent: the statistics record the store ids they
        hold, and are written atomically."""
        cfg = self.config
        harmonic = load_model(self.dir / "harmonic.h5")
        pool_model = load_model(self.dir / "pool.h5")
        pool = pool_model.anharmonic.coefficients
        n_bound = int(pool_model.metadata.get("n_bounding", 0))
        bounding = list(range(len(pool) - n_bound, len(pool)))
        ts = TrainingSet(harmonic, pool, QuantityScales(cfg.fit.energy_scale, cfg.fit.force_scale,
                                                         cfg.fit.stress_scale))
        stats_path = self.dir / "stats.npz"
        ids = set()
        if stats_path.exists():
            ids = set(int(i) for i in ts.load(stats_path).get("ids", []))
        rows = [r for r in self.store.rows(state="labeled", role="train") if r.id not in ids]
        report = FitReport()
        if rows:
            structures = [(f"store id={r.id}", r.toatoms()) for r in rows]
            add_structures(ts, structures, report, progress=self.progress, log=lambda m: self.log(f"  {m}"))
            for label, reason in report.skipped:  # an unusable frame is taken out for good, with its reason
                self.store.exclude(int(label.split("=")[1]), f"not usable for the fit: {reason}")
            ids |= {r.id for r in rows}
            ts.save(stats_path, ids=np.array(sorted(ids), dtype=int))
        return ts, report, harmonic, bounding, len(rows)

    def fit_model(self, ts, harmonic, bounding, version: int, report, frozen=None, extra_cuts=(),
                  kept_cuts: bool = True) -> tuple:
        """(model, report, check): the fit of the statistics ``ts`` as model ``version`` (bounded under
        constraints with ``[fit] bound``, the probe rays found failing kept in bound_cuts.npz for the next fits;
        check: its :class:`sp_server.fit.bound.BoundReport`, with the hot MDs' escapes of every round in
        ``details["escapes"]``; None without ``bound``).  Nothing is published here.  frozen: a
        :class:`sp_server.fit.bayes.FrozenPrior` (terms, scales and widths held; sp_server.otf.learn);
        extra_cuts: more rays for the constrained fit (kept with the others).  kept_cuts False: the fit starts
        from its probes and ``extra_cuts`` alone, and bound_cuts.npz is neither read nor written."""
        cfg = self.config
        if not cfg.fit.bound:
            if frozen is not None:
                model, report = fit_training_set(ts, harmonic, frozen=frozen, name="otf", report=report,
                                                 version=version)
            else:
                model, report = fit_training_set(ts, harmonic, select=cfg.terms.select,
                                                 select_by=cfg.terms.select_by, name="otf", report=report,
                                                 version=version, fixed={j: 0.0 for j in bounding})
            return model, report, None
        cuts_path = self.dir / "bound_cuts.npz"
        try:
            cuts = load_rays(cuts_path) if kept_cuts and cuts_path.exists() else []
        except ValueError as exc:   # a damaged file only costs the rounds that find them again
            self.log(f"  {exc}; the constrained fit starts from its probes alone")
            cuts = []
        cuts = list(cuts) + list(extra_cuts)
        model, report, bound = fit_bounded(ts, harmonic, select=cfg.terms.select, select_by=cfg.terms.select_by,
                                           bounding=bounding, name="otf", cuts=cuts, frozen=frozen,
                                           version=version, report=report, log=lambda m: self.log(f"  {m}"),
                                           settings=self.bound_settings(harmonic))
        found = bound.details.get("cuts", [])
        if kept_cuts and (len(found) != len(cuts) or any(a is not b for a, b in zip(found, cuts))):
            save_rays(cuts_path, found)
        return model, report, bound

    def fit_stage(self):
        cfg = self.config
        t0 = time.monotonic()
        ts, report, harmonic, bounding, n_new = self.training_statistics()
        version = self.state["model_version"] + 1
        bounded = None
        current = self.dir / "model.h5"
        kept = load_model(current) if not n_new and self.state["model_version"] > 0 and current.exists() else None
        if kept is not None and (kept.metadata.get("otf") or {}).get("n_train") == ts.n_structures:
            # nothing new to fit (the model was fitted on these very statistics; a stop between the statistics and
            # the model refits): the fit is deterministic, so the model is kept instead of being refitted and
            # checked again
            model = kept
            version = int(model.version)
            report.rmse = dict(model.metadata.get("fit", {}).get("rmse_train", {}))
            report.sigma_v = model.posterior.sigma_v if model.posterior is not None else float("nan")
            self.log(f"  no new labels: model v{version} kept")
        else:
            model, report, check = self.fit_model(ts, harmonic, bounding, version, report)
            bounded = check.bounded if check is not None else None
        if version != self.state["model_version"]:
            model.metadata["otf"] = {"iteration": self._iteration_key(), "n_train": ts.n_structures,
                                     "bounded": bounded}
            model.metadata["ready"] = bool(bounded) if bounded is not None else True
            save_model(model, self.dir / "models" / f"model_v{version:03d}.h5")
            save_model(model, self.dir / "model.h5")  # atomic: the server hot-reloads it
        val = self.validation_rmse(model)
        extra = {}
        if cfg.loop.threshold_mode == "relative":
            extra["training_median_error"] = self._training_median_error(model)
        if cfg.loop.threshold_mode == "calibrated":
            extra["error_calibration"] = self.error_calibration(model)
        record = dict(self.state.pop("pending_record", None) or {"key": self._iteration_key(), "flagged": None})
        record.update({"model_version": version, "n_train": ts.n_structures, "n_selected": len(model.anharmonic),
                       "rmse_train": report.rmse, "rmse_validation": val, "sigma_v": report.sigma_v,
                       "labels": self.store.counts(role="train")["labeled"], "fit_s": time.monotonic() - t0,
                       "oracle_calls": self.state["oracle_calls"], "md_steps_total": self.state["md_steps"]})
        if "error_calibration" in extra:
            record["error_calibration"] = extra["error_calibration"]
        history = self.state["history"] + [record]
        self.log(self._line(record))
        # what next: repeat this temperature while its MD flags frames (even if none of them could be labelled:
        # an MD that left the trusted range has not converged), up to the cap; else the next temperature
        t_index, it = self.state["t_index"], self.state["iteration"]
        if t_index < 0:
            t_index, it = 0, 0
        elif record.get("flagged") and it + 1 < cfg.loop.max_iterations_per_temperature:
            it += 1
        else:
            if record.get("flagged"):
                self.log(f"  {self.temperature:g} K: still {record['flagged']} flagged frame(s) after "
                         f"{it + 1} iterations (max_iterations_per_temperature); going on to the next temperature")
            t_index, it = t_index + 1, 0
        stage = "holdout" if t_index >= len(self.schedule()) else "md"
        self._save_state(stage=stage, t_index=t_index, iteration=it, model_version=version, history=history,
                         **extra)

    def _line(self, r: dict) -> str:
        val = r.get("rmse_validation") or {}
        v = (f"val RMSE E {val['energy_mev_per_cell']:.2f} meV/cell F {val['forces']:.3f} eV/A S "
             f"{val['stress_gpa']:.3f} GPa (n={val['n']})") if val.get("n") else "val RMSE -"
        if r["key"] == "initial":
            head = "initial fit        "
        else:
            head = f"T {r['temperature']:6.1f} K  it {r['iteration']:2d}"
        flagged = "" if r.get("flagged") is None else (
            f"flagged {r['flagged']:3d} (labelled {r['selected']:3d})  max err {self.threshold.quantity} "
            f"{r['max_error']:.3f}  ")
        cal = r.get("error_calibration")
        cal = f"  real/Bayesian x{cal['factor']:.3g} (n={cal['n']})" if cal else ""
        return (f"{head}  {flagged}train {r['n_train']:4d}  {v}{cal}  model v{r['model_version']}  "
                f"[{r['fit_s']:.1f} s fit]")

    def validation_rmse(self, model: Model) -> dict:
        """RMSE on the labelled validation frames: energy meV per reference cell (after removing nothing: the
        reference energy is the oracle's), forces eV/A, stress GPa; n = number of frames."""
        val = parity_data(self.store, model, log=self.log, role="validation").get("validation")
        if val is None:
            return {"n": 0}
        return {"n": len(val["energy"]), "energy_mev_per_cell": rmse(val["energy"]), "forces": rmse(val["forces"]),
                "stress_gpa": rmse(val["stress"])}

    def error_calibration(self, model: Model) -> dict:
        """How much larger the real error is than the Bayesian one, on the validation frames (never trained on;
        the final held-out set excluded): factor = median over frames of real / Bayesian for the threshold's
        quantity (largest force-component error, eV/A; energy, meV per cell; largest stress component, GPa),
        at least 1 and at most 1e3.  A calibrated threshold divides the Bayesian one by it, so that the MD flags
        frames whose *real* error is likely above the threshold.  Returns {"factor", "n", "quantity"}."""
        q = self.threshold.quantity
        ev = Evaluator(model)
        ratios = []
        for r in self.store.rows(state="labeled", role="validation"):
            if r.get("origin") == "holdout":
                continue
            try:
                e, f, s, res = frame_pairs(ev, r.toatoms(), errors=True)
            except ValueError:
                continue
            if q == "force_max":
                real = float(np.abs(f[:, 1] - f[:, 0]).max())
            elif q == "energy_mev_per_cell":
                real = float(abs(e[1] - e[0]))
            else:
                if s is None:
                    continue
                real = float(np.abs(s[:, 1] - s[:, 0]).max())
            bayes = float(res.errors[q])
            if np.isfinite(real) and np.isfinite(bayes) and bayes > 0:
                ratios.append(real / bayes)
        factor = float(np.clip(np.median(ratios), 1.0, 1e3)) if ratios else 1.0
        return {"factor": factor, "n": len(ratios), "quantity": q}

    def _training_median_error(self, model: Model) -> float:
        ev = Evaluator(model)
        q = self.threshold.quantity
        values = []
        for r in self.store.rows(state="labeled", role="train"):
            atoms = r.toatoms()
            try:
                values.append(ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, errors=True).errors[q])
            except ValueError:
                continue
        return float(np.median(values)) if values else 0.0
