#!/usr/bin/env python
"""MD step cost: direct evaluation vs through i-PI (sp-server serve) vs the LAMMPS bridge (sp-server lammps),
toy perovskite model, supercells n^3.  The engines' overhead is the share of the step time not spent evaluating.

    python tools/bench_md.py [--sizes 2 4 8 12 16] [--steps 100]

i-PI: the server logs the time between consecutive POSDATA messages (the engine's step) and its own evaluation
time; LAMMPS: its "Loop time" per step and the bridge's evaluation time.  Start-up never enters the figures.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ase.io

from sp_server.model import load_model
from sp_server.potential import Evaluator

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "toy_perovskite.h5"
BIN = Path(sys.executable).parent


def direct(model, atoms, repeat=10):
    ev = Evaluator(model)
    ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
    t0 = time.perf_counter()
    for _ in range(repeat):
        ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
    return (time.perf_counter() - t0) / repeat


def ipi_run(work: Path, steps: int) -> tuple[float, float]:
    name = f"bm{uuid.uuid4().hex[:8]}"
    text = (ROOT / "ipi_inputs" / "nvt" / "input.xml").read_text()
    text = re.sub(r"<address>[^<]*</address>", f"<address>{name}</address>", text)
    text = re.sub(r"<total_steps>\d+</total_steps>", f"<total_steps>{steps}</total_steps>", text)
    text = re.sub(r"stride='\d+'", "stride='1000000'", text)
    (work / "input.xml").write_text(text)
    ipi = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=work, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    out = subprocess.run([str(BIN / "sp-server"), "serve", str(MODEL), "--address", name, "--unix"], check=True,
                         capture_output=True, text=True)
    ipi.wait()
    m = re.search(r"timing: ([0-9.]+) ms per MD step, ([0-9.]+) ms evaluating", out.stderr)
    return float(m.group(1)) / 1e3, float(m.group(2)) / 1e3


def lammps_run(work: Path, steps: int) -> tuple[float, float]:
    deck = work / "in.nvt"
    deck.write_text((ROOT / "lammps_inputs" / "nvt" / "in.nvt").read_text().replace("thermo 10", "thermo 1000000"))
    out = subprocess.run([str(BIN / "sp-server"), "lammps", str(deck), "--model", str(MODEL), "--var", "steps",
                          str(steps)], check=True, capture_output=True, text=True)
    log = (work / "log.lammps").read_text()
    loop = float(re.search(r"Loop time of ([0-9.eE+-]+)", log).group(1)) / steps
    each = float(re.search(r"force evaluations, ([0-9.]+) ms each", out.stderr).group(1)) / 1e3
    return loop, each


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    model = load_model(MODEL)
    print(f"# sp_server bench_md: toy perovskite (7 coefficients, dipole-dipole), NVT; command: python "
          f"tools/bench_md.py {' '.join(argv or sys.argv[1:])}")
    print(f"{'cells':>7} {'atoms':>7} {'direct ms':>10} {'i-PI ms/step':>13} {'engine+socket':>14} "
          f"{'LAMMPS ms/step':>15} {'engine':>8}")
    for n in args.sizes:
        atoms = model.supercell((n, n, n))
        t_dir = direct(model, atoms)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            ase.io.write(work / "init.extxyz", atoms)
            ase.io.write(work / "toy_222.data", atoms, format="lammps-data", masses=True,
                         specorder=["Ba", "Ti", "O"], atom_style="atomic")
            ipi_step, ipi_eval = ipi_run(work, args.steps)
            lmp_step, lmp_eval = lammps_run(work, args.steps)
        print(f"{n}^3".rjust(7) + f" {len(atoms):7d} {1e3 * t_dir:10.2f} {1e3 * ipi_step:13.2f} "
              f"{1 - ipi_eval / ipi_step:14.0%} {1e3 * lmp_step:15.2f} {1 - lmp_eval / lmp_step:8.0%}", flush=True)


if __name__ == "__main__":
    main()
