"""Thermal transport item (Fig. 5) on the relaxed R phase of the toy perovskite, at the smallest settings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import constants

from sp_server.model.native import load_model
from sp_server.validate.ground_state import ground_state, model_calculator
from sp_server.validate.transport import Transport, nac_params, plot_transport, thermal_transport

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "models" / "toy_perovskite.h5"
TEMPS = (100.0, 200.0, 300.0, 600.0, 1000.0, 2000.0)
MESH = (4, 4, 4)
DULONG_PETIT = 15 * constants.R          # J/(K mol) for a 5-atom cell


@pytest.fixture(scope="module")
def toy_model():
    return load_model(TOY)


@pytest.fixture(scope="module")
def transport(toy_model) -> Transport:
    calc = model_calculator(toy_model)
    g = ground_state(toy_model, calc, "model", "R")
    return thermal_transport(g.structure.copy(), calc, mesh=MESH, temperatures=TEMPS, nac=nac_params(toy_model),
                             progress=False)


def test_nac_params_follow_phonopy_convention(toy_model):
    nac = nac_params(toy_model)
    assert np.allclose(nac["born"], toy_model.harmonic.born_charges)          # Z[i, g, a] = dP_g/du_a as is
    assert np.allclose(nac["dielectric"], toy_model.harmonic.epsilon_inf)
    coulomb = constants.e / (4 * np.pi * constants.epsilon_0 * constants.angstrom)   # e^2/(4 pi eps0) in eV A
    assert nac["factor"] == pytest.approx(coulomb, rel=1e-5)
    assert nac_params(load_model(ROOT / "models" / "BaTiO3_chgnet" / "model.h5")) is None


def test_shapes_and_bookkeeping(transport):
    t = transport
    nt = len(TEMPS)
    assert t.temperatures == list(TEMPS) and t.mesh == list(MESH) and t.supercell == [2, 2, 2] and t.nac
    assert len(t.kappa_particle) == len(t.kappa_wave) == len(t.heat_capacity) == nt
    assert np.shape(t.kappa_tensor_particle) == np.shape(t.kappa_tensor_wave) == (nt, 6)
    f, v, w = np.array(t.frequencies), np.array(t.group_velocities), np.array(t.weights)
    assert f.shape == v.shape and f.shape[1] == 15 and len(w) == len(f) and w.sum() == np.prod(MESH)
    assert t.imaginary_modes == int(((f < -0.05) * w[:, None]).sum())
    assert t.displaced_supercells > 0 and t.t_ref == 300.0
    # group velocities in km/s: a perovskite's sound and optical-branch velocities are a few km/s
    assert 1.0 < v.max() < 20.0


def test_heat_capacity_rises_to_dulong_petit(transport):
    cv = np.array(transport.heat_capacity)
    assert np.all(np.diff(cv) > 0)
    assert 0.97 * DULONG_PETIT < cv[-1] < DULONG_PETIT                     # 2000 K
    assert cv[0] < 0.5 * DULONG_PETIT                                       # 100 K: far from classical


def test_heat_capacity_agrees_with_phonopy(transport):
    """Independent harmonic Cv: phonopy with the same fc2, NAC and (Gamma-centred) mesh, J/(K mol) per cell."""
    from phonopy import Phonopy
    ph3 = transport.phono3py
    ph = Phonopy(ph3.unitcell, supercell_matrix=ph3.supercell_matrix, primitive_matrix=np.eye(3), log_level=0)
    ph.force_constants = ph3.fc2
    ph.nac_params = ph3.nac_params
    ph.run_mesh(list(MESH), is_gamma_center=True)
    ph.run_thermal_properties(temperatures=TEMPS, cutoff_frequency=1e-4)
    ref = ph.thermal_properties.heat_capacity
    assert np.allclose(transport.heat_capacity, ref, rtol=1e-5)


def test_kappa_decreases_with_a_sensible_power_law(transport):
    t = transport
    kp, kw = np.array(t.kappa_particle), np.array(t.kappa_wave)
    total = np.array(t.kappa_total)
    assert np.all(kp > 0) and np.all(np.isfinite(kw))
    assert np.all(np.diff(total[np.array(TEMPS) >= 300]) < 0)
    assert 0.5 < t.exponent < 1.5 and t.prefactor > 0
    # the fit reproduces kappa at the temperatures it was made on to within a factor 1.5
    fit = t.prefactor * np.array(TEMPS) ** -t.exponent
    assert np.all(np.abs(np.log(fit / total)) < np.log(1.5))
    # the mean of the diagonal is what the tensors say
    assert np.allclose(kp, np.array(t.kappa_tensor_particle)[:, :3].mean(axis=1), rtol=1e-12)
    assert np.allclose(kw, np.array(t.kappa_tensor_wave)[:, :3].mean(axis=1), rtol=1e-12)


def test_kappa_tensor_has_the_rhombohedral_symmetry(transport):
    """R phase polar along [111]: the 3-fold axis makes xx = yy = zz and yz = xz = xy."""
    for tensor in (transport.kappa_tensor_particle, transport.kappa_tensor_wave):
        k = np.array(tensor)
        scale = np.abs(k).max()
        assert np.allclose(k[:, :3], k[:, :1], atol=1e-6 * scale)
        assert np.allclose(k[:, 3:], k[:, 3:4], atol=1e-6 * scale)


def test_particle_kappa_is_phono3py_standard_rta(transport):
    """The band-diagonal of the Wigner (SMM19) kappa is phono3py's plain RTA conductivity (same gammas)."""
    from phono3py import Phono3py
    src = transport.phono3py
    ph3 = Phono3py(src.unitcell, supercell_matrix=src.supercell_matrix, primitive_matrix=np.eye(3), log_level=0)
    ph3.fc3, ph3.fc2, ph3.nac_params = src.fc3, src.fc2, src.nac_params
    ph3.mesh_numbers = list(MESH)
    ph3.init_phph_interaction()
    ph3.run_thermal_conductivity(is_LBTE=False, temperatures=[300.0], write_kappa=False)
    std = ph3.thermal_conductivity.kappa[0, 0]
    assert np.allclose(transport.kappa_tensor_particle[TEMPS.index(300.0)], std, rtol=1e-8, atol=1e-10)


