"""Evaluation of a model: in the model frame for one supercell (SupercellPotential) and for engine frames (Evaluator).

SupercellPotential turns (u, eta) into energy, dE/du, dE/deta and, on request, the design rows of the Bayesian fit.
Evaluator adds the engine side: atom matching, rotation, forces and the stress (or virial) in the engine's frame.
Units: eV, Angstrom; stress eV/A^3 with ASE's sign (sigma = 1/V dE/d eps) and Voigt order xx yy zz yz xz xy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from .kernels import anharmonic as _anh
from .kernels.ewald import dipole_dipole_kgrid
from .kernels.harmonic import HarmonicOperator, fold_ifc_kgrid
from .model.mapping import Frame, FrameMapper, matrix_from_voigt, stress_voigt, symmetric_from_voigt
from .model.model import Model
from .threads import one_blas_thread

#: supercells with at least this many cells are evaluated with Numba threads
PARALLEL_MIN_CELLS = 64

PARTS = ("short_range", "dipole_dipole", "elastic", "strain_phonon", "anharmonic")


@dataclass
class Evaluation:
    """Result in the model frame.  energy: eV (reference energy included);  grad_u: dE/du (n1,n2,n3,nat,3) eV/A;
    grad_eta: dE/d eta (6) eV;  parts: energy of each part, eV.  With design rows: tau (nz), grad_u_rows
    (nz, n1,n2,n3,nat,3), grad_eta_rows (nz, 6) of each anharmonic coefficient at unit value.  With error rows
    (the compact form the Bayesian errors need): tau, grad_eta_rows, force_rows (nz, ncell * nat, 3) = d tau / d u
    (a buffer the potential reuses: copy it to keep it) and virial_rows (nz, 3, 3) = sum_i d tau / d u_i (x) u_i."""

    energy: float
    grad_u: np.ndarray
    grad_eta: np.ndarray
    parts: dict = field(default_factory=dict)
    tau: Optional[np.ndarray] = None
    grad_u_rows: Optional[np.ndarray] = None
    grad_eta_rows: Optional[np.ndarray] = None
    force_rows: Optional[np.ndarray] = None
    virial_rows: Optional[np.ndarray] = None
    error_seconds: float = 0.0   # wall time of the error rows
    tau_cells: Optional[np.ndarray] = None  # (ncell, nz) each cell's energy of each coefficient at unit value, eV


def _check_parts(parts):
    parts = PARTS if parts is None else tuple(parts)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; known: {list(PARTS)}")
    return parts


class SupercellPotential:
    """The model on one n1 x n2 x n3 supercell of its reference cell.

    ``parts`` restricts the evaluation to some of: short_range, dipole_dipole, elastic, strain_phonon, anharmonic.
    ``parallel``: use Numba threads (default: only from PARALLEL_MIN_CELLS cells on).
    Set-up cost (done once): C(k) of the short-range and dipole-dipole parts on the supercell's k grid.
    """

    def __init__(self, model: Model, mesh: Iterable[int], parts=None, *, compiled=None,
                 parallel: Optional[bool] = None):
        self.model = model
        self.mesh = tuple(int(n) for n in mesh)
        if len(self.mesh) != 3 or min(self.mesh) < 1:
            raise ValueError(f"supercell mesh must be three positive integers, got {mesh}")
        self.parts = _check_parts(parts)
        self.ncell = int(np.prod(self.mesh))
        # threads only pay off on large supercells; small ones run serial (no thread wake-up, no oversubscription
        # when an engine runs many small replicas or beads side by side)
        self.parallel = self.ncell >= PARALLEL_MIN_CELLS if parallel is None else bool(parallel)
        nat = model.natoms
        h = model.harmonic
        ck = np.zeros(self.mesh[:2] + (self.mesh[2] // 2 + 1, nat, 3, nat, 3), dtype=complex)
        self._has_quadratic = False
        if "short_range" in self.parts:
            ck += fold_ifc_kgrid(h.ifc_cells, h.ifc, self.mesh)
            self._has_quadratic = True
        if "dipole_dipole" in self.parts and h.has_dipole:
            ref = model.reference
            # the symmetric sum-rule correction (multibinit's): Hermitian; a low-symmetry model's short-range part
            # carries the antisymmetric rest (io.ddb.harmonic_from_ddb)
            ck += dipole_dipole_kgrid(ref.cell, ref.positions, h.born_charges, h.epsilon_inf, self.mesh,
                                      asr="symmetric")
            self._has_quadratic = True
        # the quadratic form only sees the Hermitian part; keeping exactly that part makes forces = -dE/du.  An
        # engine-exact model (h.conservative False) keeps its force constants as the engine applies them
        if h.conservative:
            m = 3 * nat
            flat = ck.reshape(ck.shape[:3] + (m, m))
            ck = (0.5 * (flat + np.conj(np.swapaxes(flat, -1, -2)))).reshape(ck.shape)
        self.harmonic_operator = HarmonicOperator(ck, self.mesh, parallel=self.parallel)
        # strain-dependent force constants: one quadratic form per strain component that has any
        self.strain_operators = []
        if "strain_phonon" in self.parts and h.has_strain_ifc:
            for v in range(6):
                if np.abs(h.strain_ifc[v]).max() > 0:
                    sk = fold_ifc_kgrid(h.strain_ifc_cells, h.strain_ifc[v], self.mesh)
                    self.strain_operators.append((v, HarmonicOperator(sk, self.mesh, parallel=self.parallel)))
        self.terms = compiled if compiled is not None else _anh.CompiledTerms.from_coefficients(
            model.anharmonic.coefficients, nat)
        self.terms.check_supercell(self.mesh)
        self._has_strain = np.diff(self.terms.ts_ptr) > 0
        self._neigh = self.terms.neighbour_table(self.mesh)
        self._work = (np.empty((self.ncell, len(self.terms.bonds))), np.empty((self.ncell, len(self.terms.bonds))))
        self._rows_buffer = None
        self._tau_cells = None
        self._bond_rows = None   # made on the first frame with Bayesian errors
        self.set_values(model.anharmonic.values)

    def set_values(self, values):
        """Replace the anharmonic coefficient values (eV/A^order) without recompiling anything."""
        values = np.asarray(values, dtype=float)
        if values.shape != (self.terms.ncoef,):
            raise ValueError(f"expected {self.terms.ncoef} coefficient values, got shape {values.shape}")
        self.values = values
        self._t_scale = values[self.terms.t_coef] * self.terms.t_weight

    def evaluate(self, u: np.ndarray, eta: np.ndarray, *, design: bool = False, error_rows: bool = False,
                 tau_cells: bool = False) -> Evaluation:
        """u: (n1, n2, n3, nat, 3) Angstrom; eta: (6,) Voigt strain (engineering shear).  design: the full design
        rows; error_rows: the compact rows of the Bayesian errors; tau_cells: each cell's energy of each coefficient
        (in the energy pass; a buffer the potential reuses) (see :class:`Evaluation`)."""
        model = self.model
        nat = model.natoms
        u = np.ascontiguousarray(u, dtype=float).reshape(self.mesh + (nat, 3))
        eta = np.asarray(eta, dtype=float).reshape(6)
        parts = {}
        grad_eta = np.zeros(6)
        grad_u = np.zeros_like(u)
        if self._has_quadratic:
            parts["harmonic"], grad_u = self.harmonic_operator.energy_grad(u)
        h = model.harmonic
        if "elastic" in self.parts:
            vref = self.ncell * model.reference.volume
            ce = h.elastic @ eta
            parts["elastic"] = 0.5 * vref * float(eta @ ce)
            grad_eta += vref * ce
        if "strain_phonon" in self.parts:
            usum = u.reshape(-1, nat, 3).sum(axis=0)
            parts["strain_phonon"] = float(np.einsum("iav,ia,v->", h.internal_strain, usum, eta))
            grad_u += np.einsum("iav,v->ia", h.internal_strain, eta)
            grad_eta += np.einsum("iav,ia->v", h.internal_strain, usum)
            for v, op in self.strain_operators:   # eta_v u.dPhi_v.u / 2
                e_v, g_v = op.energy_grad(u)
                parts["strain_phonon"] += eta[v] * e_v
                grad_u += eta[v] * g_v
                grad_eta[v] += e_v
        tau = gu_rows = ge_rows = f_rows = v_rows = tc = None
        t_rows = 0.0
        t = self.terms
        if "anharmonic" in self.parts and t.ncoef:
            sp, dsp = _anh.strain_products(eta, t.ts_ptr, t.ts_voigt, t.ts_power)
            if tau_cells:
                if self._tau_cells is None:
                    self._tau_cells = np.zeros((self.ncell, t.ncoef))
                tc = self._tau_cells
            e_anh, ge, delta = _anh.energy_grad(u, t, self._neigh, self._t_scale, sp, dsp, self._has_strain,
                                                grad_u, self.parallel, self._work, tau_cells=tc)
            parts["anharmonic"] = e_anh
            grad_eta += ge
            if design:
                tau, ge_rows, gu_rows = _anh.design_rows(delta, t, self._neigh, sp, dsp, self._has_strain, self.mesh,
                                                         self.parallel)
            elif error_rows:
                t_rows = time.perf_counter()
                if self._bond_rows is None:
                    self._bond_rows = t.bond_rows(self._neigh)
                tau, ge_rows, v_rows, f_rows = _anh.error_rows(u, delta, t, self._neigh, sp, dsp, self._has_strain,
                                                               self.parallel, out=self._rows_buffer,
                                                               bond_rows=self._bond_rows)
                self._rows_buffer = f_rows
                t_rows = time.perf_counter() - t_rows
        elif design:
            tau, ge_rows, gu_rows = np.zeros(t.ncoef), np.zeros((t.ncoef, 6)), np.zeros((t.ncoef,) + u.shape)
        if tau_cells and tc is None:
            tc = np.zeros((self.ncell, t.ncoef))
        if error_rows and f_rows is None:
            tau, ge_rows, v_rows = np.zeros(t.ncoef), np.zeros((t.ncoef, 6)), np.zeros((t.ncoef, 3, 3))
            f_rows = np.zeros((t.ncoef, self.ncell * nat, 3))
        energy = self.ncell * model.reference.energy + sum(parts.values())
        return Evaluation(energy, grad_u, grad_eta, parts, tau, gu_rows, ge_rows, f_rows, v_rows, t_rows, tc)


def _sylvester_adjoint(stretch: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Solve U X + X U = H for symmetric positive U (eigenbasis division); H may be a stack (..., 3, 3)."""
    lam, q = np.linalg.eigh(stretch)
    ht = q.T @ h @ q
    return q @ (ht / (lam[:, None] + lam[None, :])) @ q.T


