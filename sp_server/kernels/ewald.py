"""Dipole-dipole force constants C(q) of Born-effective-charge dipoles: anisotropic-dielectric Ewald sum (Gonze & Lee
1997; anaddb ewald9/q0dy3, dipdip 1), its acoustic-sum-rule correction and the rfftn-layout supercell k-grid."""
from __future__ import annotations

import math

import numpy as np
from ase import units as _ase_units
from numba import njit, prange

# Conventions (eV, Angstrom, Born charges in e):
#
# * ``cell`` rows are the lattice vectors a_1..a_3; atom i of cell R = n.cell sits at R + tau_i.
# * The dipole of atom i is p_g = sum_a Z[i, g, a] u_a, two dipoles interact as E = p_1^T T(d) p_2 with
#   T(d) = -grad grad phi(d), phi(d) = k_e / (sqrt(det eps) sqrt(d . eps^-1 . d)), k_e = Hartree * bohr (ase.units);
#   the macroscopic G = 0 term is omitted (conducting, "tin-foil" boundary conditions).
# * Phi_{ia,jb}(R) = d^2 E / du_ia(0) du_jb(R) (pair separation d = R + tau_j - tau_i) and
#   C(q)_{ia,jb} = sum_R Phi_{ia,jb}(R) exp(+2 pi i q_frac . n_R): the phase uses the cell translation only, so
#   on a commensurate grid C is exactly what ``numpy.fft.rfftn`` of a supercell displacement field needs
#   (f~(k) = -C(k/N) u~(k), u~ = rfftn(u, axes=(0, 1, 2))).
#
# Ewald split (parameter Lambda, 1/A), with K = 2 pi (q + G) Cartesian and H = eps^-1, D = sqrt(d.H.d):
#
#     T~_ij(q) = 4 pi / Omega  sum_{K != 0} K K^T / (K.eps.K) exp(-K.eps.K / (4 Lambda^2)) exp(-i K.(tau_j - tau_i))
#              + sum_{R, d != 0} exp(2 pi i q.n_R) (-grad grad) [erfc(Lambda D) / (sqrt(det eps) D)]
#              - delta_ij 4 Lambda^3 / (3 sqrt(pi) sqrt(det eps)) H
#
#     C(q)_{ia,jb} = k_e sum_gh Z[i,g,a] T~_ij,gh(q) Z[j,h,b]
#
# Lambda defaults to sqrt(pi) / Omega_eps^(1/3), Omega_eps = Omega / sqrt(det eps) (balanced real/reciprocal work per q),
# lowered by (2 / (n1 n2 n3))^(1/6) on a k-grid, where the real-space sum is done once and folded.  Both Gaussian
# tails are cut at z_c with max(1, (Lambda / Lambda_default)^3) * 2 z_c^2 exp(-z_c^2) = tol / 10, z = Lambda D in real
# space and z = sqrt(K.eps.K) / (2 Lambda) in reciprocal space (z_c ~ 5.8 for tol = 1e-12).
#
# ASR (``asr=True``, anaddb ``asr 1``): C(q)_ij -= delta_ij sum_l C(0)_il.  Note that sum_l C(0)_il is in general
# *not* a symmetric 3x3 matrix (it is for the usual high-symmetry perovskite reference structures), and when it is
# not, the corrected C(q) is exactly ASR-compliant but not Hermitian (anaddb's ``asr 2`` would symmetrise instead).

__all__ = ["dipole_dipole_matrices", "dipole_dipole_kgrid"]

#: Coulomb prefactor e^2 / (4 pi eps0) in eV * Angstrom.
_KE = _ase_units.Hartree * _ase_units.Bohr

_SQRT_PI = math.sqrt(math.pi)


