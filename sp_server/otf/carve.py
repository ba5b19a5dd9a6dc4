"""Frames of production runs made labellable: periodic sub-cells carved out of big frames, and near-duplicate
displacement patterns.

A flagged frame of a 10^3 NPT run (5000 atoms) cannot be labelled by DFT.  :func:`carve` cuts an n1 x n2 x n3
block of reference cells out of it, centred on the atom with the largest per-atom Bayesian force error, and makes
it a periodic cell with the frame's own displacements and homogeneous strain (unrotated).  The atoms near the
centre see the environment they had in the big frame up to the block's faces; the model's forces on the centre
cell's atoms in the carved cell and in the big frame agree to within what the interactions across the faces
carry (measured in tests/otf/test_learn.py and docs/learn.md).

:class:`Patterns` says whether a frame repeats one already known: two frames of the same shape are the same
pattern when, after removing each one's uniform translation, some lattice translation of one brings every atom
within ``displacement`` (A) of the other's and every strain component within ``strain``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from ase import Atoms

from ..model.mapping import Frame, FrameMapper
from ..model.model import Model
from ..potential import Evaluator


def interaction_reach(model: Model, tol: float = 1e-10) -> tuple:
    """(r1, r2, r3): how many reference cells away, along each lattice vector, an atom's force still depends on
    displacements through the short-range parts: the harmonic force constants' translations (blocks above ``tol``
    relative) and every anharmonic term's span.  The dipole-dipole part (Born charges) reaches further: it is not
    counted here."""
    h = model.harmonic
    big = np.abs(h.ifc).reshape(len(h.ifc_cells), -1).max(axis=1)
    keep = big > tol * max(float(big.max(initial=0.0)), 1e-300)
    reach = np.abs(h.ifc_cells[keep]).max(axis=0) if keep.any() else np.zeros(3, dtype=int)
    for coef in model.anharmonic.coefficients:
        for term in coef.terms:
            cells = [d.cell_a for d in term.displacements] + [d.cell_b for d in term.displacements]
            if cells:
                c = np.asarray(cells)
                reach = np.maximum(reach, c.max(axis=0) - c.min(axis=0))
    return tuple(int(r) for r in reach)


def exact_shape(model: Model, mesh) -> tuple:
    """The smallest sub-cell of a frame of ``mesh`` whose centre cell sees every short-range neighbour it has in the
    frame: 2 r + 1 cells along each axis (r from :func:`interaction_reach`), at most the frame's own."""
    return tuple(min(2 * r + 1, int(n)) for r, n in zip(interaction_reach(model), mesh))


def carve_shape(natoms_cell: int, mesh, max_atoms: int) -> Optional[tuple]:
    """The sub-cell (m1, m2, m3) for frames of ``mesh`` with at most ``max_atoms`` atoms: as close to a cube as the
    budget allows, each m_i <= n_i; None when the frame is small enough as it is (or not even one cell fits)."""
    mesh = tuple(int(n) for n in mesh)
    if natoms_cell * int(np.prod(mesh)) <= max_atoms:
        return None
    if natoms_cell > max_atoms:
        return None
    m = [1, 1, 1]
    while True:   # grow the smallest axis that can still grow
        order = sorted(range(3), key=lambda i: (m[i], -mesh[i]))
        for i in order:
            trial = list(m)
            trial[i] += 1
            if trial[i] <= mesh[i] and natoms_cell * int(np.prod(trial)) <= max_atoms:
                m = trial
                break
        else:
            return tuple(m)


@dataclass
class Carved:
    """A sub-cell cut out of a frame.  atoms: the periodic sub-cell (Angstrom, unrotated, model atom order);
    shape (m1, m2, m3); centre_site: the centre atom's model site index in the big frame; centre_cell: its cell in
    the big frame; window: the big frame's cell indices along each axis that the sub-cell holds; centre_local:
    the index of the centre cell's first atom in ``atoms`` (its atoms are centre_local .. centre_local + nat - 1);
    error: the centre atom's Bayesian force error, eV/A."""

    atoms: Atoms
    shape: tuple
    centre_site: int
    centre_cell: tuple
    window: tuple
    centre_local: int
    error: float


