"""From an MD engine's frame (cell + Cartesian positions, any orientation) to the model's (u, eta), and back.

The engine cell F-maps the reference supercell: cell^T = F (n * ref_cell)^T with F = R U (polar decomposition).
eta is the Biot strain U - 1 in Voigt form (engineering shear), rotation R is removed, and the displacement of each
atom is taken by minimum image from its site in the strained reference supercell.  The atom order of the engine
is matched to the model's sites once (by position) and cached.  Units: Angstrom.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import Reference

VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


class MappingError(ValueError):
    """A structure that cannot be mapped onto the model's reference supercell."""


def voigt_from_matrix(strain: np.ndarray) -> np.ndarray:
    """Symmetric 3x3 strain -> Voigt (xx, yy, zz, 2yz, 2xz, 2xy)."""
    s = strain
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2] + s[2, 1], s[0, 2] + s[2, 0], s[0, 1] + s[1, 0]])


def matrix_from_voigt(eta: np.ndarray) -> np.ndarray:
    """Voigt strain (engineering shear) -> symmetric 3x3 matrix."""
    e = np.asarray(eta, dtype=float)
    return np.array([[e[0], e[5] / 2, e[4] / 2], [e[5] / 2, e[1], e[3] / 2], [e[4] / 2, e[3] / 2, e[2]]])


_VI, _VJ = np.array(VOIGT_PAIRS).T


def stress_voigt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric 3x3 stress (or a stack (..., 3, 3)) -> ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    return np.asarray(sigma)[..., _VI, _VJ]


def symmetric_from_voigt(v: np.ndarray) -> np.ndarray:
    """Voigt (xx, yy, zz, yz, xz, xy) -> symmetric 3x3 with the same entries (stress, or dE/d eta), no halving;
    the inverse of stress_voigt.  Works on stacks (..., 6)."""
    v = np.asarray(v, dtype=float)
    m = np.empty(v.shape[:-1] + (3, 3))
    m[..., _VI, _VJ] = v
    m[..., _VJ, _VI] = v
    return m


@dataclass
class Frame:
    """One configuration in the model frame.

    mesh: supercell repetitions (n1, n2, n3).  u: (n1, n2, n3, nat, 3) displacements, Angstrom (model order).
    eta: (6,) Voigt strain.  stretch U and rotation R: engine cell^T = R U (reference supercell)^T.
    order[s] = engine index of model site s (flat C order over cells, then basis atom).
    sites: (N, 3) unstrained reference site positions (model order), Angstrom.  volume: current, A^3.
    """

    mesh: tuple
    u: np.ndarray
    eta: np.ndarray
    stretch: np.ndarray
    rotation: np.ndarray
    order: np.ndarray
    sites: np.ndarray
    volume: float

    @property
    def max_displacement(self) -> float:
        """Largest distance of an atom from its site, A, with the crystal's uniform translation (the mean of u,
        which costs no energy: e.g. the centre-of-mass drift of an MD) taken out."""
        d = self.u.reshape(-1, 3)
        return float(np.sqrt(((d - d.mean(axis=0)) ** 2).sum(axis=-1)).max())


