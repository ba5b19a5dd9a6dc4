#!/usr/bin/env python
"""Does labelling the escapes of the boundedness check's hot MDs bring the bounded fit back to the data?

On a copy of a learning run's folder (its store, statistics, oracle and session prior), repeat: the learner's
bounded refit (frozen prior; from the probes alone, or from the run's kept cuts with --kept-cuts), then the
learner's own escape labelling (``Learner._label_escapes``: states on the way out of every hot MD that left the
trusted range, carved to max_atoms, at most --escape-labels per refit) and the oracle's labels.  One line per
refit: rounds of constraints, how far the constrained fit sits from the data's optimum (posterior standard
deviations), validation RMSE (energy meV per reference cell, forces eV/A, stress GPa).

    python tools/escape_labels.py RUN_DIR --copy /tmp/esc_run --iterations 6

Used for docs/learn.md (issue 16): on the final folder of the production run of 2026-12-04 (second), the fit went
from 9 rounds and a validation energy of 9.6 meV/cell to 2 rounds and about 8 within a few refits.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from sp_server.model.native import load_model
from sp_server.otf.learn import Learner, LearnSettings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a learning run's folder (left untouched: the tool works on --copy)")
    p.add_argument("--copy", required=True, help="where to copy it (replaced)")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--escape-labels", type=int, default=8)
    p.add_argument("--kept-cuts", action="store_true", help="start each fit from the run's kept cuts too")
    args = p.parse_args(argv)
    copy = Path(args.copy).resolve()
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(Path(args.run_dir), copy, ignore=shutil.ignore_patterns("*.lock"))
    settings = LearnSettings(escape_labels=args.escape_labels, kept_cuts=args.kept_cuts, labels_total=None,
                             labels_per_hour=None)
    learner = Learner(copy, [copy / "escape_queue.db"], settings, log=lambda m: None)
    otf = learner.otf
    for it in range(args.iterations):
        ts, report, harmonic, bounding, _ = otf.training_statistics()
        t0 = time.monotonic()
        model, report, check = otf.fit_model(ts, harmonic, bounding, 999, report, frozen=learner._frozen(ts),
                                             kept_cuts=args.kept_cuts)
        b = model.metadata.get("bounding", {})
        val = otf.validation_rmse(model)
        escapes = check.details.get("escapes", [])
        learner.state["cycle"] = it          # the escape states' sources: escape:cIT:K:J
        sent = learner._label_escapes(model, escapes)
        print(f"refit {it}: {ts.n_structures} training frames, bounded {check.bounded} after {b.get('rounds')} "
              f"round(s), {b.get('active')} active of {b.get('constraints')} constraints, "
              f"{b.get('mahalanobis_shift', float('nan')):.3g} std from the data's optimum; validation "
              f"E {val['energy_mev_per_cell']:.2f} F {val['forces']:.3f} S {val['stress_gpa']:.3f}; "
              f"{len(escapes)} escape(s), {sent} state(s) labelled [{time.monotonic() - t0:.0f} s]", flush=True)
        if not sent:
            break
        otf.label_stage()
    print(f"current model of the run: v{load_model(copy / 'model.h5').version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