# ----------------------------------------------------------------------------------------------------------------
# numba kernels
# ----------------------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _screened_dipole_tensor(d, epsinv, lam, dcut2, inv_sqrtdet, out):
    """out = -grad grad [erfc(lam D)/(sqrt(det eps) D)], D = sqrt(d.eps^-1.d).  Returns False (out untouched)
    if d = 0 or D^2 > dcut2."""
    x0 = epsinv[0, 0] * d[0] + epsinv[0, 1] * d[1] + epsinv[0, 2] * d[2]
    x1 = epsinv[1, 0] * d[0] + epsinv[1, 1] * d[1] + epsinv[1, 2] * d[2]
    x2 = epsinv[2, 0] * d[0] + epsinv[2, 1] * d[1] + epsinv[2, 2] * d[2]
    d2 = d[0] * x0 + d[1] * x1 + d[2] * x2
    if d2 > dcut2 or d2 == 0.0:
        return False
    dd = math.sqrt(d2)
    y = lam * dd
    ec = math.erfc(y)
    ex = math.exp(-y * y)
    c_e = 2.0 * lam / math.sqrt(math.pi)
    inv_d2 = 1.0 / d2
    inv_d3 = inv_d2 / dd
    c1 = (ec * inv_d3 + c_e * ex * inv_d2) * inv_sqrtdet
    c2 = (3.0 * ec * inv_d3 + 3.0 * c_e * ex * inv_d2 + 2.0 * c_e * lam * lam * ex) * inv_d2 * inv_sqrtdet
    out[0, 0] = c1 * epsinv[0, 0] - c2 * x0 * x0
    out[0, 1] = c1 * epsinv[0, 1] - c2 * x0 * x1
    out[0, 2] = c1 * epsinv[0, 2] - c2 * x0 * x2
    out[1, 0] = c1 * epsinv[1, 0] - c2 * x1 * x0
    out[1, 1] = c1 * epsinv[1, 1] - c2 * x1 * x1
    out[1, 2] = c1 * epsinv[1, 2] - c2 * x1 * x2
    out[2, 0] = c1 * epsinv[2, 0] - c2 * x2 * x0
    out[2, 1] = c1 * epsinv[2, 1] - c2 * x2 * x1
    out[2, 2] = c1 * epsinv[2, 2] - c2 * x2 * x2
    return True


@njit(cache=True, parallel=True)
def _real_space_kernel(nvec, cell, tau, epsinv, lam, dcut2, inv_sqrtdet):
    """T_real[r, i, j] = -grad grad [erfc(lam D)/(sqrt(det eps) D)] at d = n_r.cell + tau_j - tau_i (d != 0, D < dcut).

    Returns (T (nR, nat, nat, 3, 3) float64, used (nR,) bool: some pair of that cell lies inside the cutoff)."""
    nr = nvec.shape[0]
    nat = tau.shape[0]
    out = np.zeros((nr, nat, nat, 3, 3))
    used = np.zeros(nr, dtype=np.bool_)
    for r in prange(nr):
        d = np.empty(3)
        t = np.empty((3, 3))
        for i in range(nat):
            for j in range(nat):
                for a in range(3):
                    d[a] = (nvec[r, 0] * cell[0, a] + nvec[r, 1] * cell[1, a] + nvec[r, 2] * cell[2, a]
                            + tau[j, a] - tau[i, a])
                if _screened_dipole_tensor(d, epsinv, lam, dcut2, inv_sqrtdet, t):
                    used[r] = True
                    out[r, i, j] = t
    return out, used


@njit(cache=True, parallel=True)
def _real_space_fold_kernel(nvec, fold, nfold, cell, tau, epsinv, lam, dcut2, inv_sqrtdet):
    """out[fold[r], i, j] += T_real(n_r.cell + tau_j - tau_i): the real-space sum folded onto a supercell grid
    (parallel over atom pairs, so no two threads write the same element)."""
    nr = nvec.shape[0]
    nat = tau.shape[0]
    out = np.zeros((nfold, nat, nat, 3, 3))
    for ij in prange(nat * nat):
        i = ij // nat
        j = ij % nat
        d = np.empty(3)
        t = np.empty((3, 3))
        for r in range(nr):
            for a in range(3):
                d[a] = (nvec[r, 0] * cell[0, a] + nvec[r, 1] * cell[1, a] + nvec[r, 2] * cell[2, a]
                        + tau[j, a] - tau[i, a])
            if _screened_dipole_tensor(d, epsinv, lam, dcut2, inv_sqrtdet, t):
                k = fold[r]
                for a in range(3):
                    for b in range(3):
                        out[k, i, j, a, b] += t[a, b]
    return out


