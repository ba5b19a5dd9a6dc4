"""Real DDBs other than the BaHfO3 reference (issue 18): files that ABINIT's own tutorials produce, kept under
tests/data with their origin (tests/data/README.md)."""
from pathlib import Path

import numpy as np
import pytest

from sp_server.io.ddb import DDBFormatError, model_from_ddb, phonon_frequencies, read_ddb, unfold_qmesh

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
    the dipole-dipole split is refused with a way out (--no-dipdip); the full force constants reproduce the
    (symmetrised) Gamma-point phonons and keep the acoustic sum rule."""
    ddb = read_ddb(catio3_ddb)
    assert ddb.natoms == 20 and ddb.ngqpt == (2, 2, 2)
    fixes = {f["quantity"]: f for f in ddb.symmetrisation}
    assert 0.02 < fixes["Born charges (their two mixed halves)"]["relative"] < 0.06
    assert fixes["strain-strain tensor"]["relative"] < 1e-5
    with pytest.raises(DDBFormatError, match="--no-dipdip"):
        model_from_ddb(catio3_ddb)
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
