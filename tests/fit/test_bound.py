"""Boundedness check and bounding terms."""
import numpy as np

from sp_server.fit.bound import BoundSettings, bound_model, check_bounded
from sp_server.model import AnharmonicPart, Model

FAST = BoundSettings(n_directions=60, md_steps=150)


def test_toy_model_is_bounded(toy):
    report = check_bounded(toy, FAST)
    assert report.bounded, report
    assert report.md_ok and report.n_failing_directions == 0


def test_unbounded_model_is_detected_and_bounded(toy):
    # keep only the quartic Ti-O term, with the wrong sign: the energy runs to -infinity
    anh = AnharmonicPart([toy.anharmonic.coefficients[0]], [-0.9])
    bad = Model(toy.reference, toy.harmonic, anh, name="unbounded")
    report = check_bounded(bad, FAST)
    assert not report.bounded and report.n_failing_directions > 0
    messages = []
    fixed, report = bound_model(bad, FAST, log=messages.append)
    assert report.bounded, messages
    assert len(fixed.anharmonic) > 1 and np.all(fixed.anharmonic.values[1:] > 0)
    assert fixed.metadata["bounding"]["terms"] == len(fixed.anharmonic) - 1
    assert any("NOT bounded" in m for m in messages)
