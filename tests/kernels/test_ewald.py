"""Tests of the dipole-dipole Ewald kernel: conventions (phases, signs, layout) pinned by independent checks."""
import time

import numpy as np
import pytest
from ase import units

from sp_server.kernels.ewald import dipole_dipole_kgrid, dipole_dipole_matrices

KE = units.Hartree * units.Bohr  # e^2 / (4 pi eps0) in eV * A


# ----------------------------------------------------------------------------------------------------------------
# fixtures / helpers
# ----------------------------------------------------------------------------------------------------------------
def _triclinic(seed=0, nat=3):
    rng = np.random.default_rng(seed)
    cell = np.array([[3.9, 0.2, -0.3], [0.4, 4.2, 0.1], [-0.2, 0.5, 4.6]])
    pos = rng.random((nat, 3)) @ cell + rng.normal(scale=0.3, size=(nat, 3))  # not all inside the cell
    zstar = rng.normal(size=(nat, 3, 3)) + 2.0 * np.eye(3)  # non-symmetric
    a = np.array([[1.8, 0.3, -0.2], [0.0, 2.4, 0.5], [0.1, -0.4, 1.5]])
    eps = a @ a.T  # anisotropic, non-diagonal
    return cell, pos, zstar, eps


def _perovskite():
    a = 4.0
    cell = np.eye(3) * a
    pos = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]) * a
    zstar = np.array([np.eye(3) * 2.7, np.eye(3) * 7.2, np.diag([-2.0, -2.0, -5.9]),
                      np.diag([-2.0, -5.9, -2.0]), np.diag([-5.9, -2.0, -2.0])])
    return cell, pos, zstar, np.eye(3) * 6.0


def _mat(c):
    """(nat, 3, nat, 3) -> (3 nat, 3 nat)."""
    n = c.shape[0] * 3
    return c.reshape(n, n)


