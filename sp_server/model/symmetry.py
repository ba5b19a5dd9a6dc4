"""Space-group operations of a reference cell (spglib) and symmetry-adapted coefficients (orbits of monomials).

A coefficient is made invariant by summing a monomial over its orbit under the space group: each operation maps
atoms to atoms (with a lattice shift), Cartesian directions to signed directions and strain components likewise.
Terms are put in a canonical form (translation of the whole term, order inside a difference, order of factors)
so that duplicates add up and terms that cancel by symmetry disappear.  Only groups whose Cartesian point
operations are signed permutations of x, y, z are supported (perovskite settings: cubic, tetragonal,
orthorhombic, rhombohedral axes excluded), which keeps every monomial a monomial.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import spglib

if hasattr(spglib, "error") and hasattr(spglib.error, "OLD_ERROR_HANDLING"):
    spglib.error.OLD_ERROR_HANDLING = False  # exceptions instead of None + warning

from .model import Reference
from .terms import Coefficient, DisplacementDiff, StrainFactor, Term

_VOIGT = {(0, 0): 1, (1, 1): 2, (2, 2): 3, (1, 2): 4, (2, 1): 4, (0, 2): 5, (2, 0): 5, (0, 1): 6, (1, 0): 6}
_PAIR = {1: (0, 0), 2: (1, 1), 3: (2, 2), 4: (1, 2), 5: (0, 2), 6: (0, 1)}


@dataclass(frozen=True)
class SymmetryOperation:
    """x -> R x + t on the crystal.  rotation: integer (fractional), perm/sign: Cartesian image of axis a is
    sign[a] * e_perm[a];  atom_map[i] and shift[i]: site (i, c) goes to (atom_map[i], R c + shift[i])."""

    rotation: np.ndarray
    perm: tuple
    sign: tuple
    atom_map: np.ndarray
    shift: np.ndarray


def space_group_operations(reference: Reference, symprec: float = 1e-4) -> list[SymmetryOperation]:
    cell = reference.cell
    frac = reference.scaled_positions
    try:
        sym = spglib.get_symmetry((cell, frac, reference.numbers), symprec=symprec)
    except Exception as exc:  # spglib >= 2.5 raises SpglibError when asked to
        raise ValueError(f"spglib could not determine the symmetry of the reference cell: {exc}") from None
    if sym is None:
        raise ValueError("spglib could not determine the symmetry of the reference cell")
    ops = []
    a_t = cell.T
    for R, t in zip(sym["rotations"], sym["translations"]):
        rc = a_t @ R @ np.linalg.inv(a_t)
        ri = np.round(rc)
        if not np.allclose(rc, ri, atol=1e-6) or not np.all(np.abs(ri).sum(axis=0) == 1):
            raise ValueError("the reference's point group does not permute the Cartesian axes; symmetry-adapted "
                             "Cartesian monomials need a setting aligned with x, y, z")
        perm = tuple(int(np.flatnonzero(ri[:, a])[0]) for a in range(3))
        sign = tuple(int(ri[perm[a], a]) for a in range(3))
        new = frac @ R.T + t
        atom_map = np.empty(len(frac), dtype=int)
        shift = np.empty((len(frac), 3), dtype=int)
        for i, f in enumerate(new):
            d = f - frac
            j = np.flatnonzero((np.abs(d - np.round(d)) < 1e-4).all(axis=1) & (reference.numbers == reference.numbers[i]))
            if len(j) != 1:
                raise ValueError("symmetry operation does not map the reference atoms onto themselves")
            atom_map[i] = j[0]
            shift[i] = np.round(d[j[0]]).astype(int)
        ops.append(SymmetryOperation(R.astype(int), perm, sign, atom_map, shift))
    return ops


def _apply(op: SymmetryOperation, term: Term) -> Term:
    w = term.weight
    disps = []
    for d in term.displacements:
        ca = op.rotation @ np.array(d.cell_a) + op.shift[d.atom_a]
        cb = op.rotation @ np.array(d.cell_b) + op.shift[d.atom_b]
        w *= op.sign[d.direction] ** d.power
        disps.append(DisplacementDiff(int(op.atom_map[d.atom_a]), tuple(ca), int(op.atom_map[d.atom_b]), tuple(cb),
                                      op.perm[d.direction], d.power))
    strains = []
    for s in term.strains:
        i, j = _PAIR[s.voigt]
        w *= (op.sign[i] * op.sign[j]) ** s.power
        strains.append(StrainFactor(_VOIGT[(op.perm[i], op.perm[j])], s.power))
    return Term(w, tuple(disps), tuple(strains))


def canonical(term: Term) -> Term:
    """Same lattice-summed monomial in canonical form: a < b inside each difference (sign (-1)^p), factors merged
    and sorted, and the whole term translated to the lexicographically smallest of its placements."""
    w = term.weight
    facs: dict = {}
    for d in term.displacements:
        a, b = (d.atom_a, d.cell_a), (d.atom_b, d.cell_b)
        if b < a:
            a, b = b, a
            w *= (-1) ** d.power
        key = (a, b, d.direction)
        facs[key] = facs.get(key, 0) + d.power
    if len(facs) == 1 and next(iter(facs.values())) == 1:
        # a lone linear difference sums over the lattice to sum_L u_a(L) - u_b(L): its cells do not matter
        ((a, b, al),) = facs
        facs = {((a[0], (0, 0, 0)), (b[0], (0, 0, 0)), al): 1}
    strains: dict = {}
    for s in term.strains:
        strains[s.voigt] = strains.get(s.voigt, 0) + s.power
    best = None
    cells = {c for (a, b, _) in facs for c in (a[1], b[1])} or {(0, 0, 0)}
    for c0 in cells:
        shifted = sorted(
            ((a[0], tuple(np.subtract(a[1], c0))), (b[0], tuple(np.subtract(b[1], c0))), al, p)
            for (a, b, al), p in facs.items()
        )
        key = tuple(shifted)
        if best is None or key < best:
            best = key
    disps = tuple(DisplacementDiff(a[0], a[1], b[0], b[1], al, p) for a, b, al, p in best)
    return Term(w, disps, tuple(StrainFactor(v, q) for v, q in sorted(strains.items())))


def _key(term: Term):
    return (tuple((d.atom_a, d.cell_a, d.atom_b, d.cell_b, d.direction, d.power) for d in term.displacements),
            tuple((s.voigt, s.power) for s in term.strains))


def symmetrize(term: Term, ops, name: str = "", tol: float = 1e-10) -> Coefficient | None:
    """The orbit of ``term`` under ``ops`` as one coefficient (weights normalised so the seed has weight 1), or
    None when the orbit sums to zero (the monomial is forbidden by symmetry)."""
    seed = canonical(term)
    if any(d.atom_a == d.atom_b and d.cell_a == d.cell_b for d in seed.displacements):
        return None  # a difference of a site with itself (e.g. a lone u_a(L) - u_a(L+R) summed over L) is zero
    acc: dict = {}
    for op in ops:
        t = canonical(_apply(op, term))
        k = _key(t)
        acc[k] = acc.get(k, 0.0) + t.weight
    norm = acc.get(_key(seed), 0.0)
    if abs(norm) < tol:
        return None
    terms = tuple(
        Term(w / norm, tuple(DisplacementDiff(*f) for f in k[0]), tuple(StrainFactor(*s) for s in k[1]))
        for k, w in sorted(acc.items()) if abs(w / norm) > tol
    )
    return Coefficient(terms, name=name)


def is_invariant(coefficient: Coefficient, ops, tol: float = 1e-9) -> bool:
    """True when every operation maps the coefficient's sum of terms onto itself."""
    base: dict = {}
    for t in coefficient.terms:
        c = canonical(t)
        base[_key(c)] = base.get(_key(c), 0.0) + c.weight
    for op in ops:
        img: dict = {}
        for t in coefficient.terms:
            c = canonical(_apply(op, t))
            img[_key(c)] = img.get(_key(c), 0.0) + c.weight
        keys = set(base) | set(img)
        if any(abs(base.get(k, 0.0) - img.get(k, 0.0)) > tol for k in keys):
            return False
    return True
