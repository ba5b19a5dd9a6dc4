"""The ABINIT oracle against ABINIT 9.6.2 (Debian): symmetry, energy derivatives, failures, MPICH environment.

Cheap settings (ecut 15 Ha, 2x2x2 k-points, 2 ranks): far from converged for these pseudopotentials, enough for
conventions.  A wide cutoff smearing (ecutsm 2 Ha) makes the energy smooth in the strain at this low cutoff, so
that the analytic stress can be compared tightly with finite differences of the energy.
"""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from scipy.spatial.transform import Rotation

from sp_server.fit.harmonic import OracleError
from sp_server.oracles import make_oracle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(shutil.which("abinit") is None or not os.path.exists("/usr/bin/mpirun"),
                                 reason="needs ABINIT (`abinit` on PATH) and Open MPI's /usr/bin/mpirun "
                                        "(Debian/Ubuntu: apt-get install abinit)")]

OPTIONS = {"ecut_ha": 15.0, "ecutsm_ha": 2.0, "ngkpt": [2, 2, 2], "ranks": 2}


def perovskite(cell) -> Atoms:
    """BaTiO3: Ba at the origin, Ti at the centre, O at the face centres."""
    return Atoms("BaTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                 cell=cell, pbc=True)


def triclinic() -> Atoms:
    """A compressed triclinic cell with Ti off-centre: every stress component and force non-zero."""
    atoms = perovskite([[3.9, 0.0, 0.0], [0.2, 3.85, 0.0], [0.1, -0.15, 3.95]])
    atoms.positions[1] += [0.03, -0.02, 0.05]
    return atoms


def label(atoms: Atoms, calc) -> dict:
    a = atoms.copy()
    a.calc = calc
    return {"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("abinit_runs")


@pytest.fixture(scope="module")
def calc(runs):
    return make_oracle("abinit", dict(OPTIONS, workdir=str(runs)))


@pytest.fixture(scope="module")
def cubic(calc) -> dict:
    return label(perovskite(4.0 * np.eye(3)), calc)


@pytest.fixture(scope="module")
def tric(calc) -> dict:
    return label(triclinic(), calc)


def test_cubic_symmetry_and_displaced_ti(calc, cubic, runs):
    assert np.isfinite(cubic["energy"])
    assert np.abs(cubic["forces"]).max() < 1e-3
    s = cubic["stress"]
    assert np.allclose(s[:3], s[0], rtol=0, atol=1e-8) and np.abs(s[3:]).max() < 1e-8
    atoms = perovskite(4.0 * np.eye(3))
    atoms.positions[1, 2] += 0.05
    f = label(atoms, calc)["forces"]
    assert abs(f[1, 2]) > 1e-2 and np.abs(f[1, :2]).max() < 1e-3
    assert np.abs(f.sum(axis=0)).max() < 1e-6
    assert list(runs.iterdir()) == []          # successful run directories are removed


def test_stress_and_forces_are_energy_derivatives(calc, tric):
    atoms = triclinic()
    volume = atoms.get_volume()
    eps = 1e-3
    for voigt, (i, j) in ((2, (2, 2)), (5, (0, 1))):       # zz and xy (engineering shear)
        d = np.zeros((3, 3))
        d[i, j] += 0.5
        d[j, i] += 0.5
        energies = []
        for sign in (1, -1):
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps * d).T, scale_atoms=True)
            energies.append(label(strained, calc)["energy"])
        fd = (energies[0] - energies[1]) / (2 * eps * volume)
        assert abs(tric["stress"][voigt]) > 0.02
        assert tric["stress"][voigt] == pytest.approx(fd, abs=5e-4), f"stress component {voigt}"
    h = 0.0025
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[1, 0] += sign * h
        energies.append(label(moved, calc)["energy"])
    assert abs(tric["forces"][1, 0]) > 0.05
    assert tric["forces"][1, 0] == pytest.approx(-(energies[0] - energies[1]) / (2 * h), abs=5e-4)


