"""Validation items on the toy perovskite: ground state and double well, model vs a teacher oracle."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sp_server.model.native import load_model
from sp_server.validate.ground_state import double_well, ground_state, model_calculator
from sp_server.validate.run import ValidationSettings, run_validation

TOY = Path(__file__).resolve().parents[2] / "models" / "toy_perovskite.h5"


@pytest.fixture(scope="module")
def toy():
    return load_model(TOY)


@pytest.mark.parametrize("phase, axis", [("R", (1, 1, 1)), ("O", (1, 1, 0)), ("T", (0, 0, 1))])
def test_relaxed_phases_are_polar_along_their_axis_and_below_cubic(toy, phase, axis):
    g = ground_state(toy, model_calculator(toy), "model", phase)
    assert g.converged and g.max_force < 1e-3 and g.max_stress_gpa < 0.05
    assert g.energy_mev < -1.0
    p = np.array(g.polarization)
    unit = np.array(axis, float) / np.linalg.norm(axis)
    assert np.allclose(p / np.linalg.norm(p), unit, atol=1e-4) and g.born_charges == "model Born charges"
    # P from the Born charges: e/V sum_i Z_i u_i
    z = toy.harmonic.born_charges
    u = np.array(g.displacements)
    assert np.allclose(p, np.einsum("iab,ib->a", z, u) / g.volume * 16.02176634, rtol=1e-10)
    if phase == "R":
        assert g.alpha != pytest.approx(90.0, abs=1e-3)


def test_double_well_is_symmetric_with_its_minimum_at_the_ground_state(toy):
    g = ground_state(toy, model_calculator(toy), "model", "R")
    amps = np.linspace(-1.4, 1.4, 29)
    dw = double_well(toy, {"model": model_calculator(toy)}, g.displacements, amps)
    e = np.array(dw.energies["model"])
    assert e[14] == pytest.approx(0.0, abs=1e-9)                   # amplitude 0: the cubic reference
    assert np.allclose(e, e[::-1], atol=1e-8)                       # centrosymmetric reference
    assert abs(abs(amps[np.argmin(e)]) - 1.0) <= 0.1 + 1e-9         # the minimum near the relaxed distortion
    assert min(e) < 0 and min(e) >= g.energy_mev - 1e-6             # strain relaxation lowers it a bit more


def test_validate_command_model_vs_oracle(tmp_path):
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "validate", str(TOY), "--oracle", "model",
                          "--oracle-option", f"path={TOY}", "-o", str(out), "--items", "ground_state",
                          "double_well", "--no-progress"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    by = data["ground_state"]["R"]
    assert set(by) == {"model", "oracle:model"}
    for key in ("a", "alpha", "volume", "energy_mev", "polarization_norm"):   # the same model on both sides
        assert by["model"][key] == pytest.approx(by["oracle:model"][key], rel=1e-9, abs=1e-9)
    dw = data["double_well"]["energies"]
    assert np.allclose(dw["model"], dw["oracle:model"], atol=1e-9)
    for name in ("summary.md", "double_well.png", "double_well.csv"):
        assert (out / name).stat().st_size > 0
    assert "## Ground state, R phase" in (out / "summary.md").read_text()


def test_unknown_item_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown validation item"):
        run_validation(TOY, tmp_path, items=("phonons_typo",))


def test_phonons_of_the_cubic_toy_show_its_soft_mode_and_acoustic_zeros(toy):
    from sp_server.validate.phonons import compare, dispersion
    d = dispersion(toy.supercell((1, 1, 1)), model_calculator(toy), "model", "C")
    f = np.array(d.frequencies)
    assert f.shape == (len(d.distances), 15)
    assert np.sum(np.abs(f[0]) < 0.05) == 3                  # the three acoustic modes at Gamma
    assert f.min() < -1.0                                    # the unstable polar mode of the toy's cubic phase
    same = compare(d, dispersion(toy.supercell((1, 1, 1)), model_calculator(toy), "again", "C"))
    assert same["rms_thz"] < 1e-8 and same["max_thz"] < 1e-8


def test_validate_phonons_item_writes_one_figure_per_phase(tmp_path, toy):
    res = run_validation(TOY, tmp_path, items=("phonons",), phases=("R",), log=lambda m: None)
    assert set(res["phonons"]) == {"C", "R"}
    for phase in ("C", "R"):
        assert (tmp_path / f"phonons_{phase}.png").stat().st_size > 0
    assert "## Phonons, R" in (tmp_path / "summary.md").read_text()


def test_every_item_at_its_smallest_setting(tmp_path):
    """All seven items on the toy, model vs the same model as oracle: every section, figure and table is written
    and the two sides agree."""
    from sp_server.validate.run import ValidationSettings
    from sp_server.validate.transitions import TransitionSettings
    settings = ValidationSettings(transport_mesh=(4, 4, 4), transport_temperatures=(100.0, 300.0, 600.0),
                                  phonon_points=5, double_well_points=7, holdout_frames=3, holdout_supercells=(2,),
                                  transitions=TransitionSettings(supercell=3, temperatures=(50.0, 600.0), steps=60,
                                                                 stride=10, cooling=False))
    res = run_validation(TOY, tmp_path, oracle=model_calculator(load_model(TOY)), oracle_name="model",
                         settings=settings, log=lambda m: None)
    assert res["failed"] == {}
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["items"]) == {"ground_state", "metastable", "phonons", "transport", "transitions",
                                  "double_well", "accuracy"}
    for ph, by in data["metastable"].items():
        assert by["model"]["energy_mev"] == pytest.approx(by["oracle:model"]["energy_mev"], abs=1e-6), ph
    (held,) = data["accuracy"]["sets"]
    assert held["rmse_forces"] < 1e-6 and held["frames"] == 3 and held["name"] == "fresh MD 2^3 300 K"
    assert len(data["transitions"]["stages"]) == 2 and data["transport"]["mesh"] == [4, 4, 4]
    summary = (tmp_path / "summary.md").read_text()
    for title in ("## Ground state", "## Metastable phases", "## Phonons, R", "## Thermal transport",
                  "## Phase transitions", "## Double well", "## Accuracy on held-out sets"):
        assert title in summary
    for name in ("metastable.png", "metastable.csv", "transport.png", "transport.csv", "transitions.png",
                 "transitions.csv", "accuracy_parity_1.png", "accuracy_bayesian_1.png", "phonons_C.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_held_out_sets_from_files_and_fresh_md_each_in_its_row(tmp_path, toy):
    """Every --holdout file and every fresh MD cell is its own set with its own RMSEs and figures; a set that cannot
    be read is reported and the others go on."""
    import ase.io
    from sp_server.validate.accuracy import sample_frames
    frames = sample_frames(TOY, model_calculator(toy), tmp_path / "made", supercell=2, temperature=200.0, frames=4,
                           steps=200, log=lambda m: None)
    ase.io.write(tmp_path / "outside.extxyz", frames)
    cli = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "validate", str(TOY), "--items", "accuracy",
                          "--holdout", str(tmp_path / "outside.extxyz"), "--holdout", str(tmp_path / "missing.extxyz"),
                          "--holdout-md", "-o", str(tmp_path / "cli"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    data = json.loads((tmp_path / "cli" / "results.json").read_text())["accuracy"]
    assert [s["name"] for s in data["sets"]] == ["outside.extxyz"] and data["sets"][0]["frames"] == 4
    assert data["sets"][0]["rmse_forces"] < 1e-6 and "missing.extxyz" in next(iter(data["failed"]))
    summary = (tmp_path / "cli" / "summary.md").read_text()
    assert "| outside.extxyz | 4 |" in summary and "held-out set" in summary and "FAILED" in summary
    # a file and a fresh 2^3 MD, side by side
    settings = ValidationSettings(holdout=(str(tmp_path / "outside.extxyz"),), holdout_supercells=(2,),
                                  holdout_frames=3)
    res = run_validation(TOY, tmp_path / "both", oracle=model_calculator(toy), oracle_name="model",
                         items=("accuracy",), settings=settings, log=lambda m: None)
    names = [s["name"] for s in res["accuracy"]["sets"]]
    assert names == ["outside.extxyz", "fresh MD 2^3 300 K"] and res["failed"] == {}
    assert (tmp_path / "both" / "accuracy_parity_2.png").stat().st_size > 0
    assert ValidationSettings().fresh_holdout_supercells() == (2, 4)
    assert ValidationSettings(holdout="x.extxyz").fresh_holdout_supercells() == ()


def test_a_failing_item_is_reported_and_the_others_go_on(tmp_path):
    res = run_validation(TOY, tmp_path, items=("accuracy", "double_well"), log=lambda m: None)
    assert "accuracy" in res["failed"] and "held-out set" in res["failed"]["accuracy"]
    assert "double_well" in res and (tmp_path / "accuracy.error.txt").exists()
    assert "**accuracy FAILED**" in (tmp_path / "summary.md").read_text()
    cli = subprocess.run([sys.executable, "-m", "sp_server.cli.main", "validate", str(TOY), "--items", "accuracy",
                          "-o", str(tmp_path / "cli"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and "accuracy FAILED" in cli.stdout