def carve_frame(model: Model, frame: Frame, shape, centre_site: int) -> Carved:
    """Cut ``shape`` reference cells out of the mapped ``frame`` around model site ``centre_site`` (see module)."""
    nat = model.natoms
    shape = tuple(int(m) for m in shape)
    mesh = tuple(frame.mesh)
    cell_index, _ = divmod(int(centre_site), nat)
    centre_cell = tuple(int(c) for c in np.unravel_index(cell_index, mesh))
    window = tuple((c - m // 2 + np.arange(m)) % n for c, m, n in zip(centre_cell, shape, mesh))
    u = frame.u[np.ix_(*window)]                  # (m1, m2, m3, nat, 3)
    cell, positions = FrameMapper.frame_from_model(model.reference, shape, u, frame.eta)
    atoms = Atoms(numbers=np.tile(model.reference.numbers, int(np.prod(shape))), positions=positions, cell=cell,
                  pbc=True)
    local_cell = int(np.ravel_multi_index(tuple(m // 2 for m in shape), shape))
    return Carved(atoms, shape, int(centre_site), centre_cell, window, local_cell * nat, float("nan"))


def carve(model: Model, atoms: Atoms, shape, evaluator: Optional[Evaluator] = None,
          max_displacement: Optional[float] = None) -> Optional[Carved]:
    """The sub-cell of ``atoms`` (any orientation and atom order) of ``shape`` reference cells, centred on the atom
    with the largest per-atom Bayesian force error of ``model`` (which needs a posterior).  max_displacement (A):
    centred on the atom of largest error whose sub-cell keeps every atom within this of its site (uniform
    translation removed), None when no sub-cell does."""
    evaluator = evaluator or Evaluator(model)
    frame, errors = evaluator.atom_force_errors(atoms.cell.array, atoms.positions, atoms.numbers)
    tried = set()
    for site in np.argsort(-errors, kind="stable"):
        carved = carve_frame(model, frame, shape, int(site))
        if max_displacement is not None:
            if carved.centre_cell in tried:
                continue
            tried.add(carved.centre_cell)
            u = frame.u[np.ix_(*carved.window)].reshape(-1, 3)
            if np.sqrt(((u - u.mean(axis=0)) ** 2).sum(axis=1)).max() > max_displacement:
                continue
        carved.error = float(errors[site])
        return carved
    return None


class Patterns:
    """Known displacement patterns, for near-duplicate checks (see the module docstring).  ``add`` and
    ``duplicate_of`` take mapped frames (:class:`sp_server.model.mapping.Frame`) with any key."""

    def __init__(self, displacement: float = 0.03, strain: float = 0.005):
        self.displacement = float(displacement)   # A, largest atom difference
        self.strain = float(strain)               # largest Voigt strain difference
        self._by_mesh: dict = {}                  # mesh -> ([key], [u (n1, n2, n3, nat, 3)], [eta (6,)])

    @staticmethod
    def _pattern(frame: Frame):
        u = frame.u - frame.u.reshape(-1, 3).mean(axis=0)
        return tuple(frame.mesh), u, np.asarray(frame.eta, dtype=float)

    def __len__(self):
        return sum(len(v[0]) for v in self._by_mesh.values())

    def add(self, key, frame: Frame):
        mesh, u, eta = self._pattern(frame)
        keys, us, etas = self._by_mesh.setdefault(mesh, ([], [], []))
        keys.append(key)
        us.append(u)
        etas.append(eta)

    def duplicate_of(self, frame: Frame):
        """The key of a known pattern that ``frame`` repeats, else None."""
        mesh, u, eta = self._pattern(frame)
        if mesh not in self._by_mesh:
            return None
        keys, us, etas = self._by_mesh[mesh]
        etas = np.asarray(etas)
        close = np.flatnonzero(np.abs(etas - eta).max(axis=1) <= self.strain)
        if close.size == 0:
            return None
        stack = np.asarray(us)[close]                 # (K, n1, n2, n3, nat, 3)
        for shift in np.ndindex(*mesh):
            rolled = np.roll(u, shift, axis=(0, 1, 2))
            d = np.sqrt(((stack - rolled) ** 2).sum(axis=-1)).reshape(len(close), -1).max(axis=1)
            hit = np.flatnonzero(d <= self.displacement)
            if hit.size:
                return keys[int(close[hit[0]])]
        return None
