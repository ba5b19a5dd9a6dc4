"""Metastable phases (Table 2): distortion patterns, their space groups, relaxation under symmetry."""
from pathlib import Path

import numpy as np
import pytest

from sp_server.model.native import load_model
from sp_server.otf.structures import PHASES, _cells, phase_structure, polar_patterns, soft_pattern
from sp_server.potential import SupercellPotential
from sp_server.validate.ground_state import ground_state, model_calculator
from sp_server.validate.phases import amplitudes, relax_phase, space_group

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "models" / "toy_perovskite.h5"
BTO = ROOT / "models" / "BaTiO3_chgnet" / "model.h5"


@pytest.fixture(scope="module")
def toy():
    return load_model(TOY)


@pytest.mark.parametrize("path", [TOY, BTO], ids=["toy", "BaTiO3"])
def test_each_pattern_has_its_space_group(path):
    model = load_model(path)
    for name in PHASES:
        assert space_group(phase_structure(model, name)).startswith(name + " ("), name


@pytest.mark.parametrize("q, alpha", [((0, 0, 0), 2), ((0.5, 0, 0), 2), ((0.5, 0.5, 0), 2), ((0, 0.5, 0), 0),
                                      ((0.5, 0, 0.5), 1)])
def test_soft_pattern_is_a_harmonic_eigenmode(toy, q, alpha):
    """Frozen into the 2x2x2 supercell, the pattern's harmonic forces are -omega^2 M u on every atom."""
    mesh = (2, 2, 2)
    p = soft_pattern(toy, q, alpha)
    assert np.abs(p).max() == pytest.approx(1.0) and p[np.argmax(np.abs(p))] > 0
    wave = np.cos(2 * np.pi * _cells(mesh) @ np.asarray(q, float))
    u = np.zeros((8, toy.natoms, 3))
    u[:, :, alpha] = 1e-3 * wave[:, None] * p[None, :]
    pot = SupercellPotential(toy, mesh, parts=("short_range", "dipole_dipole"))
    shape = mesh + (toy.natoms, 3)
    f = -pot.evaluate(u.reshape(shape), np.zeros(6)).grad_u.reshape(8, toy.natoms, 3)
    mu = toy.reference.masses[None, :, None] * u
    w2 = -np.sum(f * u) / np.sum(mu * u)
    assert np.allclose(f, -w2 * mu, atol=1e-9 + 1e-6 * np.abs(f).max())


def test_gamma_patterns_are_the_polar_patterns(toy):
    assert np.allclose(np.abs(polar_patterns(toy)), np.abs([soft_pattern(toy, (0, 0, 0), a) for a in range(3)]))


def test_zone_boundary_transverse_q_only(toy):
    with pytest.raises(ValueError, match="zone-boundary"):
        soft_pattern(toy, (0.25, 0, 0), 2)
    with pytest.raises(ValueError, match="polarisation axis"):     # longitudinal at X: mixes with x, y
        soft_pattern(toy, (0, 0, 0.5), 2)


def test_amplitudes_of_a_pure_wave(toy):
    mesh = (2, 2, 1)
    part = np.random.default_rng(0).normal(size=(toy.natoms, 3))
    for q in [(0.5, 0, 0), (0.5, 0.5, 0), (0, 0, 0)]:
        u = np.cos(2 * np.pi * _cells(mesh) @ np.asarray(q))[:, None, None] * part[None]
        amp = amplitudes(toy, mesh, u)
        assert list(amp) == ["q=(" + ",".join(f"{x:g}" for x in q) + ")"]
        assert next(iter(amp.values())) == pytest.approx(np.linalg.norm(part))


def test_relaxed_phases_of_the_toy(toy):
    calc = model_calculator(toy)
    r3m = relax_phase(toy, calc, "model", "R3m")
    gs = ground_state(toy, calc, "model", "R", fmax=1e-3)
    assert r3m.kept_symmetry and r3m.space_group.startswith("R3m")
    assert r3m.energy_mev == pytest.approx(gs.energy_mev, abs=0.05)
    pmma = relax_phase(toy, calc, "model", "Pmma")
    assert pmma.kept_symmetry and pmma.converged and pmma.energy_mev < 0
    assert set(pmma.amplitudes) == {"q=(0.5,0,0)"}                    # antipolar: no net polar displacement
    # the toy's M-point chain mode is stable: P4/nmm relaxes back to cubic, and the result says so
    p4nmm = relax_phase(toy, calc, "model", "P4/nmm")
    assert not p4nmm.kept_symmetry and p4nmm.space_group.startswith("Pm-3m")
    assert abs(p4nmm.energy_mev) < 1e-3
    with pytest.raises(ValueError, match="unknown phase"):
        relax_phase(toy, calc, "model", "Pnma")