def _relerr(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _dipole_tensor(d):
    """T(d) = -grad grad (1/|d|) for eps = 1, d (..., 3)."""
    r = np.linalg.norm(d, axis=-1)[..., None, None]
    return (np.eye(3) * r ** 2 - 3.0 * d[..., :, None] * d[..., None, :]) / r ** 5


def _direct_lattice_sum(cell, pos, zstar, q, rc, width):
    """Brute force C(q) = sum_R Z_i^T T(R + tau_j - tau_i) Z_j exp(2 pi i q.n) over (j,R) != (i,0), eps = 1,
    with a smooth spherical envelope w(|R|) (1 inside rc - width, cosine to 0 at rc)."""
    nat = len(pos)
    nmax = int(rc / np.min(np.abs(np.linalg.det(cell)) / np.linalg.norm(
        np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1))) + 2
    ax = np.arange(-nmax, nmax + 1)
    n = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    r = np.linalg.norm(n @ cell, axis=1)
    x = np.clip((r - (rc - width)) / width, 0.0, 1.0)
    w = 0.5 * (1.0 + np.cos(np.pi * x))
    keep = w > 0
    n, w = n[keep], w[keep]
    rvec = n @ cell
    ph = np.exp(2j * np.pi * (n @ q)) * w
    out = np.zeros((nat, 3, nat, 3), complex)
    for i in range(nat):
        for j in range(nat):
            d = rvec + pos[j] - pos[i]
            ok = np.linalg.norm(d, axis=1) > 1e-9
            tsum = np.einsum("r,rgh->gh", ph[ok], _dipole_tensor(d[ok]))
            out[i, :, j, :] = zstar[i].T @ tsum @ zstar[j]
    return out * KE


def _qgrid(mesh):
    n1, n2, n3 = mesh
    k = np.meshgrid(np.arange(n1) / n1, np.arange(n2) / n2, np.arange(n3 // 2 + 1) / n3, indexing="ij")
    return np.stack(k, axis=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------------------------
# 1. Lambda independence
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("asr", [False, True])
def test_lambda_independence(asr):
    cell, pos, zstar, eps = _triclinic()
    rng = np.random.default_rng(5)
    q = np.vstack([np.zeros(3), [0.5, 0.0, 0.0], rng.random((4, 3)) - 0.5, [1e-3, 0, 0]])
    ref = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=asr)
    for lam in (0.12, 1.5):  # default is ~0.8 1/A here
        c = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=asr, lambda_=lam)
        assert _relerr(c, ref) < 1e-10
    mesh = (3, 2, 5)
    kref = dipole_dipole_kgrid(cell, pos, zstar, eps, mesh, asr=asr)
    for lam in (0.12, 1.5):
        assert _relerr(dipole_dipole_kgrid(cell, pos, zstar, eps, mesh, asr=asr, lambda_=lam), kref) < 1e-10


def test_tolerance_controls_accuracy():
    cell, pos, zstar, eps = _triclinic()
    q = np.array([[0.1, -0.2, 0.3]])
    ref = dipole_dipole_matrices(cell, pos, zstar, eps, q, tol=1e-14)
    loose = dipole_dipole_matrices(cell, pos, zstar, eps, q, tol=1e-4, lambda_=0.3)
    assert _relerr(loose, ref) < 1e-3


# ----------------------------------------------------------------------------------------------------------------
# 2. Hermiticity, time reversal, periodicity
# ----------------------------------------------------------------------------------------------------------------
def test_hermitian_and_time_reversal():
    cell, pos, zstar, eps = _triclinic(seed=1)
    rng = np.random.default_rng(2)
    q = np.vstack([np.zeros(3), rng.random((5, 3)) - 0.5])
    c = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=False)
    cm = dipole_dipole_matrices(cell, pos, zstar, eps, -q, asr=False)
    cg = dipole_dipole_matrices(cell, pos, zstar, eps, q + np.array([1, -2, 3]), asr=False)
    scale = np.abs(c).max()
    for iq in range(len(q)):
        m = _mat(c[iq])
        assert np.abs(m - m.conj().T).max() < 1e-12 * scale
        assert np.abs(cm[iq] - c[iq].conj()).max() < 1e-12 * scale
        assert np.abs(cg[iq] - c[iq]).max() < 1e-11 * scale  # C(q + G) = C(q): phases use n_R only
    assert np.abs(c[0].imag).max() < 1e-12 * scale  # C(0) is real


def test_asr_breaks_hermiticity_only_by_antisymmetric_part_of_acoustic_sum():
    """sum_l C(0)_il is not symmetric for generic Born charges: asr=True (anaddb asr 1) then moves exactly its
    antisymmetric part into the diagonal blocks (documented behaviour)."""
    cell, pos, zstar, eps = _triclinic(seed=1)
    q = np.array([[0.2, -0.1, 0.35]])
    c = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=False)[0]
    ca = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=True)[0]
    s = dipole_dipole_matrices(cell, pos, zstar, eps, np.zeros((1, 3)), asr=False)[0].real.sum(axis=2)
    expected = c.copy()
    for i in range(len(pos)):
        expected[i, :, i, :] -= s[i]
    assert np.abs(ca - expected).max() < 1e-12 * np.abs(c).max()
    anti = _mat(ca) - _mat(ca).conj().T
    for i in range(len(pos)):
        blk = anti[3 * i:3 * i + 3, 3 * i:3 * i + 3]
        assert np.allclose(blk, -(s[i] - s[i].T), atol=1e-11 * np.abs(c).max())


def test_perovskite_asr_is_hermitian():
    cell, pos, zstar, eps = _perovskite()
    q = np.array([[0.0, 0.0, 0.0], [0.25, 0.1, -0.3], [0.5, 0.5, 0.5]])
    c = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=True)
    for m in c:
        m = _mat(m)
        assert np.abs(m - m.conj().T).max() < 1e-11 * np.abs(m).max()


# ----------------------------------------------------------------------------------------------------------------
# 3. acoustic sum rule
# ----------------------------------------------------------------------------------------------------------------
def test_asr_sum_vanishes():
    cell, pos, zstar, eps = _triclinic(seed=3)
    c0 = dipole_dipole_matrices(cell, pos, zstar, eps, np.zeros((1, 3)), asr=True)[0]
    c0_raw = dipole_dipole_matrices(cell, pos, zstar, eps, np.zeros((1, 3)), asr=False)[0]
    scale = np.abs(c0_raw).max()
    assert np.abs(c0_raw.sum(axis=2)).max() > 1e-2 * scale  # the correction is not trivial here
    assert np.abs(c0.sum(axis=2)).max() < 1e-12 * scale
    ck = dipole_dipole_kgrid(cell, pos, zstar, eps, (2, 3, 2), asr=True)
    assert np.abs(ck[0, 0, 0].sum(axis=2)).max() < 1e-12 * scale
    # off-diagonal blocks and the q != 0 diagonal blocks are shifted by the same q-independent matrix
    q = np.array([[0.3, 0.1, -0.2]])
    d = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=True)[0] - \
        dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=False)[0]
    for i in range(len(pos)):
        for j in range(len(pos)):
            want = -c0_raw.real.sum(axis=2)[i] if i == j else np.zeros((3, 3))
            assert np.allclose(d[i, :, j, :], want, atol=1e-12 * scale)