@njit(cache=True, parallel=True)
def _reciprocal_kernel(qfrac, bmat, eps, tau, lam, kcut2, width, pref):
    """T_recip[q, i, j] = pref sum_{K=2pi(q+G) != 0, K.eps.K < kcut2} K K^T/(K.eps.K) exp(-K.eps.K/4lam^2)
    exp(-i K.(tau_j - tau_i)).  bmat rows: 2 pi x reciprocal basis (K = (q+G) @ bmat); width: ellipsoid half box."""
    nq = qfrac.shape[0]
    nat = tau.shape[0]
    out = np.zeros((nq, nat, nat, 3, 3), dtype=np.complex128)
    inv4l2 = 0.25 / (lam * lam)
    for iq in prange(nq):
        kvec = np.empty(3)
        ph = np.empty(nat, dtype=np.complex128)
        acc = np.zeros((nat, nat, 6), dtype=np.complex128)
        q0 = qfrac[iq, 0]
        q1 = qfrac[iq, 1]
        q2 = qfrac[iq, 2]
        lo0 = int(math.ceil(-q0 - width[0]))
        hi0 = int(math.floor(-q0 + width[0]))
        lo1 = int(math.ceil(-q1 - width[1]))
        hi1 = int(math.floor(-q1 + width[1]))
        lo2 = int(math.ceil(-q2 - width[2]))
        hi2 = int(math.floor(-q2 + width[2]))
        for g0 in range(lo0, hi0 + 1):
            f0 = q0 + g0
            for g1 in range(lo1, hi1 + 1):
                f1 = q1 + g1
                for g2 in range(lo2, hi2 + 1):
                    f2 = q2 + g2
                    if f0 == 0.0 and f1 == 0.0 and f2 == 0.0:
                        continue
                    for a in range(3):
                        kvec[a] = f0 * bmat[0, a] + f1 * bmat[1, a] + f2 * bmat[2, a]
                    kek = 0.0
                    for a in range(3):
                        for b in range(3):
                            kek += kvec[a] * eps[a, b] * kvec[b]
                    if kek > kcut2:
                        continue
                    fac = pref * math.exp(-kek * inv4l2) / kek
                    for i in range(nat):
                        arg = kvec[0] * tau[i, 0] + kvec[1] * tau[i, 1] + kvec[2] * tau[i, 2]
                        ph[i] = complex(math.cos(arg), math.sin(arg))
                    k00 = kvec[0] * kvec[0]
                    k01 = kvec[0] * kvec[1]
                    k02 = kvec[0] * kvec[2]
                    k11 = kvec[1] * kvec[1]
                    k12 = kvec[1] * kvec[2]
                    k22 = kvec[2] * kvec[2]
                    for i in range(nat):
                        pi_ = fac * ph[i]
                        for j in range(nat):
                            c = pi_ * ph[j].conjugate()
                            acc[i, j, 0] += c * k00
                            acc[i, j, 1] += c * k01
                            acc[i, j, 2] += c * k02
                            acc[i, j, 3] += c * k11
                            acc[i, j, 4] += c * k12
                            acc[i, j, 5] += c * k22
        for i in range(nat):
            for j in range(nat):
                out[iq, i, j, 0, 0] = acc[i, j, 0]
                out[iq, i, j, 0, 1] = acc[i, j, 1]
                out[iq, i, j, 1, 0] = acc[i, j, 1]
                out[iq, i, j, 0, 2] = acc[i, j, 2]
                out[iq, i, j, 2, 0] = acc[i, j, 2]
                out[iq, i, j, 1, 1] = acc[i, j, 3]
                out[iq, i, j, 1, 2] = acc[i, j, 4]
                out[iq, i, j, 2, 1] = acc[i, j, 4]
                out[iq, i, j, 2, 2] = acc[i, j, 5]
    return out


@njit(cache=True, parallel=True)
def _real_fourier_kernel(qfrac, nvec, treal):
    """out[q, m] = sum_r exp(+2 pi i q.n_r) treal[r, m]."""
    nq = qfrac.shape[0]
    nr = nvec.shape[0]
    m = treal.shape[1]
    out = np.zeros((nq, m), dtype=np.complex128)
    twopi = 2.0 * math.pi
    for iq in prange(nq):
        for r in range(nr):
            arg = twopi * (qfrac[iq, 0] * nvec[r, 0] + qfrac[iq, 1] * nvec[r, 1] + qfrac[iq, 2] * nvec[r, 2])
            c = complex(math.cos(arg), math.sin(arg))
            for k in range(m):
                out[iq, k] += c * treal[r, k]
    return out


