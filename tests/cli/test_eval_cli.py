"""`sp-server eval MODEL STRUCTURES -o OUT.extxyz`: the stable batch interface, run as users run it."""
import subprocess
import sys

import ase.db
import ase.io
import numpy as np
import pytest

from sp_server import SecondPrinciplesCalculator
from sp_server.model import save_model
from tests.conftest import displaced


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sp_server.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, toy):
    return save_model(toy, tmp_path_factory.mktemp("m") / "toy.h5")


def frames(toy, n=3):
    return [displaced(toy, mesh, seed=k) for k, mesh in zip(range(n), [(1, 1, 1), (2, 2, 2), (2, 1, 3)])]


def reference_results(toy, atoms):
    a = atoms.copy()
    a.calc = SecondPrinciplesCalculator(toy)
    return a.get_potential_energy(), a.get_forces(), a.get_stress()


@pytest.mark.parametrize("fmt", ["extxyz", "db", "vasp"])
def test_eval_writes_energy_forces_stress(tmp_path, toy, model_file, fmt):
    structs = frames(toy, 1 if fmt == "vasp" else 3)
    src = tmp_path / {"extxyz": "in.extxyz", "db": "in.db", "vasp": "POSCAR"}[fmt]
    if fmt == "db":
        with ase.db.connect(src) as db:
            for a in structs:
                db.write(a)
    else:
        ase.io.write(src, structs if fmt == "extxyz" else structs[0], format=fmt)
    out = tmp_path / "out.extxyz"
    proc = run_cli("eval", model_file, src, "-o", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    got = ase.io.read(out, ":")
    assert len(got) == len(structs)
    inputs = ase.io.read(src, ":")  # the file's own (rounded) positions are the reference
    for a, g in zip(inputs, got):
        e, f, s = reference_results(toy, a)
        assert g.get_potential_energy() == pytest.approx(e, rel=1e-9)
        assert np.allclose(g.get_forces(), f, atol=1e-7)
        assert np.allclose(g.get_stress(), s, atol=1e-9)
        assert g.info["sp_model"] == "toy-perovskite"


def test_bad_frame_is_reported_and_the_rest_written(tmp_path, toy, model_file):
    structs = frames(toy, 3)
    bad = structs[1].copy()
    del bad[[0, 1]]  # wrong atom count for any supercell
    src = tmp_path / "in.extxyz"
    ase.io.write(src, [structs[0], bad, structs[2]])
    out = tmp_path / "out.extxyz"
    proc = run_cli("eval", model_file, src, "-o", out, "--no-progress")
    assert proc.returncode == 1
    assert f"{src}: frame 1" in proc.stderr and "not a multiple" in proc.stderr
    got = ase.io.read(out, ":")
    assert [g.info["sp_frame"] for g in got] == [0, 2]
    assert "2 structure(s) evaluated, 1 failed" in proc.stdout


def test_missing_and_malformed_inputs(tmp_path, model_file):
    proc = run_cli("eval", tmp_path / "nope.h5", tmp_path / "x.extxyz", "-o", tmp_path / "o.extxyz")
    assert proc.returncode == 2 and "no such model file" in proc.stderr
    proc = run_cli("eval", model_file, tmp_path / "absent.extxyz", "-o", tmp_path / "o.extxyz")
    assert proc.returncode == 2 and "no such structure file" in proc.stderr
    junk = tmp_path / "junk.extxyz"
    junk.write_text("3\nnot an extxyz comment line\nXx 0 0\n")
    proc = run_cli("eval", model_file, junk, "-o", tmp_path / "o.extxyz", "--no-progress")
    assert proc.returncode == 1 and f"{junk}: frame 0" in proc.stderr


def test_info_and_toy(tmp_path):
    path = tmp_path / "t.h5"
    assert run_cli("toy", "-o", path).returncode == 0
    proc = run_cli("info", path)
    assert proc.returncode == 0 and "(Ti_x-O_x)^4" in proc.stdout and "dipole-dipole: yes" in proc.stdout


REF = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "reference" / "multibinit" / "BaHfO3"


@pytest.mark.skipif(not REF.exists(), reason="shared reference data not present")
def test_import_and_export(tmp_path):
    """`sp-server import --ddb DDB [--coefficients X] -o MODEL` and `sp-server export MODEL -o PREFIX`."""
    harm = tmp_path / "harm.h5"
    proc = run_cli("import", "--ddb", REF / "BaHfO3_DDB", "-o", harm)
    assert proc.returncode == 0, proc.stderr
    assert "0 anharmonic coefficient(s); dipole-dipole on" in proc.stdout
    full = tmp_path / "full.h5"
    proc = run_cli("import", "--ddb", REF / "BaHfO3_DDB", "--coefficients", REF / "BaHfO3.xml", "-o", full)
    assert proc.returncode == 0 and "99 anharmonic coefficient(s)" in proc.stdout
    proc = run_cli("import", "--ddb", REF / "BaHfO3_DDB", "--no-dipdip", "-o", tmp_path / "nodd.h5")
    assert proc.returncode == 0 and "dipole-dipole off" in proc.stdout
    proc = run_cli("export", full, "-o", tmp_path / "again")
    assert proc.returncode == 0
    proc = run_cli("import", "--system", tmp_path / "again_sys.xml", "--coefficients", tmp_path / "again_coeffs.xml",
                   "-o", tmp_path / "again.h5")
    assert proc.returncode == 0, proc.stderr
    from sp_server.model import load_model
    a, b = load_model(full), load_model(tmp_path / "again.h5")
    assert np.allclose(a.anharmonic.values, b.anharmonic.values, rtol=1e-12)
    assert np.allclose(a.harmonic.elastic, b.harmonic.elastic, rtol=1e-12)
    proc = run_cli("import", "-o", tmp_path / "x.h5")
    assert proc.returncode == 2 and "--ddb" in proc.stderr
    bad = tmp_path / "bad_DDB"
    bad.write_text((REF / "BaHfO3_DDB").read_text()[:5000])
    proc = run_cli("import", "--ddb", bad, "-o", tmp_path / "y.h5")
    assert proc.returncode == 2 and "bad_DDB" in proc.stderr
