"""The second-principles model: reference structure, harmonic part and anharmonic coefficients.

Owns the data and its consistency checks; evaluation lives in ``sp_server.potential`` (over ``sp_server.kernels``).
Units: eV, Angstrom, amu; strain is dimensionless in Voigt order (xx, yy, zz, yz, xz, xy) with engineering shear.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from ase import Atoms

from .posterior import Posterior
from .terms import AnharmonicPart, atom_labels, term_text


def _array(value, shape, name, dtype=float):
    arr = np.asarray(value, dtype=dtype)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if dtype is float and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains non-finite values")
    return arr


@dataclass
class Reference:
    """Reference (unit) cell around which the energy is expanded; must be a stationary point.

    cell: (3, 3) lattice vectors as rows, Angstrom.  positions: (nat, 3) Cartesian, Angstrom.
    numbers: atomic numbers.  masses: amu.  energy: total energy of one reference cell, eV.
    """

    cell: np.ndarray
    positions: np.ndarray
    numbers: np.ndarray
    masses: np.ndarray
    energy: float = 0.0

    def __post_init__(self):
        self.cell = _array(self.cell, (3, 3), "reference cell")
        if abs(np.linalg.det(self.cell)) < 1e-6:
            raise ValueError("reference cell: singular lattice vectors")
        nat = len(np.atleast_1d(self.numbers))
        self.numbers = _array(self.numbers, (nat,), "reference numbers", dtype=int)
        self.positions = _array(self.positions, (nat, 3), "reference positions")
        self.masses = _array(self.masses, (nat,), "reference masses")
        if np.any(self.masses <= 0):
            raise ValueError("reference masses must be positive")
        self.energy = float(self.energy)

    @classmethod
    def from_atoms(cls, atoms: Atoms, energy: float = 0.0) -> "Reference":
        return cls(atoms.cell.array.copy(), atoms.positions.copy(), atoms.numbers.copy(), atoms.get_masses(), energy)

    def to_atoms(self) -> Atoms:
        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=True, masses=self.masses)

    @property
    def natoms(self) -> int:
        return len(self.numbers)

    @property
    def volume(self) -> float:
        """Reference cell volume, A^3."""
        return abs(float(np.linalg.det(self.cell)))

    @property
    def symbols(self) -> list[str]:
        return self.to_atoms().get_chemical_symbols()

    @property
    def labels(self) -> list[str]:
        return atom_labels(self.symbols)

    @property
    def scaled_positions(self) -> np.ndarray:
        return self.positions @ np.linalg.inv(self.cell)


# engine-exact force constants (HarmonicPart.conservative False) may be non-symmetric by DFPT noise, not more
NON_CONSERVATIVE_TOLERANCE = 1e-3


def _pair_deviations(cells, blocks):
    """For each block (nat, 3, nat, 3) at cells[k]: (R, |blocks(R) - blocks(-R)^T| relative to the largest element,
    whether blocks(-R) is missing; a missing one counts as zero)."""
    index = {tuple(r): k for k, r in enumerate(cells)}
    scale = max(np.abs(blocks).max(), 1e-30)
    for k, r in enumerate(cells):
        m = index.get(tuple(-r))
        other = 0.0 if m is None else blocks[m].transpose(2, 3, 0, 1)
        yield tuple(int(x) for x in r), float(np.abs(blocks[k] - other).max()) / scale, m is None


def _check_pairs(cells, blocks, tolerance: float, what: str):
    """blocks[k] (nat, 3, nat, 3) at cells[k] must equal blocks(-R)^T to ``tolerance`` of the largest element."""
    for r, dev, missing in _pair_deviations(cells, blocks):
        if missing and dev > max(1e-12, tolerance):
            raise ValueError(f"{what}: cell {r} present but its opposite {tuple(-x for x in r)} is missing")
        if not missing and dev > tolerance:
            raise ValueError(f"{what}: Phi(R) != Phi(-R)^T for R = {r} beyond {tolerance:g} of the largest "
                             "block (not a symmetric quadratic form)")


@dataclass
class HarmonicPart:
    """Exact harmonic part (from first principles).

    ifc_cells: (nR, 3) integer lattice translations R.
    ifc: (nR, nat, 3, nat, 3) eV/A^2, Phi[R, i, a, j, b] = d^2 E / d u_ia(0) d u_jb(R).  When Born charges are
        given, these are the *short-range* force constants: the dipole-dipole part is added for each supercell
        by an Ewald sum (MULTIBINIT's ``dipdip 1``).
    elastic: (6, 6) eV/A^3, E_elastic = N_cells * V_ref / 2 * eta . C . eta.
    internal_strain: (nat, 3, 6) eV/A, E_sp = sum_L sum_{i a v} Lambda[i, a, v] u_ia(L) eta_v.
    born_charges: (nat, 3, 3) units of e, Z[i, g, a] = dP_g / du_a, or None.
    epsilon_inf: (3, 3) electronic dielectric tensor, or None.
    conservative: True (always, except in engine-exact imports): Phi(R) = Phi(-R)^T, a quadratic form whose
        forces are exactly -dE/du.  False keeps an engine's force constants as it applies them
        (``sp-server import --multibinit-exact``): E = u.Phi.u / 2 and F = -Phi.u with Phi as printed, not exactly
        symmetric and without the sum rule imposed, and the net force removed mass-weighted as multibinit does, so
        that forces match that engine's to its printed digits but are not exactly the energy's derivatives (a
        non-conservative rest of the order of the asymmetry and of the sum-rule residue).
    strain_ifc_cells, strain_ifc: optional strain-dependent force constants (MULTIBINIT's
        ``<correction_force_constant>``): cells (nS, 3) and dPhi[v, S, i, a, j, b] / d eta_v, (6, nS, nat, 3,
        nat, 3) eV/A^2 per unit (Voigt, engineering shear) strain, so that
        E_sIFC = sum_v eta_v * 1/2 sum u_ia(L) dPhi_v[i a, j b](S) u_jb(L + S).
    """

    ifc_cells: np.ndarray
    ifc: np.ndarray
    elastic: np.ndarray
    internal_strain: np.ndarray
    born_charges: Optional[np.ndarray] = None
    epsilon_inf: Optional[np.ndarray] = None
    conservative: bool = True
    strain_ifc_cells: Optional[np.ndarray] = None
    strain_ifc: Optional[np.ndarray] = None

    def __post_init__(self):
        self.ifc_cells = np.asarray(self.ifc_cells, dtype=int).reshape(-1, 3)
        nR = len(self.ifc_cells)
        ifc = np.asarray(self.ifc, dtype=float)
        if ifc.ndim != 5 or ifc.shape[0] != nR or ifc.shape[2] != 3 or ifc.shape[4] != 3 or ifc.shape[1] != ifc.shape[3]:
            raise ValueError(f"harmonic ifc: expected shape ({nR}, nat, 3, nat, 3), got {ifc.shape}")
        nat = ifc.shape[1]
        self.ifc = _array(ifc, ifc.shape, "harmonic ifc")
        if len({tuple(r) for r in self.ifc_cells}) != nR:
            raise ValueError("harmonic ifc_cells: repeated lattice translation")
        self.elastic = _array(self.elastic, (6, 6), "elastic tensor")
        if not np.allclose(self.elastic, self.elastic.T, atol=1e-10 * max(1.0, np.abs(self.elastic).max())):
            raise ValueError("elastic tensor is not symmetric")
        self.internal_strain = _array(self.internal_strain, (nat, 3, 6), "internal strain")
        if (self.born_charges is None) != (self.epsilon_inf is None):
            raise ValueError("dipole-dipole part needs both born_charges and epsilon_inf (or neither)")
        if self.born_charges is not None:
            self.born_charges = _array(self.born_charges, (nat, 3, 3), "born charges")
            self.epsilon_inf = _array(self.epsilon_inf, (3, 3), "epsilon_inf")
            if not np.allclose(self.epsilon_inf, self.epsilon_inf.T, atol=1e-8):
                raise ValueError("epsilon_inf is not symmetric")
            if np.any(np.linalg.eigvalsh(self.epsilon_inf) <= 0):
                raise ValueError("epsilon_inf is not positive definite")
        if (self.strain_ifc is None) != (self.strain_ifc_cells is None):
            raise ValueError("strain-dependent force constants need both strain_ifc_cells and strain_ifc")
        if self.strain_ifc is not None:
            self.strain_ifc_cells = np.asarray(self.strain_ifc_cells, dtype=int).reshape(-1, 3)
            nS = len(self.strain_ifc_cells)
            if len({tuple(r) for r in self.strain_ifc_cells}) != nS:
                raise ValueError("strain_ifc_cells: repeated lattice translation")
            self.strain_ifc = _array(self.strain_ifc, (6, nS, nat, 3, nat, 3), "strain-dependent force constants")
            if self.conservative:
                for v in range(6):
                    _check_pairs(self.strain_ifc_cells, self.strain_ifc[v], 1e-8, f"strain-dependent force constants "
                                 f"(Voigt {v + 1})")
        self.conservative = bool(self.conservative)
        if self.conservative:
            self._check_hermitian()
        else:
            self._check_hermitian(tolerance=NON_CONSERVATIVE_TOLERANCE)

    @property
    def natoms(self) -> int:
        return self.ifc.shape[1]

    @property
    def has_dipole(self) -> bool:
        return self.born_charges is not None

    def asymmetry(self) -> float:
        """Largest |Phi(R) - Phi(-R)^T| relative to the largest block element (0 for a quadratic form); a block
        whose opposite cell is missing counts whole."""
        return max((dev for _, dev, _ in _pair_deviations(self.ifc_cells, self.ifc)), default=0.0)

    @property
    def has_strain_ifc(self) -> bool:
        return self.strain_ifc is not None

    def _check_hermitian(self, tolerance: float = 1e-8):
        """Phi_ij(R) must equal Phi_ji(-R)^T (to ``tolerance`` relative) for a valid quadratic form."""
        _check_pairs(self.ifc_cells, self.ifc, tolerance, "harmonic ifc")

    def asr_violation(self, target=None) -> float:
        """Largest |sum_{j,R} Phi_ij(R) - target_i| (eV/A^2; target default 0): zero when the acoustic sum rule
        holds (short-range part only; with low-symmetry Born charges its target is minus
        sp_server.kernels.ewald.dipole_sum_rule_rest, see impose_asr)."""
        s = self.ifc.sum(axis=(0, 3))
        return float(np.abs(s if target is None else s - target).max())

    def impose_asr(self, tol: float = 1e-12, max_iter: int = 200, target=None):
        """Enforce the acoustic sum rule (sum_{j,R} Phi_ij(R) = target_i, default 0) while keeping
        Phi_ij(R) = Phi_ji(-R)^T.

        ``target`` (nat, 3, 3), antisymmetric, summing to zero over atoms: what the short-range part must carry so
        that short-range + dipole-dipole is translation invariant when the dipole-dipole row sums are not
        symmetric (low-symmetry sites: minus sp_server.kernels.ewald.dipole_sum_rule_rest).
        Alternates the two orthogonal projections (each row's excess spread evenly over its stored blocks, then
        symmetrisation over (R, -R) pairs) until both hold to ``tol`` relative (von Neumann's alternating
        projections); the internal strain gets sum_i Lambda_i = 0.
        """
        goal = np.zeros((self.natoms, 3, 3)) if target is None else np.asarray(target, dtype=float)
        if goal.shape != (self.natoms, 3, 3):
            raise ValueError(f"impose_asr: target must be ({self.natoms}, 3, 3), got {goal.shape}")
        if np.abs(goal.sum(axis=0) - goal.sum(axis=0).T).max() > 1e-9 * max(np.abs(goal).max(), 1.0):
            raise ValueError("impose_asr: the target's sum over atoms must be symmetric (no symmetric force "
                             "constants reach it)")
        if not np.any(np.all(self.ifc_cells == 0, axis=1)):
            self.ifc_cells = np.vstack([self.ifc_cells, [[0, 0, 0]]])
            self.ifc = np.concatenate([self.ifc, np.zeros((1,) + self.ifc.shape[1:])])
        index = {tuple(r): k for k, r in enumerate(self.ifc_cells)}
        missing = [tuple(-r) for r in self.ifc_cells if tuple(-r) not in index]
        if missing:
            self.ifc_cells = np.vstack([self.ifc_cells, missing])
            self.ifc = np.concatenate([self.ifc, np.zeros((len(missing),) + self.ifc.shape[1:])])
            index = {tuple(r): k for k, r in enumerate(self.ifc_cells)}
        opposite = np.array([index[tuple(-r)] for r in self.ifc_cells])
        nblocks = len(self.ifc_cells) * self.natoms
        scale = max(np.abs(self.ifc).max(), 1e-30)
        ifc = self.ifc.copy()
        for _ in range(max_iter):
            total = ifc.sum(axis=(0, 3)) - goal  # (nat, 3, 3)
            ifc -= total[None, :, :, None, :] / nblocks
            ifc = 0.5 * (ifc + ifc[opposite].transpose(0, 3, 4, 1, 2))
            if np.abs(ifc.sum(axis=(0, 3)) - goal).max() < tol * scale:
                break
        else:
            raise ValueError(f"acoustic sum rule could not be imposed to {tol} in {max_iter} iterations")
        self.ifc = ifc
        self.internal_strain = self.internal_strain - self.internal_strain.mean(axis=0, keepdims=True)
        self.conservative = True   # symmetric now


@dataclass
class Model:
    """A second-principles model: E = E_harm(u) + E_elastic(eta) + E_strain-phonon(u, eta) + sum_z w_z tau_z(u, eta).

    ``version`` is a counter that grows each time the coefficients change (used for hot reload and provenance).
    ``posterior`` (from a Bayesian fit) makes every evaluation able to report its Bayesian error.
    """

    reference: Reference
    harmonic: HarmonicPart
    anharmonic: AnharmonicPart = field(default_factory=AnharmonicPart)
    name: str = "model"
    version: int = 1
    metadata: dict = field(default_factory=dict)
    posterior: Optional[Posterior] = None

    def __post_init__(self):
        nat = self.reference.natoms
        if self.harmonic.natoms != nat:
            raise ValueError(f"harmonic part has {self.harmonic.natoms} atoms, reference has {nat}")
        self.anharmonic.check_atoms(nat)
        if self.posterior is not None and self.posterior.ncoef != len(self.anharmonic):
            raise ValueError(f"posterior has {self.posterior.ncoef} coefficients, the model {len(self.anharmonic)}")

    @property
    def natoms(self) -> int:
        return self.reference.natoms

    def supercell(self, mesh: Sequence[int]) -> Atoms:
        """The reference repeated n1 x n2 x n3 (atom order: cell-major, C order over cells; same as Atoms.repeat)."""
        return self.reference.to_atoms().repeat(tuple(int(n) for n in mesh))

    def term_texts(self) -> list[str]:
        labels = self.reference.labels
        return [c.name or term_text(c.terms[0], labels) for c in self.anharmonic.coefficients]

    def summary(self) -> str:
        ref = self.reference
        lines = [
            f"sp_server model {self.name!r} (version {self.version})",
            f"  reference: {''.join(ref.labels)}  {ref.natoms} atoms, volume {ref.volume:.4f} A^3, "
            f"energy {ref.energy:.6f} eV/cell",
            f"  short-range IFCs: {len(self.harmonic.ifc_cells)} lattice vectors; ASR violation "
            f"{self.harmonic.asr_violation():.2e} eV/A^2",
            f"  dipole-dipole: {'yes' if self.harmonic.has_dipole else 'no'}",
            f"  anharmonic coefficients: {len(self.anharmonic)}",
            "  Bayesian posterior: " + ("none" if self.posterior is None else
                                        f"sigma_v {self.posterior.sigma_v:.3g}, sigma_w {self.posterior.sigma_w:.3g}, "
                                        f"{self.posterior.stats.get('n_structures', '?')} structures"),
        ]
        for text, value in zip(self.term_texts(), self.anharmonic.values):
            lines.append(f"    {value: .6e}  {text}")
        return "\n".join(lines)