def test_cumulative_kappa_against_mean_free_path(transport):
    from phono3py.conductivity.utils import get_mfp
    c = transport.mfp_cumulative
    mfp, cum = np.array(c["mfp_nm"]), np.array(c["kappa"])
    kp300 = transport.kappa_particle[TEMPS.index(300.0)]
    assert cum[-1] == pytest.approx(kp300, rel=1e-6)
    assert np.all(np.diff(mfp) >= 0) and np.all(np.diff(cum) >= -1e-12 * kp300)
    assert 0.0 <= c["fraction_below_40nm"] <= 1.0
    assert mfp[0] <= c["mfp_90_percent_nm"] <= mfp[-1]
    assert cum[np.searchsorted(mfp, c["mfp_90_percent_nm"])] >= 0.9 * kp300
    # MFP = |v| tau with phono3py's own convention (A -> nm)
    tc = transport.phono3py.thermal_conductivity
    ref = get_mfp(np.asarray(tc.gamma)[0, TEMPS.index(300.0)], np.asarray(tc.group_velocities)) / 10
    assert np.allclose(np.sort(ref.ravel()), mfp, rtol=1e-10, atol=1e-12)


def test_as_dict_is_json_and_plot_is_written(transport, tmp_path):
    d = transport.as_dict()
    assert "phono3py" not in d and d["kappa_total"] == transport.kappa_total
    back = json.loads(json.dumps(d))
    assert back["heat_capacity"] == transport.heat_capacity
    png = plot_transport(transport, tmp_path / "transport.png")
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temperatures_must_be_positive(toy_model):
    with pytest.raises(ValueError):
        thermal_transport(toy_model.supercell((1, 1, 1)), model_calculator(toy_model), temperatures=(0, 300))
