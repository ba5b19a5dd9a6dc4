"""The loop's calibrated threshold: the Bayesian error scaled by the real/Bayesian ratio measured on the
validation frames (never on the final held-out set), so that a threshold stated as a real error flags frames."""
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from sp_server import SecondPrinciplesCalculator
from sp_server.otf.config import OtfConfig
from sp_server.otf.loop import OnTheFly
from sp_server.potential import Evaluator
from sp_server.model.posterior import ErrorThreshold
from tests.conftest import displaced

CONFIG = """
run_dir = "run"
[oracle]
name = "emt"
[loop]
threshold = "force_max=0.05"
{mode}
"""


def loop(tmp_path, mode='threshold_mode = "calibrated"'):
    path = tmp_path / "otf.toml"
    path.write_text(CONFIG.format(mode=mode))
    return OnTheFly(OtfConfig.load(path), progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def student(fitted_toy):
    return fitted_toy


def labelled(toy, seed, amp):
    atoms = displaced(toy, (2, 2, 2), seed=seed, amp=amp, strain=0.01)
    atoms.calc = SecondPrinciplesCalculator(toy)
    a = atoms.copy()
    a.calc = SinglePointCalculator(a, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                   stress=atoms.get_stress())
    return a


def test_default_mode_is_absolute(tmp_path):
    assert loop(tmp_path, "").config.loop.threshold_mode == "absolute"


@pytest.mark.timeout(300)
def test_calibration_is_the_median_real_over_bayesian_ratio_of_the_validation_frames(tmp_path, toy, student):
    otf = loop(tmp_path)
    frames = [labelled(toy, 500 + k, amp) for k, amp in enumerate((0.05, 0.1, 0.15, 0.2, 0.25))]
    for a in frames:
        otf.store.add(a, state="labeled", role="validation", origin="md")
    # the final held-out set must not move the factor: a frame far out, with an enormous ratio
    otf.store.add(labelled(toy, 600, 0.4), state="labeled", role="validation", origin="holdout")
    otf.store.add(labelled(toy, 601, 0.1), state="labeled", role="train", origin="md")   # not validation

    ev = Evaluator(student)
    ratios = []
    for a in frames:
        res = ev.evaluate(a.cell.array, a.positions, a.numbers, errors=True)
        ratios.append(np.abs(res.forces - a.get_forces()).max() / res.errors["force_max"])
    cal = otf.error_calibration(student)
    assert cal["n"] == 5 and cal["quantity"] == "force_max"
    assert cal["factor"] == pytest.approx(max(1.0, float(np.median(ratios))), rel=1e-9)

    # the threshold the MDs get: the stated real error divided by the factor
    otf.state["error_calibration"] = {"factor": 4.0, "n": 5, "quantity": "force_max"}
    thr = otf._current_threshold()
    assert isinstance(thr, ErrorThreshold) and thr.quantity == "force_max" and thr.value == pytest.approx(0.0125)
    otf.state.pop("error_calibration")
    assert otf._current_threshold().value == pytest.approx(0.05)      # no validation frames yet: as stated


def test_calibration_never_lowers_the_threshold_and_copes_with_no_frames(tmp_path, toy):
    otf = loop(tmp_path)
    assert otf.error_calibration(toy) == {"factor": 1.0, "n": 0, "quantity": "force_max"}


def test_absolute_mode_passes_the_bayesian_threshold_unchanged(tmp_path):
    otf = loop(tmp_path, 'threshold_mode = "absolute"')
    otf.state["error_calibration"] = {"factor": 4.0, "n": 5, "quantity": "force_max"}
    assert otf._current_threshold().value == pytest.approx(0.05)
