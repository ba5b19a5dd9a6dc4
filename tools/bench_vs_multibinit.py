#!/usr/bin/env python
"""One MD step's force evaluation: sp_server vs multibinit 9.6.2 (and pymultibinit if it works), same machine,
same run, on the public BaHfO3 model (DDB + 99 coefficients), supercells 6^3, 8^3, 12^3, 16^3.

multibinit's cost per step is measured from two isokinetic MD runs of different lengths (the difference removes
its set-up); ours is the median time of Evaluator.evaluate (energy, forces, stress, engine frame in/out) on a
frame multibinit wrote.  Prints a table with the ratio and the command that made it.

    python tools/bench_vs_multibinit.py [--sizes 6 8 12 16] [--threads 1] [--steps 20]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from sp_server.io.multibinit import import_multibinit, read_hist
from sp_server.potential import Evaluator

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
    args = ap.parse_args(argv)
    numba.set_num_threads(args.threads)
    if shutil.which("multibinit") is None:
        sys.exit("multibinit not found (apt-get install abinit)")
    work = Path(tempfile.mkdtemp(prefix="bench_mb_"))
    for f in REF.iterdir():
        shutil.copy(f, work / f.name)
    multibinit_run(work, 2, 1, prt_model=2)
    model = import_multibinit(system=work / "b2_1_sys.xml", coefficients=work / "BaHfO3.xml")
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
          f"threads {args.threads}; multibinit OMP_NUM_THREADS=1; pymultibinit: {pymb}")
    print(f"# command: python tools/bench_vs_multibinit.py {' '.join(argv or sys.argv[1:])}")
    print(f"{'cells':>7} {'atoms':>7} {'multibinit ms/step':>19} {'sp_server ms/step':>18} {'ratio':>7}"
          + ("  pymultibinit ms" if pymb_calc else ""))
    for n in args.sizes:
        short = multibinit_run(work, n, 2)
        long = multibinit_run(work, n, args.steps)
        mb = (long - short) / (args.steps - 2)
        frames = read_hist(work / f"b{n}_{args.steps}.abo_HIST.nc")
        a = frames[-1]
        ev.evaluate(a.cell.array, a.positions, a.numbers)  # set-up of this supercell (Ewald, tables)
        ts = []
        for k in range(args.repeat):
            b = frames[-1 - k % len(frames)]
            t0 = time.perf_counter()
            ev.evaluate(b.cell.array, b.positions, b.numbers)
            ts.append(time.perf_counter() - t0)
        ours = float(np.median(ts))
        row = f"{n}^3".rjust(7) + f" {5 * n ** 3:7d} {1e3 * mb:19.1f} {1e3 * ours:18.2f} {mb / ours:7.1f}"
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
