"""Bayesian linear regression with the evidence approximation (paper eqs. 6-15; Bishop, PRML 3.3-3.5).

Rows are whitened (each energy, force and stress residual divided by its quantity scale) so that one noise level
sigma_v serves all of them; columns are divided by their RMS over the data (``feature_scale``), but never by less
than their RMS at small typical distortions (a floor), so that one prior width sigma_w is meaningful for
coefficients of very different orders, and a term the data hardly touch stays near its prior mean 0 instead of
being blown up to fit noise (a column of RMS 1e-20 scaled to 1 gave coefficients of 1e22).  Only sufficient statistics are kept:
A = Phi^T Phi, b = Phi^T y, y^T y and the row count, so adding structures costs their own rows and a refit with
thousands of structures takes milliseconds to seconds (an eigen-decomposition of an nz x nz matrix).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg.blas import dsyrk


@dataclass
class EvidenceFit:
    """Result of one evidence maximisation on (a subset of) the sufficient statistics (scaled-column space)."""

    mean: np.ndarray          # posterior mean of the scaled coefficients
    covariance: np.ndarray    # posterior covariance of the scaled coefficients
    alpha: float              # 1 / sigma_w^2
    beta: float               # 1 / sigma_v^2
    gamma: float              # effective number of well-determined parameters
    log_evidence: float
    iterations: int
    converged: bool


class SufficientStats:
    """Phi^T Phi, Phi^T y, y^T y of whitened rows, accumulated structure by structure.

    Phi^T Phi is accumulated in place into its upper triangle (BLAS syrk: no nz x nz temporary, half the flops),
    and the lower triangle is filled in when ``A`` is read: adding a structure to a pool of 5000 coefficients costs
    0.1 s instead of 1 s."""

    def __init__(self, ncoef: int):
        self._A = np.zeros((ncoef, ncoef), order="F")
        self._upper_only = False   # True: only the upper triangle of _A is current
        self.b = np.zeros(ncoef)
        self.yy = 0.0
        self.n_rows = 0
        self.n_structures = 0

    @property
    def A(self) -> np.ndarray:
        """Phi^T Phi (nz x nz, symmetric)."""
        if self._upper_only:
            a, n = self._A, self._A.shape[0]
            for j0 in range(0, n, 512):           # blocks: no n x n temporary
                j1 = min(j0 + 512, n)
                a[j1:, j0:j1] = a[j0:j1, j1:].T
                block = a[j0:j1, j0:j1]
                block[:] = np.triu(block) + np.triu(block, 1).T
            self._upper_only = False
        return self._A

    @A.setter
    def A(self, value):
        self._A = np.asarray(value, dtype=float)   # any order: syrk makes its Fortran copy once, at the next add
        self._upper_only = False

    @property
    def ncoef(self) -> int:
        return len(self.b)

    def add(self, phi: np.ndarray, y: np.ndarray):
        """phi: (rows, nz) whitened design rows; y: (rows,) whitened targets of one (or more) structures."""
        phi = np.asarray(phi, dtype=float)
        y = np.asarray(y, dtype=float)
        if phi.shape != (len(y), self.ncoef):
            raise ValueError(f"design rows {phi.shape} do not match targets {y.shape} and {self.ncoef} coefficients")
        if not (np.all(np.isfinite(phi)) and np.all(np.isfinite(y))):
            raise ValueError("non-finite design rows or targets")
        if self.ncoef and len(y):
            self._A = dsyrk(1.0, phi, beta=1.0, c=self._A, trans=1, lower=0, overwrite_c=1)
            self._upper_only = True
        self.b += phi.T @ y
        self.yy += float(y @ y)
        self.n_rows += len(y)
        self.n_structures += 1

    def as_dict(self) -> dict:
        return {"A": self.A.copy(), "b": self.b.copy(), "yy": self.yy, "n_rows": self.n_rows,
                "n_structures": self.n_structures}

    @classmethod
    def from_dict(cls, d: dict) -> "SufficientStats":
        s = cls(len(d["b"]))
        s.A, s.b = np.array(d["A"], dtype=float), np.array(d["b"], dtype=float)
        s.yy, s.n_rows, s.n_structures = float(d["yy"]), int(d["n_rows"]), int(d["n_structures"])
        return s

    def feature_scale(self, floor=None) -> np.ndarray:
        """RMS of each column over the rows, at least ``floor`` (per column; see
        :meth:`sp_server.fit.fit.TrainingSet.typical_scale`); 1 for columns that are zero (below 1e-12 of the
        largest), which leaves them at zero and out of the selection."""
        rms = np.sqrt(np.diag(self.A) / max(self.n_rows, 1))
        if floor is not None:
            rms = np.maximum(rms, np.asarray(floor, dtype=float))
        # a column 1e-12 times smaller than the largest is zero up to rounding (a term whose orbit cancels in every
        # cell of the data, e.g. (Ba_x-O_x)(Ba_y-O_y) eta_1 eta_2 on 2x2x2): scaled up to unit size it was selected
        # and fitted to rounding noise, with a variance of 1e35 that made every Bayesian error 1e8 eV/A
        big = float(rms.max()) if rms.size else 0.0
        return np.where(rms > 1e-12 * big, rms, 1.0)


def evidence_fit(A, b, yy, n_rows, *, alpha=1.0, beta=1.0, max_iter=200, tol=1e-8,
                 optimise: bool = True) -> EvidenceFit:
    """MacKay's fixed-point iterations for alpha, beta on scaled sufficient statistics (Bishop eqs. 3.87-3.95).

    The residual is floored at 1e-12 of y^T y, so noise-free data (a perfect fit) give a large but finite beta.
    optimise=False: alpha and beta are held at the given values (a frozen prior, :class:`FrozenPrior`): the
    posterior covariance (beta A + alpha)^-1 then only shrinks as rows are added to A."""
    m = len(b)
    lam, q = np.linalg.eigh(0.5 * (A + A.T))
    lam = np.clip(lam, 0.0, None)
    qb = q.T @ b
    converged = not optimise
    it = 0
    for it in range(1, (max_iter if optimise else 0) + 1):
        d = beta * lam + alpha
        mean_q = beta * qb / d
        gamma = float(np.sum(beta * lam / d))
        mm = float(mean_q @ mean_q)
        resid = max(yy - 2.0 * float(mean_q @ qb) + float(np.sum(lam * mean_q ** 2)), 1e-12 * yy, 1e-300)
        new_alpha = gamma / max(mm, 1e-300)
        new_beta = max(n_rows - gamma, 1e-12) / resid
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if done:
            converged = True
            break
    d = beta * lam + alpha
    mean_q = beta * qb / d
    mean = q @ mean_q
    cov = (q / d) @ q.T
    resid = max(yy - 2.0 * float(mean_q @ qb) + float(np.sum(lam * mean_q ** 2)), 0.0)
    e_m = 0.5 * beta * resid + 0.5 * alpha * float(mean_q @ mean_q)
    log_ev = (0.5 * m * np.log(alpha) + 0.5 * n_rows * np.log(beta) - e_m - 0.5 * float(np.sum(np.log(d)))
              - 0.5 * n_rows * np.log(2 * np.pi))
    return EvidenceFit(mean, cov, float(alpha), float(beta), float(np.sum(beta * lam / d)), float(log_ev), it,
                       converged)


def fit_stats(stats: SufficientStats, subset=None, *, floor=None, scale=None, **kw) -> tuple[EvidenceFit, np.ndarray]:
    """Evidence fit on the (optionally column-subset) statistics; returns the fit in scaled space and the scales.
    floor: least column scale, per column of ``stats`` (see SufficientStats.feature_scale); scale: the column
    scales of the subset, given (a frozen prior) instead of computed from the data."""
    idx = np.arange(stats.ncoef) if subset is None else np.asarray(subset, dtype=int)
    scale = stats.feature_scale(floor)[idx] if scale is None else np.asarray(scale, dtype=float).reshape(len(idx))
    A = stats.A[np.ix_(idx, idx)] / np.outer(scale, scale)
    b = stats.b[idx] / scale
    return evidence_fit(A, b, stats.yy, stats.n_rows, **kw), scale


def forward_selection(stats: SufficientStats, n_select: int, *, log=None, floor=None) -> tuple[list, list]:
    """Greedy forward stepwise selection: at each step the candidate that most reduces the residual sum of squares
    of the least-squares fit on the selected columns (partial correlation from A and b, incremental Cholesky);
    the evidence of the selected set is recorded after each addition.  Returns (selected indices, evidence per
    step).  floor: least column scale (SufficientStats.feature_scale)."""
    scale = stats.feature_scale(floor)
    A = stats.A / np.outer(scale, scale)
    b = stats.b / scale
    n = len(b)
    selected: list = []
    evidences: list = []
    L = np.zeros((0, 0))
    ridge = 1e-10 * max(float(np.trace(A)) / max(n, 1), 1e-300)
    for step in range(min(n_select, n)):
        if selected:
            S = np.array(selected)
            # current least-squares solution on S
            z = np.linalg.solve(L, b[S])
            coef = np.linalg.solve(L.T, z)
            corr = b - A[:, S] @ coef
            # Schur complement: A_jj - A_jS A_SS^-1 A_Sj
            V = np.linalg.solve(L, A[S, :])  # (k, n)
            schur = np.diag(A) - np.sum(V ** 2, axis=0)
        else:
            corr = b.copy()
            schur = np.diag(A).copy()
        gain = np.where(schur > ridge, corr ** 2 / np.maximum(schur, ridge), -np.inf)
        if selected:
            gain[np.array(selected)] = -np.inf
        j = int(np.argmax(gain))
        if not np.isfinite(gain[j]):
            break
        # extend the Cholesky factor of A_SS
        if selected:
            S = np.array(selected)
            l12 = np.linalg.solve(L, A[S, j])
            l22 = np.sqrt(max(A[j, j] - l12 @ l12, ridge))
            L = np.block([[L, np.zeros((len(S), 1))], [l12[None, :], np.array([[l22]])]])
        else:
            L = np.array([[np.sqrt(max(A[j, j], ridge))]])
        selected.append(j)
        ev, _ = fit_stats(stats, selected, floor=floor)
        evidences.append(ev.log_evidence)
        if log is not None:
            log(step + 1, j, ev)
    return selected, evidences


def evidence_count(evidences) -> int:
    """How many of the forward selection's terms to keep: the step of the largest log evidence (a term that does
    not pay for the prior volume it opens lowers it)."""
    ev = np.asarray(evidences, dtype=float)
    if len(ev) == 0:
        return 0
    return int(np.nanargmax(np.where(np.isfinite(ev), ev, -np.inf))) + 1


@dataclass
class FrozenPrior:
    """The prior and noise widths, column scales and term set of a fit, held fixed for later refits (a learning
    session, sp_server.otf.learn): with the same alpha, beta, scales and columns, the posterior covariance
    (beta A + alpha)^-1 of the scaled coefficients can only shrink as structures are added to A, so no frame's
    Bayesian error grows from one refit to the next.  Re-optimising them by the evidence (the default of a fit)
    widened the prior (sigma_w 2.86 -> 3.18 with 8% more data) and the errors of the frames that the production
    MDs visit by 20% (docs/learn.md).

    subset: pool indices of the fitted columns, in order; feature_scale: their column scales; n_chosen: how many
    of them (the first) were selected, the rest being bounding terms (sp_server.fit.bound); sigma_w, sigma_v:
    prior and noise standard deviations of the whitened, scaled problem."""

    subset: np.ndarray
    feature_scale: np.ndarray
    sigma_w: float
    sigma_v: float
    n_chosen: int

    @property
    def alpha(self) -> float:
        return 1.0 / self.sigma_w ** 2

    @property
    def beta(self) -> float:
        return 1.0 / self.sigma_v ** 2

    @classmethod
    def of_model(cls, model, pool) -> "FrozenPrior":
        """The prior of a fitted ``model`` (with its posterior) whose coefficients all come from ``pool`` (the
        candidate coefficients of the fit, sp_server.fit.fit.TrainingSet.pool)."""
        post = model.posterior
        if post is None:
            raise ValueError(f"model {model.name} v{model.version} has no posterior: no prior to freeze")
        def key(c):   # weights to 10 digits: a pool generated on another machine may differ in the last bits
            return tuple((float(f"{t.weight:.10g}"), t.displacements, t.strains) for t in c.terms)
        index = {key(c): j for j, c in enumerate(pool)}
        missing = [c.name or str(k) for k, c in enumerate(model.anharmonic.coefficients) if key(c) not in index]
        if missing:
            raise ValueError(f"model {model.name} v{model.version}: {len(missing)} coefficient(s) not in the "
                             f"candidate pool (e.g. {missing[:3]}): no prior to freeze")
        subset = np.array([index[key(c)] for c in model.anharmonic.coefficients], dtype=int)
        n_fixed = int(post.stats.get("n_fixed_terms", 0)) if post.stats else 0
        return cls(subset, np.array(post.feature_scale, dtype=float), float(post.sigma_w), float(post.sigma_v),
                   len(subset) - n_fixed)
