"""`sp-server` command line entry point."""
from __future__ import annotations

import argparse
import sys


def _cmd_eval(args):
    from ..batch import evaluate_file
    from ..model.native import load_model
    model = load_model(args.model)
    report = evaluate_file(model, args.structures, args.output, progress=not args.no_progress)
    print(f"{report.evaluated} structure(s) evaluated, {report.failed} failed -> {args.output}")
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
    from ..demo import run_demo
    run_demo(args.output, progress=not args.no_progress)
    return 0


def _cmd_import(args):
    from ..io.multibinit import import_multibinit
    from ..model.native import save_model
    if args.ddb is None and args.system is None:
        raise ValueError("give --ddb DDB and/or --system SYSTEM.xml")
    model = import_multibinit(ddb=args.ddb, system=args.system, coefficients=args.coefficients,
                              dipdip=not args.no_dipdip)
    path = save_model(model, args.output)
    print(model.summary().splitlines()[0])
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sp-server", description="Second-principles lattice models: evaluate, serve, fit.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="evaluate every structure of a file; write extended XYZ (eV, eV/A, eV/A^3)")
    e.add_argument("model", metavar="MODEL", help="native model file (.h5)")
    e.add_argument("structures", metavar="STRUCTURES", help="any file ase.io reads (extxyz, POSCAR, ...) or an ase.db")
    e.add_argument("-o", "--output", metavar="OUT.extxyz", required=True)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    im = sub.add_parser("import", help="build a model from MULTIBINIT/ABINIT files (DDB, system XML, coefficients)")
    im.add_argument("--ddb", metavar="DDB", help="ABINIT derivative database (harmonic part by Fourier interpolation)")
    im.add_argument("--system", metavar="SYSTEM.xml", help="MULTIBINIT system XML (replaces the DDB)")
    im.add_argument("--coefficients", metavar="COEFFS.xml", help="MULTIBINIT coefficient XML (anharmonic part)")
    im.add_argument("--no-dipdip", action="store_true",
                    help="no dipole-dipole part (MULTIBINIT dipdip 0); default: on, as dipdip 1")
    im.add_argument("-o", "--output", metavar="MODEL", required=True)
    im.set_defaults(func=_cmd_import)

    ex = sub.add_parser("export", help="write a model as MULTIBINIT system + coefficient XML")
    ex.add_argument("model", metavar="MODEL")
    ex.add_argument("-o", "--output", metavar="PREFIX", required=True,
                    help="writes PREFIX_sys.xml and PREFIX_coeffs.xml")
    ex.set_defaults(func=_cmd_export)

    i = sub.add_parser("info", help="print a model's summary and its anharmonic terms")
    i.add_argument("model", metavar="MODEL")
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser("toy", help="write the analytic toy ABO3 perovskite model (for tests and demos)")
    t.add_argument("-o", "--output", metavar="MODEL", required=True)
    t.add_argument("--a", type=float, default=4.0, help="cubic lattice constant, Angstrom (default 4.0)")
    t.add_argument("--no-dipole", action="store_true", help="leave out the dipole-dipole part")
    t.set_defaults(func=_cmd_toy)

    d = sub.add_parser("demo", help="quick-start demonstration: build, evaluate and relax a model")
    d.add_argument("-o", "--output", metavar="DIR", default="demo_output")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # ModelFileError, MappingError are ValueErrors
        print(f"sp-server {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
