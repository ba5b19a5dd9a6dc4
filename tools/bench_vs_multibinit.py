#!/usr/bin/env python
"""One MD step's force evaluation: sp_server vs multibinit 9.6.2 (and pymultibinit if it works), same machine,
same run, on the public BaHfO3 model (DDB + 99 coefficients), supercells 6^3, 8^3, 12^3, 16^3.

multibinit's cost per step is measured from two isokinetic MD runs of different lengths (the difference removes
its set-up); ours is the median time of Evaluator.evaluate (energy, forces, stress, engine frame in/out) on a
frame multibinit wrote.  With --error-stride N, ours also gives the Bayesian errors as `sp-server serve` does: all of
them every N-th frame, those of the energy pass on the others (1: all on every frame).  The imported model has
no posterior, so it gets a stand-in one (diagonal, one variance per coefficient): the errors' cost depends on the
number of coefficients and terms, not on the covariance's values.  With --engines, the MD step is also timed
through real i-PI (NVT, `sp-server serve`, i-PI's BLAS on one thread) and through LAMMPS (`sp-server lammps`), and
the share of the step spent in i-PI itself is given.  Prints a table with the ratios and the command that made it.

    python tools/bench_vs_multibinit.py [--sizes 6 8 12 16] [--threads 1] [--steps 20] [--error-stride N] [--engines]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase.io
import numba
import numpy as np

from bench_md import ipi_run, lammps_run  # tools/ is this script's folder
from sp_server.io.multibinit import import_multibinit, read_hist
from sp_server.model.native import save_model
from sp_server.model.posterior import Posterior
from sp_server.potential import Evaluator
from sp_server.threads import engine_environment

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "multibinit" / "BaHfO3"


def multibinit_run(work: Path, n: int, ntime: int, prt_model: int = 0) -> float:
    inp = work / f"b{n}_{ntime}.in"
    inp.write_text(f"ncell = {n} {n} {n}\ndipdip = 1\nngqpt = 4 4 4\ndynamics = 12\nntime = {ntime}\n"
                   f"temperature = 300\ndtion = 40\nprt_model = {prt_model}\n")
    files = f"{inp.name}\n{inp.stem}.abo\nBaHfO3_DDB\nBaHfO3.xml\n"
    t0 = time.perf_counter()
    proc = subprocess.run(["multibinit"], input=files, text=True, capture_output=True, cwd=work,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"multibinit failed: {proc.stdout[-500:]}")
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[6, 8, 12, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="multibinit MD steps of the long run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--error-stride", type=int, default=0, metavar="N",
                    help="Bayesian errors (a stand-in posterior) as sp-server serve --error-stride N; 0: none")
    ap.add_argument("--engines", action="store_true", help="also through i-PI and LAMMPS")
    ap.add_argument("--engine-steps", type=int, default=40, help="MD steps of each engine run")
    args = ap.parse_args(argv)
    numba.set_num_threads(args.threads)
    if shutil.which("multibinit") is None:
        sys.exit("multibinit not found (apt-get install abinit)")
    work = Path(tempfile.mkdtemp(prefix="bench_mb_"))
    for f in REF.iterdir():
        shutil.copy(f, work / f.name)
    multibinit_run(work, 2, 1, prt_model=2)
    model = import_multibinit(system=work / "b2_1_sys.xml", coefficients=work / "BaHfO3.xml")
    if args.error_stride:
        nz = len(model.anharmonic)
        model.posterior = Posterior(np.diag(np.full(nz, 1e-6)), 1.0, 1.0,
                                    {"energy_per_atom": 1e-3, "force": 0.1, "stress_gpa": 0.1}, np.ones(nz), 0.0)
    model_path = save_model(model, work / "model.h5")
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads))
    ev = Evaluator(model)
    pymb_calc = {}
    try:
        from pymultibinit import MultibinitCalculator
        for n in args.sizes:
            pymb_calc[n] = MultibinitCalculator.from_params(ddb_file=str(work / "BaHfO3_DDB"),
                                                           sys_file=str(work / "BaHfO3.xml"), ncell=(n, n, n))
        pymb = "timed"
    except Exception as exc:  # informational: the package may install without its compiled library
        pymb = f"not timed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:90]})"
        pymb_calc = {}
    print(f"# sp_server vs multibinit 9.6.2, BaHfO3 (99 coefficients, 1142 terms, dipdip 1); sp_server numba "
          f"threads {args.threads}; multibinit OMP_NUM_THREADS=1; pymultibinit: {pymb}; Bayesian errors "
          f"{'with error stride ' + str(args.error_stride) + ' (stand-in posterior)' if args.error_stride else 'off'}")
    print(f"# command: python tools/bench_vs_multibinit.py {' '.join(argv or sys.argv[1:])}")
    print("# ms per step; ratio = multibinit / sp_server; i-PI share: the part of the i-PI step not spent evaluating")
    print(f"{'cells':>7} {'atoms':>7} {'multibinit ms/step':>19} {'sp_server ms/step':>18} {'ratio':>7}"
          + (f" {'i-PI ms/step':>13} {'ratio':>7} {'i-PI share':>10} {'LAMMPS ms/step':>15} {'ratio':>7}"
             if args.engines else "")
          + ("  pymultibinit ms" if pymb_calc else ""))
    for n in args.sizes:
        short = multibinit_run(work, n, 2)
        long = multibinit_run(work, n, args.steps)
        mb = (long - short) / (args.steps - 2)
        frames = read_hist(work / f"b{n}_{args.steps}.abo_HIST.nc")
        a = frames[-1]
        ev.evaluate(a.cell.array, a.positions, a.numbers, errors=bool(args.error_stride))  # set-up (Ewald, tables)
        ts = []
        for k in range(args.repeat):
            b = frames[-1 - k % len(frames)]
            t0 = time.perf_counter()
            ev.evaluate(b.cell.array, b.positions, b.numbers, errors=args.error_stride > 0 and k % args.error_stride == 0,
                        local_errors=args.error_stride > 0)
            ts.append(time.perf_counter() - t0)
        ours = float(np.median(ts))
        row = f"{n}^3".rjust(7) + f" {5 * n ** 3:7d} {1e3 * mb:19.1f} {1e3 * ours:18.2f} {mb / ours:7.1f}"
        if args.engines:
            with tempfile.TemporaryDirectory() as tmp:
                eng = Path(tmp)
                b = a.copy()
                b.calc = None
                ase.io.write(eng / "init.extxyz", b)
                symbols = model.reference.symbols
                ase.io.write(eng / "toy_222.data", b, format="lammps-data", masses=True, atom_style="atomic",
                             specorder=sorted(set(symbols), key=symbols.index))
                ipi_step, ipi_eval, _ = ipi_run(eng, args.engine_steps, model_path, args.error_stride, env,
                                                ipi_env=engine_environment())
                lmp_step, _, _ = lammps_run(eng, args.engine_steps, model_path, args.error_stride, env)
            row += (f" {1e3 * ipi_step:13.2f} {mb / ipi_step:7.1f} {1 - ipi_eval / ipi_step:10.0%}"
                    f" {1e3 * lmp_step:15.2f} {mb / lmp_step:7.1f}")
        if n in pymb_calc:
            b = a.copy()
            b.calc = pymb_calc[n]
            t0 = time.perf_counter()
            b.get_forces()
            row += f"  {1e3 * (time.perf_counter() - t0):15.1f}"
        print(row, flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
