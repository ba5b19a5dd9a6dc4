"""Fitting the anharmonic part: training structures -> design rows -> Bayesian regression -> a model with posterior.

The harmonic part (and reference) of a base model are kept exactly; the targets are the oracle's energies,
forces and stresses minus the harmonic prediction.  Every structure is checked on its own: one that cannot be
mapped onto the reference, a duplicate, or a missing/NaN quantity is reported by name and the rest is used.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
from tqdm import tqdm

from ..model.model import Model
from ..model.posterior import Posterior
from ..model.terms import AnharmonicPart
from ..potential import Evaluator
from ..units import GPA_EV_A3
from .bayes import SufficientStats, fit_stats, forward_selection

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

    @staticmethod
    def _fingerprint(atoms) -> str:
        h = hashlib.sha1()
        for arr in (atoms.numbers, np.round(atoms.positions, 6), np.round(atoms.cell.array, 6)):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def add(self, atoms, label: str = "structure") -> list:
        """Add one labelled structure; returns warnings (quantities left out).  Raises ValueError when the whole
        structure is unusable (message names it)."""
        fp = self._fingerprint(atoms)
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

    def combined(self) -> SufficientStats:
        total = SufficientStats(len(self.pool))
        for st in self.stats.values():
            total.A += st.A
            total.b += st.b
            total.yy += st.yy
            total.n_rows += st.n_rows
        total.n_structures = self.n_structures
        return total

    def rmse(self, subset, weights_phys) -> dict:
        """Training RMSE per quantity (meV/atom for energies, eV/A, GPa) from the sufficient statistics."""
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


def fit_model(structures: Iterable, base: Model, pool, *, select: Optional[int] = None,
              scales: QuantityScales = QuantityScales(), name: Optional[str] = None, progress: bool = True,
              log=print) -> tuple[Model, FitReport]:
    """Fit the coefficients of ``pool`` (all of them, or ``select`` chosen by forward selection) to
    ``structures`` (iterable of (label, Atoms-with-results or Exception)); returns the model with its posterior."""
    ts = TrainingSet(base, pool, scales)
    report = FitReport()
    for label, atoms in tqdm(structures, disable=not progress, desc="design rows", unit="structure",
                             file=sys.stderr):
        if isinstance(atoms, Exception):
            report.skipped.append((label, str(atoms)))
            log(f"skipped {label}: {atoms}")
            continue
        try:
            report.warnings.extend(ts.add(atoms, label))
        except ValueError as exc:
            report.skipped.append((label, str(exc)))
            log(f"skipped {exc}" if str(exc).startswith(label) else f"skipped {label}: {exc}")
    for w in report.warnings:
        log(w)
    if ts.n_structures == 0:
        raise ValueError("no usable training structure")
    stats = ts.combined()
    if select is not None and select < len(ts.pool):
        subset, evid = forward_selection(stats, select)
        report.evidence_path = evid
    else:
        subset = list(range(len(ts.pool)))
    subset = np.array(subset, dtype=int)
    ev, scale = fit_stats(stats, subset)
    w_phys = ev.mean / scale
    cov_phys = ev.covariance / np.outer(scale, scale)
    sub_stats = {"A": stats.A[np.ix_(subset, subset)], "b": stats.b[subset], "yy": stats.yy,
                 "n_rows": stats.n_rows, "n_structures": stats.n_structures}
    posterior = Posterior(cov_phys, 1.0 / np.sqrt(ev.beta), 1.0 / np.sqrt(ev.alpha), scales.as_dict(), scale,
                          ev.log_evidence, sub_stats)
    coefs = [ts.pool[j] for j in subset]
    meta = dict(base.metadata, fit={
        "n_structures": ts.n_structures, "n_rows": stats.n_rows, "pool_size": len(ts.pool),
        "selected": int(len(subset)), "sigma_v": posterior.sigma_v, "sigma_w": posterior.sigma_w,
        "log_evidence": ev.log_evidence, "gamma": ev.gamma, "converged": ev.converged,
        "skipped": [s[0] for s in report.skipped],
    })
    model = Model(base.reference, base.harmonic, AnharmonicPart(coefs, w_phys), name=name or f"{base.name}-fit",
                  version=base.version + 1, metadata=meta, posterior=posterior)
    report.n_structures, report.n_rows = ts.n_structures, stats.n_rows
    report.selected = [int(j) for j in subset]
    report.rmse = ts.rmse(subset, w_phys)
    report.sigma_v, report.sigma_w, report.log_evidence = posterior.sigma_v, posterior.sigma_w, ev.log_evidence
    model.metadata["fit"]["rmse_train"] = report.rmse
    return model, report