class FrameMapper:
    """Maps engine frames onto one model reference; caches the atom matching per (atom count, mesh, species)."""

    def __init__(self, reference: Reference, *, max_strain: float = 0.25, rematch_displacement: float | None = None):
        self.reference = reference
        self.max_strain = float(max_strain)
        frac = reference.scaled_positions
        self._tau = frac
        # atoms further than this from their cached site trigger a fresh matching
        if rematch_displacement is None:
            sc = reference.to_atoms().repeat(2)
            d = sc.get_all_distances(mic=True)
            d[d < 1e-8] = np.inf
            rematch_displacement = 0.4 * float(d.min())
        self.rematch_displacement = float(rematch_displacement)
        self._cache: dict = {}

    def supercell_mesh(self, cell: np.ndarray, ncells: int | None = None) -> tuple:
        """n1 x n2 x n3 of the reference cell that ``cell`` (rows, A) repeats: the rounded length ratios; with
        ``ncells`` (the frame's atom count / the reference's), the factorisation n1 n2 n3 = ncells closest to the
        length ratios (least squares in log) when its edges are within ``max_strain`` of them, so that a strongly
        strained cell (c 4.2% longer on a 12-cell edge) is not taken for one cell more."""
        lengths = np.linalg.norm(cell, axis=1)
        ref = np.linalg.norm(self.reference.cell, axis=1)
        ratio = lengths / ref
        mesh = tuple(int(max(1, round(x))) for x in ratio)
        if ncells is None or int(np.prod(mesh)) == ncells:
            return mesh
        best, cost = mesh, np.inf
        for n1 in range(1, ncells + 1):
            if ncells % n1:
                continue
            rest = ncells // n1
            for n2 in range(1, rest + 1):
                if rest % n2:
                    continue
                cand = (n1, n2, rest // n2)
                c = float(np.sum(np.log(ratio / np.array(cand)) ** 2))
                if c < cost and np.abs(ratio / np.array(cand) - 1).max() <= self.max_strain:
                    best, cost = cand, c
        return best

    def _sites(self, mesh):
        n = np.array(mesh)
        grid = np.indices(mesh).reshape(3, -1).T  # C order over cells
        frac_unit = (grid[:, None, :] + self._tau[None, :, :]).reshape(-1, 3)
        return frac_unit / n  # fractional in the supercell

    def _match(self, frac, numbers, mesh, unit_cell):
        """Assign each engine atom to the nearest reference site of the same species; returns order (site -> atom)."""
        n = np.array(mesh)
        nat = self.reference.natoms
        natoms = len(frac)
        best_d = np.full(natoms, np.inf)
        best_site = np.full(natoms, -1)
        scaled = frac * n
        for i in range(nat):
            t = scaled - self._tau[i]
            cell = np.round(t)
            dist = np.linalg.norm((t - cell) @ unit_cell, axis=1)
            if numbers is not None:  # without species (i-PI sends none) atoms are matched by position alone
                dist[numbers != self.reference.numbers[i]] = np.inf
            better = dist < best_d
            cidx = np.mod(cell.astype(int), n)
            site = ((cidx[:, 0] * mesh[1] + cidx[:, 1]) * mesh[2] + cidx[:, 2]) * nat + i
            best_d[better] = dist[better]
            best_site[better] = site[better]
        if np.any(best_site < 0):
            bad = np.flatnonzero(best_site < 0)[:5].tolist()
            raise MappingError(f"atoms {bad} have a species that the reference cell does not contain")
        counts = np.bincount(best_site, minlength=natoms)
        if np.any(counts != 1):
            dup = np.flatnonzero(counts > 1)[:5]
            detail = "; ".join(
                f"site {s} claimed by atoms {np.flatnonzero(best_site == s).tolist()}" for s in dup
            )
            raise MappingError(f"atoms cannot be matched one-to-one to reference sites ({detail})")
        order = np.empty(natoms, dtype=int)
        order[best_site] = np.arange(natoms)
        return order

    def map(self, cell, positions, numbers) -> Frame:
        """cell: (3, 3) lattice vectors as rows (transpose i-PI's h first); positions (N, 3); Angstrom.
        numbers: atomic numbers, or None to match atoms to sites by position alone."""
        cell = np.asarray(cell, dtype=float)
        positions = np.asarray(positions, dtype=float)
        numbers = None if numbers is None else np.asarray(numbers)
        if cell.shape != (3, 3) or not np.all(np.isfinite(cell)):
            raise MappingError("cell must be a finite 3x3 matrix")
        if positions.ndim != 2 or positions.shape[1] != 3 or not np.all(np.isfinite(positions)):
            raise MappingError("positions must be a finite (N, 3) array")
        nat = self.reference.natoms
        if len(positions) % nat:
            raise MappingError(f"{len(positions)} atoms is not a multiple of the reference cell's {nat}")
        mesh = self.supercell_mesh(cell, len(positions) // nat)
        ncell = mesh[0] * mesh[1] * mesh[2]
        if ncell * nat != len(positions):
            raise MappingError(
                f"cell lengths suggest a {mesh[0]}x{mesh[1]}x{mesh[2]} supercell ({ncell * nat} atoms) but the "
                f"structure has {len(positions)} atoms; only n1 x n2 x n3 repetitions of the reference cell along "
                "its own lattice vectors are supported"
            )
        h0 = np.diag(mesh) @ self.reference.cell
        F = cell.T @ np.linalg.inv(h0.T)
        if np.linalg.det(F) <= 0:
            raise MappingError("cell is left-handed or degenerate relative to the reference supercell")
        W, S, Vt = np.linalg.svd(F)
        R = W @ Vt
        U = Vt.T @ np.diag(S) @ Vt
        strain = U - np.eye(3)
        if np.abs(strain).max() > self.max_strain:
            raise MappingError(
                f"cell cannot be mapped to the {mesh[0]}x{mesh[1]}x{mesh[2]} reference supercell: strain component "
                f"{np.abs(strain).max():.3f} exceeds max_strain={self.max_strain}"
            )
        x = positions @ R  # unrotated Cartesian positions (rows: R^T r)
        H = h0 @ U  # strained reference supercell, rows
        frac = x @ np.linalg.inv(H)
        key = (len(positions), mesh, None if numbers is None else hash(numbers.tobytes()))
        sites_frac = self._sites(mesh)
        order = self._cache.get(key)
        rematch = order is None
        if not rematch:
            d = frac[order] - sites_frac
            d -= np.round(d)
            u = d @ H
            rematch = np.sqrt((u ** 2).sum(axis=1)).max() > self.rematch_displacement
        if rematch:
            order = self._match(frac, numbers, mesh, self.reference.cell @ U)
            self._cache[key] = order
            d = frac[order] - sites_frac
            d -= np.round(d)
            u = d @ H
        if numbers is not None and np.any(numbers[order] != np.tile(self.reference.numbers, ncell)):
            raise MappingError("species of the structure do not match the cached atom order")
        return Frame(
            mesh=mesh, u=u.reshape(mesh + (nat, 3)), eta=voigt_from_matrix(strain), stretch=U, rotation=R,
            order=order, sites=sites_frac @ h0, volume=abs(float(np.linalg.det(cell))),
        )

    @staticmethod
    def frame_from_model(reference: Reference, mesh, u, eta) -> tuple[np.ndarray, np.ndarray]:
        """Inverse map: (u, eta) in the model frame -> (cell rows, positions) of an unrotated structure."""
        U = np.eye(3) + matrix_from_voigt(eta)
        h0 = np.diag(mesh) @ reference.cell
        sites = reference.to_atoms().repeat(tuple(mesh)).positions
        return h0 @ U, sites @ U + np.asarray(u).reshape(-1, 3)
