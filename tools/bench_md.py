#!/usr/bin/env python
"""MD steps per second: direct evaluation vs through i-PI (sp-server serve) vs the LAMMPS bridge (sp-server lammps),
toy perovskite model, supercells n^3.  The engines' overhead is the share of the step time not spent evaluating.

    python tools/bench_md.py [--sizes 2 4 8 12 16] [--steps 40]

Each engine runs twice (steps/4 and steps) so that start-up cancels: time per step = (t_long - t_short) / (3 steps/4).
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
import numpy as np

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


def ipi_run(work: Path, steps: int) -> float:
    name = f"bm{uuid.uuid4().hex[:8]}"
    text = (ROOT / "ipi_inputs" / "nvt" / "input.xml").read_text()
    text = re.sub(r"<address>[^<]*</address>", f"<address>{name}</address>", text)
    text = re.sub(r"<total_steps>\d+</total_steps>", f"<total_steps>{steps}</total_steps>", text)
    text = re.sub(r"stride='\d+'", "stride='1000000'", text)
    (work / "input.xml").write_text(text)
    t0 = time.perf_counter()
    ipi = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=work, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    subprocess.run([str(BIN / "sp-server"), "serve", str(MODEL), "--address", name, "--unix"], check=True,
                   capture_output=True)
    ipi.wait()
    return time.perf_counter() - t0


def lammps_run(work: Path, steps: int) -> float:
    deck = work / "in.nvt"
    deck.write_text((ROOT / "lammps_inputs" / "nvt" / "in.nvt").read_text().replace("thermo 10", "thermo 1000000"))
    out = subprocess.run([str(BIN / "sp-server"), "lammps", str(deck), "--model", str(MODEL), "--var", "steps",
                          str(steps)], check=True, capture_output=True, text=True)
    log = (work / "log.lammps").read_text()
    return float(re.search(r"Loop time of ([0-9.eE+-]+)", log).group(1)) if out else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    model = load_model(MODEL)
    print(f"# sp_server bench_md: toy perovskite (7 coefficients, dipole-dipole), NVT; command: python "
          f"tools/bench_md.py {' '.join(argv or sys.argv[1:])}")
    print(f"{'cells':>7} {'atoms':>7} {'direct ms':>10} {'i-PI ms/step':>13} {'i-PI overhead':>14} "
          f"{'LAMMPS ms/step':>15} {'LAMMPS overhead':>16}")
    for n in args.sizes:
        atoms = model.supercell((n, n, n))
        t_dir = direct(model, atoms)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            ase.io.write(work / "init.extxyz", atoms)
            ase.io.write(work / "toy_222.data", atoms, format="lammps-data", masses=True,
                         specorder=["Ba", "Ti", "O"], atom_style="atomic")
            short, long = max(1, args.steps // 4), args.steps
            t_ipi = (ipi_run(work, long) - ipi_run(work, short)) / (long - short)
            t_lmp = (lammps_run(work, long) - lammps_run(work, short)) / (long - short)
        print(f"{n}^3".rjust(7) + f" {len(atoms):7d} {1e3 * t_dir:10.2f} {1e3 * t_ipi:13.2f} "
              f"{max(0.0, 1 - t_dir / t_ipi):14.0%} {1e3 * t_lmp:15.2f} {max(0.0, 1 - t_dir / t_lmp):16.0%}",
              flush=True)


if __name__ == "__main__":
    main()
