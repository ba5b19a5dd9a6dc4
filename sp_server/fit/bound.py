"""Is a polynomial model bounded from below?  Check it, and bound it with positive even high-order terms.

A Taylor polynomial fitted to small distortions can run to -infinity along some direction and make MD explode
(the idea of MULTIBINIT's bound_model).  The check combines (1) the energy along many random directions of
displacements and strain at large amplitude, which must rise at the far end and never fall below a floor, and
(2) a short hot Langevin MD on a 4x4x4 supercell that must stay finite and near the reference sites.  Bounding
adds the orbits of (u_a - u_b)_alpha^8 over the bonds within a cutoff and eta_v^4, with positive values raised
until the check passes; their posterior variance is zero (they are not fitted).

With the training data at hand (:func:`fit_bounded`) the other coefficients are refitted with the bounding terms
held at each trial value, so that the bounded model still reproduces the data (MULTIBINIT's bound_model refits
too); :func:`bound_model` only adds terms to a finished model (no data needed, the fit degrades).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ..model.model import Model
from ..model.posterior import Posterior
from ..model.symmetry import space_group_operations, symmetrize
from ..model.terms import AnharmonicPart, DisplacementDiff, StrainFactor, Term
from ..potential import SupercellPotential


@dataclass
class BoundSettings:
    n_directions: int = 200
    max_displacement: float = 1.0   # A, RMS displacement per atom at the largest amplitude
    max_strain: float = 0.08        # largest strain component magnitude along the strain part of a direction
    energy_floor: float = -2.0      # eV per reference cell below the reference: "far below any ground state"
    md_steps: int = 300
    md_temperature: float = 1200.0  # K
    md_mesh: tuple = (4, 4, 4)
    md_max_displacement: float = 1.2  # A
    seed: int = 0


@dataclass
class BoundReport:
    bounded: bool
    worst_direction_energy: float  # eV per cell at the largest amplitude, worst direction
    n_failing_directions: int
    md_ok: bool
    md_message: str
    details: dict = field(default_factory=dict)


def check_bounded(model: Model, settings: BoundSettings = BoundSettings()) -> BoundReport:
    rng = np.random.default_rng(settings.seed)
    mesh = (2, 2, 2)
    pot = SupercellPotential(model, mesh)
    ncell = 8
    nat = model.natoms
    amps = np.linspace(0.0, 1.0, 9)[1:]
    e0 = ncell * model.reference.energy
    failing, worst = 0, np.inf
    for _ in range(settings.n_directions):
        u = rng.normal(size=mesh + (nat, 3))
        u -= u.reshape(-1, 3).mean(axis=0)
        u *= settings.max_displacement / np.sqrt((u ** 2).sum(axis=-1).mean())
        eta = rng.normal(size=6) * (rng.random() < 0.5)
        if np.abs(eta).max() > 0:
            eta *= settings.max_strain / np.abs(eta).max()
        e = np.array([pot.evaluate(a * u, a * eta).energy - e0 for a in amps]) / ncell
        bad = (not np.all(np.isfinite(e))) or e[-1] < e[-2] or e.min() < settings.energy_floor
        failing += bool(bad)
        worst = min(worst, e[-1] if np.isfinite(e[-1]) else -np.inf)
    md_ok, md_msg = _hot_md(model, settings)
    return BoundReport(failing == 0 and md_ok, float(worst), failing, md_ok, md_msg,
                       {"n_directions": settings.n_directions})


def _hot_md(model: Model, settings: BoundSettings):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from ..calculator import SecondPrinciplesCalculator
    atoms = model.supercell(settings.md_mesh)
    atoms.calc = SecondPrinciplesCalculator(model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=settings.md_temperature,
                                 rng=np.random.default_rng(settings.seed))
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=settings.md_temperature, friction=0.02,
                   fixcm=False, rng=np.random.default_rng(settings.seed + 1))
    ref = atoms.positions.copy()
    for step in range(settings.md_steps):
        try:
            dyn.run(1)
            e = atoms.get_potential_energy()
        except (ValueError, FloatingPointError) as exc:
            return False, f"hot MD failed at step {step}: {exc}"
        disp = atoms.positions - ref
        disp -= disp.mean(axis=0)
        dmax = float(np.sqrt((disp ** 2).sum(axis=1)).max())
        if not np.isfinite(e) or dmax > settings.md_max_displacement:
            return False, (f"hot MD ({settings.md_temperature:.0f} K, {settings.md_mesh}) left the trusted range at "
                           f"step {step}: energy {e:.3g} eV, max displacement {dmax:.2f} A")
    return True, f"hot MD ({settings.md_temperature:.0f} K, {settings.md_steps} steps) stayed bounded"


def bounding_coefficients(model: Model, cutoff: float = 3.0) -> list:
    """Orbits of (u_a - u_b)_x^8 over every pair within ``cutoff`` (A) and of eta_1^4, eta_4^4."""
    ref = model.reference
    ops = space_group_operations(ref)
    coefs, keys = [], set()
    for i in range(ref.natoms):
        for c in np.ndindex(3, 3, 3):
            cell = tuple(int(x) - 1 for x in c)
            for j in range(ref.natoms):
                d = np.linalg.norm(ref.positions[j] + np.array(cell) @ ref.cell - ref.positions[i])
                if d < 1e-6 or d > cutoff:
                    continue
                coef = symmetrize(Term(1.0, (DisplacementDiff(i, (0, 0, 0), j, cell, 0, 8),)), ops,
                                  name=f"bound ({ref.labels[i]}-{ref.labels[j]})^8")
                if coef is not None:
                    key = frozenset((t.displacements, t.strains) for t in coef.terms)
                    if key not in keys:
                        keys.add(key)
                        coefs.append(coef)
    for v in (1, 4):
        coef = symmetrize(Term(1.0, (), (StrainFactor(v, 4),)), ops, name=f"bound (eta_{v})^4")
        if coef is not None:
            coefs.append(coef)
    return coefs


def bound_model(model: Model, settings: BoundSettings = BoundSettings(), *, start=1.0, factor=10.0, max_rounds=5,
                log=print) -> tuple[Model, BoundReport]:
    """Return (model, report): the model itself when it is bounded, else with bounding terms added whose values
    (eV/A^8 and eV per cell for strain) grow by ``factor`` until the check passes; report.bounded says whether
    it succeeded."""
    report = check_bounded(model, settings)
    log(f"boundedness: {'ok' if report.bounded else 'NOT bounded'} ({report.n_failing_directions} of "
        f"{settings.n_directions} directions fail; {report.md_message})")
    if report.bounded:
        return model, report
    extra = bounding_coefficients(model)
    value = start
    for _ in range(max_rounds):
        anh = AnharmonicPart(list(model.anharmonic.coefficients) + extra,
                             np.concatenate([model.anharmonic.values, np.full(len(extra), value)]))
        post = None
        if model.posterior is not None:
            p = model.posterior
            nz, ne = p.ncoef, len(extra)
            cov = np.zeros((nz + ne, nz + ne))
            cov[:nz, :nz] = p.covariance
            post = Posterior(cov, p.sigma_v, p.sigma_w, p.scales, np.concatenate([p.feature_scale, np.ones(ne)]),
                             p.log_evidence, dict(p.stats, n_bounding_terms=ne))
        bounded = Model(model.reference, model.harmonic, anh, name=model.name, version=model.version,
                        metadata=dict(model.metadata, bounding={"terms": len(extra), "value": value}), posterior=post)
        report = check_bounded(bounded, settings)
        log(f"bounding terms at {value:g}: {'ok' if report.bounded else 'still unbounded'} "
            f"({report.n_failing_directions} failing directions; {report.md_message})")
        if report.bounded:
            return bounded, report
        value *= factor
    return bounded, report


def fit_bounded(ts, base: Model, *, select=None, bounding: list, settings: BoundSettings = BoundSettings(),
                values=(1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0), name=None, version=None, report=None, log=print,
                fitted=None):
    """Fit on the training set ``ts`` (a :class:`sp_server.fit.fit.TrainingSet`) whose pool contains the bounding
    coefficients at the pool indices ``bounding`` (see :func:`bounding_coefficients`): forward selection among the
    other coefficients, the boundedness check, and when it fails a refit of the same selection with the bounding
    terms held at each of ``values`` in turn (eV/A^8, eV per cell for strain) until the check passes.

    Returns (model, fit report, bound report).  When no value passes, the model that came closest (fewest failing
    directions, then the hot MD surviving, then the lowest training force error) is returned with
    report.bounded False.  ``fitted``: the (model, report) of that first fit (bounding terms at zero) when the
    caller has made it already; its selection is then not redone."""
    from .fit import fit_training_set
    off = {int(j): 0.0 for j in bounding}
    if fitted is None:
        model, rep = fit_training_set(ts, base, select=select, fixed=off, name=name, version=version, report=report)
    else:
        model, rep = fitted
    check = check_bounded(model, settings)
    log(f"boundedness: {'ok' if check.bounded else 'NOT bounded'} ({check.n_failing_directions} of "
        f"{settings.n_directions} directions fail; {check.md_message})")
    if check.bounded or not bounding:
        return model, rep, check

    def badness(c, r):
        return (c.n_failing_directions, not c.md_ok, r.rmse.get("forces", np.inf))
    best = (badness(check, rep), model, rep, check)
    chosen = list(rep.selected)
    for value in values:
        model, rep = fit_training_set(ts, base, subset=chosen, fixed={j: float(value) for j in off}, name=name,
                                      version=version, report=copy.copy(rep))
        model.metadata["bounding"] = {"terms": len(off), "value": float(value), "refitted": True}
        check = check_bounded(model, settings)
        rm = rep.rmse
        log(f"bounding terms at {value:g} (others refitted: train RMSE E {rm.get('energy', np.nan):.3g} meV/atom "
            f"F {rm.get('forces', np.nan):.3g} eV/A): {'ok' if check.bounded else 'still unbounded'} "
            f"({check.n_failing_directions} failing directions; {check.md_message})")
        if check.bounded:
            return model, rep, check
        if badness(check, rep) < best[0]:
            best = (badness(check, rep), model, rep, check)
    _, model, rep, check = best
    log(f"no bounding value passed; keeping the closest model (bounding "
        f"{model.metadata.get('bounding', {}).get('value', 0):g}, {check.n_failing_directions} failing directions)")
    return model, rep, check
