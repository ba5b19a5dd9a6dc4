"""Lattice thermal transport (paper's Fig. 5) with phono3py: Wigner / SMM19 relaxation-time approximation.

The relaxed structure (the R phase, 5-atom cell = one formula unit, used as the primitive cell) gets third-order
finite displacements on a supercell (phono3py, ``distance`` A, fc2 from the same supercell); every displaced
supercell is evaluated with the ASE calculator (eV/A), fc3 and fc2 are produced and symmetrized (translational and
permutation symmetry), optionally with the non-analytic correction (``nac``, phonopy convention), and the
Wigner transport equation of Simoncelli, Marzari and Mauri (Nat. Phys. 15, 809 (2019); phono3py's
``transport_type="SMM19"``) is solved in the RTA on a q-mesh.  phono3py splits its kappa matrix into the band
diagonal (``kappa_intra``: the particle-like, Peierls-Boltzmann conductivity, identical to phono3py's standard
RTA) and the off-diagonal coherences (``kappa_inter``: the wave-like term).

Units (all stated again in :class:`Transport`): T in K; kappa in W/(m K) (tensors in Voigt order xx, yy, zz, yz,
xz, xy); heat capacity Cv in J/(K mol) per mole of 5-atom cells (= formula units; the Dulong-Petit limit is 15 R =
124.7 J/(K mol)); frequencies in THz (imaginary modes negative); group velocities |v| in km/s; mean free paths
in nm.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from scipy import constants

from ..fit.harmonic import ase_atoms, phonopy_atoms

# 1 eV/K per cell -> J/(K mol) of cells
EV_PER_K_IN_J_PER_K_MOL = constants.e * constants.N_A
# phono3py's group velocities are in THz * A = 1e12 * 1e-10 m/s = 100 m/s = 0.1 km/s
THZ_ANGSTROM_IN_KM_S = 0.1
IMAGINARY_THZ = -0.05          # a mode below this frequency (THz) counts as imaginary
MFP_THRESHOLD_NM = 40.0        # fraction of kappa carried by phonons with a mean free path below this
DEFAULT_TEMPERATURES = (100, 150, 200, 250, 300, 400, 500, 600, 700, 800, 900, 1000)


@dataclass
class Transport:
    """Thermal transport of one structure (phono3py, Wigner/SMM19 in the RTA).

    Units: temperatures T in K; kappa in W/(m K): ``kappa_particle`` (populations, the Peierls-Boltzmann RTA
    conductivity) and ``kappa_wave`` (coherences) as the mean of the diagonal xx, yy, zz (one third of the trace,
    independent of the orientation of the cell), the tensors in Voigt order xx, yy, zz, yz, xz, xy; heat capacity
    Cv in J/(K mol) per mole of 5-atom cells (formula units), from phono3py's mode heat capacities (modes below
    phono3py's cutoff frequency, 1e-4 THz, i.e. the acoustic modes at Gamma and imaginary modes, carry none);
    ``exponent`` n and ``prefactor`` A of the least-squares fit kappa_total = A T^-n in log-log on T >=
    ``fit_tmin`` (A in W/(m K) K^n); ``frequencies`` (nq_irr, nband) in THz and ``group_velocities`` (nq_irr,
    nband) |v| in km/s on the irreducible q-points of the mesh, ``weights`` their multiplicities (sum = number of
    mesh points); ``mfp_cumulative`` at ``t_ref`` (300 K if computed, else the nearest T): mean free paths
    (``mfp_nm``, nm, sorted) and the cumulative particle kappa (``kappa``, W/(m K), mean of the diagonal) of the
    modes up to each of them, ``fraction_below_40nm`` and ``mfp_90_percent_nm`` (the MFP below which 90% of the
    particle kappa is carried); ``imaginary_modes``: modes (q on the full mesh x band) with frequency < -0.05 THz
    (phono3py skips them); ``timings`` in s."""

    supercell: list
    mesh: list
    temperatures: list
    kappa_particle: list
    kappa_wave: list
    kappa_tensor_particle: list
    kappa_tensor_wave: list
    heat_capacity: list
    exponent: float
    prefactor: float
    frequencies: list
    group_velocities: list
    mfp_cumulative: dict
    imaginary_modes: int
    weights: list = field(default_factory=list)
    t_ref: float = 300.0
    fit_tmin: float = 100.0
    distance: float = 0.03
    cutoff_pair_distance: float | None = None
    nac: bool = False
    displaced_supercells: int = 0
    timings: dict = field(default_factory=dict)
    phono3py: Any = field(default=None, repr=False, compare=False)   # the Phono3py object (not in as_dict)

    @property
    def kappa_total(self) -> list:
        """kappa_particle + kappa_wave per T, W/(m K)."""
        return [p + w for p, w in zip(self.kappa_particle, self.kappa_wave)]

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "phono3py"}
        out["kappa_total"] = self.kappa_total
        return out


def nac_params(model) -> dict | None:
    """phonopy's NAC parameters of a model with Born charges, None without.

    phonopy's ``born[i][a][b]`` enters its dipole-dipole term through ``np.dot(q, born)``, i.e. contracted with q on
    the first Cartesian index: born[i][a][b] = dP_a / du_b (VASP's convention), which is sp_server's
    Z[i, g, a] = dP_g / du_a as is.  ``factor``: e^2 / (4 pi eps0) in eV A (Hartree x Bohr = 14.40), phonopy's value
    for calculators in eV and A (its "vasp" units)."""
    z = model.harmonic.born_charges
    if z is None:
        return None
    from phonopy.physical_units import get_calculator_physical_units
    return {"born": np.asarray(z, dtype=float), "dielectric": np.asarray(model.harmonic.epsilon_inf, dtype=float),
            "factor": float(get_calculator_physical_units().nac_factor)}


def _forces(ph3, calc, progress) -> np.ndarray:
    """Forces (eV/A) of every displaced supercell; zeros for the pairs phono3py leaves out (None)."""
    from tqdm.auto import tqdm
    cells = ph3.supercells_with_displacements
    natom = len(ph3.supercell)
    out = np.zeros((len(cells), natom, 3))
    for k, sc in enumerate(tqdm(cells, desc="fc3 supercells", disable=not progress)):
        if sc is None:
            continue
        a = ase_atoms(sc)
        a.calc = calc
        f = np.asarray(a.get_forces(), dtype=float)
        if f.shape != (natom, 3) or not np.isfinite(f).all():
            raise RuntimeError(f"calculator returned invalid forces for displaced supercell {k}")
        out[k] = f
    return out


def _power_law(temps: np.ndarray, kappa: np.ndarray, tmin: float) -> tuple[float, float]:
    """n, A of kappa = A T^-n, least squares in log-log on T >= tmin (all T > 0 if fewer than 2 there)."""
    ok = (temps >= tmin) & (kappa > 0)
    if ok.sum() < 2:
        ok = (temps > 0) & (kappa > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(temps[ok]), np.log(kappa[ok]), 1)
    return float(-slope), float(np.exp(intercept))


def _cumulative(mfp_nm: np.ndarray, kappa_mode: np.ndarray) -> dict:
    """Cumulative particle kappa (W/(m K)) against the mean free path (nm) of the modes."""
    order = np.argsort(mfp_nm, kind="stable")
    mfp = mfp_nm[order]
    cum = np.cumsum(kappa_mode[order])
    total = float(cum[-1]) if len(cum) else 0.0
    if total > 0:
        below = float(cum[mfp <= MFP_THRESHOLD_NM][-1] / total) if (mfp <= MFP_THRESHOLD_NM).any() else 0.0
        mfp90 = float(mfp[np.searchsorted(cum, 0.9 * total)])
    else:
        below, mfp90 = float("nan"), float("nan")
    return {"mfp_nm": mfp.tolist(), "kappa": cum.tolist(), "fraction_below_40nm": below,
            "mfp_90_percent_nm": mfp90}


def thermal_transport(atoms: Atoms, calc, *, supercell=(2, 2, 2), mesh=(8, 8, 8),
                      temperatures=DEFAULT_TEMPERATURES, distance: float = 0.03, nac: dict | None = None,
                      cutoff_pair_distance: float | None = None, fit_tmin: float = 100.0,
                      progress: bool | None = None) -> Transport:
    """Wigner (SMM19) RTA thermal conductivity, heat capacity, group velocities and mean free paths of ``atoms``.

    atoms: the relaxed structure (its cell is the primitive cell); calc: any ASE calculator (eV, eV/A);
    supercell: diagonal of the fc3 (and fc2) supercell; mesh: q-mesh; temperatures: K (> 0); distance:
    displacement, A; nac: phonopy NAC parameters (``{"born", "dielectric", "factor"}``, see :func:`nac_params`)
    or None; cutoff_pair_distance: A, phono3py leaves out the pair displacements of atoms farther apart (their
    fc3 is zero); None (default) keeps all pairs: with a second-principles calculator the 1280 supercells of the
    R phase on 2x2x2 take about a second; fit_tmin: K, lowest T of the power-law fit; progress: tqdm bar over the
    displaced supercells when true.  Units of the result: :class:`Transport`."""
    from phono3py import Phono3py
    temps = np.asarray(temperatures, dtype=float)
    if temps.ndim != 1 or len(temps) == 0 or (temps <= 0).any():
        raise ValueError("temperatures must be a non-empty list of positive values (K)")
    timings = {}
    t0 = time.perf_counter()
    ph3 = Phono3py(phonopy_atoms(atoms), supercell_matrix=np.diag(supercell), primitive_matrix=np.eye(3),
                   log_level=0)
    ph3.generate_displacements(distance=distance, cutoff_pair_distance=cutoff_pair_distance)
    ph3.forces = _forces(ph3, calc, progress)
    ndisp = sum(sc is not None for sc in ph3.supercells_with_displacements)
    timings["forces"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ph3.produce_fc3()                    # fc2 from the same supercell (no phonon_supercell_matrix)
    ph3.symmetrize_fc3()
    ph3.symmetrize_fc2()
    if nac is not None:
        ph3.nac_params = {"born": np.asarray(nac["born"], dtype=float),
                          "dielectric": np.asarray(nac["dielectric"], dtype=float), "factor": float(nac["factor"])}
    timings["force_constants"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ph3.mesh_numbers = list(mesh)
    ph3.init_phph_interaction()
    ph3.run_thermal_conductivity(is_LBTE=False, temperatures=temps, transport_type="SMM19", write_kappa=False)
    timings["phph"] = time.perf_counter() - t0
    tc = ph3.thermal_conductivity

    # kappa (num_sigma, num_temp, 6), W/(m K); one sigma (the tetrahedron method)
    k_part = np.asarray(tc.kappa_intra)[0]
    k_wave = np.asarray(tc.kappa_inter)[0]
    weights = np.asarray(tc.grid_weights, dtype=float)
    freqs = np.asarray(tc.frequencies)                                       # (nq_irr, nband), THz
    gv = np.linalg.norm(np.asarray(tc.group_velocities), axis=2)             # (nq_irr, nband), THz A
    # mode heat capacities (num_temp, nq_irr, nband) in eV/K per mode; per cell = weighted mean over the mesh
    cv = np.einsum("tqb,q->t", np.asarray(tc.mode_heat_capacities), weights) / weights.sum()
    heat_capacity = cv * EV_PER_K_IN_J_PER_K_MOL
    n, a = _power_law(temps, k_part[:, :3].mean(axis=1) + k_wave[:, :3].mean(axis=1), fit_tmin)

    # mean free paths at T_ref.  phono3py's gamma (num_sigma, num_temp, nq_irr, nband) is the imaginary part of
    # the self energy (half width at half maximum) in THz (ordinary frequency); the lifetime is
    # tau = 1 / (2 * 2 pi gamma) ps (as phono3py's conductivity.utils.get_mfp), MFP = |v| tau: THz A x ps = A.
    it = int(np.argmin(np.abs(temps - 300.0)))
    gamma = np.asarray(tc.gamma)[0, it]
    with np.errstate(divide="ignore", invalid="ignore"):
        mfp_nm = np.where(gamma > 0, gv / (4 * np.pi * np.where(gamma > 0, gamma, 1.0)), 0.0) / 10.0
    # per-mode particle kappa: the band-diagonal of the Wigner kappa matrix (num_sigma, num_temp, nq_irr, nband,
    # nband, 6) / number of mesh points (the star of each q-point is already summed in), mean of xx, yy, zz
    kmat = np.asarray(tc.mode_kappa_matrix)[0, it]
    kmode = np.einsum("qbbc->qbc", kmat)[..., :3].mean(axis=2) / float(np.prod(mesh))

    return Transport(
        supercell=[int(x) for x in supercell], mesh=[int(x) for x in mesh], temperatures=temps.tolist(),
        kappa_particle=k_part[:, :3].mean(axis=1).tolist(), kappa_wave=k_wave[:, :3].mean(axis=1).tolist(),
        kappa_tensor_particle=k_part.tolist(), kappa_tensor_wave=k_wave.tolist(),
        heat_capacity=heat_capacity.tolist(), exponent=n, prefactor=a,
        frequencies=freqs.tolist(), group_velocities=(gv * THZ_ANGSTROM_IN_KM_S).tolist(),
        mfp_cumulative=_cumulative(mfp_nm.ravel(), kmode.ravel()),
        imaginary_modes=int(round(float(((freqs < IMAGINARY_THZ) * weights[:, None]).sum()))),
        weights=weights.astype(int).tolist(), t_ref=float(temps[it]), fit_tmin=float(fit_tmin),
        distance=float(distance), cutoff_pair_distance=cutoff_pair_distance, nac=nac is not None,
        displaced_supercells=int(ndisp), timings={k: round(v, 3) for k, v in timings.items()}, phono3py=ph3)


def plot_transport(t: Transport, path) -> Path:
    """One PNG with the four panels of Fig. 5: |v| (km/s) against frequency (THz), Cv (J/(K mol)) against T (K)
    with the Dulong-Petit limit, kappa particle / wave / total (W/(m K)) against T in log-log with the T^-n fit,
    cumulative particle kappa against the mean free path (nm, log) at T_ref."""
    from ..figures import plt, save
    fig, ax = plt.subplots(2, 2, figsize=(10, 8))
    f = np.asarray(t.frequencies).ravel()
    v = np.asarray(t.group_velocities).ravel()
    ok = f > 0
    ax[0, 0].scatter(f[ok], v[ok], s=6, alpha=0.6)
    ax[0, 0].set_xlabel("frequency (THz)")
    ax[0, 0].set_ylabel("|group velocity| (km/s)")
    ax[0, 0].set_title("group velocities (irreducible q-points)")

    temps = np.asarray(t.temperatures)
    ax[0, 1].plot(temps, t.heat_capacity, "o-", label="$C_v$")
    nband = np.asarray(t.frequencies).shape[1] if len(t.frequencies) else 15
    ax[0, 1].axhline(nband * constants.R, color="k", ls="--", lw=0.8, label=f"Dulong-Petit {nband}R")
    ax[0, 1].set_xlabel("T (K)")
    ax[0, 1].set_ylabel("$C_v$ (J K$^{-1}$ mol$^{-1}$)")
    ax[0, 1].legend()

    kp, kw, kt = (np.asarray(x, dtype=float) for x in (t.kappa_particle, t.kappa_wave, t.kappa_total))
    for k, label, style in ((kp, "particle", "o-"), (kw, "wave", "s-"), (kt, "total", "^-")):
        pos = k > 0
        if pos.any():
            ax[1, 0].plot(temps[pos], k[pos], style, label=label)
    if np.isfinite(t.exponent):
        tt = np.geomspace(max(temps.min(), 1e-3), temps.max(), 50)
        ax[1, 0].plot(tt, t.prefactor * tt ** -t.exponent, "k--", lw=0.8, label=f"$T^{{-{t.exponent:.2f}}}$")
    ax[1, 0].set_xscale("log")
    ax[1, 0].set_yscale("log")
    ax[1, 0].set_xlabel("T (K)")
    ax[1, 0].set_ylabel("$\\kappa$ (W m$^{-1}$ K$^{-1}$)")
    ax[1, 0].legend()

    mfp = np.asarray(t.mfp_cumulative["mfp_nm"])
    cum = np.asarray(t.mfp_cumulative["kappa"])
    pos = mfp > 0
    if pos.any():
        ax[1, 1].step(mfp[pos], cum[pos], where="post")
        ax[1, 1].set_xscale("log")
        # modes with (nearly) zero velocity sit at absurdly short MFPs: start where 0.1% of kappa is reached
        lo = mfp[pos][np.searchsorted(cum[pos], 1e-3 * cum[-1])] if cum[-1] > 0 else mfp[pos][0]
        ax[1, 1].set_xlim(lo / 3, mfp[-1] * 3)
    ax[1, 1].axvline(MFP_THRESHOLD_NM, color="k", ls=":", lw=0.8)
    ax[1, 1].set_xlabel("mean free path (nm)")
    ax[1, 1].set_ylabel("cumulative $\\kappa_P$ (W m$^{-1}$ K$^{-1}$)")
    ax[1, 1].set_title(f"T = {t.t_ref:g} K")
    return save(fig, path)
