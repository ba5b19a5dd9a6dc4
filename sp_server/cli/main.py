"""`sp-server` command line entry point."""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _cmd_eval(args):
    from ..batch import evaluate_file
    from ..model.native import load_model
    from ..model.posterior import ErrorThreshold
    model = load_model(args.model)
    threshold = ErrorThreshold.parse(args.threshold) if args.threshold else None
    if threshold is not None and model.posterior is None:
        raise ValueError(f"{args.model}: --threshold needs a model with a Bayesian posterior (from sp-server fit)")
    report = evaluate_file(model, args.structures, args.output, progress=not args.no_progress, threshold=threshold)
    flagged = f", {report.flagged} flagged ({threshold})" if threshold is not None else ""
    print(f"{report.evaluated} structure(s) evaluated, {report.failed} failed{flagged} -> {args.output}")
    return 1 if report.failed else 0


def _cmd_info(args):
    from ..model.native import load_model
    print(load_model(args.model).summary())
    return 0


def _cmd_toy(args):
    from ..model.native import save_model
    from ..model.toy import toy_perovskite
    path = save_model(toy_perovskite(a=args.a, dipole=not args.no_dipole), args.output)
    print(f"toy perovskite model written to {path}")
    return 0


def _cmd_demo(args):
    import logging
    if args.toy:
        from ..demo import run_demo
        run_demo(args.output, progress=not args.no_progress)
        return 0
    from ..demo import run_otf_demo
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    model = run_otf_demo(args.output, progress=not args.no_progress)
    print(f"model: {model.resolve()}\nreport: {(model.parent / 'report').resolve()} (summary.md, figures)")
    return 0


def _cmd_import(args):
    from ..io.multibinit import import_multibinit
    from ..model.native import save_model
    if args.ddb is None and args.system is None:
        raise ValueError("give --ddb DDB and/or --system SYSTEM.xml")
    model = import_multibinit(ddb=args.ddb, system=args.system, coefficients=args.coefficients,
                              dipdip=not args.no_dipdip, asymmetry_tolerance=args.asymmetry_tolerance,
                              multibinit_exact=args.multibinit_exact)
    path = save_model(model, args.output)
    print(model.summary().splitlines()[0])
    if args.multibinit_exact:
        h = model.harmonic
        print(f"multibinit-exact: force constants as multibinit applies them ({model.metadata.get('built_by', 'as printed')}): "
              f"asymmetry {h.asymmetry():.2g} of the largest block, sum-rule residue {h.asr_violation():.2g} eV/A^2; "
              "forces are -dE/du only to that level (docs/multibinit.md)")
    for fix in model.metadata.get("symmetrisation", []):   # the DFPT noise removed, as anaddb does
        where = f" (line {fix['line']})" if fix["line"] else ""
        print(f"symmetrised: {fix['quantity']}{where}: largest deviation {fix['max']:.3g}"
              f"{' ' + fix['unit'] if fix['unit'] else ''} ({fix['relative']:.1e} of its largest element)")
    print(f"{len(model.anharmonic)} anharmonic coefficient(s); dipole-dipole "
          f"{'on' if model.harmonic.has_dipole else 'off'}; written to {path}")
    return 0


def _cmd_export(args):
    from ..io.multibinit import export_multibinit
    from ..model.native import load_model
    sys_xml, coeffs = export_multibinit(load_model(args.model), args.output)
    print(f"wrote {sys_xml} and {coeffs} (Hartree, bohr; read them with multibinit as the system and "
          "coefficient files)")
    return 0


def _cmd_harmonic(args):
    import ase.io

    from ..fit.harmonic import HarmonicSettings, harmonic_from_oracle
    from ..model.native import save_model
    from ..oracles import make_oracle
    atoms = ase.io.read(args.structure)
    settings = HarmonicSettings(supercell=tuple(args.supercell), displacement=args.displacement,
                                strain_step=args.strain_step, relax_lattice=not args.no_relax)
    born = args.born
    if born is not None and "DDB" in born:  # Born charges and eps_inf from an ABINIT DDB
        from ..io.ddb import read_ddb
        ddb = read_ddb(born)
        if ddb.born_charges is None:
            raise ValueError(f"{born}: the DDB has no Born charges / dielectric tensor")
        born = (ddb.born_charges, ddb.epsilon_inf)
    model = harmonic_from_oracle(atoms, make_oracle(args.oracle, _oracle_options(args)), settings, born=born,
                                 progress=not args.no_progress)
    path = save_model(model, args.output)
    print(model.summary())
    print(f"harmonic model written to {path}")
    return 0