# ----------------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------------
def _as_real_array(x, name, shape):
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot be converted to a float array ({exc})") from None
    if arr.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, arr.shape)):
        want = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains non-finite values")
    return np.ascontiguousarray(arr)


def _validate_structure(cell, positions, born_charges, epsilon, tol, lambda_):
    cell = _as_real_array(cell, "cell", (3, 3))
    vol = float(np.linalg.det(cell))
    scale = float(np.prod(np.linalg.norm(cell, axis=1)))
    if scale == 0.0 or abs(vol) <= 1e-10 * scale:
        raise ValueError("cell: lattice vectors are (nearly) linearly dependent")
    positions = _as_real_array(positions, "positions", (None, 3))
    nat = positions.shape[0]
    if nat == 0:
        raise ValueError("positions: at least one atom is required")
    born_charges = _as_real_array(born_charges, "born_charges", (nat, 3, 3))
    epsilon = _as_real_array(epsilon, "epsilon", (3, 3))
    emax = float(np.max(np.abs(epsilon)))
    if emax == 0.0 or np.max(np.abs(epsilon - epsilon.T)) > 1e-10 * emax:
        raise ValueError("epsilon: must be a symmetric 3x3 matrix")
    epsilon = 0.5 * (epsilon + epsilon.T)
    ev = np.linalg.eigvalsh(epsilon)
    if ev[0] <= 0.0:
        raise ValueError(f"epsilon: must be positive definite (eigenvalues {ev})")
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol: must be a number, got {tol!r}") from None
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol: must satisfy 0 < tol < 1, got {tol}")
    if lambda_ is not None:
        try:
            lambda_ = float(lambda_)
        except (TypeError, ValueError):
            raise ValueError(f"lambda_: must be a positive number or None, got {lambda_!r}") from None
        if not (math.isfinite(lambda_) and lambda_ > 0.0):
            raise ValueError(f"lambda_: must be a positive finite number (1/Angstrom), got {lambda_}")
    # two atoms on the same site (modulo a lattice translation) make the dipole sum singular
    frac = positions @ np.linalg.inv(cell)
    if nat > 1:
        diff = frac[None, :, :] - frac[:, None, :]
        diff -= np.round(diff)
        dcart = np.linalg.norm(diff @ cell, axis=-1)
        iu = np.triu_indices(nat, 1)
        bad = dcart[iu] < 1e-8
        if np.any(bad):
            k = int(np.argmax(bad))
            raise ValueError(
                f"positions: atoms {iu[0][k]} and {iu[1][k]} coincide (modulo a lattice translation)")
    return cell, positions, born_charges, epsilon, tol, lambda_, frac


def _validate_qpoints(qpoints):
    return _as_real_array(qpoints, "qpoints", (None, 3))


def _validate_mesh(mesh):
    try:
        vals = list(mesh)
    except TypeError:
        raise ValueError(f"mesh: expected three positive integers, got {mesh!r}") from None
    if len(vals) != 3:
        raise ValueError(f"mesh: expected three positive integers, got {mesh!r}")
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            if isinstance(v, (float, np.floating)) and float(v).is_integer():
                v = int(v)
            else:
                raise ValueError(f"mesh: expected three positive integers, got {mesh!r}")
        if int(v) < 1:
            raise ValueError(f"mesh: expected three positive integers, got {mesh!r}")
        out.append(int(v))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# Ewald setup
# ----------------------------------------------------------------------------------------------------------------
def _gaussian_tail_cutoff(tol, mult):
    """z such that mult * 2 z^2 exp(-z^2) <= tol / 10 (bound of the truncated Gaussian tail, both sums)."""
    big_l = math.log(20.0 * max(1.0, mult) / tol)
    z2 = big_l
    for _ in range(50):
        z2 = big_l + math.log(z2)
    return math.sqrt(z2)


