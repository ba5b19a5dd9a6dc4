"""The native model file: exact round trip, and clear errors for malformed or incompatible files."""
import h5py
import numpy as np
import pytest

from sp_server import SecondPrinciplesCalculator
from sp_server.model import ModelFileError, load_model, save_model
from tests.conftest import displaced


def test_round_trip_is_exact(tmp_path, rand_model):
    path = save_model(rand_model, tmp_path / "m.h5")
    back = load_model(path)
    assert back.name == rand_model.name and back.version == rand_model.version
    assert np.array_equal(back.harmonic.ifc, rand_model.harmonic.ifc)
    assert np.array_equal(back.harmonic.born_charges, rand_model.harmonic.born_charges)
    assert back.anharmonic.coefficients == rand_model.anharmonic.coefficients
    assert np.array_equal(back.anharmonic.values, rand_model.anharmonic.values)
    atoms = displaced(rand_model, (2, 2, 1), seed=2)
    e = []
    for m in (rand_model, back):
        a = atoms.copy()
        a.calc = SecondPrinciplesCalculator(m)
        e.append(a.get_potential_energy())
    assert e[0] == e[1]
    with h5py.File(path) as f:  # every dataset states its unit
        units = []
        f.visititems(lambda name, obj: units.append((name, obj.attrs.get("unit"))) if isinstance(obj, h5py.Dataset)
                     else None)
    assert all(u is not None for name, u in units if name != "anharmonic/names")


def test_no_temporary_files_left(tmp_path, toy):
    save_model(toy, tmp_path / "m.h5")
    save_model(toy, tmp_path / "m.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


def _corrupt(path, action):
    with h5py.File(path, "a") as f:
        action(f)


@pytest.mark.parametrize("action,message", [
    (lambda f: f.attrs.__setitem__("format", "something else"), "not an sp_server model"),
    (lambda f: f.attrs.__setitem__("format_version", 99), "format version 99"),
    (lambda f: f.__delitem__("harmonic/elastic"), "missing dataset '/harmonic/elastic'"),
    (lambda f: f.attrs.__delitem__("model_version"), "missing attribute 'model_version'"),
    (lambda f: (f.__delitem__("harmonic/ifc"), f.create_dataset("harmonic/ifc", data=np.zeros((2, 2)))),
     "harmonic ifc: expected shape"),
    (lambda f: f["anharmonic/disp"].__setitem__((0, 0), 17), "atom index 17 outside the reference cell"),
    (lambda f: f["anharmonic/disp"].__setitem__((0, 9), 0), "power must be >= 1"),
    (lambda f: f["anharmonic/disp_offsets"].__setitem__(-1, 3), "disp_offsets inconsistent"),
    (lambda f: f["anharmonic/values"].__setitem__(0, np.nan), "non-finite coefficient values"),
    (lambda f: f["harmonic/elastic"].__setitem__((0, 1), 7.0), "elastic tensor is not symmetric"),
    (lambda f: f.__delitem__("harmonic/epsilon_inf"), "needs both born_charges and epsilon_inf"),
])
def test_malformed_files_give_clear_errors(tmp_path, toy, action, message):
    path = save_model(toy, tmp_path / "bad.h5")
    _corrupt(path, action)
    with pytest.raises(ModelFileError) as err:
        load_model(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_not_hdf5_and_missing(tmp_path):
    bad = tmp_path / "junk.h5"
    bad.write_text("hello")
    with pytest.raises(ModelFileError, match="not an HDF5 model file"):
        load_model(bad)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model(tmp_path / "absent.h5")
