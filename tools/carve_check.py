#!/usr/bin/env python
"""How well a carved sub-cell (sp-server learn's labels of big frames) reproduces the big frame: the model's forces
on the centre cell's atoms in the m x m x m sub-cell against the same atoms' forces in the n x n x n frame.

    python tools/carve_check.py MODEL.h5 [--mesh 8] [--amplitude 0.07] [--parts short_range,elastic,...]

The frame: the reference supercell with Gaussian displacements (std --amplitude, A) and a small tetragonal strain;
20 random centre sites per sub-cell size.  Prints the largest and median deviation over the centre atoms, eV/A,
against the forces' RMS.  Short-range parts are exact once m >= 2 r + 1 (r: sp_server.otf.carve.interaction_reach);
the dipole-dipole part is not (the field of the atoms outside the sub-cell is replaced by the sub-cell's images).
"""
import argparse

import numpy as np

from sp_server.model.native import load_model
from sp_server.otf.carve import carve_frame, interaction_reach
from sp_server.potential import Evaluator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--mesh", type=int, default=8)
    p.add_argument("--amplitude", type=float, default=0.07)
    p.add_argument("--parts", help="comma-separated parts (sp_server.potential.PARTS); default all")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 5])
    args = p.parse_args(argv)
    model = load_model(args.model)
    ev = Evaluator(model, parts=args.parts.split(",") if args.parts else None)
    rng = np.random.default_rng(1)
    atoms = model.supercell((args.mesh,) * 3)
    atoms.positions += rng.normal(0, args.amplitude, atoms.positions.shape)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + np.diag([0.004, 0.004, 0.01])), scale_atoms=True)
    big = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
    frame = ev.mapper.map(atoms.cell.array, atoms.positions, atoms.numbers)
    nat = model.natoms
    print(f"{args.model}: reach {interaction_reach(model)} cells, dipole-dipole "
          f"{'yes' if model.harmonic.has_dipole else 'no'}; {args.mesh}^3 frame, {args.amplitude} A displacements, "
          f"force RMS {np.sqrt((big.forces ** 2).mean()):.3f} eV/A")
    for m in args.sizes:
        devs = []
        for site in rng.choice(len(atoms), 20, replace=False):
            c = carve_frame(model, frame, (m, m, m), int(site))
            small = ev.evaluate(c.atoms.cell.array, c.atoms.positions, c.atoms.numbers)
            first = (int(site) // nat) * nat
            ref = big.forces[frame.order[first:first + nat]]
            devs.append(np.abs(small.forces[c.centre_local:c.centre_local + nat] - ref).max())
        print(f"  {m}x{m}x{m} sub-cell ({nat * m ** 3} atoms): centre-cell force deviation largest {max(devs):.2e}, "
              f"median {np.median(devs):.2e} eV/A")


if __name__ == "__main__":
    main()