class _EwaldSetup:
    """Everything that depends on the structure and Lambda but not on q: real-space lattice box, self term and
    the G-space ellipsoid."""

    def __init__(self, cell, positions, epsilon, frac, tol, lam, lam_scale):
        self.cell = cell
        self.tau = positions
        self.eps = epsilon
        self.epsinv = np.linalg.inv(epsilon)
        self.epsinv = 0.5 * (self.epsinv + self.epsinv.T)
        sqrtdet = math.sqrt(float(np.linalg.det(epsilon)))
        self.inv_sqrtdet = 1.0 / sqrtdet
        self.omega = abs(float(np.linalg.det(cell)))
        omega_t = self.omega / sqrtdet  # cell volume in the coordinates where eps = 1
        lam0 = _SQRT_PI / omega_t ** (1.0 / 3.0)
        self.lam = float(lam) if lam is not None else lam0 * lam_scale
        s3 = (self.lam / lam0) ** 3  # per-term weight of the first neighbour shells relative to the balanced split
        zc = _gaussian_tail_cutoff(tol, s3)
        # ---- real space: D(d) <= zc / Lambda
        dcut = zc / self.lam
        self.dcut2 = dcut * dcut
        mr_inv = np.linalg.inv(cell).T @ epsilon @ np.linalg.inv(cell)  # inverse of cell eps^-1 cell^T
        wr = dcut * np.sqrt(np.diag(mr_inv))
        fdiff = frac[None, :, :] - frac[:, None, :]
        fmax = fdiff.reshape(-1, 3).max(axis=0)
        fmin = fdiff.reshape(-1, 3).min(axis=0)
        lo = np.ceil(-wr - fmax).astype(np.int64)
        hi = np.floor(wr - fmin).astype(np.int64)
        axes = [np.arange(lo[a], hi[a] + 1, dtype=np.int64) for a in range(3)]
        self.nvec_box = np.ascontiguousarray(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3))
        # self term: remove the d -> 0 limit of the smooth (erf) part contained in the reciprocal sum
        self.selfterm = 4.0 * self.lam ** 3 / (3.0 * _SQRT_PI) * self.inv_sqrtdet * self.epsinv
        # ---- reciprocal space: K.eps.K <= (2 Lambda zc)^2
        kcut = 2.0 * self.lam * zc
        self.kcut2 = kcut * kcut
        self.bmat = np.ascontiguousarray(2.0 * np.pi * np.linalg.inv(cell).T)
        mg_inv = np.linalg.inv(self.bmat @ epsilon @ self.bmat.T)
        self.gwidth = np.ascontiguousarray(kcut * np.sqrt(np.diag(mg_inv)))
        self.pref = 4.0 * np.pi / self.omega

    def reciprocal(self, qfrac):
        """Reciprocal-space part T~_recip(q), (nq, nat, nat, 3, 3) complex."""
        return _reciprocal_kernel(np.ascontiguousarray(qfrac), self.bmat, self.eps, self.tau, self.lam, self.kcut2,
                                  self.gwidth, self.pref)

    def real_at(self, qfrac):
        """Real-space part plus self term at arbitrary q, (nq, nat, nat, 3, 3) complex."""
        nat = self.tau.shape[0]
        treal, used = _real_space_kernel(self.nvec_box, self.cell, self.tau, self.epsinv, self.lam, self.dcut2,
                                         self.inv_sqrtdet)
        izero = np.all(self.nvec_box == 0, axis=1)
        used |= izero
        nvec = np.ascontiguousarray(self.nvec_box[used])
        treal = np.ascontiguousarray(treal[used])
        i0 = int(np.flatnonzero(np.all(nvec == 0, axis=1))[0])
        for i in range(nat):
            treal[i0, i, i] -= self.selfterm
        out = _real_fourier_kernel(np.ascontiguousarray(qfrac), nvec, treal.reshape(treal.shape[0], -1))
        return out.reshape(qfrac.shape[0], nat, nat, 3, 3)

    def real_on_grid(self, mesh):
        """Real-space part plus self term on the rfftn grid of an n1 x n2 x n3 supercell,
        (n1, n2, n3//2+1, nat, nat, 3, 3) complex, entry k = sum_n Phi_real(n) exp(+2 pi i k.n / N)."""
        n1, n2, n3 = mesh
        nat = self.tau.shape[0]
        nv = self.nvec_box
        # fold Phi_real(n) onto index (-n) mod N, so that rfftn (exp(-2 pi i k.m / N)) gives exp(+2 pi i k.n / N)
        fold = np.ascontiguousarray(((-nv[:, 0]) % n1) * (n2 * n3) + ((-nv[:, 1]) % n2) * n3 + ((-nv[:, 2]) % n3))
        folded = _real_space_fold_kernel(nv, fold, n1 * n2 * n3, self.cell, self.tau, self.epsinv, self.lam,
                                         self.dcut2, self.inv_sqrtdet)
        for i in range(nat):
            folded[0, i, i] -= self.selfterm
        return np.fft.rfftn(folded.reshape(n1, n2, n3, nat, nat, 3, 3), axes=(0, 1, 2))