def test_rotated_left_handed_cell_is_the_same_structure(calc, tric):
    atoms = triclinic()
    rot = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    turned = Atoms(atoms.numbers, positions=atoms.positions @ rot.T, cell=-(atoms.cell.array @ rot.T), pbc=True)
    assert np.linalg.det(turned.cell.array) < 0
    res = label(turned, calc)
    assert res["energy"] == pytest.approx(tric["energy"], abs=1e-6)
    assert np.allclose(res["forces"], tric["forces"] @ rot.T, atol=1e-5)
    sigma = tric["stress"]
    full = np.array([[sigma[0], sigma[5], sigma[4]], [sigma[5], sigma[1], sigma[3]], [sigma[4], sigma[3], sigma[2]]])
    turned_sigma = rot @ full @ rot.T
    assert np.allclose(res["stress"], turned_sigma[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]], atol=1e-6)


def test_failures_are_errors(tmp_path):
    atoms = perovskite(4.0 * np.eye(3))
    kept = tmp_path / "kept"
    with pytest.raises(OracleError, match=r"SCF not converged within nstep = 2 .*was not enough SCF cycles") as err:
        label(atoms, make_oracle("abinit", dict(OPTIONS, nstep=2, workdir=str(kept))))
    (run_dir,) = kept.iterdir()
    assert str(run_dir) in str(err.value) and (run_dir / "abinit.abo").is_file()
    removed = tmp_path / "removed"
    with pytest.raises(OracleError, match="run directory removed"):
        label(atoms, make_oracle("abinit", dict(OPTIONS, nstep=2, workdir=str(removed), keep_failed=False)))
    assert list(removed.iterdir()) == []
    with pytest.raises(OracleError, match=r"exit code \d+: .*occopt"):
        label(atoms, make_oracle("abinit", dict(OPTIONS, workdir=str(kept), extra={"occopt": 99})))

    partial = tmp_path / "psp"
    partial.mkdir()
    for element in ("Ba", "O"):
        (partial / f"{element}.psp8").symlink_to(f"/usr/share/abinit/psp/Pseudodojo_nc_sr_04_pw_standard_psp8/"
                                                 f"{element}.psp8")
    with pytest.raises(OracleError, match=f"no pseudopotential for Ti in {partial}"):
        label(atoms, make_oracle("abinit", dict(OPTIONS, pseudo_dir=str(partial))))
    with pytest.raises(ValueError, match="pseudopotential for Ti: .*Ti_missing.psp8 does not exist"):
        make_oracle("abinit", {"pseudos": {"Ti": "Ti_missing.psp8"}})
    with pytest.raises(OracleError, match="xc = 'PBEsol' but .*pspxc = -1012"):
        label(atoms, make_oracle("abinit", dict(OPTIONS, xc="PBEsol")))
    with pytest.raises(ValueError, match=r"\['ecut', 'natom'\]"):
        make_oracle("abinit", {"extra": {"natom": 5, "ecut": 10}})


def test_kpoint_grid_from_kspacing():
    from sp_server.oracles.abinit import kpoint_grid
    assert kpoint_grid(4.0 * np.eye(3), 0.3) == (6, 6, 6)
    assert kpoint_grid(8.0 * np.eye(3), 0.3) == (3, 3, 3)
    assert kpoint_grid(np.diag([4.0, 8.0, 40.0]), 0.8) == (2, 1, 1)


def test_runs_under_an_mpich_launch(monkeypatch, cubic, runs):
    from sp_server.oracles.abinit import child_environment
    fake = {"PMI_RANK": "0", "PMI_SIZE": "1", "PMI_FD": "9", "PMI_HOSTNAME": "node", "HYDI_CONTROL_FD": "7",
            "HYDRA_LAUNCHER": "fork", "MPIR_CVAR_CH4_NETMOD": "ofi", "MPICH_INTERFACE_HOSTNAME": "node",
            "MPI_LOCALNRANKS": "1", "MPI_LOCALRANKID": "0"}
    for key, value in fake.items():
        monkeypatch.setenv(key, value)
    env = child_environment()
    assert not set(fake) & set(env)
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    res = label(perovskite(4.0 * np.eye(3)), make_oracle("abinit", dict(OPTIONS, workdir=str(runs))))
    assert res["energy"] == pytest.approx(cubic["energy"], abs=1e-6)
