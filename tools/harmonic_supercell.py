"""How well a harmonic part reproduces the oracle's forces on a large cell, by the phonopy supercell it was built on
(docs/otf.md, issue 15): builds the harmonic part on each N x N x N supercell from the oracle (19 oracle calls for a
cubic perovskite) and compares its forces with the oracle's on random displacements of a larger cell.

    python tools/harmonic_supercell.py MODEL_OR_HARMONIC.h5 [--oracle chgnet] [--supercells 2 4 6] [--cell 4]
                                       [--amplitudes 0.01 0.03] [--frames 3] [--save-dir DIR]

The reference (relaxed cubic cell) is taken from the given model.  Forces eV/A (RMSE over all components),
displacement amplitudes A (RMS per component), seed 0.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from sp_server.calculator import SecondPrinciplesCalculator
from sp_server.fit.harmonic import HarmonicSettings, harmonic_from_oracle
from sp_server.model.native import load_model, save_model
from sp_server.oracles import make_oracle


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--oracle", default="chgnet")
    p.add_argument("--supercells", type=int, nargs="+", default=[2, 4])
    p.add_argument("--cell", type=int, default=4, help="the test cell, N x N x N")
    p.add_argument("--amplitudes", type=float, nargs="+", default=[0.01, 0.03])
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--save-dir", type=Path, default=None, help="keep each harmonic part there (harmonicN.h5)")
    args = p.parse_args(argv)

    calc = make_oracle(args.oracle)
    base = load_model(args.model)
    unit = base.supercell((1, 1, 1))
    parts = {}
    for n in args.supercells:
        t0 = time.monotonic()
        h = harmonic_from_oracle(unit, calc, HarmonicSettings(supercell=(n, n, n), relax_lattice=False),
                                 name=f"harmonic {n}x{n}x{n}", log=None)
        print(f"harmonic part on {n}x{n}x{n}: {h.metadata['n_oracle_calls']} oracle calls, "
              f"{time.monotonic() - t0:.0f} s", flush=True)
        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            save_model(h, args.save_dir / f"harmonic{n}.h5")
        parts[n] = SecondPrinciplesCalculator(h)
    ref = base.supercell((args.cell,) * 3)
    rng = np.random.default_rng(0)
    print(f"{'amplitude (A)':>13s} {'oracle force RMS':>16s}  " + "  ".join(f"{f'error {n}x{n}x{n}':>12s}"
                                                                          for n in args.supercells))
    for amp in args.amplitudes:
        errors = {n: [] for n in args.supercells}
        norms = []
        for _ in range(args.frames):
            atoms = ref.copy()
            atoms.positions += rng.normal(0.0, amp, atoms.positions.shape)
            atoms.calc = calc
            f0 = atoms.get_forces()
            norms.append(np.sqrt(np.mean(f0 ** 2)))
            for n, c in parts.items():
                atoms.calc = c
                errors[n].append(np.sqrt(np.mean((atoms.get_forces() - f0) ** 2)))
        print(f"{amp:13.3f} {np.mean(norms):16.4f}  " + "  ".join(f"{np.mean(errors[n]):12.4f}"
                                                                  for n in args.supercells), flush=True)


if __name__ == "__main__":
    main()
