"""Anharmonic terms of a second-principles model: coefficients made of monomials in displacement differences and strain.

The semantics are those of MULTIBINIT's ``<Heff_definition>`` XML, so that file maps one to one onto these classes:
a *coefficient* z has a value w_z and a list of *terms*; each term has a weight c_t and is a product of
displacement differences ``(u_a(L + cell_a) - u_b(L + cell_b))_alpha ** p`` and strain factors ``eta_v ** q``
(Voigt v = 1..6, engineering shear: eta_4 = 2 e_yz, eta_5 = 2 e_xz, eta_6 = 2 e_xy).  The energy is

    E_anh = sum_z w_z tau_z,   tau_z = sum_L sum_{t in z} c_t prod_d (Delta_d(L))^p_d prod_s eta_v^q_s,

summed over every cell L of the supercell (translation invariance).  Values are in eV / Angstrom^(sum p).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DIRECTIONS = "xyz"


@dataclass(frozen=True)
class DisplacementDiff:
    """One factor ``(u_{atom_a}(L + cell_a) - u_{atom_b}(L + cell_b))_direction ** power``.

    atom indices are 0-based indices of the reference (unit) cell; cells are integer lattice translations;
    direction is 0, 1, 2 for x, y, z.
    """

    atom_a: int
    cell_a: tuple[int, int, int]
    atom_b: int
    cell_b: tuple[int, int, int]
    direction: int
    power: int

    def __post_init__(self):
        object.__setattr__(self, "cell_a", tuple(int(c) for c in self.cell_a))
        object.__setattr__(self, "cell_b", tuple(int(c) for c in self.cell_b))
        if self.direction not in (0, 1, 2):
            raise ValueError(f"displacement difference: direction must be 0, 1 or 2 (x, y, z), got {self.direction}")
        if self.power < 1:
            raise ValueError(f"displacement difference: power must be >= 1, got {self.power}")
        if len(self.cell_a) != 3 or len(self.cell_b) != 3:
            raise ValueError("displacement difference: cells must have 3 integer components")

    def key(self):
        """Identity of the difference itself (without the power)."""
        return (self.atom_a, self.cell_a, self.atom_b, self.cell_b, self.direction)


@dataclass(frozen=True)
class StrainFactor:
    """One factor ``eta_voigt ** power`` with voigt in 1..6."""

    voigt: int
    power: int

    def __post_init__(self):
        if not 1 <= self.voigt <= 6:
            raise ValueError(f"strain factor: Voigt index must be 1..6, got {self.voigt}")
        if self.power < 1:
            raise ValueError(f"strain factor: power must be >= 1, got {self.power}")


@dataclass(frozen=True)
class Term:
    """A weighted monomial: weight * prod(displacement differences) * prod(strain factors)."""

    weight: float
    displacements: tuple[DisplacementDiff, ...] = ()
    strains: tuple[StrainFactor, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "displacements", tuple(self.displacements))
        object.__setattr__(self, "strains", tuple(self.strains))
        if not self.displacements and not self.strains:
            raise ValueError("term has neither displacement nor strain factors")
        if not np.isfinite(self.weight):
            raise ValueError(f"term weight is not finite: {self.weight}")

    @property
    def displacement_order(self) -> int:
        return sum(d.power for d in self.displacements)

    @property
    def strain_order(self) -> int:
        return sum(s.power for s in self.strains)


@dataclass(frozen=True)
class Coefficient:
    """A symmetry-adapted anharmonic coefficient: a named list of terms sharing one fitted value."""

    terms: tuple[Term, ...]
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms:
            raise ValueError(f"coefficient {self.name!r} has no terms")

    @property
    def displacement_order(self) -> int:
        return self.terms[0].displacement_order

    @property
    def strain_order(self) -> int:
        return self.terms[0].strain_order


def atom_labels(symbols: Sequence[str]) -> list[str]:
    """Labels of the reference atoms as MULTIBINIT prints them: 'Ba', 'Ti', 'O1', 'O2', 'O3'."""
    counts: dict[str, int] = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    seen: dict[str, int] = {}
    labels = []
    for s in symbols:
        if counts[s] == 1:
            labels.append(s)
        else:
            seen[s] = seen.get(s, 0) + 1
            labels.append(f"{s}{seen[s]}")
    return labels


def term_text(term: Term, labels: Sequence[str]) -> str:
    """Human-readable form of a term, e.g. ``(Ti_z-O1_z)^3(eta_3)^1``; cells are shown when not the home cell."""
    parts = []
    for d in term.displacements:
        a = labels[d.atom_a] + ("" if d.cell_a == (0, 0, 0) else "[%d,%d,%d]" % d.cell_a)
        b = labels[d.atom_b] + ("" if d.cell_b == (0, 0, 0) else "[%d,%d,%d]" % d.cell_b)
        c = DIRECTIONS[d.direction]
        parts.append(f"({a}_{c}-{b}_{c})^{d.power}")
    for s in term.strains:
        parts.append(f"(eta_{s.voigt})^{s.power}")
    return "".join(parts)


@dataclass
class AnharmonicPart:
    """The list of coefficients (definitions) and their values (eV / A^order)."""

    coefficients: list[Coefficient] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=float).reshape(-1)
        if len(self.values) != len(self.coefficients):
            raise ValueError(
                f"anharmonic part: {len(self.coefficients)} coefficient definitions but {len(self.values)} values"
            )
        if not np.all(np.isfinite(self.values)):
            bad = np.flatnonzero(~np.isfinite(self.values))
            raise ValueError(f"anharmonic part: non-finite coefficient values at indices {bad.tolist()}")

    def __len__(self):
        return len(self.coefficients)

    def check_atoms(self, natoms: int):
        for z, coef in enumerate(self.coefficients):
            for t in coef.terms:
                for d in t.displacements:
                    for a in (d.atom_a, d.atom_b):
                        if not 0 <= a < natoms:
                            raise ValueError(
                                f"coefficient {z} ({coef.name!r}): atom index {a} outside the reference cell "
                                f"(0..{natoms - 1})"
                            )
