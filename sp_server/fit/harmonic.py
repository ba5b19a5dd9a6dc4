"""The harmonic part of a second-principles model from an "oracle": any ASE calculator (DFT or a stand-in).

Steps of :func:`harmonic_from_oracle` (units eV, Angstrom, amu; strain in Voigt order xx yy zz yz xz xy with
engineering shear, as everywhere in sp_server):

1. optionally the (cubic) lattice constant is relaxed with the oracle (cell scaled isotropically, fractional
   positions kept, until the pressure vanishes); the reference must be a stationary point: residual forces above
   ``settings.fmax_check`` are an error;
2. force constants by finite displacements with phonopy on ``settings.supercell`` (central differences by
   default), phonopy's translational + permutation symmetrisation; the periodic supercell force constants
   phi_per(m) = d2E / du_i(0) du_j(m) (m on the n1 x n2 x n3 grid) are spread over the Wigner-Seitz images R = m +
   n N of each atom pair with anaddb's weights (``sp_server.io.ddb._ws_weights``): the weights of the images sum
   to one, so the model on the *same* supercell folds them back to exactly phonopy's force constants (any
   displacement pattern), Phi(R) = Phi(-R)^T holds, and on other supercells this is the usual Wigner-Seitz
   interpolation (as anaddb / MULTIBINIT do from a q-mesh);
3. the clamped-ion elastic tensor and the internal strain by central finite strains of the reference cell with
   the atoms at the strained reference positions (u = 0): for the symmetric deformation F = 1 + eps(eta), the
   generalized force dE/deta_v = V sym(sigma F^-1)_v (sigma = ASE's stress, 1/V dE/deps, V the strained volume;
   exact also when the reference carries a residual stress) gives C_vw = 1/V_ref d2E/deta_v deta_w, and the
   forces F_ia = -Lambda[i, a, v] eta_v give Lambda; both are averaged over the space group (spglib) and
   sum_i Lambda_i = 0 (translation invariance) is imposed;
4. Born charges Z[i, g, a] = dP_g / du_a and epsilon_inf from ``born`` (a phonopy BORN file, a dict or a pair),
   or from the calculator when it implements ASE's ``born_effective_charges`` and ``dielectric_tensor``;
   otherwise the model has no dipole-dipole part (said in the log).  With Born charges the stored IFCs are the
   short-range ones: the Hermitian part of the Ewald dipole-dipole C_dd(q) (sp_server.kernels.ewald, asr
   corrected, the same the model adds back on every supercell) is subtracted at the supercell's commensurate
   q-points before the Wigner-Seitz step, so the model reproduces phonopy's force constants on that supercell;
5. Model(reference with the oracle's energy, harmonic part, metadata: settings, oracle, lattice constant,
   residual forces and stress, number of oracle calls, warnings).

Oracle failures (an exception, NaN/inf, absurd or wrongly shaped results) are retried (``attempts``); a
configuration that keeps failing raises :class:`OracleError` (a RuntimeError)
naming the step and the configuration; nothing is ever silently replaced by zeros.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from ase import Atoms

from ..io.ddb import _asr_onsite, _ws_weights
from ..io.jsonfile import atomic_path
from ..model.mapping import VOIGT_PAIRS, matrix_from_voigt
from ..model.model import HarmonicPart, Model, Reference

__all__ = ["HarmonicSettings", "OracleError", "NotStationaryError", "relax_cubic_lattice", "harmonic_from_oracle",
           "read_phonopy_born", "phonopy_to_ifc"]

NO_BORN_MESSAGE = "no Born charges: no dipole-dipole part"


def _quiet(*args, **kwargs):
    pass


class OracleError(RuntimeError):
    """The oracle (ASE calculator) failed or returned non-finite / malformed results; names step + configuration."""


class NotStationaryError(ValueError):
    """The reference structure is not a stationary point of the oracle (forces above the tolerance)."""


@dataclass
class HarmonicSettings:
    """supercell: phonopy supercell n1 x n2 x n3 (an int means n x n x n) for the finite displacements.
    displacement: A.  strain_step: finite strain (dimensionless) for the elastic and internal-strain tensors.
    relax_lattice: scale the cell to zero pressure with the oracle first.  fmax_check: eV/A, largest acceptable
    residual force on the reference.  symprec: A, symmetry tolerance (phonopy, spglib).
    plusminus: phonopy's is_plusminus (True: +/- displacements, central differences; 'auto': only where symmetry
    does not give the opposite one; False: one sided, then the forces of the undisplaced supercell are subtracted).
    symmetrize: average the elastic and internal-strain tensors (and oracle Born charges) over the space group.
    pressure_tol: eV/A^3, convergence of the lattice relaxation."""

    supercell: tuple = (2, 2, 2)
    displacement: float = 0.01
    strain_step: float = 0.005
    relax_lattice: bool = True
    fmax_check: float = 1e-3
    symprec: float = 1e-5
    plusminus: object = True
    symmetrize: bool = True
    pressure_tol: float = 1e-5

    def mesh(self) -> tuple:
        sc = self.supercell
        if np.isscalar(sc):
            sc = (sc, sc, sc)
        sc = tuple(int(n) for n in sc)
        if len(sc) != 3 or min(sc) < 1:
            raise ValueError(f"supercell must be three positive integers (diagonal supercell), got {self.supercell}")
        return sc


# ----------------------------------------------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------------------------------------------
def _oracle_name(calc) -> str:
    cls = type(calc).__name__
    name = getattr(calc, "name", None)
    return cls if not name or str(name).lower() == cls.lower() else f"{cls} ({name})"


class _Oracle:
    """Calls the calculator on copies of the configurations and checks every result.

    A failed call (an exception, a time-out of an isolated oracle, NaN/inf or malformed results) is retried up to
    ``attempts`` times in all, each failure logged; only a call that keeps failing raises :class:`OracleError`.
    With ``cache_dir`` every accepted result is kept there (one .npz per configuration, written atomically), so a
    stopped or failed run that is started again repeats no call that had succeeded."""

    def __init__(self, calc, log, progress: bool, attempts: int = 3, cache_dir=None):
        self.calc = calc
        self.name = _oracle_name(calc)
        self.log = log
        self.progress = progress
        self.attempts = max(int(attempts), 1)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.ncalls = 0          # configurations computed (cached ones included: the same figure after a restart)
        self.nfailed = 0         # failed attempts
        self.ncached = 0

    def _key(self, atoms: Atoms, props) -> str:
        from .fit import fingerprint
        return f"{fingerprint(atoms, 10)}-{'-'.join(props)}"

    def __call__(self, atoms: Atoms, step: str, label: str, props=("energy", "forces", "stress")) -> dict:
        self.ncalls += 1
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self._key(atoms, props)}.npz"
            if path.exists():
                try:
                    with np.load(path) as data:
                        out = {p: np.array(data[p]) for p in props}
                    self.ncached += 1
                    if "energy" in out:
                        out["energy"] = float(out["energy"])
                    return out
                except Exception:   # a damaged cache file is computed again
                    pass
        if self.progress:
            self.log(f"  [{step}] oracle call {self.ncalls}: {label}")
        errors = []
        for attempt in range(1, self.attempts + 1):
            try:
                out = self._call(atoms, step, label, props)
            except OracleError as exc:
                self.nfailed += 1
                errors.append(str(exc))
                if attempt < self.attempts:
                    self.log(f"  [{step}] attempt {attempt} of {self.attempts} failed: {exc}; retrying")
                continue
            if path is not None:
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, **out)
            return out
        raise OracleError(f"{errors[-1]} (failed {self.attempts} time(s); earlier: "
                          f"{'; '.join(e.rsplit(': ', 1)[-1] for e in errors[:-1]) or '-'})")

    def _call(self, atoms: Atoms, step: str, label: str, props) -> dict:
        a = atoms.copy()
        if hasattr(self.calc, "reset"):  # nothing cached from a failed attempt may leak into this one
            self.calc.reset()
        a.calc = self.calc
        where = f"oracle {self.name} failed in step '{step}' on configuration '{label}'"
        out = {}
        try:
            for p in props:
                if p == "energy":
                    out[p] = np.asarray(a.get_potential_energy(), dtype=float)
                elif p == "forces":
                    out[p] = np.asarray(a.get_forces(), dtype=float)
                elif p == "stress":
                    out[p] = np.asarray(a.get_stress(voigt=True), dtype=float)
                else:
                    out[p] = np.asarray(a.calc.get_property(p, a), dtype=float)
        except OracleError:
            raise
        except Exception as exc:
            raise OracleError(f"{where}: {type(exc).__name__}: {exc}") from exc
        shapes = {"energy": (), "forces": (len(a), 3), "stress": (6,)}
        for p, v in out.items():
            if p in shapes and v.shape != shapes[p]:
                raise OracleError(f"{where}: {p} has shape {v.shape}, expected {shapes[p]}")
            if not np.all(np.isfinite(v)):
                raise OracleError(f"{where}: non-finite {p} (NaN or inf)")
        if "forces" in out and len(a) and np.abs(out["forces"]).max() > self.max_force:
            raise OracleError(f"{where}: force {np.abs(out['forces']).max():.3g} eV/A above the accepted "
                              f"{self.max_force:g} eV/A")
        if "energy" in out:
            out["energy"] = float(out["energy"])
        return out

    #: eV/A: a larger force on a configuration of the harmonic part means a broken calculation
    max_force = 50.0


def _strained(atoms: Atoms, eta) -> Atoms:
    """The cell deformed by F = 1 + eps(eta) (symmetric, no rotation), atoms at the strained positions."""
    f = np.eye(3) + matrix_from_voigt(eta)
    a = atoms.copy()
    a.calc = None
    a.set_cell(atoms.cell.array @ f.T, scale_atoms=True)
    return a


def _scaled(atoms: Atoms, s: float) -> Atoms:
    a = atoms.copy()
    a.calc = None
    a.set_cell(atoms.cell.array * s, scale_atoms=True)
    return a


def _is_cubic(cell: np.ndarray, tol: float = 1e-6) -> bool:
    a = np.linalg.norm(cell, axis=1)
    return bool(np.allclose(cell @ cell.T, a.mean() ** 2 * np.eye(3), atol=tol * a.mean() ** 2))


# ----------------------------------------------------------------------------------------------------------------
# 1. lattice relaxation
# ----------------------------------------------------------------------------------------------------------------
def _relax(atoms: Atoms, oracle: _Oracle, tol: float, fmax_check: float, max_steps: int, log) -> tuple:
    step = "lattice relaxation"
    cur = atoms.copy()
    cur.calc = None

    def pressure(s):
        res = oracle(_scaled(cur, s), step, f"cell scaled by {s:.8f}")
        return -res["stress"][:3].mean(), res

    s_prev, (p_prev, res) = 1.0, pressure(1.0)
    s_now, p_now = s_prev, p_prev
    if abs(p_now) > tol:
        s_now = 1.001 if p_prev > 0 else 0.999      # expand under positive pressure
        p_now, res = pressure(s_now)
        for _ in range(max_steps):
            if abs(p_now) <= tol:
                break
            slope = (p_now - p_prev) / (s_now - s_prev)
            if not slope < 0:
                raise OracleError(f"{step}: the pressure does not decrease with the volume (dp/ds = {slope:.3e} "
                                  f"eV/A^3 at scale {s_now:.6f}): mechanically unstable or noisy oracle")
            ds = float(np.clip(-p_now / slope, -0.05 * s_now, 0.05 * s_now))
            s_prev, p_prev = s_now, p_now
            s_now = s_now + ds
            p_now, res = pressure(s_now)
        else:
            raise OracleError(f"{step}: pressure {p_now:.3e} eV/A^3 still above {tol:.1e} after {max_steps} steps")
    out = _scaled(cur, s_now)
    fmax = float(np.linalg.norm(res["forces"], axis=1).max())
    if fmax > fmax_check:
        raise NotStationaryError(f"{step}: the structure is not a stationary point: residual force {fmax:.3e} eV/A "
                                 f"> fmax_check = {fmax_check:.1e} eV/A (relax the internal coordinates first)")
    dev = res["stress"].copy()
    dev[:3] -= dev[:3].mean()
    if np.abs(dev).max() > max(10 * tol, 1e-6):
        log(f"WARNING: {step}: non-hydrostatic stress {np.abs(dev).max():.3e} eV/A^3 remains (isotropic scaling "
            f"only zeroes the pressure; the cell is not cubic?)")
    log(f"{step}: scale {s_now:.8f}, pressure {p_now:.2e} eV/A^3, max force {fmax:.2e} eV/A "
        f"({oracle.ncalls} oracle calls)")
    return out, res


def relax_cubic_lattice(atoms: Atoms, calc, *, tol: float = 1e-4, fmax_check: float = 1e-3, max_steps: int = 50,
                        log: Optional[Callable] = None) -> Atoms:
    """Scale the cell isotropically (fractional positions kept) until the pressure -tr(stress)/3 is below ``tol``
    (eV/A^3), by secant steps on the scale factor (at most 5% per step).  Raises NotStationaryError if the forces
    on the relaxed structure exceed ``fmax_check`` (eV/A) and OracleError if the oracle fails.  Returns a new Atoms
    (no calculator attached)."""
    log = _quiet if log is None else log
    out, _ = _relax(atoms, _Oracle(calc, log, False), tol, fmax_check, max_steps, log)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. force constants with phonopy
# ----------------------------------------------------------------------------------------------------------------
def phonopy_atoms(atoms: Atoms):
    """ASE Atoms -> PhonopyAtoms (same masses)."""
    from phonopy.structure.atoms import PhonopyAtoms
    return PhonopyAtoms(numbers=atoms.numbers, cell=atoms.cell.array, scaled_positions=atoms.get_scaled_positions(),
                        masses=atoms.get_masses())


def ase_atoms(pa) -> Atoms:
    """PhonopyAtoms (e.g. a displaced supercell) -> periodic ASE Atoms."""
    return Atoms(numbers=pa.numbers, cell=pa.cell, scaled_positions=pa.scaled_positions, pbc=True)


def _supercell_index(frac_unit: np.ndarray, numbers: np.ndarray, sc_frac: np.ndarray, sc_numbers: np.ndarray,
                     mesh, tol: float = 1e-4) -> np.ndarray:
    """index[c1, c2, c3, i] = supercell atom of unit-cell atom i in cell (c1, c2, c3)."""
    mesh = np.asarray(mesh)
    nat = len(frac_unit)
    index = -np.ones(tuple(mesh) + (nat,), dtype=int)
    x = sc_frac * mesh                                   # unit-cell fractional coordinates
    for s, (xs, z) in enumerate(zip(x, sc_numbers)):
        d = xs - frac_unit
        ok = np.flatnonzero((np.abs(d - np.round(d)) < tol).all(axis=1) & (numbers == z))
        if len(ok) != 1:
            raise ValueError(f"supercell atom {s} does not correspond to exactly one unit-cell atom")
        c = np.mod(np.round(d[ok[0]]).astype(int), mesh)
        index[tuple(c) + (ok[0],)] = s
    if np.any(index < 0):
        raise ValueError("the supercell does not contain every atom of every cell")
    return index


def _periodic_fc(fc: np.ndarray, index: np.ndarray) -> np.ndarray:
    """phi_per[m, i, a, j, b] = fc[s(c, i), s(c + m, j), a, b] averaged over the cells c (mesh shape on m)."""
    mesh = index.shape[:3]
    nat = index.shape[3]
    cells = list(np.ndindex(*mesh))
    out = np.zeros(mesh + (nat, 3, nat, 3))
    for m in cells:
        acc = np.zeros((nat, nat, 3, 3))
        for c in cells:
            cm = tuple((np.array(c) + m) % mesh)
            acc += fc[np.ix_(index[c], index[cm])]
        out[m] = (acc / len(cells)).transpose(0, 2, 1, 3)
    return out


def phonopy_to_ifc(fc: np.ndarray, atoms: Atoms, mesh, sc_frac: np.ndarray, sc_numbers: np.ndarray, *,
                   born=None, epsilon=None, log=None) -> tuple:
    """Supercell force constants (phonopy's full fc (N, N, 3, 3), eV/A^2) on the diagonal supercell ``mesh`` of
    ``atoms`` -> (ifc_cells (nR, 3), ifc (nR, nat, 3, nat, 3)) spread over the Wigner-Seitz images, minus the
    dipole-dipole part on the commensurate q-points when ``born`` / ``epsilon`` are given.  sc_frac/sc_numbers:
    the phonopy supercell's fractional positions and atomic numbers (any atom order)."""
    mesh = tuple(int(n) for n in mesh)
    frac = atoms.get_scaled_positions(wrap=False)
    index = _supercell_index(frac, atoms.numbers, sc_frac, sc_numbers, mesh)
    phi = _periodic_fc(np.asarray(fc, dtype=float), index)
    nat = len(atoms)
    if born is not None:
        from ..kernels.ewald import dipole_dipole_matrices
        keys = list(np.ndindex(*mesh))
        q = np.array(keys, dtype=float) / np.array(mesh)
        cdd = dipole_dipole_matrices(atoms.cell.array, atoms.positions, born, epsilon, q, asr=True)
        m = 3 * nat
        flat = cdd.reshape(len(q), m, m)
        cdd = (0.5 * (flat + np.conj(np.swapaxes(flat, -1, -2)))).reshape(cdd.shape)   # what the model adds
        grid = cdd.reshape(mesh + (nat, 3, nat, 3))
        phi_dd = np.fft.fftn(grid, axes=(0, 1, 2)) / np.prod(mesh)    # 1/N sum_k C(k/N) exp(-2 pi i k.m/N)
        imag = np.abs(phi_dd.imag).max()
        if imag > 1e-8 * max(np.abs(phi_dd.real).max(), 1e-30):
            raise ValueError(f"dipole-dipole force constants of the supercell are not real (max imaginary part "
                             f"{imag:.2e} eV/A^2)")
        phi = phi - phi_dd.real
    cells, w = _ws_weights(atoms.cell.array, frac, mesh)
    idx = np.mod(cells, mesh)
    ifc = phi[idx[:, 0], idx[:, 1], idx[:, 2]] * w[:, :, None, :, None]
    return cells, ifc


def _force_constants(atoms: Atoms, oracle: _Oracle, settings: HarmonicSettings, log) -> tuple:
    from phonopy import Phonopy
    step = "force constants (finite displacements)"
    mesh = settings.mesh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ph = Phonopy(phonopy_atoms(atoms), supercell_matrix=np.diag(mesh), primitive_matrix="P",
                     symprec=settings.symprec, log_level=0)
        ph.generate_displacements(distance=settings.displacement, is_plusminus=settings.plusminus)
    for w in caught:
        log(f"{step}: phonopy says: {str(w.message).strip()}")
    scs = ph.supercells_with_displacements
    disps = ph.displacements
    log(f"{step}: phonopy {'x'.join(map(str, mesh))} supercell ({len(ph.supercell)} atoms), "
        f"{len(scs)} displaced configurations, displacement {settings.displacement} A")

    forces = []
    for n, (sc, d) in enumerate(zip(scs, disps)):
        iat, vec = int(d[0]), np.asarray(d[1:4], dtype=float)
        label = (f"displacement {n + 1}/{len(scs)}: supercell atom {iat} moved by "
                 f"({vec[0]:+.4f}, {vec[1]:+.4f}, {vec[2]:+.4f}) A")
        forces.append(oracle(ase_atoms(sc), step, label, props=("forces",))["forces"])
    forces = np.array(forces)
    residual = 0.0
    if settings.plusminus is not True:
        f0 = oracle(ase_atoms(ph.supercell), step, "undisplaced supercell", props=("forces",))["forces"]
        residual = float(np.abs(f0).max())
        forces = forces - f0[None]
    ph.forces = forces
    ph.produce_force_constants(calculate_full_force_constants=True, show_drift=False)
    raw = ph.force_constants.copy()
    ph.symmetrize_force_constants(show_drift=False)
    fc = ph.force_constants
    scale = max(np.abs(fc).max(), 1e-30)
    change = float(np.abs(fc - raw).max())
    log(f"{step}: symmetrisation (translation + permutation) changed the force constants by at most "
        f"{change:.2e} eV/A^2 ({change / scale:.1e} relative)")
    sc = ph.supercell
    return fc, np.asarray(sc.scaled_positions), np.asarray(sc.numbers), {
        "n_displacements": len(scs), "supercell_atoms": len(sc), "symmetrization_change": change,
        "undisplaced_supercell_max_force": residual}


# ----------------------------------------------------------------------------------------------------------------
# 3. elastic and internal strain
# ----------------------------------------------------------------------------------------------------------------
def _generalized_strain_force(stress_voigt: np.ndarray, eta: np.ndarray, volume: float) -> np.ndarray:
    """dE/deta_v = V sym(sigma F^-1)_v for F = 1 + eps(eta) symmetric (sigma: ASE stress = 1/V dE/deps)."""
    x = stress_voigt
    s = np.array([[x[0], x[5], x[4]], [x[5], x[1], x[3]], [x[4], x[3], x[2]]])    # stress: no factor 2 on shears
    f = np.eye(3) + matrix_from_voigt(eta)
    g = volume * s @ np.linalg.inv(f)
    g = 0.5 * (g + g.T)
    return np.array([g[i, j] for i, j in VOIGT_PAIRS])


def _strain_response(atoms: Atoms, oracle: _Oracle, h: float, log) -> tuple:
    step = "elastic and internal strain (finite strains)"
    v0 = atoms.get_volume()
    nat = len(atoms)
    elastic = np.zeros((6, 6))
    internal = np.zeros((nat, 3, 6))
    names = ("xx", "yy", "zz", "yz", "xz", "xy")
    for w in range(6):
        g = {}
        f = {}
        for sgn in (+1, -1):
            eta = np.zeros(6)
            eta[w] = sgn * h
            a = _strained(atoms, eta)
            res = oracle(a, step, f"strain eta_{w + 1} ({names[w]}) = {sgn * h:+g}", props=("forces", "stress"))
            g[sgn] = _generalized_strain_force(res["stress"], eta, a.get_volume())
            f[sgn] = res["forces"]
        elastic[:, w] = (g[1] - g[-1]) / (2 * h * v0)
        internal[:, :, w] = -(f[1] - f[-1]) / (2 * h)
    asym = float(np.abs(elastic - elastic.T).max())
    log(f"{step}: 12 strained cells, strain step {h}; elastic tensor asymmetry {asym:.2e} eV/A^3 "
        f"({asym / max(np.abs(elastic).max(), 1e-30):.1e} relative)")
    return 0.5 * (elastic + elastic.T), internal, asym


def _space_group_cartesian(atoms: Atoms, symprec: float):
    """[(Cartesian rotation (3,3), atom map)] of the space group (spglib), atom i -> map[i]."""
    import spglib
    cell = atoms.cell.array
    frac = atoms.get_scaled_positions(wrap=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)    # spglib 2.5's error-handling notice
            sym = spglib.get_symmetry((cell, frac, atoms.numbers), symprec=symprec)
    except Exception as exc:          # spglib >= 2.5 may raise instead of returning None
        raise ValueError(f"spglib: {exc}") from None
    if sym is None:
        raise ValueError("spglib found no symmetry")
    ops = []
    for r, t in zip(sym["rotations"], sym["translations"]):
        rc = cell.T @ r @ np.linalg.inv(cell.T)
        new = frac @ r.T + t
        amap = np.empty(len(frac), dtype=int)
        for i, x in enumerate(new):
            d = x - frac
            d -= np.round(d)
            j = np.flatnonzero((np.linalg.norm(d @ cell, axis=1) < 10 * symprec + 1e-8)
                               & (atoms.numbers == atoms.numbers[i]))
            if len(j) != 1:
                raise ValueError("a symmetry operation does not map the atoms onto themselves")
            amap[i] = j[0]
        ops.append((rc, amap))
    return ops


def _voigt_to_tensor4(c: np.ndarray) -> np.ndarray:
    t = np.zeros((3, 3, 3, 3))
    for v, (i, j) in enumerate(VOIGT_PAIRS):
        for w, (k, l) in enumerate(VOIGT_PAIRS):
            for a, b in {(i, j), (j, i)}:
                for c_, d in {(k, l), (l, k)}:
                    t[a, b, c_, d] = c[v, w]
    return t


def _symmetrize_tensors(ops, elastic, internal, born=None):
    """Average C (engineering Voigt), Lambda[i, a, v] and Z[i, g, a] over the space group."""
    nat = internal.shape[0]
    c4 = _voigt_to_tensor4(elastic)
    lam = np.zeros((nat, 3, 3, 3))                       # lam[i, a, j, k] = Lambda[i, a, v(jk)]
    for v, (j, k) in enumerate(VOIGT_PAIRS):
        lam[:, :, j, k] = lam[:, :, k, j] = internal[:, :, v]
    c_acc = np.zeros_like(c4)
    l_acc = np.zeros_like(lam)
    z_acc = None if born is None else np.zeros_like(born)
    for r, amap in ops:
        c_acc += np.einsum("ip,jq,kr,ls,pqrs->ijkl", r, r, r, r, c4)
        rotated = np.einsum("ap,jq,kr,ipqr->iajk", r, r, r, lam)
        l_acc[amap] += rotated
        if born is not None:
            z_acc[amap] += np.einsum("gp,aq,ipq->iga", r, r, born)
    n = len(ops)
    c4, lam = c_acc / n, l_acc / n
    el = np.array([[c4[i, j, k, l] for (k, l) in VOIGT_PAIRS] for (i, j) in VOIGT_PAIRS])
    el = 0.5 * (el + el.T)
    inner = np.stack([lam[:, :, j, k] for (j, k) in VOIGT_PAIRS], axis=-1)
    return el, inner, (None if born is None else z_acc / n)


# ----------------------------------------------------------------------------------------------------------------
# 4. Born charges
# ----------------------------------------------------------------------------------------------------------------
def read_phonopy_born(path, atoms: Atoms, *, symprec: float = 1e-5) -> tuple:
    """A phonopy BORN file (line 1: conversion factor or comment; line 2: epsilon_inf, 9 numbers; then the Born
    charges of the symmetry-independent atoms only, 9 numbers each, in phonopy's order of independent atoms) ->
    (born (nat, 3, 3), epsilon (3, 3)) for every atom of ``atoms`` (expanded with the space group by phonopy).
    Phonopy's convention is ours: Z[i, g, a] = dP_g / du_a (first index: polarisation / field)."""
    from phonopy.file_IO import parse_BORN
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such BORN file")
    try:
        nac = parse_BORN(phonopy_atoms(atoms), symprec=symprec, is_symmetry=True, filename=str(path))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the phonopy BORN file: {exc}") from exc
    return np.array(nac["born"], dtype=float), np.array(nac["dielectric"], dtype=float)


def _born_input(born, atoms: Atoms, settings: HarmonicSettings, oracle: _Oracle):
    """(Z, eps, source) or (None, None, reason)."""
    nat = len(atoms)
    if born is None:
        props = set(getattr(oracle.calc, "implemented_properties", ()) or ())
        if "born_effective_charges" in props and "dielectric_tensor" in props:
            res = oracle(atoms, "Born charges", "reference cell", props=("born_effective_charges",
                                                                          "dielectric_tensor"))
            return res["born_effective_charges"], res["dielectric_tensor"], f"oracle {oracle.name}"
        return None, None, "none"
    if isinstance(born, (str, os.PathLike)):
        z, eps = read_phonopy_born(born, atoms, symprec=settings.symprec)
        return z, eps, f"phonopy BORN file {os.fspath(born)}"
    if isinstance(born, dict):
        z = born.get("born", born.get("born_charges"))
        eps = born.get("dielectric", born.get("epsilon", born.get("epsilon_inf")))
        if z is None or eps is None:
            raise ValueError("born dict needs 'born' and 'dielectric' (or 'epsilon') entries")
        src = "dict"
    else:
        try:
            z, eps = born
        except (TypeError, ValueError):
            raise ValueError("born must be a BORN file path, a dict or a pair (born (nat,3,3), epsilon (3,3))") \
                from None
        src = "given (born, epsilon)"
    z = np.asarray(z, dtype=float)
    eps = np.asarray(eps, dtype=float)
    if z.shape != (nat, 3, 3) or eps.shape != (3, 3):
        raise ValueError(f"Born charges must be ({nat}, 3, 3) and epsilon (3, 3); got {z.shape} and {eps.shape}")
    return z, eps, src


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------
def harmonic_from_oracle(atoms: Atoms, calc, settings: Optional[HarmonicSettings] = None, *, born=None,
                         log: Optional[Callable] = print, progress: bool = False, name: Optional[str] = None,
                         attempts: int = 3, cache_dir=None) -> Model:
    """The harmonic part of a second-principles model (short-range IFCs, Born charges / epsilon_inf, clamped-ion
    elastic tensor, internal strain) from an ASE calculator ``calc`` around the reference unit cell ``atoms``.

    born: a phonopy BORN file path, a dict {'born', 'dielectric'} or a pair (born (nat,3,3), epsilon (3,3)) with
    Z[i, g, a] = dP_g / du_a; None: from the calculator if it implements ASE's 'born_effective_charges' and
    'dielectric_tensor', otherwise no dipole-dipole part.  log: a print-like callable (None: silent).
    progress: log every oracle call.  attempts: tries per configuration before the oracle's failure stops the
    calculation (OracleError).  cache_dir: keep every oracle result there, so that a run started again after a stop
    or a failure repeats no successful call.  Returns a Model without anharmonic terms (see the module
    docstring)."""
    settings = settings or HarmonicSettings()
    log = _quiet if log is None else log
    mesh = settings.mesh()
    warns: list = []

    def warn(msg):
        warns.append(msg)
        log(f"WARNING: {msg}")

    oracle = _Oracle(calc, log, progress, attempts=attempts, cache_dir=cache_dir)
    ref = atoms.copy()
    ref.calc = None
    ref.pbc = True
    log(f"harmonic_from_oracle: {ref.get_chemical_formula()} ({len(ref)} atoms), oracle {oracle.name}")

    # 1. reference: lattice constant and stationarity
    if settings.relax_lattice:
        if not _is_cubic(ref.cell.array, 1e-4):
            warn("relax_lattice on a non-cubic cell: isotropic scaling zeroes only the mean pressure")
        ref, res0 = _relax(ref, oracle, settings.pressure_tol, settings.fmax_check, 50, log)
    else:
        res0 = oracle(ref, "reference", "reference cell")
    fmax = float(np.linalg.norm(res0["forces"], axis=1).max())
    if fmax > settings.fmax_check:
        raise NotStationaryError(f"reference: not a stationary point of {oracle.name}: residual force {fmax:.3e} "
                                 f"eV/A > fmax_check = {settings.fmax_check:.1e} eV/A")
    smax = float(np.abs(res0["stress"]).max())
    if smax > 1e-4:
        warn(f"the reference carries a residual stress of {smax:.2e} eV/A^3 (max Voigt component); the model has no "
             f"term linear in the strain")
    log(f"reference: energy {res0['energy']:.8f} eV, max force {fmax:.2e} eV/A, max stress {smax:.2e} eV/A^3")

    # 4 (first: the dipole part is needed to split the IFCs). Born charges
    z, eps, born_source = _born_input(born, ref, settings, oracle)
    ops = None
    if settings.symmetrize:
        try:
            ops = _space_group_cartesian(ref, settings.symprec)
        except ValueError as exc:
            warn(f"no symmetrisation of the strain tensors: {exc}")
    if z is None:
        log(NO_BORN_MESSAGE)
    else:
        if ops is not None and born_source.startswith("oracle"):
            _, _, z = _symmetrize_tensors(ops, np.zeros((6, 6)), np.zeros((len(ref), 3, 6)), z)
        eps = 0.5 * (eps + eps.T)
        neutral = z.sum(axis=0)
        if np.abs(neutral).max() > 1e-8:
            if np.abs(neutral).max() > 1e-3:
                warn(f"Born charges violate charge neutrality by {np.abs(neutral).max():.2e} e: removed in equal "
                     f"parts (chneut 1)")
            z = z - neutral / len(ref)
        log(f"Born charges ({born_source}) and epsilon_inf: the stored IFCs are short-range (dipole-dipole "
            f"subtracted on the {'x'.join(map(str, mesh))} q-mesh)")

    # 2. force constants
    fc, sc_frac, sc_numbers, fc_info = _force_constants(ref, oracle, settings, log)
    cells, ifc = phonopy_to_ifc(fc, ref, mesh, sc_frac, sc_numbers, born=z, epsilon=eps)
    scale = max(np.abs(ifc).max(), 1e-30)
    asr_before = float(np.abs(ifc.sum(axis=(0, 3))).max())
    if asr_before > 1e-12 * scale:
        _asr_onsite(ifc, cells)

    # 3. elastic and internal strain
    elastic, internal, asym = _strain_response(ref, oracle, settings.strain_step, log)
    lam_sum = float(np.abs(internal.sum(axis=0)).max())
    if ops is not None:
        el_s, in_s, _ = _symmetrize_tensors(ops, elastic, internal)
        dev = (float(np.abs(el_s - elastic).max()), float(np.abs(in_s - internal).max()))
        log(f"space group ({len(ops)} operations): symmetrisation changed C by {dev[0]:.2e} eV/A^3 and Lambda by "
            f"{dev[1]:.2e} eV/A")
        elastic, internal = el_s, in_s
    internal = internal - internal.mean(axis=0, keepdims=True)

    # drop vanishing (R, -R) pairs, build the part, make the sum rule exact
    small = np.abs(ifc).reshape(len(cells), -1).max(axis=1) <= 1e-14 * scale
    index = {tuple(c): n for n, c in enumerate(cells)}
    keep = np.array([not (small[n] and small[index[tuple(-c)]]) for n, c in enumerate(cells)])
    hp = HarmonicPart(cells[keep], ifc[keep], elastic, internal, z, eps)
    if hp.asr_violation() > 1e-10 * scale:
        hp.impose_asr()
    if not np.all(np.linalg.eigvalsh(elastic) > 0):
        warn("the clamped-ion elastic tensor is not positive definite")

    masses = ref.get_masses()
    reference = Reference(ref.cell.array, ref.positions, ref.numbers, masses, res0["energy"])
    lengths = np.linalg.norm(ref.cell.array, axis=1)
    meta = {
        "source": "oracle (finite displacements with phonopy, finite strains)",
        "oracle": oracle.name,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "supercell": list(mesh),
        "lattice_constant": float(lengths.mean()) if _is_cubic(ref.cell.array, 1e-6) else None,
        "cell": ref.cell.array.tolist(),
        "residual_force_max": fmax,
        "residual_stress": res0["stress"].tolist(),
        "born_source": born_source,
        "dipdip": z is not None,
        "asr_violation_before": asr_before,
        "internal_strain_sum_violation": lam_sum,
        "elastic_asymmetry": asym,
        "n_oracle_calls": oracle.ncalls,
        "n_failed_oracle_calls": oracle.nfailed,
        "warnings": warns,
        **fc_info,
    }
    try:
        import phonopy
        meta["phonopy_version"] = phonopy.__version__
    except Exception:  # pragma: no cover
        pass
    if z is None:
        meta["notes"] = [NO_BORN_MESSAGE]
    model = Model(reference, hp, name=name or f"{ref.get_chemical_formula()} harmonic ({oracle.name})",
                  metadata=meta)
    log(f"harmonic_from_oracle: done ({oracle.ncalls} oracle calls, {len(hp.ifc_cells)} IFC lattice vectors)")
    return model