@pytest.mark.parametrize("structure", ["cscl", "rocksalt"])
def test_asr_correction_negligible_for_neutral_cubic_sites(structure):
    """Neutral isotropic charges on sites of cubic symmetry: the uniform-translation field vanishes, so does the
    ASR correction.  (Neutrality alone is not enough: on sites of lower symmetry, e.g. O in a perovskite, the
    dipole field of a rigid translation does not vanish.)"""
    a = 4.1
    if structure == "cscl":
        cell = np.eye(3) * a
        pos = np.array([[0, 0, 0], [0.5, 0.5, 0.5]]) * a
    else:
        cell = 0.5 * a * (np.ones((3, 3)) - np.eye(3))
        pos = np.array([[0, 0, 0], [0.5, 0.5, 0.5]]) * a
    zstar = np.array([np.eye(3) * 1.3, -np.eye(3) * 1.3])
    q = np.array([[0.0, 0.0, 0.0], [0.3, -0.1, 0.2]])
    c = dipole_dipole_matrices(cell, pos, zstar, np.eye(3) * 2.5, q, asr=False)
    ca = dipole_dipole_matrices(cell, pos, zstar, np.eye(3) * 2.5, q, asr=True)
    assert np.abs(c[0].sum(axis=2)).max() < 1e-12 * np.abs(c).max()
    assert _relerr(ca, c) < 1e-12


def test_asr_correction_not_negligible_for_neutral_perovskite():
    cell, pos, _, eps = _perovskite()
    zstar = np.array([2.0, 4.0, -2.0, -2.0, -2.0])[:, None, None] * np.eye(3)  # nominal, neutral
    s = dipole_dipole_matrices(cell, pos, zstar, eps, np.zeros((1, 3)), asr=False)[0].real.sum(axis=2)
    assert np.abs(s[2:]).max() > 0.1  # eV/A^2: O sites (tetragonal site symmetry) feel a field gradient
    assert np.allclose(s, np.transpose(s, (0, 2, 1)), atol=1e-12)  # but it is symmetric there


# ----------------------------------------------------------------------------------------------------------------
# 4. independent brute-force physics (eps = 1)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sc", "bcc", "fcc"])
def test_cubic_lattice_lorentz_field(kind):
    """One atom, Z = 1, parallel dipoles, tin-foil: E / dipole = -(2 pi / (3 Omega)) p^2 k_e (Lorentz field
    4 pi P / 3, no depolarisation), i.e. C(0) = -(4 pi / (3 Omega)) k_e 1."""
    a = 3.7
    cell = {"sc": np.eye(3), "bcc": 0.5 * (np.ones((3, 3)) - 2 * np.eye(3)),
            "fcc": 0.5 * (np.ones((3, 3)) - np.eye(3))}[kind] * a
    omega = abs(np.linalg.det(cell))
    c = dipole_dipole_matrices(cell, [[0.1, 0.2, 0.3]], np.eye(3)[None], np.eye(3), np.zeros((1, 3)), asr=False)
    assert np.allclose(c[0, 0, :, 0, :], -4 * np.pi / (3 * omega) * KE * np.eye(3), rtol=0, atol=1e-12)
    p = np.array([0.3, -0.7, 0.2])
    energy = 0.5 * p @ c[0, 0, :, 0, :].real @ p
    assert energy == pytest.approx(-2 * np.pi / (3 * omega) * (p @ p) * KE, rel=1e-12)
    # asr=True removes it entirely (one atom)
    ca = dipole_dipole_matrices(cell, [[0.1, 0.2, 0.3]], np.eye(3)[None], np.eye(3), np.zeros((1, 3)))
    assert np.abs(ca).max() < 1e-12