def strain_derivative(frame: Frame, grad_u: np.ndarray, grad_eta: np.ndarray) -> np.ndarray:
    """dE/d eps (3x3, eV) for a homogeneous deformation (1 + eps) of the engine's cell and positions, in the
    model (unrotated) frame.  Derivation: docs/theory.md, "stress".  Works on stacks (leading axes) too."""
    g = grad_u.reshape(grad_u.shape[:-5] + (-1, 3))
    return strain_derivative_virial(frame, np.einsum("...ia,ib->...ab", g, frame.u.reshape(-1, 3)), grad_eta)


def strain_derivative_virial(frame: Frame, virial: np.ndarray, grad_eta: np.ndarray) -> np.ndarray:
    """dE/d eps as :func:`strain_derivative`, from the virial sum_i dE/du_i (x) u_i (3x3 eV, model frame;
    stacks too) instead of dE/du."""
    U = frame.stretch
    G = symmetric_from_voigt(grad_eta)  # G_23 = dE/d eta_4 (engineering shear)
    # with x' = (1 + eps) x and the stretch U -> U + dU (U dU + dU U = 2 U eps U), u changes by dU U^-1 u,
    # so dE = dU : H with H = G + sum_i g_i (x) U^-1 u_i, and dE/d eps = 2 U L(sym H) U (L: Sylvester inverse)
    H = G + np.asarray(virial) @ np.linalg.inv(U)
    Hs = 0.5 * (H + np.swapaxes(H, -1, -2))
    return 2.0 * U @ _sylvester_adjoint(U, Hs) @ U


