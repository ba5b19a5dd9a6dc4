"""Held-out frames the on-the-fly loop never produces: antipolar, tilted, polar and strained perovskite cells with
thermal noise, on 2x2x2 and 3x3x3 supercells, labelled by an oracle.  Written once and kept in the repository, so
every model is judged on the same outside structures (``sp-server validate MODEL --items accuracy --holdout FILE``).

    python tools/make_holdout_outside.py models/BaTiO3_chgnet/model.h5 --oracle chgnet \\
        -o models/BaTiO3_chgnet/holdout_outside.extxyz

Patterns (amplitudes in A, angles in degrees; every frame also gets Gaussian noise and a random symmetric strain):
- antipolar X and M: Ti displaced along z with the sign of (-1)^nx, (-1)^(nx+ny), Ba against it at a third;
- tilts a0a0c- (R), a-a-a- (R) and a0a0c+ (M): every octahedron rotated rigidly by a small angle, O moving as
  omega_n x (O - Ti_n) (the two Ti of an oxygen agree for these patterns);
- polar 111 and 001 on 3x3x3 (Ti along, O against), and plain thermal noise, with 1% strains.
The model file only supplies the reference cell (sites, lattice constant).  Units of the file: eV, A, eV/A^3 (ASE).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _sites(model, mesh):
    atoms = model.supercell(mesh)
    nat = model.natoms
    labels = list(model.reference.labels)
    cells = np.array([c for c in np.ndindex(*mesh) for _ in range(nat)])
    site = np.tile(np.arange(nat), int(np.prod(mesh)))
    return atoms, labels, cells, site


def pattern_displacements(model, mesh, kind: str, amp: float) -> np.ndarray:
    atoms, labels, cells, site = _sites(model, mesh)
    species = np.array([labels[s].rstrip("0123456789") for s in site])
    u = np.zeros((len(atoms), 3))
    ti = np.where(species == "Ti")[0]
    ba = np.where(species == "Ba")[0]
    ox = np.where(species == "O")[0]
    if kind in ("antipolar_X", "antipolar_M"):
        sign = lambda n: (-1.0) ** (n[0] if kind == "antipolar_X" else n[0] + n[1])  # noqa: E731
        for i in ti:
            u[i, 2] = amp * sign(cells[i])
        for i in ba:
            u[i, 2] = -amp / 3 * sign(cells[i])
        return u
    if kind in ("tilt_a0a0c-", "tilt_a-a-a-", "tilt_a0a0c+"):
        phi = np.radians(amp)
        axis = np.array([1.0, 1.0, 1.0]) / np.sqrt(3) if kind == "tilt_a-a-a-" else np.array([0.0, 0.0, 1.0])
        cellv = atoms.cell.array
        for o in ox:
            # the two Ti nearest to this oxygen (through the periodic images)
            d = atoms.positions[o] - atoms.positions[ti]
            frac = np.linalg.solve(cellv.T, d.T).T
            d = (frac - np.round(frac)) @ cellv
            near = np.argsort(np.linalg.norm(d, axis=1))[:2]
            acc = np.zeros(3)
            for k in near:
                n = cells[ti[k]]
                s = (-1.0) ** (n[0] + n[1]) if kind == "tilt_a0a0c+" else (-1.0) ** (n[0] + n[1] + n[2])
                acc += np.cross(s * phi * axis, d[k])
            u[o] = acc / 2
        return u
    if kind in ("polar_111", "polar_001"):
        v = np.array([1.0, 1.0, 1.0]) / np.sqrt(3) if kind == "polar_111" else np.array([0.0, 0.0, 1.0])
        u[ti] = amp * v
        u[ox] = -0.4 * amp * v
        return u
    if kind == "thermal":
        return u
    raise ValueError(f"unknown pattern {kind!r}")


FRAMES = [  # (pattern, supercell, amplitude, noise RMS A, strain scale)
    ("antipolar_X", 2, 0.06, 0.03, 0.004), ("antipolar_X", 2, 0.12, 0.04, 0.006),
    ("antipolar_M", 2, 0.06, 0.03, 0.004), ("antipolar_M", 2, 0.12, 0.04, 0.006),
    ("tilt_a0a0c-", 2, 3.0, 0.03, 0.004), ("tilt_a0a0c-", 2, 6.0, 0.04, 0.006),
    ("tilt_a-a-a-", 2, 3.0, 0.03, 0.004), ("tilt_a-a-a-", 2, 6.0, 0.04, 0.006),
    ("tilt_a0a0c+", 2, 3.0, 0.03, 0.004), ("tilt_a0a0c+", 2, 6.0, 0.04, 0.006),
    ("polar_111", 3, 0.08, 0.04, 0.005), ("polar_111", 3, 0.14, 0.05, 0.01),
    ("polar_001", 3, 0.10, 0.04, 0.01), ("polar_001", 3, 0.14, 0.05, 0.01),
    ("thermal", 3, 0.0, 0.06, 0.005), ("thermal", 3, 0.0, 0.08, 0.01),
]


def make_frames(model, seed: int = 7):
    """[(Atoms, info)] of FRAMES, deterministic for the seed."""
    rng = np.random.default_rng(seed)
    out = []
    for kind, n, amp, noise, strain in FRAMES:
        mesh = (n, n, n)
        atoms = model.supercell(mesh)
        u = pattern_displacements(model, mesh, kind, amp)
        u += rng.normal(0.0, noise / np.sqrt(3.0), u.shape)
        atoms.positions += u - u.mean(axis=0)
        eps = rng.normal(0.0, strain, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        out.append((atoms, {"pattern": kind, "supercell": n, "amplitude": amp, "noise": noise, "strain": strain}))
    return out


def main(argv=None) -> int:
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from sp_server.model.native import load_model
    from sp_server.oracles import make_oracle
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model whose reference cell the patterns are built on")
    p.add_argument("--oracle", default="chgnet")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    model = load_model(args.model)
    calc = make_oracle(args.oracle, {})
    labelled = []
    for atoms, info in make_frames(model, args.seed):
        t0 = time.monotonic()
        atoms.calc = calc
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        a = atoms.copy()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        a.info.update(info, oracle=args.oracle)
        labelled.append(a)
        print(f"{info['pattern']:12s} {info['supercell']}^3 amp {info['amplitude']:<5g} E {e:.4f} eV "
              f"max|F| {np.abs(f).max():.3f} eV/A ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    ase.io.write(args.output, labelled, format="extxyz")
    print(f"wrote {len(labelled)} frames to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
