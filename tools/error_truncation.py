#!/usr/bin/env python
"""Can the Bayesian errors be had from a few coefficient vectors instead of the whole posterior?  And how well does
the cheap local error of the energy pass follow the force error?  (issue 17)

The per-component force variance is phi^T Sigma phi = sum_k (phi . l_k)^2 over the columns l_k of any factor
Sigma = L L^T.  Keeping r columns gives the errors at the cost of r extra force evaluations.  This script measures,
on labelled or unlabelled frames, how far the three per-frame errors (energy per cell, largest force component,
largest stress component) move when only r columns are kept, for three choices of columns:

- "eigen": the leading eigenvectors of the posterior covariance in the fit's scaled coordinates (columns divided by
  their training RMS), the choice that keeps most of the posterior's variance;
- "data": the leading singular vectors of M^(1/2) L, M the mean of phi phi^T over the force components of every
  other frame (the best rank-r choice on average over frames like these);
- "committee": r samples of the posterior (L times r random unit-variance vectors, divided by sqrt(r)), the
  errors of a committee of r models.

    python tools/error_truncation.py MODEL.h5 FRAMES.extxyz [FRAMES ...] [--ranks 4 8 16 32 64] [--seed 0]

Prints, per choice and r, the largest relative change over the frames of each error, and the exact errors' range.
Then the rank correlation (Spearman) over the frames between the largest force error and local_energy_max_mev (the
largest per-cell energy error, which the server gives on every frame at about 20% of the cost of a frame), and
between the largest force error and the total energy error.
"""
from __future__ import annotations

import argparse
import sys

import ase.io
import numpy as np
from scipy.stats import spearmanr

from sp_server.model.native import load_model
from sp_server.potential import Evaluator


def frame_rows(ev, atoms):
    res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, design=True)
    nz = len(res.phi_energy)
    return res.phi_energy, res.phi_forces.reshape(nz, -1).T, res.phi_stress.T


def errors_with(L, rows):
    e, pf, ps = rows
    return np.array([np.linalg.norm(e @ L), np.sqrt(np.sum((pf @ L) ** 2, axis=1)).max(),
                     np.sqrt(np.sum((ps @ L) ** 2, axis=1)).max()])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("frames", nargs="+")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-frames", type=int, default=20, help="per file")
    ap.add_argument("--every", type=int, default=1, help="every n-th frame of each file")
    ap.add_argument("--correlation-only", action="store_true",
                    help="only the rank correlations (no truncation: large frames, many of them)")
    ap.add_argument("--plot", metavar="PNG", help="scatter of the local and the total energy error against the "
                                                  "largest force error, one point per frame")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    if model.posterior is None:
        raise SystemExit(f"{args.model}: no posterior")
    frames = [a for f in args.frames for a in ase.io.read(f, f"::{args.every}")[:args.max_frames]]
    ev = Evaluator(model)
    cheap = [ev.evaluate(a.cell.array, a.positions, a.numbers, errors=True).errors for a in frames]
    print(f"# {args.model}: {len(model.anharmonic)} coefficients, {len(frames)} frames; command: python "
          f"tools/error_truncation.py {' '.join(argv or sys.argv[1:])}")
    if not args.correlation_only:
        truncation(model, [frame_rows(ev, a) for a in frames], args)
    force = np.array([c["force_max"] for c in cheap])
    local = np.array([c["local_energy_max_mev"] for c in cheap])
    energy = np.array([c["energy_mev_per_cell"] for c in cheap])
    top = force >= np.quantile(force, 0.9)
    print(f"# rank correlation with the largest force error over the frames: local_energy_max_mev "
          f"{spearmanr(local, force)[0]:.2f}, energy_mev_per_cell {spearmanr(energy, force)[0]:.2f}; the frames in "
          f"the top 10% by force error are in the top {100 * (1 - min(np.mean(local < x) for x in local[top])):.0f}% "
          f"by local_energy_max_mev")
    if args.plot:
        from sp_server.figures import plt, save
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, y, label in ((axes[0], local, "largest per-cell energy error (meV), every frame"),
                             (axes[1], energy, "total energy error (meV per cell), every frame")):
            ax.loglog(force, y, ".", ms=4, alpha=0.6)
            ax.set_xlabel("largest force error (eV/A), all errors")
            ax.set_ylabel(label)
            ax.set_title(f"rank correlation {spearmanr(y, force)[0]:.2f}", fontsize=10)
        print(f"# figure: {save(fig, args.plot)}")


def truncation(model, rows, args):
    post = model.posterior
    S = 0.5 * (post.covariance + post.covariance.T)
    w, V = np.linalg.eigh(S)
    L = V * np.sqrt(np.clip(w, 0.0, None))
    exact = np.array([errors_with(L, r) for r in rows])
    f = post.feature_scale
    ws, Vs = np.linalg.eigh(S * np.outer(f, f))
    order = np.argsort(ws)[::-1]
    eigen = (Vs[:, order] * np.sqrt(np.clip(ws[order], 0.0, None))) / f[:, None]
    rng = np.random.default_rng(args.seed)
    nz = S.shape[0]
    print(f"# exact errors over the frames: energy {exact[:, 0].min():.3g}-{exact[:, 0].max():.3g} eV, largest force "
          f"component {exact[:, 1].min():.3g}-{exact[:, 1].max():.3g} eV/A, largest stress component "
          f"{exact[:, 2].min():.3g}-{exact[:, 2].max():.3g} eV/A^3")
    print("# largest relative change over the frames (|truncated - exact| / exact) of: energy, force, stress")
    print(f"{'columns':>10} {'r':>4} {'energy':>8} {'force':>8} {'stress':>8}")
    total = sum(o[1].T @ o[1] / len(o[1]) for o in rows)
    data_basis = []
    for fr in rows:   # the data metric of every other frame (leave one out)
        M = (total - fr[1].T @ fr[1] / len(fr[1])) / max(len(rows) - 1, 1)
        wm, Q = np.linalg.eigh(M)
        _, _, Wt = np.linalg.svd((Q * np.sqrt(np.clip(wm, 0.0, None))) @ Q.T @ L, full_matrices=False)
        data_basis.append(L @ Wt.T)
    for r in args.ranks:
        if r > nz:
            continue
        worst = {k: np.zeros(3) for k in ("eigen", "data", "committee")}
        for j, fr in enumerate(rows):
            cols = {"eigen": eigen[:, :r], "data": data_basis[j][:, :r],
                    "committee": L @ rng.normal(size=(nz, r)) / np.sqrt(r)}
            for k, c in cols.items():
                worst[k] = np.maximum(worst[k], np.abs(errors_with(c, fr) - exact[j]) / exact[j])
        for k, v in worst.items():
            print(f"{k:>10} {r:4d} {v[0]:8.3f} {v[1]:8.3f} {v[2]:8.3f}", flush=True)


if __name__ == "__main__":
    main()