@dataclass
class FrameResult:
    """Energy (eV), forces (N, 3) eV/A and stress (6, Voigt, eV/A^3, ASE sign) in the engine's frame and atom order;
    with design rows: phi_energy (nz), phi_forces (nz, N, 3), phi_stress (nz, 6), such that
    E_anh = phi_energy @ w, F_anh = phi_forces @ w (contracted on nz), sigma_anh = phi_stress @ w."""

    energy: float
    forces: np.ndarray
    stress: np.ndarray
    frame: Frame
    parts: dict
    phi_energy: Optional[np.ndarray] = None
    phi_forces: Optional[np.ndarray] = None
    phi_stress: Optional[np.ndarray] = None
    errors: Optional[dict] = None  # Bayesian errors (see sp_server.model.posterior) when the model has a posterior
    error_seconds: float = 0.0     # the share of this evaluation's wall time that the Bayesian errors took


class Evaluator:
    """Evaluates a model on engine frames of any n1 x n2 x n3 supercell; caches one SupercellPotential per mesh."""

    def __init__(self, model: Model, parts=None, *, max_strain: float = 0.25):
        self.model = model
        self.parts = _check_parts(parts)
        self.mapper = FrameMapper(model.reference, max_strain=max_strain)
        self._compiled = _anh.CompiledTerms.from_coefficients(model.anharmonic.coefficients, model.natoms)
        self._potentials: dict = {}

    def potential(self, mesh) -> SupercellPotential:
        mesh = tuple(mesh)
        pot = self._potentials.get(mesh)
        if pot is None:
            pot = SupercellPotential(self.model, mesh, self.parts, compiled=self._compiled)
            self._potentials[mesh] = pot
        return pot

    def evaluate(self, cell, positions, numbers, *, design: bool = False, errors: bool = False,
                 local_errors: bool = False) -> FrameResult:
        """cell: (3, 3) rows, Angstrom; positions (N, 3) Angstrom; numbers (N,).  Engine frame in, engine frame out.

        design: also return the design rows; errors: also the Bayesian errors, all of ERROR_KEYS (needs a model with
        a posterior); local_errors: only those of the energy pass, energy_mev_per_cell and local_energy_max_mev
        (about 20% more than energy, forces and stress, against 3x for all).  BLAS runs on one thread meanwhile
        (:func:`sp_server.threads.one_blas_thread`)."""
        with one_blas_thread():
            return self._evaluate(cell, positions, numbers, design=design, errors=errors, local_errors=local_errors)

    def _evaluate(self, cell, positions, numbers, *, design: bool, errors: bool, local_errors: bool) -> FrameResult:
        errors = errors and self.model.posterior is not None
        local_errors = (local_errors or errors) and self.model.posterior is not None
        frame = self.mapper.map(cell, positions, numbers)
        ev = self.potential(frame.mesh).evaluate(frame.u, frame.eta, design=design, error_rows=errors and not design,
                                                 tau_cells=local_errors)
        R = frame.rotation
        n = len(frame.order)
        forces = np.empty((n, 3))
        g = -ev.grad_u.reshape(-1, 3)
        if not self.model.harmonic.conservative:   # multibinit-exact: multibinit's mass-weighted net-force removal
            m = np.tile(self.model.reference.masses, n // self.model.natoms)
            g = g - m[:, None] * (g.sum(axis=0) / m.sum())
        forces[frame.order] = g @ R.T
        sigma = R @ strain_derivative(frame, ev.grad_u, ev.grad_eta) @ R.T / frame.volume
        result = FrameResult(ev.energy, forces, stress_voigt(sigma), frame, ev.parts)
        if design:
            nz = len(ev.tau)
            result.phi_energy = ev.tau
            phi_f = np.empty((nz, n, 3))
            phi_f[:, frame.order] = -ev.grad_u_rows.reshape(nz, -1, 3) @ R.T
            result.phi_forces = phi_f
            sig = R @ strain_derivative(frame, ev.grad_u_rows, ev.grad_eta_rows) @ R.T / frame.volume
            result.phi_stress = stress_voigt(sig).reshape(nz, 6)
        ncell = len(frame.order) // self.model.natoms
        t0 = time.perf_counter()
        if local_errors:
            result.errors = self.model.posterior.local_errors(ev.tau_cells)
        if errors and design:
            result.errors.update(self.model.posterior.errors(result.phi_energy, result.phi_forces, result.phi_stress,
                                                             ncell))
        elif errors:
            sig = R @ strain_derivative_virial(frame, ev.virial_rows, ev.grad_eta_rows) @ R.T / frame.volume
            result.errors.update(self.model.posterior.errors_from_rows(ev.tau, ev.force_rows, stress_voigt(
                sig).reshape(-1, 6), R, ncell))
        if local_errors:
            result.error_seconds = ev.error_seconds + time.perf_counter() - t0
        return result

    def atom_force_errors(self, cell, positions, numbers):
        """(frame, errors): the mapped frame and each model site's Bayesian force error, eV/A ((N,), model site order:
        ``frame.order[s]`` is the engine index of site s); see Posterior.atom_force_errors.  Needs a posterior."""
        if self.model.posterior is None:
            raise ValueError("per-atom Bayesian errors need a model with a posterior (from sp-server fit)")
        with one_blas_thread():
            frame = self.mapper.map(cell, positions, numbers)
            ev = self.potential(frame.mesh).evaluate(frame.u, frame.eta, error_rows=True)
            return frame, self.model.posterior.atom_force_errors(ev.force_rows)


__all__ = ["PARTS", "Evaluation", "Evaluator", "FrameResult", "SupercellPotential", "strain_derivative",
           "strain_derivative_virial",
           "matrix_from_voigt"]
