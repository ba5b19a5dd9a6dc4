"""`sp-server fit TRAINING --harmonic MODEL --terms TERMS [--select N] -o OUT` end to end."""
import ase.io
import numpy as np

from sp_server.io.multibinit import write_coefficients_xml
from sp_server.model import AnharmonicPart, Model, load_model, save_model
from tests.cli.test_eval_cli import run_cli
from tests.fit.test_bayes import noisy_data


def test_fit_from_xml_pool_with_selection(tmp_path, toy):
    base = Model(toy.reference, toy.harmonic, AnharmonicPart(), name="toy-harmonic")
    save_model(base, tmp_path / "harm.h5")
    write_coefficients_xml(toy.anharmonic, tmp_path / "pool.xml")
    data = noisy_data(toy, 15, seed=8)
    ase.io.write(tmp_path / "train.extxyz", [a for _, a in data])
    proc = run_cli("fit", tmp_path / "train.extxyz", "--harmonic", tmp_path / "harm.h5", "--terms",
                   tmp_path / "pool.xml", "--select", "5", "-o", tmp_path / "fit.h5", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fitted 5 coefficients on 15 structures" in proc.stdout
    model = load_model(tmp_path / "fit.h5")
    assert model.metadata["ready"] and model.posterior is not None
    # the 5 selected terms, then the bounding terms the constrained fit always carries (non-negative, zero variance)
    names = {c.name for c in toy.anharmonic.coefficients}
    assert {c.name for c in model.anharmonic.coefficients[:5]} <= names
    assert all(c.name.startswith("bound ") for c in model.anharmonic.coefficients[5:])
    assert len(model.anharmonic) > 5 and np.all(model.anharmonic.values[5:] >= 0)
    assert np.all(np.diag(model.posterior.covariance)[5:] == 0.0)
    # bad training file: reported by name, the command still fits on the rest
    frames = [a for _, a in data]
    broken = frames[3].copy()
    del broken[0]
    ase.io.write(tmp_path / "train2.extxyz", frames[:3] + [broken] + frames[4:])
    proc = run_cli("fit", tmp_path / "train2.extxyz", "--harmonic", tmp_path / "harm.h5", "--terms",
                   tmp_path / "pool.xml", "-o", tmp_path / "fit2.h5", "--no-progress", "--no-bound")
    assert proc.returncode == 3  # written, but not marked ready without the boundedness check
    assert "train2.extxyz: frame 3" in proc.stdout + proc.stderr
    assert not load_model(tmp_path / "fit2.h5").metadata["ready"]
    assert np.isfinite(load_model(tmp_path / "fit2.h5").anharmonic.values).all()


def test_harmonic_then_fit_with_generated_terms(tmp_path):
    """`sp-server harmonic` with EMT, then `sp-server fit ... --terms generate` on EMT-labelled frames."""
    from ase import Atoms

    from tests.fit.test_fit_real_oracle import labelled
    cell = Atoms("AuCu3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=np.eye(3) * 3.8, pbc=True)
    ase.io.write(tmp_path / "Cu3Au.vasp", cell, format="vasp")
    proc = run_cli("harmonic", tmp_path / "Cu3Au.vasp", "--oracle", "emt", "-o", tmp_path / "harm.h5",
                   "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no Born charges" in proc.stdout + proc.stderr
    harm = load_model(tmp_path / "harm.h5")
    ase.io.write(tmp_path / "train.extxyz", [a for _, a in labelled(harm, 25, seed=4, amp=0.05)])
    proc = run_cli("fit", tmp_path / "train.extxyz", "--harmonic", tmp_path / "harm.h5", "--terms", "generate",
                   "--cutoff", "2.8", "--orders", "3", "4", "--max-bodies", "2", "--select", "20",
                   "-o", tmp_path / "fit.h5", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "symmetry-adapted candidate coefficients" in proc.stdout
    assert "fitted 20 coefficients on 25 structures" in proc.stdout
    assert load_model(tmp_path / "fit.h5").metadata["ready"]
    # --sp-pairs: u^3 eta on top of the default strain-phonon terms (more candidates); a malformed pair is a usage
    # error
    import re
    counts = []
    for extra in ([], ["--sp-pairs", "3:1"]):
        proc = run_cli("fit", tmp_path / "train.extxyz", "--harmonic", tmp_path / "harm.h5", "--terms", "generate",
                       "--cutoff", "2.8", "--orders", "3", "--select", "10", "--no-bound", *extra,
                       "-o", tmp_path / "fit_sp.h5", "--no-progress")
        assert proc.returncode == 3, proc.stdout + proc.stderr     # written, not marked ready without the check
        counts.append(int(re.search(r"generated (\d+) symmetry-adapted", proc.stdout).group(1)))
    assert counts[1] > counts[0], counts
    proc = run_cli("fit", tmp_path / "train.extxyz", "--harmonic", tmp_path / "harm.h5", "--terms", "generate",
                   "--sp-pairs", "4", "-o", tmp_path / "x.h5", "--no-progress")
    assert proc.returncode == 2 and "--sp-pairs: '4' is not N:Q" in proc.stderr, proc.stderr
    proc = run_cli("harmonic", tmp_path / "Cu3Au.vasp", "--oracle", "nosuch", "-o", tmp_path / "x.h5")
    assert proc.returncode == 2 and "unknown oracle 'nosuch'" in proc.stderr


def test_harmonic_with_born_charges_from_a_ddb(tmp_path):
    """--born takes the Born charges and eps_inf of an ABINIT DDB (here BaHfO3's, on the toy BaTiO3-like oracle)."""
    from tests.cli.test_eval_cli import REF
    if not REF.exists():
        import pytest
        pytest.skip("shared reference data not present")
    from sp_server.model.toy import toy_perovskite
    toy = toy_perovskite(dipole=False)
    save_model(toy, tmp_path / "teacher.h5")
    ase.io.write(tmp_path / "cell.vasp", toy.supercell((1, 1, 1)), format="vasp")
    (tmp_path / "teacher_oracle.py").write_text(
        "from sp_server import SecondPrinciplesCalculator\n"
        f"def make():\n    return SecondPrinciplesCalculator({str(tmp_path / 'teacher.h5')!r})\n")
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "harmonic", str(tmp_path / "cell.vasp"),
                           "--oracle", "teacher_oracle:make", "--born", str(REF / "BaHfO3_DDB"), "--no-relax",
                           "-o", str(tmp_path / "h.h5"), "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    h = load_model(tmp_path / "h.h5").harmonic
    assert h.has_dipole and abs(h.born_charges[1, 0, 0] - 5.816) < 0.01 and abs(h.epsilon_inf[0, 0] - 4.68) < 0.01