@njit(cache=True, parallel=True)
def _sandwich_kernel(ttilde, zstar, scale):
    """out[q, i, a, j, b] = scale * sum_gh Z[i,g,a] T[q, i, j, g, h] Z[j,h,b]."""
    nq = ttilde.shape[0]
    nat = ttilde.shape[1]
    out = np.empty((nq, nat, 3, nat, 3), dtype=np.complex128)
    for iq in prange(nq):
        tmp = np.empty((3, 3), dtype=np.complex128)
        for i in range(nat):
            for j in range(nat):
                for g in range(3):  # tmp = T_ij Z_j
                    for b in range(3):
                        tmp[g, b] = (ttilde[iq, i, j, g, 0] * zstar[j, 0, b] + ttilde[iq, i, j, g, 1] * zstar[j, 1, b]
                                     + ttilde[iq, i, j, g, 2] * zstar[j, 2, b])
                for a in range(3):
                    for b in range(3):
                        out[iq, i, a, j, b] = scale * (zstar[i, 0, a] * tmp[0, b] + zstar[i, 1, a] * tmp[1, b]
                                                       + zstar[i, 2, a] * tmp[2, b])
    return out


def _sandwich(ttilde, born_charges):
    """C[..., i, a, j, b] = k_e sum_gh Z[i,g,a] T[..., i, j, g, h] Z[j,h,b]."""
    lead = ttilde.shape[:-4]
    nat = ttilde.shape[-4]
    flat = np.ascontiguousarray(ttilde, dtype=np.complex128).reshape((-1, nat, nat, 3, 3))
    return _sandwich_kernel(flat, born_charges, _KE).reshape(lead + (nat, 3, nat, 3))


def _apply_asr(c, c0, symmetric: bool = False):
    """c[..., i, :, i, :] -= sum_l c0[i, :, l, :] (anaddb asr 1 with the q = 0 Ewald matrix); ``symmetric``: only
    the symmetric part of each 3x3 sum (what multibinit subtracts; Hermitian, but with low-symmetry Born charges
    a rigid translation then feels a force)."""
    s = c0.real.sum(axis=2)  # (nat, 3, 3)
    if symmetric:
        s = 0.5 * (s + np.swapaxes(s, 1, 2))
    nat = s.shape[0]
    for i in range(nat):
        c[..., i, :, i, :] -= s[i]
    return c


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def dipole_dipole_matrices(cell, positions, born_charges, epsilon, qpoints, *, asr=True, tol=1e-12, lambda_=None):
    """Dipole-dipole force-constant matrices C(q) in eV/A^2.
    cell: (3,3) lattice vectors as ROWS, Angstrom.  positions: (nat,3) Cartesian Angstrom.
    born_charges: (nat,3,3), Z[i, g, a] = dP_g/du_a (units of e).  epsilon: (3,3) electronic dielectric tensor.
    qpoints: (nq,3) in fractional reciprocal coordinates (q_frac . R_int gives the phase in units of 2 pi).
    Returns complex128 array (nq, nat, 3, nat, 3).

    C(q)_{ia,jb} = sum_R Phi_{ia,jb}(R) exp(+2 pi i q.n_R) (phase from the cell translation only), Ewald-summed with
    the G = 0 term omitted.  ``asr``: subtract delta_ij sum_l C(0)_il; "symmetric": only the symmetric part of
    each 3x3 sum (see dipole_sum_rule_rest); False: nothing.  ``tol``: relative truncation error of the
    real- and reciprocal-space sums.  ``lambda_``: Ewald parameter in 1/A (default sqrt(pi) / Omega_eps^(1/3),
    Omega_eps = Omega / sqrt(det eps)); the result does not depend on it beyond ~tol."""
    cell, positions, born_charges, epsilon, tol, lambda_, frac = _validate_structure(
        cell, positions, born_charges, epsilon, tol, lambda_)
    qfrac = _validate_qpoints(qpoints)
    setup = _EwaldSetup(cell, positions, epsilon, frac, tol, lambda_, 1.0)
    qall = np.concatenate([qfrac, np.zeros((1, 3))], axis=0) if asr else qfrac
    ttilde = setup.reciprocal(qall) + setup.real_at(qall)
    c = _sandwich(ttilde, born_charges)
    if asr:
        c0 = c[-1].copy()
        c = c[:-1].copy()
        _apply_asr(c, c0, symmetric=asr == "symmetric")
    return c


