"""Probe a model's stability: NVT Langevin MD (ASE, fixed cell) printing the energy per cell, the largest Bayesian
force error and the largest atomic displacement (uniform translation removed) until the run ends or leaves the
trusted range.  Diagnostic, not a test.

    python tools/md_probe.py models/BaTiO3_chgnet/model.h5 --temperature 300 --supercell 4 4 4
    python tools/md_probe.py MODEL --temperature 15 --supercell 2 2 2 --start R   # from the polar R structure

Units: K, fs, eV per reference cell, eV/A, A.
"""
from __future__ import annotations

import argparse

import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from sp_server.calculator import SecondPrinciplesCalculator
from sp_server.model.native import load_model
from sp_server.otf.structures import polar_structure


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--supercell", type=int, nargs=3, default=[4, 4, 4])
    p.add_argument("--start", choices=["C", "R", "O", "T"], default="C", help="cubic or a polar start (0.08 A)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--every", type=int, default=20, help="print every N steps")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    model = load_model(args.model)
    mesh = tuple(args.supercell)
    atoms = polar_structure(model, mesh, args.start, 0.08)
    ref = model.supercell(mesh).positions
    ncell = len(atoms) // model.natoms
    atoms.calc = SecondPrinciplesCalculator(model, errors=model.posterior is not None)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=np.random.default_rng(args.seed))
    dyn = Langevin(atoms, args.timestep * units.fs, temperature_K=args.temperature, friction=0.02,
                   rng=np.random.default_rng(args.seed + 1))
    print(f"# {args.model}: NVT {args.temperature:g} K, {mesh} from {args.start}, {args.steps} steps")
    print("# step  E-E_ref (eV/cell)  Bayesian force_max (eV/A)  max displacement (A) [atom]  max |F| (eV/A)")
    for step in range(1, args.steps + 1):
        dyn.run(1)
        e = (atoms.get_potential_energy() - ncell * model.reference.energy) / ncell
        err = atoms.calc.results.get("bayesian_error", {}).get("force_max", float("nan"))
        d = atoms.positions - ref
        d -= d.mean(axis=0)
        dn = np.linalg.norm(d, axis=1)
        fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        runaway = e < -1.0 or dn.max() > 1.0 or not np.isfinite(e)
        if step % args.every == 0 or runaway:
            k = int(dn.argmax())
            print(f"{step:6d} {e:12.4f} {err:12.3f} {dn.max():10.3f} [{k} {atoms[k].symbol}] {fmax:10.2f}")
        if runaway:
            print(f"# left the trusted range at step {step}")
            return 1
    print("# stayed in the trusted range")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