def test_uniform_displacement_energy_vs_sphere_sum():
    """q = 0: 0.5 u^T C(0) u equals the direct pair sum over a large sphere of cells minus the sphere's
    depolarisation energy (2 pi / (3 Omega)) |M|^2 k_e (E_vacuum-sphere = E_tinfoil + 2 pi |M|^2 / 3 Omega)."""
    cell, pos, zstar, _ = _triclinic(seed=4)
    rng = np.random.default_rng(7)
    u = rng.normal(size=(len(pos), 3))
    c0 = dipole_dipole_matrices(cell, pos, zstar, np.eye(3), np.zeros((1, 3)), asr=False)[0]
    e_ewald = 0.5 * np.einsum("ia,iajb,jb->", u, c0.real, u)
    csph = _direct_lattice_sum(cell, pos, zstar, np.zeros(3), rc=70.0, width=25.0).real
    e_sphere = 0.5 * np.einsum("ia,iajb,jb->", u, csph, u)
    m = np.einsum("iga,ia->g", zstar, u)  # dipole per cell
    shape = 2 * np.pi / (3 * abs(np.linalg.det(cell))) * (m @ m) * KE
    assert shape > 1e-2 * abs(e_ewald)  # the shape term matters at this level
    assert e_sphere - shape == pytest.approx(e_ewald, rel=1e-4)


def test_finite_q_vs_direct_lattice_sum():
    """q != 0 (no macroscopic field): the smooth-envelope direct sum converges to C(q) itself.  This pins the
    phase convention exp(+2 pi i q.n_R) and the sign of the tau phase in the reciprocal sum."""
    cell, pos, zstar, _ = _triclinic(seed=4)
    q = np.array([1 / 3, 0.25, -0.2])
    c = dipole_dipole_matrices(cell, pos, zstar, np.eye(3), q[None], asr=False)[0]
    brute = _direct_lattice_sum(cell, pos, zstar, q, rc=60.0, width=20.0)
    assert _relerr(brute, c) < 2e-5
    cwrong = dipole_dipole_matrices(cell, pos, zstar, np.eye(3), -q[None], asr=False)[0]
    assert _relerr(brute, cwrong) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# 5. anisotropic epsilon by coordinate transformation
# ----------------------------------------------------------------------------------------------------------------
def test_anisotropic_epsilon_by_coordinate_transformation():
    """With eps = A A^T and s = A^-1 d the screened potential is 1/(det A |s|): hence
    C(cell, tau, Z, eps) = C(cell A^-T, tau A^-T, A^-1 Z, 1) / det A (q_frac and the u index unchanged)."""
    cell, pos, zstar, eps = _triclinic(seed=6)
    rng = np.random.default_rng(8)
    q = np.vstack([np.zeros(3), rng.random((3, 3)) - 0.5])
    ref = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=False)
    refa = dipole_dipole_matrices(cell, pos, zstar, eps, q, asr=True)
    chol = np.linalg.cholesky(eps)
    w, v = np.linalg.eigh(eps)
    sym = v @ np.diag(np.sqrt(w)) @ v.T
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(rot) < 0:
        rot[:, 0] *= -1
    for amat in (chol, sym, chol @ rot):
        assert np.allclose(amat @ amat.T, eps)
        ainv_t = np.linalg.inv(amat).T
        z2 = np.einsum("gh,iha->iga", np.linalg.inv(amat), zstar)
        c = dipole_dipole_matrices(cell @ ainv_t, pos @ ainv_t, z2, np.eye(3), q, asr=False)
        assert _relerr(c / np.linalg.det(amat), ref) < 1e-10
        ca = dipole_dipole_matrices(cell @ ainv_t, pos @ ainv_t, z2, np.eye(3), q, asr=True)
        assert _relerr(ca / np.linalg.det(amat), refa) < 1e-10
    # scalar screening: C(e 1) = C(1) / e
    c1 = dipole_dipole_matrices(cell, pos, zstar, np.eye(3), q, asr=False)
    assert _relerr(dipole_dipole_matrices(cell, pos, zstar, 4.5 * np.eye(3), q, asr=False) * 4.5, c1) < 1e-10


def test_anisotropic_epsilon_matters():
    cell, pos, zstar, eps = _triclinic(seed=6)
    q = np.array([[0.1, 0.2, -0.3]])
    c = dipole_dipole_matrices(cell, pos, zstar, eps, q)
    ciso = dipole_dipole_matrices(cell, pos, zstar, np.eye(3) * np.linalg.det(eps) ** (1 / 3), q)
    assert _relerr(c, ciso) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# 6. k-grid layout, FFT forces, real-space force constants
