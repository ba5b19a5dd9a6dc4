"""Held-out accuracy: RMSEs against labelled frames, unlabelled frames named and left out, fresh MD frames."""
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect

from sp_server.model.native import load_model
from sp_server.units import GPA_EV_A3
from sp_server.validate.accuracy import accuracy, read_frames, sample_frames
from sp_server.validate.ground_state import model_calculator

TOY = Path(__file__).resolve().parents[2] / "models" / "toy_perovskite.h5"


@pytest.fixture(scope="module")
def toy():
    return load_model(TOY)


def _frames(model, n=4, df=0.0, de=0.0, ds=0.0):
    """Frames labelled by the model itself, then shifted: forces by df (every component), energy by de eV/cell,
    stress by ds GPa."""
    calc = model_calculator(model)
    out = []
    rng = np.random.default_rng(1)
    for k in range(n):
        a = model.supercell((2, 2, 2))
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.calc = calc
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e + de * 8, forces=f + df, stress=s + ds * GPA_EV_A3)
        out.append(a)
    return out


def test_known_errors_are_measured(toy):
    acc = accuracy(toy, _frames(toy, df=0.02, de=0.003, ds=0.1), log=lambda m: None)
    assert acc.frames == 4 and not acc.skipped
    assert acc.rmse_forces == pytest.approx(0.02, rel=1e-6)
    assert acc.rmse_energy_mev == pytest.approx(3.0, rel=1e-6)       # meV per 5-atom cell
    assert acc.rmse_stress_gpa == pytest.approx(0.1, rel=1e-6)
    assert np.allclose(acc.actual_force_error, 0.02)
    exact = accuracy(toy, _frames(toy), log=lambda m: None)
    assert exact.rmse_forces < 1e-9 and exact.rmse_energy_mev < 1e-6


def test_unlabelled_and_foreign_frames_are_named_and_left_out(toy, tmp_path):
    frames = _frames(toy, n=3)
    bare = toy.supercell((2, 2, 2))                       # no energy / forces
    bare.info["source"] = "bare frame"
    alien = frames[0].copy()
    alien.calc = frames[0].calc
    alien.positions[0] += 2.5                             # an atom no site claims
    alien.info["source"] = "alien frame"
    messages = []
    acc = accuracy(toy, frames + [bare, alien], log=messages.append)
    assert acc.frames == 3 and len(acc.skipped) == 2
    assert any("bare frame" in m for m in messages) and any("alien frame" in m for m in messages)
    with pytest.raises(ValueError, match="no labelled frame"):
        accuracy(toy, [bare], source="x", log=lambda m: None)


def test_read_frames_from_extxyz_and_a_db_selection(toy, tmp_path):
    frames = _frames(toy, n=3)
    ase.io.write(tmp_path / "h.extxyz", frames)
    assert len(read_frames(tmp_path / "h.extxyz")) == 3
    with connect(tmp_path / "h.db") as db:
        for k, a in enumerate(frames):
            db.write(a, origin="holdout" if k else "md")
    got = read_frames(tmp_path / "h.db", "origin=holdout")
    assert len(got) == 2 and got[0].info["source"].startswith("h.db id=")
    with pytest.raises(ValueError, match="needs an ase.db"):
        read_frames(tmp_path / "h.extxyz", "origin=holdout")
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "missing.extxyz")


def test_fresh_frames_from_model_md_labelled_by_the_oracle(toy, tmp_path):
    frames = sample_frames(TOY, model_calculator(toy), tmp_path, supercell=2, temperature=200.0, frames=4,
                           steps=200, log=lambda m: None)
    assert len(frames) == 4 and (tmp_path / "holdout.extxyz").exists()
    again = ase.io.read(tmp_path / "holdout.extxyz", index=":")
    acc = accuracy(toy, again, log=lambda m: None)
    assert acc.rmse_forces < 1e-6 and acc.rmse_stress_gpa < 1e-6     # the oracle is the model itself
    assert len({round(a.get_potential_energy(), 8) for a in again}) == 4   # distinct frames


def test_calibration_of_bayesian_errors():
    """The calibration numbers say what they promise on constructed cases: a Bayesian error proportional to the
    actual one ranks perfectly, one unrelated to it carries no information, and a threshold counts its flags."""
    from sp_server.otf.report import calibration
    rng = np.random.default_rng(0)
    actual = rng.lognormal(size=400)
    exact = calibration(0.05 * actual, actual, threshold=0.05 * np.quantile(actual, 0.9))
    assert exact["spearman"] == pytest.approx(1.0) and exact["top_quartile_precision"] == 1.0
    assert exact["ratio_median"] == pytest.approx(20.0) and exact["flagged"] == 40
    assert exact["flagged_precision"] == 1.0
    blind = calibration(rng.lognormal(size=400), actual)
    assert abs(blind["spearman"]) < 0.15 and 0.35 < blind["top_quartile_precision"] < 0.65
    assert calibration([0.1, np.nan], [0.2, 0.3]) == {"n": 1}      # too few frames: no verdict
