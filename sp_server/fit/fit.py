"""Fitting the anharmonic part: training structures -> design rows -> Bayesian regression -> a model with posterior.

The harmonic part (and reference) of a base model are kept exactly; the targets are the oracle's energies,
forces and stresses minus the harmonic prediction.  Every structure is checked on its own: one that cannot be
mapped onto the reference, a duplicate, or a missing/NaN quantity is reported by name and the rest is used.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tqdm import tqdm

from ..io.jsonfile import atomic_path
from ..model.model import Model
from ..model.posterior import Posterior
from ..model.terms import AnharmonicPart
from ..potential import Evaluator
from ..units import GPA_EV_A3
from .bayes import SufficientStats, evidence_count, fit_stats, forward_selection

QUANTITIES = ("energy", "forces", "stress")


@dataclass
class QuantityScales:
    """Units that make residuals commensurate (each whitened row is residual / scale)."""

    energy_per_atom: float = 1e-3  # eV per atom
    force: float = 0.05            # eV/A
    stress_gpa: float = 0.1        # GPa

    def as_dict(self) -> dict:
        return {"energy_per_atom": self.energy_per_atom, "force": self.force, "stress_gpa": self.stress_gpa}


@dataclass
class FitReport:
    n_structures: int = 0
    n_rows: int = 0
    skipped: list = field(default_factory=list)  # (label, reason)
    warnings: list = field(default_factory=list)
    selected: list = field(default_factory=list)
    evidence_path: list = field(default_factory=list)
    rmse: dict = field(default_factory=dict)
    sigma_v: float = float("nan")
    sigma_w: float = float("nan")
    log_evidence: float = float("nan")


def fingerprint(atoms, decimals: int = 6) -> str:
    """Species, positions and cell rounded to ``decimals`` (A): the same structure read back from a file or a store
    has the same fingerprint (the training statistics keep those of their structures)."""
    h = hashlib.sha1()
    for arr in (atoms.numbers, np.round(atoms.positions, decimals), np.round(atoms.cell.array, decimals)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class TrainingSet:
    """Design rows of training structures for a pool of coefficients, kept as per-quantity sufficient statistics."""

    def __init__(self, base: Model, pool, scales: QuantityScales = QuantityScales()):
        self.pool = list(pool)
        self.scales = scales
        self.model = Model(base.reference, base.harmonic, AnharmonicPart(self.pool, np.zeros(len(self.pool))),
                           name=base.name)
        self.evaluator = Evaluator(self.model)
        self.stats = {q: SufficientStats(len(self.pool)) for q in QUANTITIES}
        self._seen: set = set()
        self.n_structures = 0
        self._typical = None

    def typical_scale(self, amplitude: float = 0.05, strain: float = 0.005, n: int = 8, seed: int = 0) -> np.ndarray:
        """RMS of each whitened design column over ``n`` small typical distortions of a 2x2x2 supercell of the
        reference (random displacements of RMS ``amplitude`` A, random strain of about ``strain``): the least
        column scale of the fit (:func:`sp_server.fit.bayes.fit_stats`).  Depends only on the pool, the reference
        and the quantity scales."""
        if self._typical is None:
            rng = np.random.default_rng(seed)
            total, rows = np.zeros(len(self.pool)), 0
            for _ in range(n):
                atoms = self.model.supercell((2, 2, 2))
                atoms.positions += rng.normal(0.0, amplitude / np.sqrt(3.0), atoms.positions.shape)
                eps = rng.normal(0.0, strain, (3, 3))
                atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
                res = self.evaluator.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, design=True)
                nat = len(atoms)
                total += (res.phi_energy / (self.scales.energy_per_atom * nat)) ** 2
                total += np.sum((res.phi_forces.reshape(len(self.pool), -1) / self.scales.force) ** 2, axis=1)
                total += np.sum((res.phi_stress / (self.scales.stress_gpa * GPA_EV_A3)) ** 2, axis=1)
                rows += 1 + 3 * nat + 6
            self._typical = np.sqrt(total / rows)
        return self._typical

    def add(self, atoms, label: str = "structure") -> list:
        """Add one labelled structure; returns warnings (quantities left out).  Raises ValueError when the whole
        structure is unusable (message names it)."""
        fp = fingerprint(atoms)
        if fp in self._seen:
            raise ValueError(f"{label}: duplicate of an earlier structure (skipped)")
        calc = atoms.calc
        if calc is None:
            raise ValueError(f"{label}: no energy, forces or stress attached")
        res = self.evaluator.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, design=True)
        n = len(atoms)
        warnings = []
        rows = {}

        def get(name, fn):
            try:
                value = fn()
            except Exception:  # property absent
                warnings.append(f"{label}: no {name}; its rows are left out")
                return None
            value = np.asarray(value, dtype=float)
            if not np.all(np.isfinite(value)):
                warnings.append(f"{label}: non-finite {name}; its rows are left out")
                return None
            return value

        e = get("energy", lambda: calc.results["energy"])
        if e is not None:
            s = self.scales.energy_per_atom * n
            rows["energy"] = (res.phi_energy[None, :] / s, np.atleast_1d((e - res.energy) / s))
        f = get("forces", lambda: calc.results["forces"])
        if f is not None:
            s = self.scales.force
            rows["forces"] = (res.phi_forces.reshape(len(self.pool), -1).T / s, (f - res.forces).ravel() / s)
        st = get("stress", lambda: calc.results["stress"])
        if st is not None:
            st = st.reshape(-1)
            if st.size == 9:
                st = st.reshape(3, 3)[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            s = self.scales.stress_gpa * GPA_EV_A3
            rows["stress"] = (res.phi_stress.T / s, (st - res.stress) / s)
        if not rows:
            raise ValueError(f"{label}: neither energy, forces nor stress is usable")
        for q, (phi, y) in rows.items():
            self.stats[q].add(phi, y)
        self._seen.add(fp)
        self.n_structures += 1
        return warnings

    def save(self, path, **extra):
        """Write the statistics (and the fingerprints of the structures in them) atomically to an .npz file;
        ``extra``: arrays stored beside them (e.g. the store ids of the structures).  A temporary file in the same
        folder, fsync'ed and renamed (sp_server.io.jsonfile.atomic_path): a full or read-only disk leaves the
        previous file and no temporary one, and raises an OSError naming ``path``."""
        path = Path(path)
        data = {"n_structures": self.n_structures, "seen": np.array(sorted(self._seen), dtype="U40"),
                "pool_size": len(self.pool)}
        for q, st in self.stats.items():
            for key, value in st.as_dict().items():
                data[f"{q}.{key}"] = value
        data.update({f"extra.{k}": v for k, v in extra.items()})
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.savez does not append ".npz" to its name
                np.savez(fh, **data)
                fh.flush()
                os.fsync(fh.fileno())

    def load(self, path) -> dict:
        """Read statistics written by :meth:`save` for the same pool; returns the extra arrays."""
        with np.load(path) as data:
            if int(data["pool_size"]) != len(self.pool):
                raise ValueError(f"{path}: statistics of {int(data['pool_size'])} coefficients, the pool has "
                                 f"{len(self.pool)}")
            for q in QUANTITIES:
                self.stats[q] = SufficientStats.from_dict({k: data[f"{q}.{k}"] for k in
                                                           ("A", "b", "yy", "n_rows", "n_structures")})
            self.n_structures = int(data["n_structures"])
            self._seen = set(str(x) for x in data["seen"])
            return {k[len("extra."):]: data[k] for k in data.files if k.startswith("extra.")}

    def combined(self) -> SufficientStats:
        total = SufficientStats(len(self.pool))
        for st in self.stats.values():
            total.A += st.A
            total.b += st.b
            total.yy += st.yy
            total.n_rows += st.n_rows
        total.n_structures = self.n_structures
        return total

    def rmse(self, subset, weights_phys, fixed: Optional[dict] = None) -> dict:
        """Training RMSE per quantity (meV/atom for energies, eV/A, GPa) from the sufficient statistics, for the
        coefficients ``subset`` at ``weights_phys`` plus the ``fixed`` {pool index: value} ones."""
        fixed = {int(k): float(v) for k, v in (fixed or {}).items() if float(v) != 0.0}
        subset = np.concatenate([np.asarray(subset, dtype=int), np.array(list(fixed), dtype=int)])
        weights_phys = np.concatenate([np.asarray(weights_phys, dtype=float), list(fixed.values())])
        out = {}
        unit = {"energy": 1000.0 * self.scales.energy_per_atom, "forces": self.scales.force,
                "stress": self.scales.stress_gpa}
        for q, st in self.stats.items():
            if st.n_rows == 0:
                continue
            A = st.A[np.ix_(subset, subset)]
            b = st.b[subset]
            r2 = st.yy - 2.0 * weights_phys @ b + weights_phys @ A @ weights_phys
            out[q] = float(np.sqrt(max(r2, 0.0) / st.n_rows)) * unit[q]
        return out


def add_structures(ts: TrainingSet, structures: Iterable, report: FitReport, *, progress: bool = True,
                   log=print) -> list:
    """Add (label, Atoms-with-results or Exception) pairs to the training set; unusable ones are reported in
    ``report.skipped`` (and logged) and the rest goes on.  Returns the labels that were added."""
    added = []
    for label, atoms in tqdm(structures, disable=not progress, desc="design rows", unit="structure",
                             file=sys.stderr):
        if isinstance(atoms, Exception):
            report.skipped.append((label, str(atoms)))
            log(f"skipped {label}: {atoms}")
            continue
        try:
            warnings = ts.add(atoms, label)
        except ValueError as exc:
            report.skipped.append((label, str(exc)))
            log(f"skipped {exc}" if str(exc).startswith(label) else f"skipped {label}: {exc}")
            continue
        report.warnings.extend(warnings)
        for w in warnings:
            log(w)
        added.append(label)
    return added


def fit_model(structures: Iterable, base: Model, pool, *, select: Optional[int] = None,
              scales: QuantityScales = QuantityScales(), name: Optional[str] = None, progress: bool = True,
              log=print, select_by: str = "evidence") -> tuple[Model, FitReport]:
    """Fit the coefficients of ``pool`` (all of them, or ``select`` chosen by forward selection) to
    ``structures`` (iterable of (label, Atoms-with-results or Exception)); returns the model with its posterior."""
    ts = TrainingSet(base, pool, scales)
    report = FitReport()
    add_structures(ts, structures, report, progress=progress, log=log)
    return fit_training_set(ts, base, select=select, name=name, report=report, select_by=select_by)


def fit_training_set(ts: TrainingSet, base: Model, *, select: Optional[int] = None, subset=None,
                     fixed: Optional[dict] = None, name: Optional[str] = None, report: Optional[FitReport] = None,
                     version: Optional[int] = None, select_by: str = "evidence",
                     frozen=None) -> tuple[Model, FitReport]:
    """Bayesian regression (evidence approximation) on the statistics of ``ts``; the model keeps the harmonic part
    and reference of ``base``.

    select: choose coefficients by forward selection, at most that many (default: all free ones, no selection);
    select_by: "evidence" keeps the first k of the selection path with k where the log evidence is largest,
        "count" keeps ``select`` of them;
    subset: or give the pool indices to fit (no selection);
    fixed: {pool index: value} coefficients held at fixed values (eV per unit of the term, e.g. bounding terms):
        their contribution is taken out of the targets exactly (from the sufficient statistics), they are never
        selected, and a non-zero one is part of the model with zero posterior variance.  A value 0 just keeps the
        column out of the fit;
    frozen: a :class:`sp_server.fit.bayes.FrozenPrior`: its columns (``subset``, if not given), column scales and
        prior and noise widths instead of a selection and the evidence's; no fixed terms with it."""
    report = report or FitReport()
    scales = ts.scales
    if ts.n_structures == 0:
        raise ValueError("no usable training structure")
    full = ts.combined()
    fixed = {int(k): float(v) for k, v in (fixed or {}).items()}
    free = np.array([j for j in range(len(ts.pool)) if j not in fixed], dtype=int)
    stats = _reduced_stats(full, free, fixed)
    floor = ts.typical_scale()[free]
    given = {}
    if frozen is not None:
        if fixed:
            raise ValueError("a frozen prior fixes the columns: no fixed terms with it")
        subset = frozen.subset if subset is None else subset
        if [int(j) for j in subset] != [int(j) for j in frozen.subset]:
            raise ValueError("the subset differs from the frozen prior's columns")
        given = {"scale": frozen.feature_scale, "alpha": frozen.alpha, "beta": frozen.beta, "optimise": False}
    if subset is not None:
        position = {int(j): k for k, j in enumerate(free)}
        bad = [int(j) for j in subset if int(j) not in position]
        if bad:
            raise ValueError(f"subset holds fixed or unknown pool indices {bad}")
        local = np.array([position[int(j)] for j in subset], dtype=int)
    elif select is not None and select < len(free):
        if select_by not in ("evidence", "count"):
            raise ValueError(f"select_by must be 'evidence' or 'count', got {select_by!r}")
        local, evid = forward_selection(stats, select, floor=floor)
        if select_by == "evidence":
            local = local[:evidence_count(evid)]
        local = np.array(local, dtype=int)
        report.evidence_path = evid
    else:
        local = np.arange(len(free))
    ev, scale = fit_stats(stats, local, floor=floor, **given)
    w_phys = ev.mean / scale
    cov_phys = ev.covariance / np.outer(scale, scale)
    chosen = free[local]
    held = [j for j, v in fixed.items() if v != 0.0]
    nz, nh = len(chosen), len(held)
    cov = np.zeros((nz + nh, nz + nh))
    cov[:nz, :nz] = cov_phys
    sub_stats = {"A": stats.A[np.ix_(local, local)], "b": stats.b[local], "yy": stats.yy,
                 "n_rows": stats.n_rows, "n_structures": stats.n_structures}
    if nh:
        sub_stats["n_fixed_terms"] = nh
    posterior = Posterior(cov, 1.0 / np.sqrt(ev.beta), 1.0 / np.sqrt(ev.alpha), scales.as_dict(),
                          np.concatenate([scale, np.ones(nh)]), ev.log_evidence, sub_stats)
    coefs = [ts.pool[j] for j in chosen] + [ts.pool[j] for j in held]
    values = np.concatenate([w_phys, [fixed[j] for j in held]])
    meta = dict(base.metadata, fit={
        "n_structures": ts.n_structures, "n_rows": stats.n_rows, "pool_size": len(ts.pool),
        "selected": int(nz), "fixed": int(nh), "select_by": select_by if subset is None and select else None,
        "sigma_v": posterior.sigma_v, "sigma_w": posterior.sigma_w,
        "log_evidence": ev.log_evidence, "gamma": ev.gamma, "converged": ev.converged, "frozen_prior": frozen is not None,
        "skipped": [s[0] for s in report.skipped],
    })
    model = Model(base.reference, base.harmonic, AnharmonicPart(coefs, values), name=name or f"{base.name}-fit",
                  version=base.version + 1 if version is None else int(version), metadata=meta, posterior=posterior)
    report.n_structures, report.n_rows = ts.n_structures, stats.n_rows
    report.selected = [int(j) for j in chosen]
    report.rmse = ts.rmse(chosen, w_phys, fixed)
    report.sigma_v, report.sigma_w, report.log_evidence = posterior.sigma_v, posterior.sigma_w, ev.log_evidence
    model.metadata["fit"]["rmse_train"] = report.rmse
    return model, report


def _reduced_stats(stats: SufficientStats, free: np.ndarray, fixed: dict) -> SufficientStats:
    """Statistics of the free columns with the fixed columns' contribution removed from the targets:
    y' = y - Phi_F w_F  ->  A' = A_ff, b' = b_f - A_fF w_F, y'y' = yy - 2 w_F.b_F + w_F A_FF w_F."""
    out = SufficientStats(len(free))
    out.A = stats.A[np.ix_(free, free)].copy()
    out.b = stats.b[free].copy()
    out.yy, out.n_rows, out.n_structures = stats.yy, stats.n_rows, stats.n_structures
    if fixed:
        idx = np.array(list(fixed), dtype=int)
        w = np.array(list(fixed.values()), dtype=float)
        out.b -= stats.A[np.ix_(free, idx)] @ w
        out.yy = float(stats.yy - 2.0 * w @ stats.b[idx] + w @ stats.A[np.ix_(idx, idx)] @ w)
    return out