def _generator_settings(args):
    from ..fit.generate import GeneratorSettings
    return GeneratorSettings(cutoff=args.cutoff, orders=tuple(args.orders), max_bodies=args.max_bodies,
                             strain_phonon=not args.no_strain_phonon, strain_powers=tuple(args.strain_powers),
                             sp_orders=tuple(args.sp_orders), even_top_order=args.even_top_order,
                             sp_pairs=tuple(_sp_pair(p) for p in args.sp_pairs))


def _sp_pair(text: str) -> tuple:
    from ..fit.generate import parse_sp_pair
    try:
        return parse_sp_pair(text)
    except ValueError as exc:
        raise ValueError(f"--sp-pairs: {exc}") from None


def _cmd_fit(args):
    from ..batch import iter_structures
    from ..fit.bound import bounding_coefficients, fit_bounded
    from ..fit.fit import FitReport, QuantityScales, TrainingSet, add_structures, fit_training_set
    from ..io.multibinit import read_coefficients_xml
    from ..model.native import load_model, save_model
    base = load_model(args.harmonic)
    if args.terms == "generate":
        from ..fit.generate import generate_terms, print_counts
        pool = generate_terms(base.reference, _generator_settings(args), progress=not args.no_progress)
        print(f"generated {len(pool)} symmetry-adapted candidate coefficients:")
        print_counts(pool)
    else:
        pool = read_coefficients_xml(args.terms, base.natoms).coefficients  # values ignored: only the terms
        print(f"{len(pool)} candidate coefficients from {args.terms}")
    scales = QuantityScales(args.energy_scale, args.force_scale, args.stress_scale)
    bounding = [] if args.no_bound else bounding_coefficients(base)
    ts = TrainingSet(base, list(pool) + bounding, scales)
    report = FitReport()
    add_structures(ts, iter_structures(args.training), report, progress=not args.no_progress)
    fixed_off = {len(pool) + k: 0.0 for k in range(len(bounding))}
    model, report = fit_training_set(ts, base, select=args.select, select_by=args.select_by, fixed=fixed_off,
                                     report=report)
    print(f"fitted {len(model.anharmonic)} coefficients on {report.n_structures} structures "
          f"({report.n_rows} rows; {len(report.skipped)} skipped): sigma_v {report.sigma_v:.3g}, "
          f"sigma_w {report.sigma_w:.3g}, log evidence {report.log_evidence:.6g}")
    print("training RMSE: " + ", ".join(f"{k} {v:.4g} {u}" for (k, v), u in
                                        zip(report.rmse.items(), ("meV/atom", "eV/A", "GPa"))))
    for text, value, var in zip(model.term_texts(), model.anharmonic.values, np.diag(model.posterior.covariance)):
        print(f"  {value: .6e} +- {np.sqrt(var):.2e}  {text}")
    ready = False  # only a model that passed the boundedness check is "ready"
    if not args.no_bound:
        # the same selection and the bounding terms, at the posterior's most probable values under the boundedness
        # constraints (bounded by construction, fit.bound.fit_bounded)
        from ..fit.bound import BoundSettings
        from ..otf.structures import polar_backgrounds
        settings = BoundSettings(backgrounds=polar_backgrounds(base) if base.natoms == 5 else ())
        model, report, bound = fit_bounded(ts, base, select=args.select, select_by=args.select_by,
                                           bounding=list(fixed_off), fitted=(model, report), settings=settings)
        ready = bound.bounded
        model.metadata["bounded"] = bound.bounded
    model.metadata["ready"] = ready
    path = save_model(model, args.output)
    print(f"model written to {path}" + ("" if ready else " -- NOT READY: it failed the boundedness check"))
    return 0 if ready else 3


def _cmd_serve(args):
    import logging

    from ..model.posterior import ErrorThreshold
    from ..server.driver import ForceServer, ServeSettings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        filename=args.log)
    if not args.unix and args.port is None:
        raise ValueError("an INET connection needs --port (or use --unix)")
    if args.error_stride < 0:
        raise ValueError(f"--error-stride must be >= 0, got {args.error_stride}")
    settings = ServeSettings(threshold=ErrorThreshold.parse(args.threshold) if args.threshold else None,
                             wait=args.wait, error_stride=args.error_stride, trace_dir=args.trace,
                             committee_extras=args.committee_extras, probation_frames=args.probation,
                             probation_margin=args.probation_margin, probation_alpha=args.probation_alpha)
    server = ForceServer(args.model, args.address, args.port, args.unix, args.connections, args.queue, settings)
    return server.serve_forever()


