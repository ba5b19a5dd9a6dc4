"""Phase transitions from NPT MD ladders (Fig. 6): polarization of a frame, detection, a short ladder end to end."""
from pathlib import Path

import numpy as np
import pytest

from sp_server.model.native import load_model
from sp_server.otf.structures import polar_structure
from sp_server.validate.transitions import (
    Stage,
    TransitionSettings,
    detect,
    frame_polarization,
    phase_transitions,
    plot_transitions,
)

TOY = Path(__file__).resolve().parents[2] / "models" / "toy_perovskite.h5"


def _stage(direction, t, on):
    return Stage(direction, t, t, [0.3] * on + [0.0] * (3 - on), [0, 0, 0], [4, 4, 4], 64.0, on, "RROTC"[3 - on],
                 0.01, 0, "done", 100, 1.0)


def test_detection_on_heating_and_cooling():
    heat = [_stage("heating", t, on) for t, on in [(100, 3), (200, 3), (300, 2), (400, 1), (500, 1), (600, 0)]]
    cool = [_stage("cooling", t, on) for t, on in [(500, 0), (400, 1), (300, 3), (200, 3)]]
    assert detect(heat, "heating") == {"R-O": 250.0, "O-T": 350.0, "T-C": 550.0}
    # cooling starts from the top heating stage (600 K, C): T at 400 K, then straight to R at 300 K
    assert detect(heat + cool, "cooling") == {"R-O": 350.0, "O-T": 350.0, "T-C": 450.0}
    assert detect(heat[:2], "heating") == {"R-O": None, "O-T": None, "T-C": None}


def test_polarization_of_a_frame():
    model = load_model(TOY)
    mesh = (2, 2, 2)
    z = model.harmonic.born_charges
    atoms = polar_structure(model, mesh, "T", 0.1)
    u = (atoms.positions - model.supercell(mesh).positions).reshape(-1, model.natoms, 3)
    expected = np.einsum("iab,Lib->a", z, u) / atoms.get_volume() * 16.02176634
    assert np.allclose(frame_polarization(model, mesh, atoms, z), expected, atol=1e-6)
    assert abs(expected[2]) > 0.05 and np.allclose(expected[:2], 0, atol=1e-9)
    moved = atoms.copy()
    moved.positions += [0.3, -0.2, 0.1]          # a rigid translation carries no polarization
    moved.wrap()
    assert np.allclose(frame_polarization(model, mesh, moved, z), expected, atol=1e-6)


def test_short_ladder_of_the_toy(tmp_path):
    settings = TransitionSettings(supercell=3, temperatures=(30.0, 1500.0), steps=100, stride=10, error_stride=5)
    res = phase_transitions(TOY, tmp_path, settings, log=lambda m: None)
    assert [(s.direction, s.temperature) for s in res.stages] == [("heating", 30.0), ("heating", 1500.0),
                                                                   ("cooling", 30.0)]
    cold = res.stages[0]
    assert cold.status == "done" and cold.frames >= 100 and cold.phase == "R"
    assert min(cold.polarization_sorted) > 0.5 * max(cold.polarization_sorted)   # three comparable components
    assert res.stages[1].polarization_sorted[0] < cold.polarization_sorted[0]      # hotter: less polar
    assert res.stages[1].temperature_md == pytest.approx(1500, rel=0.3)
    assert set(res.temperatures) == {"heating", "cooling"}
    assert (tmp_path / "00_heating_0030.0K" / "md" / "ipi.log").exists()
    plot_transitions(res, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_a_stage_that_leaves_the_trusted_range_stops_the_ladder(tmp_path):
    model = load_model(TOY)
    start = polar_structure(model, (3, 3, 3), "R", 0.1)
    start.positions[7] += [1.6, 0.0, 0.0]       # an atom beyond the server's trusted range (1 A from its site)
    settings = TransitionSettings(supercell=3, temperatures=(30.0, 300.0), steps=50, stride=10)
    messages = []
    res = phase_transitions(TOY, tmp_path, settings, start=start, log=messages.append)
    assert len(res.stages) == 1 and res.stages[0].status == "untrusted"
    assert any("the ladder stops here" in m for m in messages)
    assert res.stages[0].flagged >= 1           # the untrusted frame is kept in the queue for inspection
