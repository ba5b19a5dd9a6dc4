#!/usr/bin/env python
"""Learning during production with real engines: i-PI NPT on a 10x10x10 cell and i-PI PIMD (4 beads) on a 6x6x6
cell, each driven by its own `sp-server serve RUN/model.h5 --queue`, and `sp-server learn` with the oracle beside
them; the commands a user would type, as subprocesses.

    python tools/learn_production.py --run models/BaTiO3_chgnet/run --work /tmp/prod

1. copies the run folder (the shipped model's) to WORK/run and prepares it (candidate pool, sufficient statistics);
2. equilibration (--equilibrate steps of each MD, with the shipped model and `serve --trace`, no queue): the
   flagging threshold of each run is the --quantile of the largest local energy error of the frames of its last
   two thirds (err_local_energy_max_mev, every 10th frame);
3. production from the equilibrated states (i-PI's RESTART: beads, momenta, cell, thermostat; see
   sp_server.otf.md.continue_ipi_input): both MDs, both servers (--error-stride 10, --threshold
   local_energy_max_mev=V, one queue each), and `sp-server learn WORK/run --queue npt.db --queue pimd.db` with the
   oracle, until both MDs end;
4. held-out frames of these runs (random 3x3x3 sub-cells of trajectory frames, never labelled by the learner),
   labelled by the oracle: RMSE of the first and of the last model;
5. writes WORK/summary.json and prints the flag rate per ps in windows of MD time, per model version.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np

from sp_server.model.native import load_model
from sp_server.otf.carve import carve_frame
from sp_server.otf.learn import Learner, LearnSettings
from sp_server.otf.md import MDJob, MDSettings, continue_ipi_input, ipi_executable, write_ipi_input
from sp_server.otf.structures import polar_structure
from sp_server.potential import Evaluator
from sp_server.server.driver import read_trace, version_switches
from sp_server.server.queue import FRAME_ROWS
from sp_server.store.db import connect
from sp_server.threads import engine_environment


def sp_server(*args) -> list:
    return [sys.executable, "-m", "sp_server.cli.main", *map(str, args)]


class MD:
    """One engine + its server, started as subprocesses."""

    def __init__(self, name, folder: Path, model_path: Path, atoms, *, temperature, steps, timestep_fs, seed,
                 beads=1, queue=None, threshold=None, trace=False, stride=50, restart=None):
        self.name = name
        self.folder = folder
        self.address = f"sp{name}{os.getpid() % 10000}"
        self.steps = steps
        self.first_step = 0
        if restart is not None:
            import xml.etree.ElementTree as ET
            self.first_step = int(ET.parse(restart).getroot().findtext("step", "0"))
        folder.mkdir(parents=True, exist_ok=True)
        if restart is None:
            write_ipi_input(MDJob(name, atoms, folder, temperature, steps, seed, beads), self.address,
                            MDSettings(timestep_fs=timestep_fs, trajectory_stride=stride))
        else:   # go on from an equilibrated state
            continue_ipi_input(restart, folder, self.address, steps, stride=stride)
        Path(f"/tmp/ipi_{self.address}").unlink(missing_ok=True)
        self.ipi = subprocess.Popen([ipi_executable(), "input.xml"], cwd=folder, stdout=open(folder / "ipi.log", "w"),
                                    stderr=subprocess.STDOUT, env=engine_environment())
        cmd = sp_server("serve", model_path, "--address", self.address, "--unix", "--connections", beads,
                        "--wait", 300, "--error-stride", 10, "--log", folder / "serve.log")
        if queue is not None:
            cmd += ["--queue", queue]
        if threshold is not None:
            cmd += ["--threshold", threshold]
        if trace:
            cmd += ["--trace", folder / "traces"]
        self.server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait(self, timeout):
        """(i-PI exit code, server exit code); an i-PI left waiting for a client 120 s after its server ended (the
        server closed the connection on a frame it could not map) is stopped: that run did not finish."""
        deadline = time.monotonic() + timeout
        server_gone = None
        while self.ipi.poll() is None and time.monotonic() < deadline:
            if self.server.poll() is not None:
                server_gone = server_gone or time.monotonic()
                if time.monotonic() - server_gone > 120:
                    print(f"{self.name}: the server ended (exit {self.server.returncode}) and i-PI waits for a "
                          "client: stopping i-PI", flush=True)
                    self.ipi.terminate()
                    break
            time.sleep(2)
        rc_ipi = self.ipi.wait(60)
        try:
            rc_srv = self.server.wait(120)
        except subprocess.TimeoutExpired:
            self.server.terminate()
            rc_srv = self.server.wait(60)
        return rc_ipi, rc_srv

    def last_step(self) -> int:
        """Steps this run made (i-PI counts on from a restart's step)."""
        out = self.folder / "md.out"
        rows = [ln.split() for ln in out.read_text().splitlines() if ln.strip() and not ln.startswith("#")] \
            if out.exists() else []
        return int(float(rows[-1][0])) - self.first_step if rows else -1


def threshold_from_traces(folder: Path, quantile: float) -> float:
    values = []
    for trace in sorted((folder / "traces").glob("trace_*.csv")):
        data = read_trace(trace)
        v = data["err_local_energy_max_mev"]
        values += list(v[len(v) // 3:][np.isfinite(v[len(v) // 3:])])
    return float(np.quantile(values, quantile))


def heldout(model_paths: dict, frames: list, oracle) -> dict:
    """RMSE (energy meV per reference cell, forces eV/A, stress GPa) of each model on the labelled frames."""
    from sp_server.otf.report import frame_pairs
    labelled = []
    for atoms in frames:
        a = atoms.copy()
        a.calc = oracle
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        from ase.calculators.singlepoint import SinglePointCalculator
        b = atoms.copy()
        b.calc = SinglePointCalculator(b, energy=e, forces=f, stress=s)
        labelled.append(b)
    out = {}
    for name, path in model_paths.items():
        ev = Evaluator(load_model(path))
        E, F, S = [], [], []
        for a in labelled:
            e, f, s, _ = frame_pairs(ev, a)
            E.append(e)
            F.append(f)
            S.append(s)
        E, F, S = np.array(E), np.concatenate(F), np.array(S)
        out[name] = {"energy_mev_per_cell": float(np.sqrt(np.mean((E[:, 0] - E[:, 1]) ** 2))),
                     "forces": float(np.sqrt(np.mean((F[:, 0] - F[:, 1]) ** 2))),
                     "stress_gpa": float(np.sqrt(np.mean((S[..., 0] - S[..., 1]) ** 2))), "n": len(labelled)}
    return out


def flag_windows(url, steps_per_window: int, steps: int, log=None) -> list:
    """[(first step, last step, flags, model versions served)] over the whole run (``steps`` MD steps), from its
    queue rows and, for the versions, the server's log (else the versions of the flagged rows).  A server's frame
    index counts the frames of one connection, i.e. MD steps, also for the beads of a path-integral run, one
    connection each."""
    with connect(url) as db:
        rows = [(int(r.frame), int(r.model_version)) for r in db.select(FRAME_ROWS)]
    switches = []    # [(frame, version)] of connection 0, from the server's log
    if log is not None and Path(log).exists():
        with open(log) as fh:
            switches = version_switches(fh)
    first = min((v for _, v in rows), default=None)   # the version served from the start
    n = max(1, -(-int(steps) // steps_per_window))   # the last step (= total) joins the last window
    out = []
    for k in range(n):
        a, b = k * steps_per_window, (k + 1) * steps_per_window
        sel = [v for s, v in rows if min(s // steps_per_window, n - 1) == k]
        before = [v for f, v in switches if f <= a]
        at_start = before[-1] if before else first    # the log names a version from its first switch on
        versions = {v for f, v in switches if a < f < b} | ({at_start} if at_start is not None else set())
        out.append((a, b, len(sel), sorted(versions | set(sel))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="models/BaTiO3_chgnet/run", help="the on-the-fly run folder to start from")
    p.add_argument("--work", required=True)
    p.add_argument("--oracle", default="chgnet")
    p.add_argument("--npt", type=int, nargs=4, default=[10, 350, 5000, 2], metavar=("N", "T", "STEPS", "DT_FS"))
    p.add_argument("--pimd", type=int, nargs=5, default=[6, 300, 2500, 4, 1], metavar=("N", "T", "STEPS", "BEADS",
                                                                                       "DT_FS"))
    p.add_argument("--equilibrate", type=int, nargs=2, default=[2500, 3000], metavar=("NPT_STEPS", "PIMD_STEPS"),
                   help="equilibration steps before production (they also set the thresholds)")
    p.add_argument("--phase", default="O", help="polar start (R, O, T, C)")
    p.add_argument("--quantile", type=float, default=0.98)
    p.add_argument("--learn-args", default="--batch 30 --min-labels 20 --poll 15",
                   help="extra arguments of sp-server learn")
    p.add_argument("--holdout", type=int, default=12, help="held-out sub-cells per run")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    t_all = time.monotonic()
    summary = {"args": vars(args)}
    if not run.exists():
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("report", "learn*", "*.lock"))
    first_model = work / "model_start.h5"
    if not first_model.exists():
        shutil.copy(run / "model.h5", first_model)
    t0 = time.monotonic()
    learner = Learner(run, [work / "npt.db", work / "pimd.db"], LearnSettings(), log=print)
    learner.otf.training_statistics()   # the statistics once, before the MDs share the cores
    summary["prepare_s"] = time.monotonic() - t0
    model = load_model(first_model)
    n_npt, T_npt, steps_npt, dt_npt = args.npt
    n_pi, T_pi, steps_pi, beads, dt_pi = args.pimd
    start_npt = polar_structure(model, (n_npt,) * 3, args.phase, 0.1)
    start_pi = polar_structure(model, (n_pi,) * 3, args.phase, 0.1)

    # ---- equilibration with the first model: the starting states and the thresholds
    thresholds = json.loads((work / "thresholds.json").read_text()) if (work / "thresholds.json").exists() else None
    if thresholds is None:
        t0 = time.monotonic()
        eq_npt, eq_pi = args.equilibrate
        pilots = [MD("pnpt", work / "equil_npt", first_model, start_npt, temperature=T_npt, steps=eq_npt,
                     timestep_fs=dt_npt, seed=11, trace=True, stride=500),
                  MD("ppimd", work / "equil_pimd", first_model, start_pi, temperature=T_pi, steps=eq_pi,
                     timestep_fs=dt_pi, seed=12, beads=beads, trace=True, stride=500)]
        for md in pilots:
            rc = md.wait(4 * 3600)
            if rc != (0, 0) or md.last_step() != md.steps:
                raise SystemExit(f"equilibration {md.name} failed: exit codes {rc}, {md.last_step()} of {md.steps} "
                                 f"steps (see {md.folder})")
        thresholds = {"npt": threshold_from_traces(work / "equil_npt", args.quantile),
                      "pimd": threshold_from_traces(work / "equil_pimd", args.quantile)}
        (work / "thresholds.json").write_text(json.dumps(thresholds))
        summary["equilibration_s"] = time.monotonic() - t0
    print(f"thresholds (local_energy_max_mev, {args.quantile} quantile of the equilibrations): {thresholds}",
          flush=True)

    # ---- production with the learner beside
    t0 = time.monotonic()
    mds = [MD("npt", work / "npt", run / "model.h5", start_npt, temperature=T_npt, steps=steps_npt,
              timestep_fs=dt_npt, seed=21, queue=work / "npt.db", restart=work / "equil_npt" / "RESTART",
              threshold=f"local_energy_max_mev={thresholds['npt']:.6g}"),
           MD("pimd", work / "pimd", run / "model.h5", start_pi, temperature=T_pi, steps=steps_pi,
              timestep_fs=dt_pi, seed=22, beads=beads, queue=work / "pimd.db", restart=work / "equil_pimd" / "RESTART",
              threshold=f"local_energy_max_mev={thresholds['pimd']:.6g}")]
    learn_cmd = sp_server("learn", run, "--queue", work / "npt.db", "--queue", work / "pimd.db", "--timestep-fs",
                          dt_npt, "--timestep-fs", dt_pi, "--no-progress", *args.learn_args.split())
    with open(work / "learn.out", "w") as out:
        learn = subprocess.Popen(learn_cmd, stdout=out, stderr=subprocess.STDOUT)
    print(" ".join(map(str, learn_cmd)), flush=True)
    results = {}
    for md in mds:
        rc_ipi, rc_srv = md.wait(4 * 3600)
        results[md.name] = {"ipi_rc": rc_ipi, "server_rc": rc_srv, "last_step": md.last_step(), "steps": md.steps}
        print(f"{md.name}: i-PI exit {rc_ipi}, server exit {rc_srv}, last step {md.last_step()} of {md.steps}",
              flush=True)
    summary["production_s"] = time.monotonic() - t0
    time.sleep(5)
    learn.terminate()      # after its current step: a last refit may still be running, the state says where
    try:
        learn.wait(1800)
    except subprocess.TimeoutExpired:
        learn.kill()
    summary["runs"] = results
    state = json.loads((run / "learn_state.json").read_text())
    summary["refits"] = [{k: h[k] for k in ("cycle", "decision", "version", "n_train", "flags", "md_ps",
                                            "flags_per_ps", "rates_by_queue", "rmse_before", "rmse_after")}
                         for h in state["history"]]
    # windows up to the step each MD reached (a lost run has no windows after it)
    summary["windows"] = {
        "npt": flag_windows(work / "npt.db", max(steps_npt // 10, 1), max(results["npt"]["last_step"], 1),
                            work / "npt" / "serve.log"),
        "pimd": flag_windows(work / "pimd.db", max(steps_pi // 10, 1), max(results["pimd"]["last_step"], 1),
                             work / "pimd" / "serve.log")}

    # ---- held-out frames of these runs (random sub-cells of trajectory frames), before and after
    from sp_server.oracles import make_oracle
    rng = np.random.default_rng(5)
    frames = []
    ev = Evaluator(model)
    for name, pattern in (("npt", "md.pos_0.extxyz"), ("pimd", "md.pos_0.extxyz")):
        path = work / name / pattern
        if not path.exists():
            continue
        traj = ase.io.read(path, ":")
        for k in np.linspace(len(traj) // 5, len(traj) - 1, args.holdout).round().astype(int):
            a = traj[int(k)]
            frame = ev.mapper.map(a.cell.array, a.positions, np.tile(model.reference.numbers, len(a) // model.natoms))
            site = int(rng.integers(len(a)))
            frames.append(carve_frame(model, frame, (3, 3, 3), site).atoms)
    ase.io.write(work / "holdout.extxyz", frames)
    summary["heldout"] = heldout({"start": first_model, "final": run / "model.h5"}, frames, make_oracle(args.oracle))
    summary["total_s"] = time.monotonic() - t_all
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(json.dumps({k: summary[k] for k in ("runs", "heldout")}, indent=1, default=float))
    for h in summary["refits"]:
        print(f"refit cycle {h['cycle']}: {h['decision']} v{h['version']}: {h['flags']} flags over {h['md_ps']:.2f} "
              f"ps = {h['flags_per_ps']:.2f}/ps; by queue {json.dumps(h['rates_by_queue'], default=float)}")
    for name, windows in summary["windows"].items():
        dt = dt_npt if name == "npt" else dt_pi
        for a, b, n, versions in windows:
            print(f"{name} steps {a}-{b}: {n} flags = {n / ((b - a) * dt * 1e-3):.1f}/ps (model versions {versions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