# ----------------------------------------------------------------------------------------------------------------
def test_kgrid_matches_matrices():
    cell, pos, zstar, eps = _triclinic(seed=9)
    for mesh in [(3, 2, 4), (1, 1, 1), (2, 5, 3)]:
        for asr in (False, True):
            ck = dipole_dipole_kgrid(cell, pos, zstar, eps, mesh, asr=asr)
            n1, n2, n3 = mesh
            assert ck.shape == (n1, n2, n3 // 2 + 1, len(pos), 3, len(pos), 3)
            assert ck.dtype == np.complex128
            cm = dipole_dipole_matrices(cell, pos, zstar, eps, _qgrid(mesh), asr=asr).reshape(ck.shape)
            assert _relerr(ck, cm) < 1e-11


def _fft_forces(ck, u):
    mesh = u.shape[:3]
    ut = np.fft.rfftn(u, axes=(0, 1, 2))
    ft = -np.einsum("xyziajb,xyzjb->xyzia", ck, ut)
    return np.fft.irfftn(ft, s=mesh, axes=(0, 1, 2))


def _fft_energy(ck, u):
    mesh = u.shape[:3]
    ut = np.fft.rfftn(u, axes=(0, 1, 2))
    e = np.einsum("xyzia,xyziajb,xyzjb->xyz", ut.conj(), ck, ut).real
    n3 = mesh[2]
    wgt = np.full(ck.shape[2], 2.0)
    wgt[0] = 1.0
    if n3 % 2 == 0:
        wgt[-1] = 1.0
    return 0.5 * np.sum(e * wgt) / np.prod(mesh)


def test_fft_forces_layout_and_real_space_sum():
    cell, pos, zstar, eps = _triclinic(seed=10)
    nat = len(pos)
    mesh = (3, 2, 4)
    big = (6, 4, 8)
    rng = np.random.default_rng(11)
    u = rng.normal(size=mesh + (nat, 3))
    for asr in (False, True):
        ck = dipole_dipole_kgrid(cell, pos, zstar, eps, mesh, asr=asr)
        f = _fft_forces(ck, u)

        if not asr:  # (with random Born charges asr=True is not Hermitian, see above: no energy then)
            # (a) f = -dE/du, E from the k-space quadratic form (central differences are exact for a quadratic)
            h = 1e-3
            fd = np.zeros_like(u)
            for idx in np.ndindex(u.shape):
                up = u.copy()
                up[idx] += h
                um = u.copy()
                um[idx] -= h
                fd[idx] = -(_fft_energy(ck, up) - _fft_energy(ck, um)) / (2 * h)
            assert _relerr(fd, f) < 1e-8

        # (b) f(L) = -sum_{j,R} Phi_ij(R) u_j(L + R), with Phi(R) from the inverse transform of C on a finer
        # (commensurate) mesh folded back onto the 3 x 2 x 4 supercell
        cbig = dipole_dipole_kgrid(cell, pos, zstar, eps, big, asr=asr)
        # C(k) = sum_n Phi(n) exp(+2 pi i k.n / N)  =>  Phi(n) = irfftn(conj(C))[n]   (Phi is real)
        phi_big = np.fft.irfftn(cbig.conj(), s=big, axes=(0, 1, 2))
        phi = np.zeros(mesh + (nat, 3, nat, 3))
        for n in np.ndindex(big):
            phi[n[0] % mesh[0], n[1] % mesh[1], n[2] % mesh[2]] += phi_big[n]
        f_direct = np.zeros_like(u)
        for m in np.ndindex(mesh):
            shifted = np.roll(u, shift=(-m[0], -m[1], -m[2]), axis=(0, 1, 2))  # shifted[L] = u[L + m]
            f_direct -= np.einsum("iajb,xyzjb->xyzia", phi[m], shifted)
        assert _relerr(f_direct, f) < 1e-11

        # a rigid translation of the whole crystal costs no force with asr=True
        ft = _fft_forces(ck, np.broadcast_to(rng.normal(size=3), u.shape).copy())
        if asr:
            assert np.abs(ft).max() < 1e-10 * np.abs(f).max()
        else:
            assert np.abs(ft).max() > 1e-3 * np.abs(f).max()


def test_real_space_force_constants_are_bare_dipole_tensor():
    """Phi(R) from the inverse transform of the 16^3 grid equals the bare pair interaction
    Z_i^T T(R + tau_j - tau_i) Z_j plus the images of the (cubic, tin-foil) supercell, which to leading order add
    -(4 pi / (3 Omega_super)) Z_i^T Z_j (exact for the self-image term); residual O((d/L)^5).
    This pins the real-space pair convention d = R + tau_j - tau_i and the sign of the phase."""
    rng = np.random.default_rng(2)
    a = 4.0
    cell = np.eye(3) * a
    pos = rng.random((3, 3)) @ cell
    zstar = rng.normal(size=(3, 3, 3))
    n = 16
    ck = dipole_dipole_kgrid(cell, pos, zstar, np.eye(3), (n, n, n), asr=False)
    phi = np.fft.irfftn(ck.conj(), s=(n, n, n), axes=(0, 1, 2))
    phi_wrong = np.fft.irfftn(ck, s=(n, n, n), axes=(0, 1, 2))  # exp(-2 pi i q.n) convention
    image = 4 * np.pi / (3 * n ** 3 * a ** 3)
    scale = np.max(np.abs(zstar)) ** 2 * KE / a ** 3
    err, err_wrong = 0.0, 0.0
    for cellidx in [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, -1, 1), (1, 1, -1)]:
        for i in range(3):
            for j in range(3):
                d = np.array(cellidx) * a + pos[j] - pos[i]
                t = _dipole_tensor(d) if np.linalg.norm(d) > 1e-9 else np.zeros((3, 3))
                want = zstar[i].T @ (t - image * np.eye(3)) @ zstar[j] * KE
                err = max(err, np.abs(phi[cellidx][i, :, j, :] - want).max() / scale)
                err_wrong = max(err_wrong, np.abs(phi_wrong[cellidx][i, :, j, :] - want).max() / scale)
                if cellidx == (0, 0, 0) and i == j:  # self-image sum of a cubic lattice: exact
                    assert np.allclose(phi[cellidx][i, :, i, :], want, atol=1e-12 * scale)
    assert err < 3e-4
    assert err_wrong > 1e-1


