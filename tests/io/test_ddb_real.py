"""Real DDBs other than the BaHfO3 reference (issue 18): files that ABINIT's own tutorials produce, kept under
tests/data with their origin (tests/data/README.md)."""
from pathlib import Path

import numpy as np
import pytest

from sp_server.io.ddb import model_from_ddb, phonon_frequencies, read_ddb, unfold_qmesh

CATIO3_DDB = Path(__file__).resolve().parents[1] / "data" / "CaTiO3_Pnma_tmulti1_DDB.gz"


@pytest.fixture(scope="module")
def catio3_ddb(tmp_path_factory):
    import gzip
    path = tmp_path_factory.mktemp("catio3") / "tmulti1_DDB"
    path.write_bytes(gzip.decompress(CATIO3_DDB.read_bytes()))
    return path


@pytest.mark.timeout(120)
def test_real_pnma_ddb_of_abinits_multibinit_tutorial(catio3_ddb):
    """The 20-atom PAW CaTiO3 DDB of ABINIT's multibinit tutorial (tests/data/README.md): its DFPT noise (Born
    charge halves 4% apart, zone-boundary symmetry images 5% apart) is symmetrised and recorded instead of refused;
    the full force constants (--no-dipdip) reproduce the (symmetrised) Gamma-point phonons and keep the acoustic
    sum rule."""
    ddb = read_ddb(catio3_ddb)
    assert ddb.natoms == 20 and ddb.ngqpt == (2, 2, 2)
    fixes = {f["quantity"]: f for f in ddb.symmetrisation}
    assert 0.02 < fixes["Born charges (their two mixed halves)"]["relative"] < 0.06
    assert fixes["strain-strain tensor"]["relative"] < 1e-5
    model = model_from_ddb(catio3_ddb, dipdip=False)
    images = [f for f in model.metadata["symmetrisation"] if f["quantity"].startswith("dynamical matrices (symmetry")]
    assert len(images) == 1 and 0.02 < images[0]["relative"] < 0.1
    q, c = unfold_qmesh(read_ddb(catio3_ddb))
    gamma = c[0]
    c_model = model.harmonic.ifc.sum(axis=0)                       # C(Gamma) = sum_R Phi(R)
    w_ddb = np.sort(phonon_frequencies(gamma, ddb.masses))
    w_model = np.sort(phonon_frequencies(c_model, ddb.masses))
    assert np.abs(w_model[:3]).max() < 1.0                        # cm^-1: acoustic sum rule
    # the optical modes: the DDB's Gamma matrix up to its own sum-rule correction (asr 2, a few cm^-1)
    assert np.abs(w_model[3:] - w_ddb[3:]).max() < 0.02 * np.abs(w_ddb).max()


@pytest.mark.timeout(120)
def test_low_symmetry_born_charges_dipole_dipole_model_is_conservative_and_translation_invariant(catio3_ddb):
    """Pnma CaTiO3 with the dipole-dipole split (import used to refuse it): the Born charges are not symmetric, so
    the dipole-dipole row sums keep an antisymmetric rest (26 eV/A^2 here).  The short-range part carries minus
    that rest: forces are exact energy derivatives (finite differences), a rigid translation costs nothing and
    feels no force, and the Gamma-point optical phonons are the DDB's."""
    from sp_server.io.ddb import harmonic_dynamical_matrices
    from sp_server.kernels.ewald import dipole_sum_rule_rest
    from sp_server.potential import Evaluator
    model = model_from_ddb(catio3_ddb)
    h = model.harmonic
    assert h.has_dipole and h.conservative and h.asymmetry() < 1e-12
    rest = dipole_sum_rule_rest(model.reference.cell, model.reference.positions, h.born_charges, h.epsilon_inf)
    assert np.abs(rest).max() > 1.0                                           # eV/A^2: a real low-symmetry case
    assert h.asr_violation(-rest) < 1e-9 and h.asr_violation() > 1.0         # the short-range part carries it
    ev = Evaluator(model)
    atoms = model.supercell((2, 2, 1))
    atoms.positions += np.random.default_rng(0).normal(0, 0.05, atoms.positions.shape)
    res = ev.evaluate(atoms.cell.array, atoms.positions, atoms.numbers)
    moved = atoms.copy()
    moved.positions += [0.13, -0.07, 0.21]
    res2 = ev.evaluate(moved.cell.array, moved.positions, moved.numbers)
    fscale = np.abs(res.forces).max()
    assert np.abs(res.forces.sum(axis=0)).max() < 1e-9 * fscale
    assert np.abs(res2.forces - res.forces).max() < 1e-9 * fscale and abs(res2.energy - res.energy) < 1e-8
    d = 1e-4
    for i, k in ((3, 0), (11, 1), (17, 2), (60, 0)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += d
        minus.positions[i, k] -= d
        fd = -(ev.evaluate(plus.cell.array, plus.positions, plus.numbers).energy
               - ev.evaluate(minus.cell.array, minus.positions, minus.numbers).energy) / (2 * d)
        assert abs(fd - res.forces[i, k]) < 1e-6 * fscale
    ddb = read_ddb(catio3_ddb)
    _, c = unfold_qmesh(ddb)
    w_ddb = np.sort(phonon_frequencies(c[0], ddb.masses))
    w_model = np.sort(phonon_frequencies(harmonic_dynamical_matrices(h, model.reference, np.zeros((1, 3)))[0],
                                         ddb.masses))
    assert np.abs(w_model[:3]).max() < 1.0
    assert np.abs(w_model[3:] - w_ddb[3:]).max() < 0.02 * np.abs(w_ddb).max()     # measured 0.6%
