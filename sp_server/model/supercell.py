"""Re-express a model on a larger reference cell (any integer supercell matrix, e.g. a 20-atom orthorhombic cell).

The physics is unchanged: force constants, Born charges, internal strain and every anharmonic term are mapped onto
the atoms of the new reference cell, and each coefficient's lattice sum over old cells becomes a sum over new
cells of its det(S) translated copies.  Useful to evaluate non-diagonal supercells, and to hand MULTIBINIT a
model on the reference cell it expects.
"""
from __future__ import annotations

import itertools

import numpy as np

from .model import HarmonicPart, Model, Reference
from .terms import AnharmonicPart, Coefficient, DisplacementDiff, Term


class _Sites:
    """Old sites (atom i, old cell c) <-> new sites (atom k, new cell R') for new cell = S @ old cell (rows)."""

    def __init__(self, natoms: int, matrix: np.ndarray):
        self.S = np.asarray(matrix, dtype=int)
        det = int(round(np.linalg.det(self.S)))
        if det <= 0:
            raise ValueError(f"supercell matrix must have a positive determinant, got {det}")
        self.inv = np.linalg.inv(self.S)
        # old-lattice representatives of the new cell: old cells c with c @ S^-1 in [0, 1)^3
        span = np.abs(self.S).sum(axis=0)
        reps = []
        for c in itertools.product(*(range(-int(s), int(s) + 1) for s in span)):
            f = np.array(c) @ self.inv
            if np.all(f > -1e-9) and np.all(f < 1 - 1e-9):
                reps.append(tuple(c))
        if len(reps) != det:
            raise ValueError(f"found {len(reps)} lattice points in the supercell, expected det(S) = {det}")
        self.reps = sorted(reps)
        self.rep_index = {c: m for m, c in enumerate(self.reps)}
        self.nat = natoms

    def to_new(self, atom: int, cell) -> tuple[int, tuple]:
        cell = np.asarray(cell)
        big = np.floor(cell @ self.inv + 1e-9).astype(int)
        rest = tuple(int(x) for x in cell - big @ self.S)
        return self.rep_index[rest] * self.nat + atom, tuple(int(x) for x in big)

    def old_of(self, k: int) -> tuple[int, tuple]:
        return k % self.nat, self.reps[k // self.nat]


def expand_reference(model: Model, matrix) -> Model:
    """The same model on the reference cell ``matrix @ model.reference.cell`` (integer 3x3, rows)."""
    ref = model.reference
    sites = _Sites(ref.natoms, matrix)
    nrep = len(sites.reps)
    nat_new = nrep * ref.natoms
    cell = sites.S @ ref.cell
    order = [sites.old_of(k) for k in range(nat_new)]
    positions = np.array([ref.positions[i] + np.array(c) @ ref.cell for i, c in order])
    pick = np.array([i for i, _ in order])
    reference = Reference(cell, positions, ref.numbers[pick], ref.masses[pick], ref.energy * nrep)

    h = model.harmonic

    def expand_blocks(old_cells, old_blocks):
        blocks: dict = {}
        for R, blk in zip(old_cells, old_blocks):
            for k, (i, ck) in enumerate(order):
                for j in range(ref.natoms):
                    l, Rn = sites.to_new(j, np.array(ck) + R)
                    acc = blocks.setdefault(Rn, np.zeros((nat_new, 3, nat_new, 3)))
                    acc[k, :, l, :] += blk[i, :, j, :]
        cells = sorted(blocks)
        return np.array(cells), np.array([blocks[c] for c in cells])

    cells, ifc = expand_blocks(h.ifc_cells, h.ifc)
    s_cells = s_ifc = None
    if h.has_strain_ifc:
        per_v = [expand_blocks(h.strain_ifc_cells, h.strain_ifc[v]) for v in range(6)]
        s_cells = per_v[0][0]
        s_ifc = np.array([b for _, b in per_v])
    harmonic = HarmonicPart(cells, ifc, h.elastic, h.internal_strain[pick],
                            None if h.born_charges is None else h.born_charges[pick], h.epsilon_inf,
                            conservative=h.conservative, strain_ifc_cells=s_cells, strain_ifc=s_ifc)

    coefs = []
    for coef in model.anharmonic.coefficients:
        terms = []
        for t in coef.terms:
            for rep in sites.reps:
                disps = []
                for d in t.displacements:
                    a, ca = sites.to_new(d.atom_a, np.add(d.cell_a, rep))
                    b, cb = sites.to_new(d.atom_b, np.add(d.cell_b, rep))
                    disps.append(DisplacementDiff(a, ca, b, cb, d.direction, d.power))
                terms.append(Term(t.weight, tuple(disps), t.strains))
        coefs.append(Coefficient(tuple(terms), name=coef.name))
    anh = AnharmonicPart(coefs, model.anharmonic.values.copy())
    meta = dict(model.metadata, expanded_from=model.name, supercell_matrix=sites.S.tolist())
    return Model(reference, harmonic, anh, name=f"{model.name}-x{nrep}", version=model.version, metadata=meta)
