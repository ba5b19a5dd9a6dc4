"""Refit an on-the-fly run's training structures with another candidate pool and energy weight, and report the
held-out and validation errors: the check behind docs/otf.md's table of strain-phonon couplings (issue 15).

    python tools/refit_terms.py RUN_DIR [--sp-orders 1 2] [--strain-powers 1 2] [--sp-pairs 3:1 4:1]
                                [--pure-strain 3 4] [--energy-scales 1e-3 3e-4] [--select 150 300]
                                [--cutoff-factor 1.0] [--max-bodies 3] [--harmonic H.h5] [--leave-out 4:1 ...]
                                [--orders 2 3 4 5 6] [--holdout FILE ...] [--statics]

RUN_DIR is the run folder of `sp-server otf` (harmonic.h5, store.db).  The design rows of its labelled training
structures are built once for the generated pool (a minute or two for 5000 candidates); every energy scale
(eV/atom) and every --leave-out category (displacement order:strain order, held at zero) is then a refit of
seconds.  Fits are unconstrained (no bounding terms): this measures what the basis can represent, not the loop's
bounded model.  Errors: energy meV per 5-atom cell, forces eV/A, stress GPa (RMSE), on the run's held-out frames
(origin "holdout"), its other validation frames and each --holdout file.  --statics also relaxes the seven
metastable phases and the R3m cell with each refit and with the run's oracle (once), and compares the double well
along the oracle's R3m pattern at the cubic cell: meV per 5-atom cell (model - oracle), A, and the well's depth
relative to the oracle's; it prints E/lambda^2 along that pattern for the oracle and the harmonic part (lambda = 1:
the relaxed R3m displacements).
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np

from sp_server.fit.fit import QuantityScales, TrainingSet, fit_training_set
from sp_server.fit.generate import generate_terms, parse_sp_pair as pair
from sp_server.model.native import load_model
from sp_server.otf.config import OtfConfig
from sp_server.store.store import Store
from sp_server.validate.accuracy import accuracy, read_frames

from oracle_smoothness import curvature_profile  # tools/ is this script's folder


def errors(model, frames) -> str:
    if not frames:
        return " none"
    acc = accuracy(model, frames, log=lambda m: print(f"  {m}"))
    return f"{acc.rmse_energy_mev:5.2f} {acc.rmse_forces:.3f} {acc.rmse_stress_gpa:.3f}"


class Statics:
    """The oracle's Table 2 energies, R3m cell and double well (computed once), and each model's differences."""

    def __init__(self, harm, oracle):
        from sp_server.validate.ground_state import double_well, ground_state, model_calculator
        from sp_server.validate.phases import PHASES, metastable_phases
        self.names = list(PHASES)
        got = metastable_phases(harm, {"oracle": oracle}, self.names, log=lambda m: None)
        self.phases = {n: float("nan") if isinstance(got[n]["oracle"], str) else got[n]["oracle"].energy_mev
                       for n in self.names}     # a failed oracle relaxation: nan, the others go on
        gs = ground_state(harm, oracle, "oracle", "R")
        self.a, self.e_r = gs.a, gs.energy_mev
        self.pattern = np.array(gs.displacements)
        self.depth = min(double_well(harm, {"oracle": oracle}, self.pattern).energies["oracle"])
        # E / lambda^2 along the pattern: a Taylor polynomial's is smooth from lambda = 0 on, with the harmonic
        # part's value at 0; an oracle that is not (e.g. flat below some amplitude) cannot be fitted exactly
        lams = np.array([0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0])
        for name, calc in (("oracle", oracle), ("harmonic part", model_calculator(harm))):
            profile = curvature_profile(harm, calc, self.pattern, lams)
            print(f"{name} E/lambda^2 along the R3m pattern (meV/cell) at lambda = "
                  + ", ".join(f"{lam:g}: {x:.1f}" for lam, x in zip(lams, profile)), flush=True)
        print("oracle statics: " + " ".join(f"{n} {e:.2f}" for n, e in self.phases.items())
              + f" | R3m a {self.a:.4f} A, E {self.e_r:.2f} | double well {self.depth:.2f} meV/cell", flush=True)

    def line(self, model) -> str:
        from sp_server.validate.ground_state import double_well, ground_state, model_calculator
        from sp_server.validate.phases import metastable_phases
        calc = model_calculator(model)
        got = metastable_phases(model, {"model": calc}, self.names, log=lambda m: None)
        parts = [f"{n} {got[n]['model'].energy_mev - self.phases[n]:+.2f}" if not isinstance(got[n]["model"], str)
                 else f"{n} FAILED" for n in self.names]
        try:
            gs = ground_state(model, calc, "model", "R")
            parts.append(f"| R3m a {gs.a - self.a:+.4f} E {gs.energy_mev - self.e_r:+.2f}")
        except Exception as exc:    # noqa: BLE001 - a refit whose relaxation fails is a result
            parts.append(f"| R3m FAILED ({type(exc).__name__})")
        depth = min(double_well(model, {"model": calc}, self.pattern).energies["model"])
        parts.append(f"| double well {100 * (depth / self.depth - 1):+.0f}%")
        return " ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--orders", type=int, nargs="+", default=[3, 4, 5, 6])
    p.add_argument("--sp-orders", type=int, nargs="+", default=[1, 2])
    p.add_argument("--strain-powers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sp-pairs", type=pair, nargs="*", default=[(3, 1), (4, 1)], metavar="N:Q")
    p.add_argument("--pure-strain", type=int, nargs="+", default=[3, 4])
    p.add_argument("--energy-scales", type=float, nargs="+", default=[1e-3, 3e-4], help="eV/atom")
    p.add_argument("--select", type=int, nargs="+", default=[150], help="numbers of terms to select (each a refit)")
    p.add_argument("--cutoff-factor", type=float, default=None, help="bond cutoff in units of a0 (default: the run's)")
    p.add_argument("--harmonic", type=Path, default=None,
                   help="another harmonic model (.h5) of the same reference instead of the run's harmonic.h5")
    p.add_argument("--max-bodies", type=int, default=None, help="(default: the run's)")
    p.add_argument("--leave-out", type=pair, nargs="*", default=[], metavar="N:Q",
                   help="also refit with each of these (displacement order:strain order) categories held at zero")
    p.add_argument("--holdout", type=Path, nargs="*", default=[], metavar="FILE",
                   help="more held-out frames (extxyz or ASE db with oracle energies, forces, stress)")
    p.add_argument("--statics", action="store_true",
                   help="Table 2 phases, R3m cell and double well of every refit against the run's oracle")
    args = p.parse_args(argv)

    run = args.run_dir
    cfg = OtfConfig.load(run / "config.toml")
    harm = load_model(args.harmonic or run / "harmonic.h5")
    a0 = float(np.cbrt(harm.reference.volume))
    gs = dataclasses.replace(cfg.terms.generator_settings(a0), orders=tuple(args.orders),
                             sp_orders=tuple(args.sp_orders), strain_powers=tuple(args.strain_powers),
                             sp_pairs=tuple(args.sp_pairs), pure_strain=tuple(args.pure_strain))
    if args.cutoff_factor is not None:
        gs = dataclasses.replace(gs, cutoff=args.cutoff_factor * a0)
    if args.max_bodies is not None:
        gs = dataclasses.replace(gs, max_bodies=args.max_bodies)
    pool = generate_terms(harm.reference, gs)
    print(f"{len(pool)} candidates: " + ", ".join(f"u^{n} eta^{q} {c}" for (n, q), c in
                                                  sorted(collections.Counter((c.displacement_order, c.strain_order)
                                                                             for c in pool).items())))
    ts = TrainingSet(harm, pool, QuantityScales(1e-3, cfg.fit.force_scale, cfg.fit.stress_scale))
    store = Store(run / "store.db")
    t0 = time.monotonic()
    for row in store.rows(state="labeled", role="train"):
        ts.add(row.toatoms(), f"{run}/store.db id {row.id}")
    print(f"design rows of {ts.n_structures} training structures: {time.monotonic() - t0:.0f} s")
    validation = [r for r in store.rows(state="labeled", role="validation")]
    held = [r.toatoms() for r in validation if r.get("origin") == "holdout"]
    val = [r.toatoms() for r in validation if r.get("origin") != "holdout"]
    extra = [read_frames(f) for f in args.holdout]
    statics = None
    if args.statics:
        from sp_server.oracles import make_oracle
        statics = Statics(harm, make_oracle(cfg.oracle, cfg.oracle_options))
    energy = copy.deepcopy(ts.stats["energy"])
    category = [(c.displacement_order, c.strain_order) for c in pool]
    print(f"{'energy_scale':>12s} {'left out':>10s} {'terms':>5s}   train E/F/S            held-out E/F/S "
          f"({len(held)})      validation E/F/S ({len(val)})"
          + "".join(f"      {f.parent.name}/{f.name} E/F/S ({len(x)})" for f, x in zip(args.holdout, extra)))
    for scale in args.energy_scales:
        k = (1e-3 / scale) ** 2       # the statistics were whitened with 1 meV/atom
        st = copy.deepcopy(energy)
        st.A *= k
        st.b *= k
        st.yy *= k
        ts.stats["energy"] = st
        for select, out in [(n, None) for n in args.select] + [(args.select[0], o) for o in args.leave_out]:
            fixed = {j: 0.0 for j, c in enumerate(category) if c == out}
            model, rep = fit_training_set(ts, harm, select=select, fixed=fixed)
            tr = rep.rmse
            line = (f"{scale:12.1e} {'-' if out is None else f'{out[0]}:{out[1]}':>10s} {len(rep.selected):5d}   "
                    f"{tr['energy'] * 5 / np.sqrt(k):5.2f} {tr['forces']:.3f} {tr['stress']:.3f}")
            for frames in [held, val] + extra:
                line += "   " + errors(model, frames)
            print(line, flush=True)
            if statics is not None:
                print(f"{'':29s}statics: {statics.line(model)}", flush=True)


if __name__ == "__main__":
    main()
