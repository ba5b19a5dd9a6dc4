#!/usr/bin/env python
"""Benchmark the fit: design rows per structure, incremental accumulation, the evidence refit, and forward
selection, on the toy perovskite (2x2x2 supercells, 40 atoms) with a generated pool of candidate terms.

    python tools/bench_fit.py [--structures 2000] [--select 96]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from sp_server import SecondPrinciplesCalculator
from sp_server.fit.bayes import fit_stats, forward_selection
from sp_server.fit.fit import TrainingSet
from sp_server.fit.generate import GeneratorSettings, generate_terms
from sp_server.model import AnharmonicPart, Model
from sp_server.model.toy import toy_perovskite


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--structures", type=int, default=2000)
    ap.add_argument("--select", type=int, default=96)
    args = ap.parse_args(argv)
    teacher = toy_perovskite()
    base = Model(teacher.reference, teacher.harmonic, AnharmonicPart(), name="toy-harmonic")
    t0 = time.perf_counter()
    pool = generate_terms(teacher.reference, GeneratorSettings(cutoff=2.89, orders=(3, 4, 5, 6), max_bodies=2,
                                                               strain_powers=(1,), sp_orders=(1, 2)))
    t_gen = time.perf_counter() - t0
    print(f"# sp_server bench_fit: toy perovskite, pool of {len(pool)} generated coefficients "
          f"(cutoff 2.89 A, orders 3-6, 2 bodies, strain-phonon eta^1 x u^1..2, pure strain 3-4) in {t_gen:.1f} s")
    print(f"# command: python tools/bench_fit.py {' '.join(argv or sys.argv[1:])}")
    calc = SecondPrinciplesCalculator(teacher)
    rng = np.random.default_rng(0)
    ts = TrainingSet(base, pool)
    t_rows = 0.0
    for k in range(args.structures):
        atoms = teacher.supercell((2, 2, 2))
        atoms.positions += rng.normal(0, 0.1, atoms.positions.shape)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.01 * rng.normal(size=(3, 3))), scale_atoms=True)
        atoms.calc = calc
        a = atoms.copy()
        noise = 0.01  # eV/A on forces (and 1 meV/atom, 0.01 GPa): labels are never exact
        a.calc = SinglePointCalculator(a, energy=atoms.get_potential_energy() + rng.normal(0, 1e-3 * len(a)),
                                       forces=atoms.get_forces() + rng.normal(0, noise, (len(a), 3)),
                                       stress=atoms.get_stress() + rng.normal(0, 0.01 * 6.2415e-3, 6))
        t0 = time.perf_counter()
        ts.add(a, f"frame {k}")
        t_rows += time.perf_counter() - t0
    stats = ts.combined()
    print(f"design rows + accumulation: {1e3 * t_rows / args.structures:.2f} ms per 40-atom structure "
          f"({stats.n_rows} rows, {len(pool)} columns)")
    t0 = time.perf_counter()
    subset, _ = forward_selection(stats, args.select)
    t_sel = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit, _ = fit_stats(stats, subset)
    t_fit = time.perf_counter() - t0
    print(f"forward selection of {args.select} of {len(pool)}: {t_sel:.2f} s (evidence of every step included)")
    print(f"evidence refit of {args.select} coefficients on {args.structures} structures: {1e3 * t_fit:.1f} ms "
          f"({fit.iterations} MacKay iterations)")
    t0 = time.perf_counter()
    fit_all, _ = fit_stats(stats)
    print(f"evidence refit of all {len(pool)} coefficients: {1e3 * (time.perf_counter() - t0):.1f} ms")


if __name__ == "__main__":
    main()