def dipole_sum_rule_rest(cell, positions, born_charges, epsilon) -> np.ndarray:
    """(nat, 3, 3) eV/A^2: the antisymmetric part of each atom's dipole-dipole sum s_i = sum_j C_dd(0)_ij.

    With the symmetric sum-rule correction (asr="symmetric", what the models use) the dipole-dipole part is
    Hermitian, and its row sums at q = 0 are this rest: zero when every site's Born charge tensor is symmetric
    enough (cubic perovskites), not for low-symmetry sites (Pnma CaTiO3: 26 eV/A^2).  A short-range part whose row
    sums are minus this rest (HarmonicPart.impose_asr(target=...)) makes the whole force field both Hermitian and
    translation invariant."""
    c0 = dipole_dipole_matrices(cell, positions, born_charges, epsilon, np.zeros((1, 3)), asr=False)[0].real
    s = c0.sum(axis=2)
    return 0.5 * (s - np.swapaxes(s, 1, 2))


def dipole_dipole_kgrid(cell, positions, born_charges, epsilon, mesh, *, asr=True, tol=1e-12, lambda_=None):
    """Same quantity on the whole commensurate grid of an n1 x n2 x n3 supercell, in the layout of numpy's rfftn:
    returns complex128 array (n1, n2, n3//2+1, nat, 3, nat, 3), entry [k1,k2,k3] is C(q) at q_frac = (k1/n1, k2/n2, k3/n3).
    ``asr``: True as dipole_dipole_matrices, "symmetric" subtracts only the symmetric part of each on-site sum
    (multibinit's choice; see _apply_asr), False nothing.

    The real-space part is summed once per lattice vector, folded onto the supercell and Fourier transformed with
    rfftn; the reciprocal part is summed per grid point.  The default Lambda is lowered by (2 / (n1 n2 n3))^(1/6)
    relative to ``dipole_dipole_matrices`` to balance the two."""
    cell, positions, born_charges, epsilon, tol, lambda_, frac = _validate_structure(
        cell, positions, born_charges, epsilon, tol, lambda_)
    n1, n2, n3 = _validate_mesh(mesh)
    ntot = n1 * n2 * n3
    nat = positions.shape[0]
    setup = _EwaldSetup(cell, positions, epsilon, frac, tol, lambda_, min(1.0, (2.0 / ntot) ** (1.0 / 6.0)))
    n3h = n3 // 2 + 1
    real_part = setup.real_on_grid((n1, n2, n3))
    # reciprocal part on the rfft half-grid
    k1, k2, k3 = np.meshgrid(np.arange(n1) / n1, np.arange(n2) / n2, np.arange(n3h) / n3, indexing="ij")
    qgrid = np.stack([k1, k2, k3], axis=-1).reshape(-1, 3)
    ttilde = setup.reciprocal(qgrid).reshape(n1, n2, n3h, nat, nat, 3, 3)
    ttilde += real_part
    c = _sandwich(ttilde, born_charges)
    if asr:
        _apply_asr(c, c[0, 0, 0].copy(), symmetric=asr == "symmetric")
    return c
