"""A small analytic ABO3 perovskite model (springs + Born-charge dipoles + cubic-invariant anharmonic terms).

It is a *toy*: not fitted to anything, made to exercise every part of the code (short-range IFCs, dipole-dipole,
elastic, strain-phonon and anharmonic terms with strain) and to give a ferroelectric-like double well for demos
and tests.  Real models come from MULTIBINIT files or from a fit.  Units: eV, Angstrom.
"""
from __future__ import annotations

import itertools

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

from ..units import GPA_EV_A3
from .model import HarmonicPart, Model, Reference
from .terms import AnharmonicPart, Coefficient, DisplacementDiff, StrainFactor, Term

# spring constants (k_parallel, k_perpendicular) in eV/A^2 for each pair of species classes; with the Born
# charges below they give a BaTiO3-like harmonic spectrum: polar instability at Gamma, X and M, stable at R
_SPRINGS = {
    ("B", "O"): (21.5, 0.5),
    ("A", "O"): (1.6, 0.25),
    ("O", "O"): (2.0, 0.6),
    ("A", "B"): (1.2, 0.1),
    ("A", "A"): (0.8, 0.0),
    ("B", "B"): (0.8, 0.0),
}


def perovskite_atoms(a: float = 4.0, symbols=("Ba", "Ti", "O")) -> Atoms:
    """Cubic ABO3 reference: A (0,0,0), B (1/2,1/2,1/2), O1 (1/2,1/2,0), O2 (1/2,0,1/2), O3 (0,1/2,1/2)."""
    A, B, O = symbols
    return Atoms(
        [A, B, O, O, O],
        scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
        cell=np.eye(3) * a, pbc=True,
    )


def _spring_ifc(atoms: Atoms, cutoff: float):
    classes = ["A", "B", "O", "O", "O"]
    pos = atoms.positions
    cell = atoms.cell.array
    nat = len(atoms)
    blocks: dict = {}
    for R in itertools.product(range(-2, 3), repeat=3):
        shift = np.array(R) @ cell
        for i in range(nat):
            for j in range(nat):
                d = pos[j] + shift - pos[i]
                r = np.linalg.norm(d)
                if r < 1e-8 or r > cutoff:
                    continue
                kpar, kperp = _SPRINGS[tuple(sorted((classes[i], classes[j]), key="ABO".index))]
                dd = np.outer(d, d) / r ** 2
                k = kpar * dd + kperp * (np.eye(3) - dd)
                blocks.setdefault(R, np.zeros((nat, 3, nat, 3)))[i, :, j, :] -= k
                blocks.setdefault((0, 0, 0), np.zeros((nat, 3, nat, 3)))[i, :, i, :] += k
    cells = sorted(blocks)
    return np.array(cells), np.array([blocks[c] for c in cells])


def _ti_o_neighbours():
    """The six O neighbours of B (atom 1, cell 0) as (atom, cell, bond direction)."""
    return [(2, (0, 0, 0), 2), (2, (0, 0, 1), 2), (3, (0, 0, 0), 1), (3, (0, 1, 0), 1),
            (4, (0, 0, 0), 0), (4, (1, 0, 0), 0)]


def _toy_coefficients():
    zero = (0, 0, 0)
    nbrs = _ti_o_neighbours()
    ba = [(0, c) for c in itertools.product((0, 1), repeat=3)]

    def dd(atom_b, cell_b, direction, power, atom_a=1):
        return DisplacementDiff(atom_a, zero, atom_b, cell_b, direction, power)

    coefs = [
        Coefficient(tuple(Term(1.0, (dd(o, c, al, 4),)) for o, c, _ in nbrs for al in range(3)),
                    "(Ti_x-O_x)^4 [cubic orbit]"),
        Coefficient(tuple(Term(1.0, (dd(b, c, al, 4),)) for b, c in ba for al in range(3)),
                    "(Ti_x-Ba_x)^4 [cubic orbit]"),
        Coefficient(tuple(Term(1.0, (dd(o, c, al, 2), dd(o, c, be, 2)))
                          for o, c, _ in nbrs for al, be in ((0, 1), (0, 2), (1, 2))),
                    "(Ti_x-O_x)^2(Ti_y-O_y)^2 [cubic orbit]"),
        Coefficient(tuple(Term(1.0, (dd(o, c, al, 6),)) for o, c, _ in nbrs for al in range(3)),
                    "(Ti_x-O_x)^6 [cubic orbit]"),
        Coefficient(tuple(Term(1.0, (dd(o, c, al, 2),), (StrainFactor(al + 1, 1),))
                          for o, c, _ in nbrs for al in range(3)),
                    "(Ti_x-O_x)^2(eta_1)^1 [cubic orbit]"),
        Coefficient(tuple(Term(1.0, (dd(o, c, al, 1), dd(o, c, be, 1)), (StrainFactor(v, 1),))
                          for o, c, _ in nbrs for al, be, v in ((1, 2, 4), (0, 2, 5), (0, 1, 6))),
                    "(Ti_y-O_y)^1(Ti_z-O_z)^1(eta_4)^1 [cubic orbit]"),
        Coefficient(tuple(Term(1.0, (), (StrainFactor(v, 3),)) for v in (1, 2, 3)), "(eta_1)^3 [cubic orbit]"),
    ]
    values = np.array([0.9, 0.05, 0.6, 0.08, -0.5, -0.3, -2.0])
    return coefs, values


def toy_perovskite(a: float = 4.0, symbols=("Ba", "Ti", "O"), *, dipole: bool = True,
                   anharmonic: bool = True, cutoff: float | None = None) -> Model:
    """Build the toy ABO3 model (lattice constant ``a`` in Angstrom)."""
    atoms = perovskite_atoms(a, symbols)
    cells, ifc = _spring_ifc(atoms, cutoff if cutoff is not None else 1.01 * a)
    elastic = np.zeros((6, 6))
    c11, c12, c44 = 300.0 * GPA_EV_A3, 110.0 * GPA_EV_A3, 120.0 * GPA_EV_A3
    elastic[:3, :3] = c12
    elastic[np.arange(3), np.arange(3)] = c11
    elastic[np.arange(3, 6), np.arange(3, 6)] = c44
    born = eps = None
    if dipole:
        zpar, zperp = -5.8, -2.1
        born = np.zeros((5, 3, 3))
        born[0] = 2.7 * np.eye(3)
        born[1] = 7.3 * np.eye(3)
        for o, axis in ((2, 2), (3, 1), (4, 0)):
            born[o] = zperp * np.eye(3)
            born[o, axis, axis] = zpar
        eps = 6.0 * np.eye(3)
    harmonic = HarmonicPart(cells, ifc, elastic, np.zeros((5, 3, 6)), born, eps)
    masses = np.array([atomic_masses[atomic_numbers[s]] for s in atoms.get_chemical_symbols()])
    reference = Reference(atoms.cell.array, atoms.positions, atoms.numbers, masses, energy=0.0)
    coefs, values = _toy_coefficients() if anharmonic else ([], np.zeros(0))
    return Model(reference, harmonic, AnharmonicPart(coefs, values), name="toy-perovskite",
                 metadata={"source": "sp_server.model.toy (analytic toy model, not fitted)", "a": a})
