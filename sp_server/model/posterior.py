"""The Bayesian posterior a fitted model carries, and the per-structure "Bayesian error" it predicts.

The anharmonic coefficients w are the weights of a Bayesian linear model (paper eqs. 6-15): posterior mean =
the model's values, covariance ``covariance`` (physical units, (eV/A^n)^2).  For a new structure with design rows
phi (energy, forces, stress contributions of each coefficient at unit value) the Bayesian error of a quantity is
sqrt(diag(phi Sigma phi^T)).  Reported per structure: energy std per reference cell (meV), the largest
force-component std (eV/A) and the largest stress-component std (GPa).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..threads import matmul
from ..units import GPA_EV_A3

#: the quantities a threshold can apply to, with their units.  local_energy_max_mev: the largest Bayesian std,
#: over the reference cells of the frame, of one cell's energy (the terms anchored in that cell), meV: a local error
#: like force_max, but computed in the energy pass at about 20% of the cost of energy, forces and stress
#: (docs/performance.md), so the server can give it on every frame
ERROR_KEYS = {"energy_mev_per_cell": "meV per reference cell", "force_max": "eV/A", "stress_max_gpa": "GPa",
              "local_energy_max_mev": "meV"}


@dataclass
class ErrorThreshold:
    """Which Bayesian error drives flagging, and its threshold (default: the largest force-component std,
    0.1 eV/A).  ``quantity`` is one of ERROR_KEYS; ``value`` is in that quantity's unit."""

    quantity: str = "force_max"
    value: float = 0.1

    def __post_init__(self):
        if self.quantity not in ERROR_KEYS:
            raise ValueError(f"unknown error quantity {self.quantity!r}; use one of {sorted(ERROR_KEYS)}")
        if not self.value > 0:
            raise ValueError(f"threshold must be positive, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> "ErrorThreshold":
        """'force_max=0.1' (or just '0.1' for the default quantity)."""
        key, _, val = text.rpartition("=")
        try:
            return cls(key or "force_max", float(val))
        except ValueError as exc:
            raise ValueError(f"threshold {text!r}: {exc}") from None

    def exceeded(self, errors: dict) -> bool:
        """Whether ``errors`` has this quantity above the value (False when the frame has no such error)."""
        return self.quantity in errors and errors[self.quantity] > self.value

    def __str__(self):
        return f"{self.quantity} > {self.value:g} {ERROR_KEYS[self.quantity]}"


@dataclass
class Posterior:
    """Posterior of the anharmonic coefficients.

    covariance: (nz, nz) of the physical coefficients.  sigma_v, sigma_w: noise and prior standard deviations of
    the whitened problem (rows divided by ``scales``, columns by ``feature_scale``).  scales: the per-quantity
    units that make rows commensurate: energy_per_atom (eV), force (eV/A), stress_gpa (GPa).  stats: sufficient
    statistics of the whitened (unscaled-column) problem, A = Phi^T Phi, b = Phi^T y, yy = y^T y, n_rows,
    n_structures, so that adding structures updates the fit without recomputing old rows.
    """

    covariance: np.ndarray
    sigma_v: float
    sigma_w: float
    scales: dict
    feature_scale: np.ndarray
    log_evidence: float
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        self.covariance = np.asarray(self.covariance, dtype=float)
        nz = self.covariance.shape[0]
        if self.covariance.shape != (nz, nz) or not np.all(np.isfinite(self.covariance)):
            raise ValueError("posterior covariance must be a finite square matrix")
        self.feature_scale = np.asarray(self.feature_scale, dtype=float).reshape(nz)
        for k in ("energy_per_atom", "force", "stress_gpa"):
            if k not in self.scales:
                raise ValueError(f"posterior scales: missing {k!r}")
        self._chol = None
        self._chol_t = None

    @property
    def ncoef(self) -> int:
        return self.covariance.shape[0]

    def _factor(self):
        """L with Sigma = L L^T, (nz, r): the eigenvectors times the square roots of the positive eigenvalues.
        Directions of zero variance (the bounding terms, which the constraints set) are dropped: exact, and
        fewer columns for every frame's product."""
        if self._chol is None:
            w, v = np.linalg.eigh(0.5 * (self.covariance + self.covariance.T))
            keep = w > 1e-14 * max(float(w.max(initial=0.0)), 1e-300)
            self._chol = np.ascontiguousarray(v[:, keep] * np.sqrt(w[keep]))  # Sigma = L L^T
        return self._chol

    def _factor_t(self):
        """L^T, contiguous (the left operand of every frame's product), cached."""
        if self._chol_t is None:
            self._chol_t = np.ascontiguousarray(self._factor().T)
        return self._chol_t

    def errors(self, phi_energy, phi_forces, phi_stress, ncell: int) -> dict:
        """Bayesian errors of one structure from its design rows (physical units, as FrameResult gives them: the
        force rows already in the engine's frame)."""
        return self.errors_from_rows(phi_energy, phi_forces, phi_stress, np.eye(3), ncell)

    def errors_from_rows(self, tau, force_rows, phi_stress, rotation, ncell: int) -> dict:
        """The same errors, exactly, from the compact rows of a frame (:func:`sp_server.kernels.anharmonic.
        error_rows`): tau (nz,) eV, force_rows (nz, N, 3) d tau / d u in the model frame and any atom order (eV/A),
        phi_stress (nz, 6) in the engine frame (eV/A^3), rotation R (model frame -> engine frame).

        One product L^T rows ((r, nz) x (nz, 3N)) instead of the design rows in the engine's frame and atom
        order: the force components are rotated after the product, on r rows instead of nz."""
        L = self._factor()
        e_std = float(np.sqrt(np.sum((np.asarray(tau) @ L) ** 2)))
        rows = np.asarray(force_rows)
        nz = self.ncoef
        y = matmul(self._factor_t(), rows.reshape(nz, -1)).reshape(L.shape[1], -1, 3)   # (r, N, 3); sign irrelevant
        R = np.asarray(rotation, dtype=float)
        if not np.allclose(R, np.eye(3), rtol=0.0, atol=1e-14):
            y = y @ R.T
        f_std = np.sqrt(np.einsum("rna,rna->na", y, y)).ravel()
        ps = np.asarray(phi_stress).reshape(nz, 6).T @ L
        s_std = np.sqrt(np.sum(ps ** 2, axis=1)) / GPA_EV_A3
        return self._summary(e_std, f_std, s_std, ncell)

    def atom_force_errors(self, force_rows) -> np.ndarray:
        """Each atom's Bayesian force error, eV/A: the standard deviation of the predicted force vector's length
        sqrt(sum over components of their variances), from the compact rows (nz, N, 3) of
        :func:`sp_server.kernels.anharmonic.error_rows`, in their (model site) order.  A rigid rotation of the frame
        leaves it unchanged."""
        rows = np.asarray(force_rows)
        y = matmul(self._factor_t(), rows.reshape(self.ncoef, -1)).reshape(-1, rows.shape[1], 3)
        return np.sqrt(np.einsum("rna,rna->n", y, y))

    def local_errors(self, tau_cells) -> dict:
        """The errors of the energy pass, exactly, from each reference cell's energy of each coefficient at unit value
        (tau_cells (ncell, nz), eV; :func:`sp_server.kernels.anharmonic.energy_grad`): energy_mev_per_cell and
        local_energy_max_mev (see ERROR_KEYS)."""
        tau_cells = np.asarray(tau_cells)
        L = self._factor()
        y = tau_cells @ L                                    # (ncell, r)
        local = np.sqrt(np.einsum("cr,cr->c", y, y))
        e_std = float(np.linalg.norm(y.sum(axis=0)))
        return {"energy_mev_per_cell": 1000.0 * e_std / len(tau_cells),
                "local_energy_max_mev": 1000.0 * float(local.max()) if local.size else 0.0}

    @staticmethod
    def _summary(e_std, f_std, s_std, ncell) -> dict:
        return {
            "energy_mev_per_cell": 1000.0 * e_std / ncell,
            "force_max": float(f_std.max()) if f_std.size else 0.0,
            "stress_max_gpa": float(s_std.max()),
        }
