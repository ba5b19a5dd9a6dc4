#!/usr/bin/env python
"""What the bounded fit's constraints cost on a run's validation frames: the validation RMSE (energy meV per
reference cell, forces eV/A, stress GPa) of the run's current model (constrained), of the learning session's
prior model (RUN/learn_prior.h5, if any), and of unconstrained fits of the run's statistics with the same terms:
with the session's frozen prior and with the evidence's widths.

    python tools/constraint_cost.py RUN_DIR

Used for docs/learn.md (run of 2026-12-04, second): the constrained model sat 1.6-3 meV/cell above the
unconstrained fits, which is why the learner rejected its candidates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sp_server.fit.bayes import FrozenPrior
from sp_server.fit.fit import fit_training_set
from sp_server.model.native import load_model
from sp_server.otf.config import OtfConfig
from sp_server.otf.loop import OnTheFly


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    run = Path(args.run_dir).resolve()
    cfg = OtfConfig.load(run / "config.toml")
    cfg.run_dir = run
    otf = OnTheFly(cfg, progress=False, log=lambda m: None)
    ts, _, harmonic, _, _ = otf.training_statistics()
    current = load_model(run / "model.h5")
    prior_path = run / "learn_prior.h5"
    prior = load_model(prior_path) if prior_path.exists() else current
    frozen = FrozenPrior.of_model(prior, ts.pool)
    rows = [(f"current model v{current.version} (constrained)", current)]
    if prior_path.exists():
        rows.append((f"session prior v{prior.version} (constrained)", prior))
    free, _ = fit_training_set(ts, harmonic, frozen=frozen)
    rows.append(("same terms, frozen prior, unconstrained", free))
    ev, _ = fit_training_set(ts, harmonic, subset=[int(j) for j in frozen.subset])
    rows.append((f"same terms, evidence widths (sigma_w {ev.posterior.sigma_w:.3g}), unconstrained", ev))
    print(f"{ts.n_structures} training frames; validation RMSE: energy meV/cell, forces eV/A, stress GPa")
    for name, model in rows:
        v = otf.validation_rmse(model)
        print(f"{name:70s} E {v['energy_mev_per_cell']:.2f}  F {v['forces']:.3f}  S {v['stress_gpa']:.3f}  "
              f"(n={v['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
