"""Bounded by construction: the posterior's most probable coefficients under linear inequality constraints.

The Bayesian fit gives a Gaussian posterior N(m, C) of the anharmonic coefficients.  A Taylor polynomial fitted to
small distortions can still run to -infinity along directions the data never visited.  Instead of trying bounding
values one after another, the coefficients are moved as little as the posterior allows (in its own metric) so that
the energy is bounded along a set of probe configurations:

    minimise (w - m)^T C^-1 (w - m)   subject to   G w >= h

with one row per constraint, linear in w because the energy is:

* the conditions of the probe rays of :mod:`sp_server.fit.probes` (random distortions above a floor and rising,
  lone atoms climbing away from their sites, strain rising), and of any ray where the check of
  :mod:`sp_server.fit.bound` found the model falling or a hot MD saw an atom escape;
* sign: the even top-order bounding terms (u_a - u_b)^8 and eta^4, eta^6 are non-negative, and each pair term
  (u_a - u_b)^8 at least a least value (``BoundSettings.pair_wall``, e.g. 1 eV/A^8: 1 eV at 1 A of relative
  displacement; see :class:`sp_server.fit.bound.BoundSettings`).

With C^-1 = L L^T and z = L^T (w - m) this is a least-distance problem, min |z| subject to (G L^-T) z >= h - G m,
solved exactly through non-negative least squares (Lawson & Hanson, "Solving Least Squares Problems", ch. 23).
The check of :mod:`sp_server.fit.bound` then runs on the result; a configuration where it still fails becomes a new
constraint and the problem is solved again (cutting planes), a few rounds at most.  The posterior covariance is
kept as it was: the Bayesian errors still say where the data are thin.  Units: eV, Angstrom; floor eV per cell.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import nnls

from ..model.model import Model
from ..model.terms import AnharmonicPart
from ..potential import SupercellPotential
from .probes import Ray


class InfeasibleConstraints(RuntimeError):
    """No coefficients satisfy the constraints (e.g. the harmonic part alone falls below the floor)."""


def least_distance(E: np.ndarray, f: np.ndarray) -> np.ndarray:
    """The shortest z with E z >= f (rows of E: constraints), by NNLS on the dual (Lawson & Hanson, ch. 23)."""
    E = np.atleast_2d(np.asarray(E, dtype=float))
    f = np.asarray(f, dtype=float).reshape(-1)
    m, n = E.shape
    if m == 0 or np.all(f <= 0):
        return np.zeros(n)
    # scale each row to unit norm (the same feasible set, a better-conditioned dual)
    norm = np.linalg.norm(E, axis=1)
    keep = norm > 0
    if np.any(f[~keep] > 0):
        raise InfeasibleConstraints(f"{int(np.sum(f[~keep] > 0))} constraint(s) cannot be met by any coefficient")
    E, f = E[keep] / norm[keep, None], f[keep] / norm[keep]
    # the NNLS dual says "infeasible" through a residual component that shrinks like 1/(1 + |z|^2): solve for
    # z / c with c a lower bound of |z| (the largest single-constraint distance), so that the answer is O(1)
    c = max(1.0, float(f.max()))
    for _ in range(4):
        M = np.vstack([E.T, (f / c)[None, :]])          # (n + 1, m)
        e = np.zeros(n + 1)
        e[-1] = 1.0
        u, _ = nnls(M, e, maxiter=50 * (n + m + 1))
        r = M @ u - e
        if abs(r[-1]) > 1e-10:
            z = -c * r[:n] / r[-1]
            if np.all(E @ z >= f - 1e-6 * np.maximum(np.abs(f), 1.0)):
                return z
        c *= 1e3
    raise InfeasibleConstraints("the constraints have no common solution")


@dataclass
class ConstraintSet:
    """Rows G w >= h in physical coefficient units (w: the free coefficients' values)."""

    G: np.ndarray
    h: np.ndarray
    kinds: list = field(default_factory=list)

    @classmethod
    def empty(cls, n: int) -> "ConstraintSet":
        return cls(np.zeros((0, n)), np.zeros(0), [])

    def add(self, G, h, kind: str):
        G = np.atleast_2d(G)
        self.G = np.vstack([self.G, G])
        self.h = np.concatenate([self.h, np.atleast_1d(h)])
        self.kinds += [kind] * len(G)

    def add_set(self, other: "ConstraintSet"):
        self.G = np.vstack([self.G, other.G])
        self.h = np.concatenate([self.h, other.h])
        self.kinds += list(other.kinds)

    def at_least(self, indices, values, kind: str = "sign"):
        """w_j >= value for each j of ``indices`` and its value of ``values``."""
        for j, v in zip(indices, values):
            row = np.zeros(self.G.shape[1])
            row[j] = 1.0
            self.add(row, float(v), kind)

    def violations(self, w) -> np.ndarray:
        return self.h - self.G @ w


class MeshPotentials:
    """One SupercellPotential of ``model`` per supercell mesh, built when first asked for."""

    def __init__(self, model: Model):
        self.model = model
        self._pots: dict = {}

    def potential(self, mesh) -> SupercellPotential:
        mesh = tuple(int(n) for n in mesh)
        pot = self._pots.get(mesh)
        if pot is None:
            pot = self._pots[mesh] = SupercellPotential(self.model, mesh)
        return pot

    def energy(self, mesh, u, eta) -> float:
        """The model's energy at (mesh, u, eta), eV."""
        return float(self.potential(mesh).evaluate(u, eta).energy)


class EnergyRows(MeshPotentials):
    """Energy of the model with free coefficients w: E(u, eta) = e0(u, eta) + tau(u, eta) . w (eV)."""

    def __init__(self, base: Model, coefficients: list):
        super().__init__(Model(base.reference, base.harmonic, AnharmonicPart(list(coefficients),
                                                                             np.zeros(len(coefficients)))))

    def __call__(self, mesh, u, eta) -> tuple[float, np.ndarray]:
        ev = self.potential(mesh).evaluate(u, eta, design=True)
        return float(ev.energy), np.asarray(ev.tau, dtype=float)


def ray_constraints(rows: EnergyRows, ray: Ray) -> ConstraintSet:
    """The ray's conditions (:class:`sp_server.fit.probes.Ray`) as rows G w >= h: growth E_k - E_{k-1} >= margin,
    floor E_k - E_ref >= value, with E = e0 + tau . w."""
    model = rows.model
    cs = ConstraintSet.empty(len(model.anharmonic))
    e_ref = int(np.prod(ray.mesh)) * model.reference.energy
    pts = [rows(mesh, u, eta) for mesh, u, eta in ray.configurations()]
    for k, margin in ray.growth:
        (e_prev, t_prev), (e_next, t_next) = pts[k - 1], pts[k]
        cs.add(t_next - t_prev, margin - (e_next - e_prev), f"{ray.kind} growth")
    for k, value in ray.floor:
        e0, tau = pts[k]
        cs.add(tau, e_ref + value - e0, f"{ray.kind} floor")
    return cs


def constrained_map(mean: np.ndarray, covariance: np.ndarray, cs: ConstraintSet,
                    scale: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict]:
    """The most probable w under N(mean, covariance) with cs.G w >= cs.h (physical units); returns (w, info):
    info has the Mahalanobis distance moved, the number of active constraints and the largest violation left.
    ``scale``: the columns' feature scales of the fit (the posterior carries them): the problem is solved in the
    scaled coordinates w * scale, where the covariance is well conditioned (in physical units its eigenvalues
    span the squares of the scales' range, far beyond double precision)."""
    mean = np.asarray(mean, dtype=float)
    n = len(mean)
    if scale is not None:
        scale = np.asarray(scale, dtype=float)
        scaled = ConstraintSet(cs.G / scale[None, :], cs.h, cs.kinds)
        w_s, info = constrained_map(mean * scale, covariance * np.outer(scale, scale), scaled)
        return w_s / scale, info
    if len(cs.h) == 0 or np.all(cs.violations(mean) <= 0):
        return mean.copy(), {"moved": 0.0, "active": 0, "violation": float(max(cs.violations(mean).max(), 0.0))
                             if len(cs.h) else 0.0}
    # covariance = R R^T (R from the eigen-decomposition: robust for a nearly singular posterior)
    lam, q = np.linalg.eigh(0.5 * (covariance + covariance.T))
    lam = np.clip(lam, 1e-300, None)
    R = q * np.sqrt(lam)                      # w = mean + R z,  (w - mean)^T C^-1 (w - mean) = |z|^2
    E = cs.G @ R
    f = cs.h - cs.G @ mean
    z = least_distance(E, f)
    w = mean + R @ z
    viol = cs.violations(w)
    scale = np.maximum(np.abs(cs.h), 1.0)
    return w, {"moved": float(np.linalg.norm(z)), "active": int(np.sum(np.abs(viol) <= 1e-6 * scale)),
               "violation": float(max(viol.max(), 0.0)), "n_constraints": int(len(cs.h)), "n": n}
