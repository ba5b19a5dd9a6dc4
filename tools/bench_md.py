#!/usr/bin/env python
"""MD step cost: direct evaluation vs through i-PI (sp-server serve) vs the LAMMPS bridge (sp-server lammps),
supercells n^3, the toy perovskite model or any model file.  The engines' overhead is the share of the step time
not spent evaluating.  With a model with a posterior, --error-stride N is the servers' (sp-server serve / lammps):
all Bayesian errors every N-th frame and those of the energy pass on the others (0: none, the default); their share
of the step is given on its own.

    python tools/bench_md.py [--sizes 2 4 8 12 16] [--steps 100] [--model MODEL.h5 [--error-stride N]] [--threads N]

i-PI: the server logs the time between consecutive POSDATA messages (the engine's step), its own evaluation time
and that of the Bayesian errors; LAMMPS: its "Loop time" per step and the bridge's evaluation and error times.
Start-up never enters the figures.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ase.io
import numba

from sp_server.model import load_model
from sp_server.potential import Evaluator
from sp_server.threads import engine_environment

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "toy_perovskite.h5"
BIN = Path(sys.executable).parent


def direct(model, atoms, repeat=10, error_stride=0):
    """Seconds per evaluation, with the errors a server with this error stride gives, averaged over the frames."""
    ev = Evaluator(model)
    ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, errors=error_stride > 0,
                local_errors=error_stride > 0)
    t0 = time.perf_counter()
    for k in range(repeat):
        ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers, errors=error_stride > 0 and k % error_stride == 0,
                    local_errors=error_stride > 0)
    return (time.perf_counter() - t0) / repeat


def ipi_run(work: Path, steps: int, model: Path, error_stride: int, env: dict, latency: float = None,
            ipi_env: dict = None) -> tuple[float, float, float]:
    """(step, evaluation, errors) seconds per MD step through i-PI (NVT, Langevin); ``latency``: the ffsocket's
    polling interval (s; i-PI's default 1e-4)."""
    name = f"bm{uuid.uuid4().hex[:8]}"
    text = (ROOT / "ipi_inputs" / "nvt" / "input.xml").read_text()
    text = re.sub(r"<address>[^<]*</address>", f"<address>{name}</address>", text)
    text = re.sub(r"<total_steps>\d+</total_steps>", f"<total_steps>{steps}</total_steps>", text)
    text = re.sub(r"stride='\d+'", "stride='1000000'", text)
    if latency is not None:
        text = re.sub(r"(<ffsocket[^>]*>)", rf"\1<latency>{latency}</latency>", text)
    (work / "input.xml").write_text(text)
    ipi = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=work, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=ipi_env)
    out = subprocess.run([str(BIN / "sp-server"), "serve", str(model), "--address", name, "--unix",
                          "--error-stride", str(error_stride)], check=True, capture_output=True,
                         text=True, env=env)
    ipi.wait()
    m = re.search(r"timing: ([0-9.]+) ms per MD step, ([0-9.]+) ms evaluating", out.stderr)
    e = re.search(r"timing: Bayesian errors .*?; ([0-9.]+) ms per MD step on average", out.stderr)
    return float(m.group(1)) / 1e3, float(m.group(2)) / 1e3, float(e.group(1)) / 1e3 if e else 0.0


def lammps_run(work: Path, steps: int, model: Path, error_stride: int, env: dict) -> tuple[float, float, float]:
    """(step, evaluation, errors) seconds per MD step of LAMMPS (NVT, Nose-Hoover) through the bridge; the bridge
    computes errors when it has a queue."""
    deck = work / "in.nvt"
    deck.write_text((ROOT / "lammps_inputs" / "nvt" / "in.nvt").read_text().replace("thermo 10", "thermo 1000000"))
    queue = ["--queue", str(work / "flagged.db"), "--error-stride", str(error_stride)] if error_stride else []
    out = subprocess.run([str(BIN / "sp-server"), "lammps", str(deck), "--model", str(model), "--var", "steps",
                          str(steps)] + queue, check=True, capture_output=True, text=True, env=env)
    log = (work / "log.lammps").read_text()
    loop = float(re.search(r"Loop time of ([0-9.eE+-]+)", log).group(1)) / steps
    each = float(re.search(r"force evaluations, ([0-9.]+) ms each", out.stderr).group(1)) / 1e3
    e = re.search(r"of which Bayesian errors ([0-9.]+) ms each", out.stderr)
    return loop, each, float(e.group(1)) / 1e3 if e else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--model", type=Path, default=MODEL, help="model file (default: the toy perovskite)")
    ap.add_argument("--error-stride", type=int, default=0, metavar="N",
                    help="all Bayesian errors every N-th frame, the energy pass's on the others; 0: none (default)")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads of the servers (default: all cores)")
    ap.add_argument("--ipi-latency", type=float, default=None,
                    help="i-PI's ffsocket polling interval, s (default: the deck's, i.e. i-PI's 1e-4)")
    ap.add_argument("--ipi-one-thread", action="store_true",
                    help="run i-PI with OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1 (its BLAS pool off the server's cores)")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    if args.error_stride and model.posterior is None:
        raise SystemExit(f"{args.model}: --error-stride needs a model with a posterior")
    env = dict(os.environ)
    if args.threads:
        env["NUMBA_NUM_THREADS"] = str(args.threads)
        numba.set_num_threads(args.threads)
    ipi_env = engine_environment() if args.ipi_one_thread else None
    print(f"# sp_server bench_md: {args.model.name} ({len(model.anharmonic)} coefficients), NVT, Bayesian errors "
          f"{'error stride ' + str(args.error_stride) if args.error_stride else 'off'}, numba threads {env.get('NUMBA_NUM_THREADS', 'all')}; "
          f"command: python tools/bench_md.py {' '.join(argv or sys.argv[1:])}")
    print(f"{'cells':>7} {'atoms':>7} {'direct ms':>10} {'i-PI ms/step':>13} {'errors':>7} {'engine+socket':>14} "
          f"{'LAMMPS ms/step':>15} {'errors':>7} {'engine':>8}")
    symbols = model.reference.symbols
    species = sorted(set(symbols), key=symbols.index)
    for n in args.sizes:
        atoms = model.supercell((n, n, n))
        t_dir = direct(model, atoms, error_stride=args.error_stride)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            ase.io.write(work / "init.extxyz", atoms)
            ase.io.write(work / "toy_222.data", atoms, format="lammps-data", masses=True, specorder=species,
                         atom_style="atomic")
            ipi_step, ipi_eval, ipi_err = ipi_run(work, args.steps, args.model, args.error_stride, env, args.ipi_latency,
                                                  ipi_env)
            lmp_step, lmp_eval, lmp_err = lammps_run(work, args.steps, args.model, args.error_stride, env)
        print(f"{n}^3".rjust(7) + f" {len(atoms):7d} {1e3 * t_dir:10.2f} {1e3 * ipi_step:13.2f} "
              f"{ipi_err / ipi_step:7.0%} {1 - ipi_eval / ipi_step:14.0%} {1e3 * lmp_step:15.2f} "
              f"{lmp_err / lmp_step:7.0%} {1 - lmp_eval / lmp_step:8.0%}", flush=True)


if __name__ == "__main__":
    main()