def _cmd_lammps(args):
    import logging

    from ..model.posterior import ErrorThreshold
    from ..server.lammps_bridge import LammpsBridge
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.error_stride < 0:
        raise ValueError(f"--error-stride must be >= 0, got {args.error_stride}")
    bridge = LammpsBridge(args.model, queue=args.queue,
                          threshold=ErrorThreshold.parse(args.threshold) if args.threshold else None,
                          error_stride=args.error_stride, probation_frames=args.probation,
                          probation_margin=args.probation_margin, probation_alpha=args.probation_alpha)
    rc = bridge.run(args.deck, dict(args.var or []), log_file=args.log)
    print(f"LAMMPS deck {args.deck} finished: {bridge.frames} force evaluations; log in {args.log}")
    return rc


def _oracle_options(args) -> dict:
    """--oracle-config FILE.toml (its [oracle] table, or the whole file) updated by --oracle-option KEY=VALUE
    (VALUE read as TOML: 30, 1e-10, "text", [2, 2, 2]; bare words are strings)."""
    import tomllib
    options = {}
    if getattr(args, "oracle_config", None):
        with open(args.oracle_config, "rb") as fh:
            data = tomllib.load(fh)
        options.update(data.get("oracle", data))
        options.pop("name", None)
    for item in getattr(args, "oracle_option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--oracle-option {item!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = value
    return options


def _add_oracle_arguments(parser, required=True):
    parser.add_argument("--oracle", required=required,
                        help="emt, chgnet, sevenn, abinit, socket, or package.module:factory (an ASE calculator)")
    parser.add_argument("--oracle-option", action="append", metavar="KEY=VALUE",
                        help="an option of the oracle (e.g. ecut_ha=30, ranks=2, unixsocket=lmp); repeatable")
    parser.add_argument("--oracle-config", metavar="FILE.toml", help="oracle options from a TOML file ([oracle])")


def _cmd_label(args):
    from ..oracles import isolated_oracle
    from ..otf.label import LabelChecks, run_workers_mpi
    options = _oracle_options(args)
    counts = run_workers_mpi(args.store, lambda: isolated_oracle(args.oracle, options, args.call_timeout),
                             checks=LabelChecks(max_force=args.max_force), batch=args.batch,
                             lease_seconds=args.lease, max_attempts=args.max_attempts,
                             progress=not args.no_progress)
    if counts is None:  # not rank 0
        return 0
    print(f"{counts.labeled} frame(s) labelled, {counts.failed} failed attempt(s) -> {args.store}")
    return 1 if counts.failed else 0


def _cmd_validate(args):
    from dataclasses import replace

    from ..validate.run import ValidationSettings, oracle_from_args, run_validation
    settings = ValidationSettings.full() if args.full else ValidationSettings()
    over = {}
    if args.phases:
        over["phases"] = tuple(args.phases)
    if args.holdout:
        over["holdout"], over["holdout_select"] = tuple(args.holdout), args.holdout_select
    if args.holdout_md is not None:
        over["holdout_supercells"] = tuple(args.holdout_md)
    md = {k: v for k, v in (("supercell", args.md_supercell), ("steps", args.md_steps),
                            ("temperatures", tuple(args.temperatures) if args.temperatures else None),
                            ("pressure_gpa", args.pressure)) if v is not None}
    if args.no_cooling:
        md["cooling"] = False
    if md:
        over["transitions"] = replace(settings.transitions, **md)
    settings = replace(settings, **over)
    oracle = oracle_from_args(args.oracle, _oracle_options(args) if args.oracle else {})
    res = run_validation(args.model, args.output, oracle=oracle, oracle_name=args.oracle or "oracle",
                         items=tuple(args.items), settings=settings, progress=not args.no_progress)
    return 1 if res["failed"] else 0


def _cmd_otf(args):
    import logging

    from ..otf.config import OtfConfig
    from ..otf.loop import OnTheFly
    from ..otf.report import write_report
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    config = OtfConfig.load(args.config)
    if args.report:
        print(f"report written to {write_report(config.run_dir)}")
        return 0
    model = OnTheFly(config, progress=not args.no_progress).run()
    print(f"model: {model}\nreport: {model.parent / 'report' / 'summary.md'}")
    return 0


def _cmd_learn(args):
    import logging

    from ..otf.learn import Learner, LearnSettings
    from ..store.db import LockTimeout
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    settings = LearnSettings(max_atoms=args.max_atoms, dedup_displacement=args.dedup_displacement,
                             dedup_strain=args.dedup_strain, labels_per_hour=args.labels_per_hour,
                             labels_total=args.labels_total, batch=args.batch, min_labels=args.min_labels,
                             poll_s=args.poll, timestep_fs=tuple(args.timestep_fs or [2.0]),
                             accept_tolerance=args.accept_tolerance,
                             validation_every=args.validation_every, workers=args.workers,
                             freeze_prior=not args.refit_prior, gate_steps=args.gate_steps,
                             gate_temperature=args.gate_temperature, escape_labels=args.escape_labels,
                             kept_cuts=args.kept_cuts)
    learner = Learner(args.run_dir, args.queue, settings, config=args.config, progress=not args.no_progress)
    try:
        cycles = learner.run(max_cycles=args.max_cycles, idle_exit_s=args.idle_exit)
    except LockTimeout as exc:   # another learner holds the run folder or a queue
        print(f"sp-server learn: error: {exc} (one learner per run folder and per queue)", file=sys.stderr)
        return 2
    published = [h["version"] for h in learner.state["history"] if h["decision"] == "published"]
    print(f"{cycles} cycle(s); versions published so far: {published or 'none'}; model {learner.dir / 'model.h5'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..validate import ITEMS as VALIDATION_ITEMS
    p = argparse.ArgumentParser(prog="sp-server", description="Second-principles lattice models: evaluate, serve, fit.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="evaluate every structure of a file; write extended XYZ (eV, eV/A, eV/A^3)")
    e.add_argument("model", metavar="MODEL", help="native model file (.h5)")
    e.add_argument("structures", metavar="STRUCTURES", help="any file ase.io reads (extxyz, POSCAR, ...) or an ase.db")
    e.add_argument("-o", "--output", metavar="OUT.extxyz", required=True)
    e.add_argument("--threshold", metavar="QUANTITY=VALUE",
                   help="flag frames whose Bayesian error exceeds this: force_max (eV/A, the default quantity), "
                        "energy_mev_per_cell (meV) or stress_max_gpa (GPa), e.g. force_max=0.1")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    im = sub.add_parser("import", help="build a model from MULTIBINIT/ABINIT files (DDB, system XML, coefficients)")
    im.add_argument("--ddb", metavar="DDB", help="ABINIT derivative database (harmonic part by Fourier interpolation)")
    im.add_argument("--system", metavar="SYSTEM.xml", help="MULTIBINIT system XML (replaces the DDB)")
    im.add_argument("--coefficients", metavar="COEFFS.xml", help="MULTIBINIT coefficient XML (anharmonic part)")
    im.add_argument("--no-dipdip", action="store_true",
                    help="no dipole-dipole part (MULTIBINIT dipdip 0); default: on, as dipdip 1")
    im.add_argument("--asymmetry-tolerance", type=float, default=None, metavar="X",
                    help="DFPT blocks are symmetrised as anaddb does (their noise is logged); an asymmetry beyond X "
                         "times a block's largest element is refused as a broken file (default 0.1, "
                         "sp_server.io.ddb.ASYMMETRY_TOLERANCE)")
    im.add_argument("--multibinit-exact", action="store_true",
                    help="force constants exactly as multibinit applies them, for bit-level parity with it: from a "
                         "DDB, multibinit itself builds them (needs the multibinit executable); from a system XML, "
                         "the blocks as printed; neither is symmetrised nor given the sum rule, so forces are not "
                         "exactly -dE/du (docs/multibinit.md)")
    im.add_argument("-o", "--output", metavar="MODEL", required=True)
    im.set_defaults(func=_cmd_import)

    ex = sub.add_parser("export", help="write a model as MULTIBINIT system + coefficient XML")
    ex.add_argument("model", metavar="MODEL")
    ex.add_argument("-o", "--output", metavar="PREFIX", required=True,
                    help="writes PREFIX_sys.xml and PREFIX_coeffs.xml")
    ex.set_defaults(func=_cmd_export)

    h = sub.add_parser("harmonic", help="harmonic part from an oracle: lattice constant, phonopy force constants, "
                                        "elastic and internal-strain tensors")
    h.add_argument("structure", metavar="STRUCTURE", help="reference unit cell (any file ase.io reads)")
    _add_oracle_arguments(h)
    h.add_argument("--supercell", type=int, nargs=3, default=[2, 2, 2], metavar=("N1", "N2", "N3"))
    h.add_argument("--displacement", type=float, default=0.01, help="finite displacement, A (default 0.01)")
    h.add_argument("--strain-step", type=float, default=0.005, help="finite strain (default 0.005)")
    h.add_argument("--born", metavar="BORN",
                   help="Born charges + eps_inf for the dipole-dipole part: a phonopy BORN file or an ABINIT DDB "
                        "(a file name containing 'DDB'); without: no dipole-dipole part")
    h.add_argument("--no-relax", action="store_true", help="keep the given lattice constant")
    h.add_argument("--no-progress", action="store_true")
    h.add_argument("-o", "--output", metavar="MODEL", required=True)
    h.set_defaults(func=_cmd_harmonic)

    f = sub.add_parser("fit", help="fit anharmonic coefficients (Bayesian regression) to labelled structures")
    f.add_argument("training", metavar="TRAINING", help="extxyz or ase.db with energy, forces, stress")
    f.add_argument("--harmonic", metavar="MODEL", required=True, help="model whose reference and harmonic part are kept")
    f.add_argument("--terms", metavar="TERMS", required=True,
                   help="MULTIBINIT coefficient XML whose terms form the pool (values ignored), or 'generate'")
    f.add_argument("--select", type=int, metavar="N",
                   help="forward selection of at most N terms (default: fit all of them)")
    f.add_argument("--select-by", choices=("evidence", "count"), default="evidence",
                   help="with --select: keep as many as maximise the log evidence (default), or exactly N")
    f.add_argument("--cutoff", type=float, default=2.89, help="generate: pair cutoff, A (default 2.89)")
    f.add_argument("--orders", type=int, nargs="+", default=[3, 4, 5, 6], help="generate: displacement orders")
    f.add_argument("--max-bodies", type=int, default=2, help="generate: distinct differences per term (default 2)")
    f.add_argument("--even-top-order", action="store_true",
                   help="generate: at the highest order keep only products of even powers (x^6, x^4 y^2), the "
                        "only ones a positive coefficient makes bounded")
    f.add_argument("--no-strain-phonon", action="store_true", help="generate: no strain-phonon terms")
    f.add_argument("--strain-powers", type=int, nargs="+", default=[1],
                   help="generate: strain powers of strain-phonon terms (default 1; 1 2 gives ~8x more terms)")
    f.add_argument("--sp-orders", type=int, nargs="+", default=[1, 2],
                   help="generate: displacement orders of strain-phonon terms (default 1 2)")
    f.add_argument("--sp-pairs", nargs="+", default=[], metavar="N:Q",
                   help="generate: more strain-phonon terms u^N eta^Q on top of --sp-orders x --strain-powers, e.g. "
                        "3:1 4:1 (u^3 eta, u^4 eta: the couplings of strongly strained polar phases)")
    f.add_argument("--energy-scale", type=float, default=1e-3, help="energy unit of the fit, eV/atom (1e-3)")
    f.add_argument("--force-scale", type=float, default=0.05, help="force unit of the fit, eV/A (0.05)")
    f.add_argument("--stress-scale", type=float, default=0.1, help="stress unit of the fit, GPa (0.1)")
    f.add_argument("--no-bound", action="store_true", help="skip the boundedness check (model not marked ready)")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("-o", "--output", metavar="OUT", required=True)
    f.set_defaults(func=_cmd_fit)

    sv = sub.add_parser("serve", help="i-PI protocol force server (connects to the engine as a driver)")
    sv.add_argument("model", metavar="MODEL")
    sv.add_argument("--address", required=True, action="append",
                    help="host name, or with --unix the name of /tmp/ipi_ADDRESS; repeat it to serve several "
                         "engines (e.g. two i-PI instances) from one process")
    sv.add_argument("--port", type=int, help="TCP port (INET sockets)")
    sv.add_argument("--unix", action="store_true", help="UNIX socket /tmp/ipi_ADDRESS")
    sv.add_argument("--connections", type=int, default=1, help="parallel connections (e.g. one per PIMD bead)")
    sv.add_argument("--queue", metavar="DB", help="ase.db file or PostgreSQL URL for flagged frames")
    sv.add_argument("--threshold", metavar="QUANTITY=VALUE", help="flagging threshold (default force_max=0.1)")
    sv.add_argument("--wait", type=float, default=600.0, help="seconds to retry until the engine is up")
    sv.add_argument("--error-stride", type=int, default=1, metavar="N",
                    help="all Bayesian errors every N-th frame of a connection (default 1: every frame; they cost "
                         "about 3x the energy, forces and stress: docs/performance.md); the other frames get the "
                         "cheap ones of the energy pass (energy_mev_per_cell, local_energy_max_mev, about +20%%), "
                         "so --threshold local_energy_max_mev=V flags on every frame; 0: no Bayesian errors")
    sv.add_argument("--committee-extras", action="store_true",
                    help="also send the Bayesian energy error as i-PI committee extras (committee_pot: E -/+ "
                         "sigma/sqrt 2, Hartree), read by i-PI's <ffcommittee> with <parse_json> (its "
                         "committee_uncertainty and active-learning output)")
    sv.add_argument("--probation", type=int, default=2000, metavar="FRAMES",
                    help="after a hot reload, a frame outside the trusted range within this many frames sends the "
                         "server back to the version before (default 2000; 0: none)")
    sv.add_argument("--probation-margin", type=float, default=0.2, metavar="A",
                    help="during probation, an atom this much (Angstrom) farther from its site than in any frame "
                         "served before the reload fails it too (default 0.2; 0: off)")
    sv.add_argument("--probation-alpha", type=float, default=1e-4, metavar="P",
                    help="with --queue and --threshold: during probation, a version flagged more often than the "
                         "frames served before the reload, at this significance (one-sided Poisson test), fails it "
                         "too (default 1e-4; 0: off)")
    sv.add_argument("--trace", metavar="DIR", help="write every frame's energy (eV) and Bayesian errors to "
                                                   "DIR/trace_K.csv, one file per connection K")
    sv.add_argument("--log", metavar="FILE", help="log file (default: standard error)")
    sv.set_defaults(func=_cmd_serve)

    lm = sub.add_parser("lammps", help="run a LAMMPS deck whose fix external pf/callback is the model")
    lm.add_argument("deck", metavar="DECK")
    lm.add_argument("--model", required=True, metavar="MODEL")
    lm.add_argument("--var", nargs=2, action="append", metavar=("NAME", "VALUE"), help="LAMMPS -var NAME VALUE")
    lm.add_argument("--queue", metavar="DB", help="ase.db file or PostgreSQL URL for flagged frames")
    lm.add_argument("--threshold", metavar="QUANTITY=VALUE", help="flagging threshold (default force_max=0.1)")
    lm.add_argument("--error-stride", type=int, default=1, metavar="N",
                    help="with --queue: all Bayesian errors every N-th force call, those of the energy pass on the "
                         "others (as sp-server serve; default 1)")
    lm.add_argument("--probation", type=int, default=2000, metavar="STEPS",
                    help="after a hot reload, a step outside the trusted range within this many steps sends the "
                         "bridge back to the version before (as sp-server serve; default 2000; 0: none)")
    lm.add_argument("--probation-margin", type=float, default=0.2, metavar="A",
                    help="as sp-server serve: an atom this much farther from its site than before the reload fails "
                         "the probation (default 0.2; 0: off)")
    lm.add_argument("--probation-alpha", type=float, default=1e-4, metavar="P",
                    help="as sp-server serve: a version flagged more often than the steps before the reload, at "
                         "this significance, fails the probation (default 1e-4; 0: off)")
    lm.add_argument("--log", default="log.lammps", help="LAMMPS log file (relative to the deck's folder)")
    lm.set_defaults(func=_cmd_lammps)

    lb = sub.add_parser("label", help="label the pending frames of a store with an oracle; under mpiexec -n K, "
                                      "K workers (one per rank)")
    lb.add_argument("store", metavar="STORE", help="ase.db file or PostgreSQL URL (sp-server serve --queue writes it)")
    _add_oracle_arguments(lb)
    lb.add_argument("--batch", type=int, default=1, help="frames claimed at a time per worker")
    lb.add_argument("--lease", type=float, default=3600.0,
                    help="seconds a claim lasts; a crashed worker's frames are retried after it")
    lb.add_argument("--max-attempts", type=int, default=3, help="failed attempts before a frame is 'failed'")
    lb.add_argument("--max-force", type=float, default=50.0, help="eV/A: a larger force is a failed label")
    lb.add_argument("--call-timeout", type=float, default=3600.0, metavar="S",
                    help="seconds per oracle call: the oracle runs in a child process, killed (with everything it "
                         "launched) past this limit, a failed attempt; 0: in the worker, no limit (default 3600)")
    lb.add_argument("--no-progress", action="store_true")
    lb.set_defaults(func=_cmd_label)

    o = sub.add_parser("otf", help="on-the-fly training loop (MD with i-PI -> flag -> label -> refit -> heat up); "
                                   "run again to continue an interrupted run")
    o.add_argument("config", metavar="CONFIG.toml", help="loop configuration (docs/otf.md)")
    o.add_argument("--report", action="store_true", help="only (re)write the report of the run folder")
    o.add_argument("--no-progress", action="store_true")
    o.set_defaults(func=_cmd_otf)

    ln = sub.add_parser("learn", help="learn during production: label the flagged frames of running servers' queues "
                                      "and refit an on-the-fly run; the servers hot-reload each published version")
    ln.add_argument("run_dir", metavar="RUN_DIR", help="an on-the-fly run folder (sp-server otf); serve its model.h5")
    ln.add_argument("--queue", metavar="DB", action="append", required=True,
                    help="a flag queue (SQLite file or postgresql:// URL) that servers write (serve/lammps --queue); "
                         "repeat for several")
    ln.add_argument("--config", metavar="CONFIG.toml", help="configuration (oracle, fit, label workers) instead of "
                                                            "RUN_DIR/config.toml")
    ln.add_argument("--max-atoms", type=int, default=135,
                    help="larger frames are carved into periodic sub-cells around the atom of largest Bayesian "
                         "force error (default 135: 3x3x3 perovskite cells)")
    ln.add_argument("--dedup-displacement", type=float, default=0.03, metavar="A",
                    help="a frame within this of a known one (every atom, after a lattice translation) is a "
                         "duplicate (default 0.03 A)")
    ln.add_argument("--dedup-strain", type=float, default=0.005, help="... and every strain component within this")
    ln.add_argument("--labels-per-hour", type=float, help="budget: frames sent to labelling per hour")
    ln.add_argument("--labels-total", type=int, help="budget: frames sent to labelling in all")
    ln.add_argument("--batch", type=int, default=40, help="frames pulled per cycle at most (default 40)")
    ln.add_argument("--min-labels", type=int, default=10,
                    help="refit once this many new labels are in, or when the queues ran dry (default 10)")
    ln.add_argument("--poll", type=float, default=30.0, metavar="S", help="seconds between looks at idle queues")
    ln.add_argument("--timestep-fs", type=float, action="append",
                    help="the engines' MD time step in fs, for the flag rate per ps: once for all queues or once per "
                         "--queue, in the same order (default 2)")
    ln.add_argument("--accept-tolerance", type=float, default=0.05,
                    help="publish a candidate whose validation energy and force RMSE are at most this much "
                         "(relative) above the current model's (default 0.05)")
    ln.add_argument("--validation-every", type=int, default=8,
                    help="every n-th frame is kept for validation, never trained on (default 8; 0: none)")
    ln.add_argument("--workers", type=int, help="labelling workers (mpiexec; default: the run's [label] workers)")
    ln.add_argument("--refit-prior", action="store_true",
                    help="re-select the terms and re-optimise the prior and noise widths at every refit (default: "
                         "keep those of the model the session started from, RUN_DIR/learn_prior.h5, so that no "
                         "frame's Bayesian error grows from one version to the next)")
    ln.add_argument("--gate-steps", type=int, default=500, metavar="FS",
                    help="production gate: a candidate is published only if NPT MD of it from each queue's latest "
                         "frame stays in the trusted range for this many fs (default 500; 0: no gate)")
    ln.add_argument("--gate-temperature", type=float, metavar="K",
                    help="the gate's temperature (default 1.5 x the highest temperature of the run's [loop])")
    ln.add_argument("--escape-labels", type=int, default=8, metavar="N",
                    help="per refit, label at most N states on the way out of the hot MDs that left the trusted "
                         "range (the boundedness check's, the gate's) as training frames (default 8; 0: none)")
    ln.add_argument("--kept-cuts", action="store_true",
                    help="start each refit's constrained fit from the run's kept constraints (bound_cuts.npz) too "
                         "(default: from its probes alone, so that a hole the check finds again is labelled)")
    ln.add_argument("--max-cycles", type=int, help="stop after this many cycles (default: run until SIGTERM)")
    ln.add_argument("--idle-exit", type=float, metavar="S",
                    help="stop after S seconds without a new frame or label (e.g. when the production runs ended)")
    ln.add_argument("--no-progress", action="store_true")
    ln.set_defaults(func=_cmd_learn)

    v = sub.add_parser("validate", help="validation report, model and oracle side by side: the paper's tables and "
                                        "figures (ground state, metastable phases, phonons, thermal transport, "
                                        "phase transitions, double well, held-out accuracy)")
    v.add_argument("model", metavar="MODEL")
    _add_oracle_arguments(v, required=False)
    v.add_argument("-o", "--output", metavar="DIR", default="validation")
    v.add_argument("--items", nargs="+", default=list(VALIDATION_ITEMS), choices=VALIDATION_ITEMS, metavar="ITEM",
                   help="any of: ground_state (Table 1), metastable (Table 2, Fig. 3), phonons (Fig. 4), transport "
                        "(Fig. 5), transitions (Fig. 6), double_well (Fig. 7), accuracy (held-out RMSE); default all")
    v.add_argument("--full", action="store_true",
                   help="publication settings (hours): tighter relaxations, denser meshes, a 16^3 MD ladder every "
                        "25 K, 100 held-out frames; default: quick settings (minutes on 2 cores)")
    v.add_argument("--phases", nargs="+", choices=["R", "O", "T"],
                   help="phases relaxed for ground_state and phonons (default R; --full: R O T)")
    v.add_argument("--holdout", metavar="FILE", action="append",
                   help="labelled held-out frames for accuracy (extxyz, ase.db, ...), one set per file; repeatable. "
                        "Default: fresh 300 K MD frames on 2^3 and 4^3 cells labelled by the oracle")
    v.add_argument("--holdout-select", metavar="SELECTION",
                   help="ase.db selection of the held-out frames, e.g. origin=holdout (an on-the-fly run's store.db)")
    v.add_argument("--holdout-md", type=int, nargs="*", metavar="N",
                   help="fresh held-out sets: 300 K NPT MD of the model on these N^3 cells, frames labelled by the "
                        "oracle (default: 2 4 without --holdout, none with it; --holdout-md alone: none)")
    v.add_argument("--md-supercell", type=int, metavar="N", help="transitions: N x N x N supercell (default 12)")
    v.add_argument("--temperatures", type=float, nargs="+", metavar="K",
                   help="transitions: temperatures in heating order, K (default 50 100 ... 400)")
    v.add_argument("--md-steps", type=int, metavar="STEPS", help="transitions: MD steps per temperature (default 300)")
    v.add_argument("--pressure", type=float, metavar="GPA", help="transitions: NPT pressure, GPa (default 0)")
    v.add_argument("--no-cooling", action="store_true", help="transitions: heating only")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.set_defaults(func=_cmd_validate)

    i = sub.add_parser("info", help="print a model's summary and its anharmonic terms")
    i.add_argument("model", metavar="MODEL")
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser("toy", help="write the analytic toy ABO3 perovskite model (for tests and demos)")
    t.add_argument("-o", "--output", metavar="MODEL", required=True)
    t.add_argument("--a", type=float, default=4.0, help="cubic lattice constant, Angstrom (default 4.0)")
    t.add_argument("--no-dipole", action="store_true", help="leave out the dipole-dipole part")
    t.set_defaults(func=_cmd_toy)

    d = sub.add_parser("demo", help="quick-start demonstration: a BaTiO3 model built on the fly with CHGNet "
                                    "(--toy: the toy perovskite, relaxed and evaluated, no oracle)")
    d.add_argument("-o", "--output", metavar="DIR", default="demo_output")
    d.add_argument("--toy", action="store_true", help="the toy-model demonstration (seconds)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)
    return p


def _written_path(exc) -> str:
    """The file a failed write was writing: the OSError's filename, HDF5's message's, else (a plain write(),
    SQLite) the database or open file found in the frames the error went through, innermost first."""
    import io
    import re
    for name in (getattr(exc, "filename", None), getattr(exc, "filename2", None)):
        if name is not None:
            return str(name)
    m = re.search(r"filename = '([^']+)'", str(exc))  # HDF5
    if m:
        return m.group(1)
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            module = type(value).__module__ or ""
            if module.startswith("ase.db") and isinstance(getattr(value, "filename", None), str):
                return value.filename  # an ase.db SQLite database
            if type(value).__name__ == "Store" and isinstance(getattr(value, "url", None), str):
                return value.url
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    return "(a file of the run)"


def _disk_fault_message(exc):
    """One line for a write that a full, over-quota, read-only or not-writable disk refused (``exc`` or an error
    it was raised from), else None."""
    import errno
    import os
    import sqlite3
    from ..io.jsonfile import DISK_ERRNOS, error_errno
    kinds = {errno.ENOSPC: "disk full", getattr(errno, "EDQUOT", -1): "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "no permission to write",
             errno.EFBIG: "file size limit reached"}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = reason = kind = None
        if isinstance(exc, sqlite3.OperationalError):
            if "database or disk is full" in str(exc):
                code, reason, kind = errno.ENOSPC, str(exc), "disk full"
            elif "readonly database" in str(exc):
                code, reason, kind = errno.EROFS, str(exc), "read-only file system or database file"
        elif isinstance(exc, (OSError, RuntimeError)):
            code = error_errno(exc)
            if code in DISK_ERRNOS:
                reason, kind = os.strerror(code), kinds[code]
        if code in DISK_ERRNOS:
            again = ("make it writable and run the same command again" if code in (errno.EROFS, errno.EACCES)
                     else "free space and run the same command again")
            return f"cannot write {_written_path(exc)}: {reason} ({kind}); nothing was half-written; {again}"
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # ModelFileError, MappingError are ValueErrors
        print(f"sp-server {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full / read-only disk: one line naming the file, no traceback
        message = _disk_fault_message(exc)
        if message is None:
            raise
        print(f"sp-server {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