def test_kgrid_timing():
    cell, pos, zstar, eps = _perovskite()
    dipole_dipole_kgrid(cell, pos, zstar, eps, (2, 2, 2))  # compile / load cache
    t0 = time.perf_counter()
    c = dipole_dipole_kgrid(cell, pos, zstar, eps, (16, 16, 16))
    assert time.perf_counter() - t0 < 5.0
    assert c.shape == (16, 16, 9, 5, 3, 5, 3)


# ----------------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------------
def test_validation_errors():
    cell, pos, zstar, eps = _triclinic()
    q = np.zeros((1, 3))
    with pytest.raises(ValueError, match="cell"):
        dipole_dipole_matrices(np.eye(2), pos, zstar, eps, q)
    with pytest.raises(ValueError, match="cell"):
        dipole_dipole_matrices([[1, 0, 0], [2, 0, 0], [0, 0, 1]], pos, zstar, eps, q)
    with pytest.raises(ValueError, match="positions"):
        dipole_dipole_matrices(cell, pos[:, :2], zstar, eps, q)
    with pytest.raises(ValueError, match="positions"):
        dipole_dipole_matrices(cell, np.vstack([pos[:1], pos[:1] + cell[1]]), zstar[:2], eps, q)
    with pytest.raises(ValueError, match="born_charges"):
        dipole_dipole_matrices(cell, pos, zstar[:2], eps, q)
    bad = zstar.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="born_charges"):
        dipole_dipole_matrices(cell, pos, bad, eps, q)
    with pytest.raises(ValueError, match="epsilon.*symmetric"):
        dipole_dipole_matrices(cell, pos, zstar, eps + np.triu(np.ones((3, 3)), 1), q)
    with pytest.raises(ValueError, match="epsilon.*positive definite"):
        dipole_dipole_matrices(cell, pos, zstar, -eps, q)
    with pytest.raises(ValueError, match="qpoints"):
        dipole_dipole_matrices(cell, pos, zstar, eps, np.zeros(3))
    with pytest.raises(ValueError, match="qpoints"):
        dipole_dipole_matrices(cell, pos, zstar, eps, [[np.inf, 0, 0]])
    with pytest.raises(ValueError, match="tol"):
        dipole_dipole_matrices(cell, pos, zstar, eps, q, tol=0.0)
    with pytest.raises(ValueError, match="lambda_"):
        dipole_dipole_matrices(cell, pos, zstar, eps, q, lambda_=-1.0)
    with pytest.raises(ValueError, match="mesh"):
        dipole_dipole_kgrid(cell, pos, zstar, eps, (2, 0, 2))
    with pytest.raises(ValueError, match="mesh"):
        dipole_dipole_kgrid(cell, pos, zstar, eps, (2, 2))
