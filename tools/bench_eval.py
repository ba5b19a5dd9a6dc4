#!/usr/bin/env python
"""Benchmark the evaluator: energy + forces + stress, and the same with design rows, for supercells 2^3 .. 16^3.

Model: the toy perovskite's harmonic part (short range + dipole-dipole by Ewald, a0 = 4 A) with ~100
symmetry-adapted anharmonic coefficients of order 3..6 (some with strain) generated from random seed monomials
over the atom pairs within 2.89 A (the paper's cutoff: Ti-O, Ba-O and O-O neighbours), orbits under Pm-3m.
Or any model file (``--model``; e.g. the shipped BaTiO3 model): with a posterior it also times the Bayesian
errors (what the force server adds to every frame unless ``--error-stride`` thins them), and their share.
Prints a table (atom-evaluations per second) and the command that made it.

    python tools/bench_eval.py [--sizes 2 4 6 8 12 16] [--repeat 5] [--threads N] [--model MODEL.h5]
"""
from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time

import numba
import numpy as np

from sp_server.model.model import Model
from sp_server.model.symmetry import space_group_operations, symmetrize
from sp_server.model.terms import AnharmonicPart, DisplacementDiff, StrainFactor, Term
from sp_server.model.toy import toy_perovskite
from sp_server.potential import Evaluator


def pairs_within(reference, cutoff):
    pos, cell = reference.positions, reference.cell
    out = []
    for i in range(reference.natoms):
        for c in itertools.product(range(-1, 2), repeat=3):
            for j in range(reference.natoms):
                d = np.linalg.norm(pos[j] + np.array(c) @ cell - pos[i])
                if 1e-6 < d <= cutoff:
                    out.append((i, j, c))
    return out


def benchmark_model(ncoef=100, cutoff=2.89, seed=0):
    base = toy_perovskite()
    ops = space_group_operations(base.reference)
    pairs = pairs_within(base.reference, cutoff)
    rng = np.random.default_rng(seed)
    coefs, seen = [], set()
    while len(coefs) < ncoef:
        order = int(rng.integers(3, 7))
        nfac = int(rng.integers(1, min(3, order) + 1))
        powers = np.ones(nfac, dtype=int)
        for _ in range(order - nfac):
            powers[rng.integers(nfac)] += 1
        disps = []
        for p in powers:
            i, j, c = pairs[rng.integers(len(pairs))]
            disps.append(DisplacementDiff(i, (0, 0, 0), j, c, int(rng.integers(3)), int(p)))
        strains = (StrainFactor(int(rng.integers(1, 7)), int(rng.integers(1, 3))),) if rng.random() < 0.3 else ()
        coef = symmetrize(Term(1.0, tuple(disps), strains), ops)
        if coef is None:
            continue
        key = tuple((t.displacements, t.strains) for t in coef.terms)  # canonical, sorted by symmetrize
        if key in seen:
            continue
        seen.add(key)
        coefs.append(coef)
    values = rng.normal(0, 0.05, ncoef)
    return Model(base.reference, base.harmonic, AnharmonicPart(coefs, values), name="bench")


def timeit(fn, repeat):
    """(median, min, max) seconds over ``repeat`` calls after a warm-up (compilation, caches)."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), min(ts), max(ts)


def spread(t):
    return f"{1e3 * t[0]:.1f} ({1e3 * t[1]:.1f}-{1e3 * t[2]:.1f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    ap.add_argument("--no-design", action="store_true")
    ap.add_argument("--model", help="a model file instead of the synthetic benchmark model")
    args = ap.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    if args.model:
        from sp_server.model.native import load_model
        model = load_model(args.model)
    else:
        model = benchmark_model()
    errors = model.posterior is not None
    nterms = sum(len(c.terms) for c in model.anharmonic.coefficients)
    nfac = sum(len(t.displacements) for c in model.anharmonic.coefficients for t in c.terms)
    print(f"# sp_server bench_eval: {args.model or 'synthetic model'}: {len(model.anharmonic)} coefficients, "
          f"{nterms} terms, {nfac} displacement factors; dipole-dipole "
          f"{'on' if model.harmonic.born_charges is not None else 'off'}; numba threads {numba.get_num_threads()}; "
          f"{platform.processor() or platform.machine()}")
    print(f"# command: {' '.join([sys.executable.split('/')[-1], 'tools/bench_eval.py'] + (argv or sys.argv[1:]))}")
    print("# ms per frame: median (min-max) of --repeat calls.  +errors: energy, forces, stress and the Bayesian errors "
          "(sp_server.kernels.anharmonic.error_rows: one sweep, then one product with the posterior's factor); "
          "error share: what the errors add, relative to E+F+S; +local errors: only those of the energy pass (the total energy's and the largest per-cell energy error); via design rows: the same errors from the full "
          "design rows (the fit's path, the server's before issue 17)")
    print(f"{'cells':>8} {'atoms':>7} {'setup s':>8} {'E+F+S ms':>20} {'atom-evals/s':>13}"
          + (f" {'+errors ms':>22} {'error share':>11} {'+local errors ms':>22} {'share':>6}" if errors else "")
          + ("" if args.no_design else f" {'via design rows ms':>22}"))
    ev = Evaluator(model)
    rng = np.random.default_rng(1)
    for n in args.sizes:
        atoms = model.supercell((n, n, n))
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.set_cell(atoms.cell.array * 1.002, scale_atoms=True)
        t0 = time.perf_counter()
        ev.potential((n, n, n))
        setup = time.perf_counter() - t0
        cell, pos, num = atoms.cell.array, atoms.positions, atoms.numbers
        t_e = timeit(lambda: ev.evaluate(cell, pos, num), args.repeat)
        row = f"{n}^3".rjust(8) + f" {len(atoms):7d} {setup:8.2f} {spread(t_e):>20} {len(atoms) / t_e[0]:13.3g}"
        if errors:
            t_b = timeit(lambda: ev.evaluate(cell, pos, num, errors=True), args.repeat)
            row += f" {spread(t_b):>22} {100 * (t_b[0] - t_e[0]) / t_e[0]:10.0f}%"
            t_l = timeit(lambda: ev.evaluate(cell, pos, num, local_errors=True), args.repeat)
            row += f" {spread(t_l):>22} {100 * (t_l[0] - t_e[0]) / t_e[0]:5.0f}%"
        if not args.no_design:
            t_d = timeit(lambda: ev.evaluate(cell, pos, num, design=True, errors=errors), max(1, args.repeat // 2))
            row += f" {spread(t_d):>22}"
        print(row, flush=True)

if __name__ == "__main__":
    main()
